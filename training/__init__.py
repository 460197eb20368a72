"""Things that produce weights, one subpackage per capability: :mod:`.lora` (LoRA training), :mod:`.esd` (ESD / UCE
concept erasure), :mod:`.merge` (checkpoint merging). What they share stays here: the host protocol
(:mod:`.host`, :mod:`.conditioning`, :mod:`.families`, :mod:`.flow`), the hosts and their loaders
(:mod:`.diffusers_host`, :mod:`.flux_host` with :mod:`.flux_fused`, :mod:`.model_loading`, :mod:`.flux_loading`,
:mod:`.quantize`, :mod:`.block_swap`) and the multi-process launcher support (:mod:`.distributed`). Host-neutral: never
imports ComfyUI."""
