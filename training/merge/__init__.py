"""Checkpoint merging: merge methods over tensors, per-block weights, streaming file merges of two/three and N
models, input hashing, recipes and the ``merge`` CLI. Submodules are imported on use (this file imports nothing, so
``import conceptlab`` stays free of torch)."""
