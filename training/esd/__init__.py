"""Concept erasure: ESD (Gandikota et al. 2023) with grid masks and UCE (Gandikota et al. 2024), their settings,
prompts, objectives, parameter selections, output files and CLIs. Submodules are imported on use (this file imports
nothing, so ``import conceptlab`` stays free of torch)."""
