"""LoRA training with kohya semantics: the training loop and its configuration, loss, optimizer, per-epoch
report and output files; the LoRA / LoCon / LyCORIS networks; kohya datasets and captions; LoRA extraction and
resizing; and the ``train`` / ``quickstart`` / ``extract`` CLIs. Submodules are imported on use (this file
imports nothing, so ``import conceptlab`` stays free of torch)."""
