"""Things that produce weights: LoRA trainer, ESD eraser, merging. Host-neutral: never imports ComfyUI."""
