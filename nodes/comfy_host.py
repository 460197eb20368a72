"""ComfyHost: the training host protocol (:class:`~conceptlab.training.host.DiffusionHost`) over ComfyUI's own MODEL /
CLIP / VAE objects, so the trainers of ``training/`` run inside ComfyUI unchanged.

Its parts live beside it in the ComfyUI bridge: key maps and family detection in :mod:`.comfy_keys`, the delta gate,
clone-input hooks and block checkpointing in :mod:`.comfy_hooks`, loading and patch helpers (and ComfyUI's sampler)
in :mod:`.comfy_patchers`; folders, progress and IMAGE conversion for every node in :mod:`.comfy_io`. ComfyUI is
imported inside functions only, so node classes import without it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..training.conditioning import Conditioning
from ..training.families import family
from ..training.host import DeltaModule, DiffusionHost, OutputDeltaHook, check_delta_space
from .comfy_hooks import DeltaGate, checkpoint_block, clone_input_hook, inplace_norms
from .comfy_keys import arch_of, strip_attr, te_prefixes, te_root, unet_module_maps
from .comfy_patchers import load_patcher, sample_images, to_normal, unload_patcher


class ComfyHost(DiffusionHost):
    """:class:`~conceptlab.training.host.DiffusionHost` over ComfyUI's MODEL / CLIP / VAE objects.

    Args:
        model: a ComfyUI ``ModelPatcher`` (MODEL) of a UNet family (SD1.x, SD2.x, SDXL base; not the refiner) or
            Flux.1 (``model_base.Flux``: dev, schnell; any weight dtype, fp8 included).
            The host works on ``model.clone()``: the input patcher and its patches are never changed.
        clip: optional ComfyUI ``CLIP`` (cloned too); needed by :meth:`encode_prompts`, :meth:`sample`, and
            text-encoder deltas.
        vae: optional ComfyUI ``VAE``; needed by :meth:`encode_images`, :meth:`decode_latents`, :meth:`sample`.

    Mechanics: trainable deltas act in activation space by default (``delta_space="activation"``,
    training/host.py): a forward hook (:class:`~conceptlab.training.host.OutputDeltaHook`) on each adapted layer
    adds ``F.linear(x, ΔW)`` (LoRA ``((x·downᵀ)·upᵀ)·scale``) to the layer's output, whatever ComfyUI does to
    compute the layer itself (full load, lowvram casting, fp8 / manual-cast weights, its own key patches). The
    module tree is shared by every clone of the MODEL, so the hooks exist only between :meth:`install_delta` and
    :meth:`clear_deltas` / :meth:`close`, and act only inside calls made through this host's patcher (a gate set by
    :meth:`predict`, the text encoding, and a ``DIFFUSION_MODEL`` wrapper on the patcher for ComfyUI's sampler;
    :class:`.comfy_hooks.DeltaGate`); gradient checkpointing carries the gate into its recomputation. With
    ``delta_space="weight"`` the deltas are ``ModelPatcher.add_weight_wrapper`` functions instead (ComfyUI's own
    TrainLoraNode mechanism, ``comfy_extras/nodes_train.py``), applied on the fly by ComfyUI's cast ops to a copy
    of each weight. The model is loaded with ``comfy.model_management.load_models_gpu``; training runs under
    ``torch.inference_mode(False)`` (every method that may build a graph enters it) with inputs cloned out of
    inference mode. :meth:`predict` goes through the model's own ``apply_model`` with ``extra_conds`` inputs (as
    ComfyUI's sampler does) and returns the raw ε / v output captured inside that call (``apply_model`` itself
    returns denoised x0). The schedule: ``alphas_cumprod = 1 / (1 + σ²)``
    from ComfyUI's discrete ``model_sampling.sigmas`` (σ_t = sqrt((1−ᾱ_t)/ᾱ_t), Karras et al. 2022 §C.1).
    Call :meth:`close` when done (or use the host as a context manager).

    Flux (``prediction_type = "flow"``, :attr:`flow` True) follows the flow conventions of training/host.py:
    σ timesteps through the model's own CONST ``model_sampling``, BFL module paths (ComfyUI's own tree),
    components ``unet``, ``te1`` (CLIP-L) and ``t5`` (T5-XXL), ``alphas_cumprod`` empty.

    Raises ``ValueError`` for other models (EDM, SD3, Chroma, video DiTs ...), non-discrete sampling on a UNet,
    the SDXL refiner, or a CLIP whose text encoders are not the model family's.
    """

    def __init__(self, model, clip=None, vae=None, delta_space: str = "activation"):
        import comfy.model_sampling as cms

        self.delta_space = check_delta_space(delta_space)
        self._gate = DeltaGate()
        self._act_hooks: dict[int, OutputDeltaHook] = {}
        self._weight_space: dict[tuple[str, str, str], bool] = {}

        self.patcher = model.clone()
        self.clip = clip.clone() if clip is not None else None
        self.vae = vae
        self._orig_wrappers = {k: list(v) for k, v in self.patcher.weight_wrapper_patches.items()}
        self._clip_orig_wrappers = ({k: list(v) for k, v in self.clip.patcher.weight_wrapper_patches.items()}
                                    if self.clip is not None else {})
        base = self.patcher.model
        self.arch = arch_of(base)
        self.flow = family(self.arch).objective == "flow" if self.arch != "unknown" else False
        if self.flow:
            # ComfyUI's Flux module tree is BFL's own, which is the canonical naming of the flow families
            # (training/host.py): every Linear of the diffusion model under its own path
            dm = base.diffusion_model
            paths = [n for n, m in dm.named_modules() if isinstance(m, nn.Linear) and n]
            self._d2l = {p: p for p in paths}
            self._l2d = dict(self._d2l)
        else:
            self._d2l, self._l2d = unet_module_maps(base.model_config.unet_config)
        self._te = te_prefixes(self.clip) if self.clip is not None else {}
        if self.clip is not None and self.arch != "unknown":
            want = family(self.arch).text_encoders
            if tuple(sorted(self._te)) != tuple(sorted(want)):
                raise ValueError(f"the CLIP has text encoder(s) {sorted(self._te)} but this {self.arch.upper()} "
                                 f"MODEL needs {list(want)}: load the CLIP from the same checkpoint as the model"
                                 + (" (Flux: DualCLIPLoader type flux with clip_l and t5xxl)" if self.flow else ""))

        ms = self.patcher.get_model_object("model_sampling")
        if self.flow:
            if not isinstance(ms, cms.CONST):
                raise ValueError(f"{type(ms).__name__}: a Flux model must use flow (CONST) model sampling")  # noqa: TRY004
            self.prediction_type = "flow"
            # unused by flow families (timesteps are sigmas, training/host.py); an empty table, never a wrong one
            self.alphas_cumprod = torch.zeros(0)
        else:
            if not isinstance(ms, cms.ModelSamplingDiscrete) or isinstance(ms, cms.ModelSamplingDiscreteEDM):
                msg = f"{type(ms).__name__}: only discrete DDPM-schedule models (SD1.x/SD2.x/SDXL) and Flux are supported"
                raise ValueError(msg)  # noqa: TRY004 - an unsupported model, not a wrong argument type
            if isinstance(ms, cms.V_PREDICTION):
                self.prediction_type = "v_prediction"
            elif isinstance(ms, cms.EPS) and not isinstance(ms, (cms.X0, cms.CONST)):
                self.prediction_type = "epsilon"
            else:
                raise ValueError(f"unsupported prediction type {type(ms).__mro__[1].__name__}")  # noqa: TRY004
            self._set_alphas_from(ms)

        self.device = torch.device(self.patcher.load_device)
        self.dtype = base.manual_cast_dtype or base.get_dtype()
        self.latent_channels = int(base.latent_format.latent_channels)
        self.vae_scale = int(getattr(vae, "downscale_ratio", 8)) if vae is not None else 8
        self._deltas: dict[tuple[str, str, str], DeltaModule] = {}
        self._hooks: list = []
        self._unet_hooks: list = []

    def _set_alphas_from(self, ms) -> None:
        with torch.inference_mode(False):  # usable by training code outside inference mode
            sigmas = ms.sigmas.detach().to("cpu", torch.float64).clone()
            self.alphas_cumprod = (1.0 / (1.0 + sigmas ** 2)).float()

    def unet_ldm_paths(self) -> dict[str, str]:
        """Diffusers → LDM UNet module paths of the loaded model, from ComfyUI's ``comfy.utils.unet_to_diffusers``
        on the model's own ``unet_config``."""
        return dict(self._d2l)

    def configure_text(self, clip_skip: int | None = None, max_token_length: int | None = None) -> list[str]:
        """kohya ``clip_skip`` through ComfyUI's own **CLIP Set Last Layer** (``clip.clip_layer(-clip_skip)``: the
        layer's output with the final layer norm, kohya's semantics) on this host's CLIP clone; SDXL ignores it, as
        kohya's SDXL trainer does. ``max_token_length``: ComfyUI encodes any caption in 75-token chunks (no 75/150/225
        truncation), which is how the LoRA will be used in ComfyUI; a non-default value is reported back as having
        no effect here (the CLI's diffusers host applies kohya's chunking exactly)."""
        msgs = super().configure_text(clip_skip, max_token_length)
        if self.max_token_length is not None:
            msgs.append(f"max_token_length = {self.max_token_length}: inside ComfyUI captions are encoded the way "
                        "ComfyUI encodes prompts (75-token chunks, never truncated); use the CLI for kohya's "
                        "150/225-token truncation")
        if self.clip_skip not in (None, 1):
            if self.arch == "sdxl":
                msgs.append("clip_skip has no effect on SDXL (kohya's SDXL trainer always uses the penultimate "
                            "layers of both text encoders)")
                self.clip_skip = None
            elif self.flow:
                msgs.append("clip_skip has no effect on Flux (it reads CLIP-L's pooled output and T5's last layer, "
                            "as kohya's flux_train_network.py does)")
                self.clip_skip = None
            elif self.clip is not None:
                self.clip.clip_layer(-self.clip_skip)
        return msgs

    def configure_schedule(self, prediction_type: str | None = None, zero_terminal_snr: bool = False) -> None:
        """Patch the clone's ``model_sampling`` as ComfyUI's own **ModelSamplingDiscrete** node does
        (``comfy_extras/nodes_model_advanced.py``: ``ModelSamplingDiscrete`` × ``EPS``/``V_PREDICTION`` with
        ``zsnr``), so training, erasure and ComfyUI's sampler all use it; :attr:`alphas_cumprod` follows.

        ComfyUI's zero-terminal-SNR table (``rescale_zero_terminal_snr_sigmas``) keeps the last ᾱ at 4.897e-8
        instead of kohya's exact 0 (σ must stay finite); the schedules agree elsewhere. Raises ``ValueError`` for
        an unknown prediction type. Flow models (Flux) keep their own ``model_sampling``: ``None``/``"flow"`` with no
        zero-terminal-SNR is accepted unchanged, and ε / v or zero-terminal SNR are refused by name
        (``ValueError``).
        """
        import comfy.model_sampling as cms

        if self.flow:
            if prediction_type not in (None, "flow"):
                raise ValueError(f"prediction_type {prediction_type!r} does not apply to {self.arch}: it is a "
                                 "rectified-flow model (velocity prediction); remove v_parameterization / "
                                 "prediction_type from the settings")
            if zero_terminal_snr:
                raise ValueError(f"zero_terminal_snr does not apply to {self.arch}: its flow schedule already ends "
                                 "at pure noise (σ = 1)")
            return
        if prediction_type not in (None, "epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
        pred = prediction_type or self.prediction_type
        current = self.patcher.get_model_object("model_sampling")
        if pred == self.prediction_type and bool(zero_terminal_snr) == bool(getattr(current, "zsnr", False)):
            return
        kind = cms.V_PREDICTION if pred == "v_prediction" else cms.EPS

        class ModelSamplingAdvanced(cms.ModelSamplingDiscrete, kind):
            pass

        ms = ModelSamplingAdvanced(self.patcher.model.model_config, zsnr=bool(zero_terminal_snr))
        self.patcher.add_object_patch("model_sampling", ms)
        self.prediction_type = pred
        self._set_alphas_from(ms)

    # -- context manager / cleanup ------------------------------------------------------------------------
    def __enter__(self) -> ComfyHost:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove every installed delta, unload this host's patched models and free cached memory."""
        import comfy.model_management as mm

        self.set_gradient_checkpointing(False)
        self.clear_deltas()
        unload_patcher(self.patcher)
        if self.clip is not None:
            unload_patcher(self.clip.patcher)
        mm.soft_empty_cache()

    def set_gradient_checkpointing(self, on: bool) -> None:
        """Turn activation (gradient) checkpointing of the diffusion model on or off, with ComfyUI's own helpers
        from ``comfy_extras/nodes_train.py`` (``find_all_highest_child_module_with_forward`` + ``patch`` /
        ``unpatch``: each top-level block's forward runs under ``torch.utils.checkpoint``), as ComfyUI's
        TrainLoraNode does. The blocks belong to the shared model, so :meth:`close` always turns it off again.

        Flux: the checkpointed units are the transformer blocks (``double_blocks.N`` and ``single_blocks.N``, where
        the activations are; kohya ``library/flux_models.py`` checkpoints the same units), not the small input
        embedders that ComfyUI's helper would also wrap, and each block runs on a private copy of its stream inputs
        (:func:`.comfy_hooks.checkpoint_block_copying_inputs`): ComfyUI's Flux blocks add residuals into their *input*
        tensors in place (``txt += ...``, ``x += ...``), so with ComfyUI's plain ``patch`` the recomputation in backward
        reads already-updated inputs and the gradients are wrong (measured: tests/test_comfy_host_flux.py)."""
        from comfy_extras import nodes_train

        dm = self.patcher.model.diffusion_model
        if self.flow:
            blocks = [*dm.double_blocks, *dm.single_blocks]
        else:
            blocks = nodes_train.find_all_highest_child_module_with_forward(dm)
        for m in blocks:
            if on and not hasattr(m, "org_forward"):
                # ComfyUI's nodes_train.patch, plus the delta gate's state carried into the recomputation
                checkpoint_block(m, self._gate, copy_inputs=self.flow)
            elif not on:
                nodes_train.unpatch(m)

    # -- names ----------------------------------------------------------------------------------------------
    def components(self) -> list[str]:
        return ["unet", *self._te]

    def _patcher_for(self, component: str):
        if component == "unet":
            return self.patcher
        if component in self._te:
            return self.clip.patcher
        if self.clip is None and component.startswith("te"):
            raise ValueError(f"component {component!r} needs a CLIP: pass clip= to ComfyHost")
        raise ValueError(f"unknown component {component!r}; this host has {self.components()}")

    def model_key(self, component: str, path: str, attr: str = "weight") -> str:
        """This host's ComfyUI patch key for a canonical path (see :func:`.comfy_keys.model_key`); ``ValueError`` if
        unknown."""
        if attr not in ("weight", "bias"):
            raise ValueError(f"attr must be 'weight' or 'bias', got {attr!r}")
        if component == "unet":
            if path not in self._d2l:
                raise ValueError(f"{path!r} is not a UNet module path of this model")
            return f"diffusion_model.{self._d2l[path]}.{attr}"
        self._patcher_for(component)
        root = te_root(component)
        if not path.startswith(root):
            raise ValueError(f"{component} paths start with {root!r}, got {path!r}")
        return f"{self._te[component]}{path}.{attr}"

    def modules(self, component: str) -> dict[str, nn.Module]:
        """Leaf Linear/Conv2d modules keyed by canonical path: UNet diffusers paths (Flux: BFL paths such as
        ``double_blocks.0.img_attn.qkv``), CLIP ``text_model.*``, T5 ``encoder.block.N.*``."""
        if component == "unet":
            dm = self.patcher.model.diffusion_model
            out = {}
            for lpath, m in dm.named_modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and lpath in self._l2d:
                    out[self._l2d[lpath]] = m
            return out
        self._patcher_for(component)
        prefix = self._te[component]
        root = prefix + te_root(component)
        out = {}
        for name, m in self.clip.cond_stage_model.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and name.startswith(root):
                out[name[len(prefix):]] = m
        return out

    # -- deltas ---------------------------------------------------------------------------------------------
    def install_delta(self, component: str, path: str, attr: str, delta: DeltaModule) -> None:
        """Apply ``delta`` to ``<component>.<path>.<attr>``: an entry of the layer's forward hook (activation space,
        the default) or a ComfyUI weight wrapper (``delta_space="weight"``); see the class docstring.

        Raises ``ValueError`` for unknown targets, a delta whose shape differs from the target tensor, or a delta
        already installed there. Deltas meant for training must be created inside ``torch.inference_mode(False)``
        (parameters made in inference mode work for sampling but cannot be trained).
        """
        import comfy.utils

        key = self.model_key(component, path, attr)
        patcher = self._patcher_for(component)
        if (component, path, attr) in self._deltas:
            raise ValueError(f"a delta is already installed on {component}.{path}.{attr}")
        target = comfy.utils.get_attr(patcher.model, key)
        if target is None:
            raise ValueError(f"{component}.{path} has no {attr}")
        shape = getattr(delta, "weight_shape", None)  # LoRA: its declared shape (delta() is 0-d while dropped out)
        if shape is None:
            with torch.no_grad():
                shape = delta.delta().shape
        shape = tuple(shape)
        if shape != tuple(target.shape):
            raise ValueError(f"delta shape {shape} does not match {component}.{path}.{attr} {tuple(target.shape)}")
        if check_delta_space(self.delta_space) == "activation":
            import comfy.patcher_extension as pe

            layer = comfy.utils.get_attr(patcher.model, key.rpartition(".")[0])
            hook = self._act_hooks.get(id(layer))
            if hook is None:
                hook = self._act_hooks[id(layer)] = OutputDeltaHook(self._gate).register(layer)
            hook.entries.append((attr, delta, None))
            self._weight_space[(component, path, attr)] = False
            if component == "unet":
                self.patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas")
                self.patcher.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas",
                                                  self._gate.wrapper)
        else:
            patcher.add_weight_wrapper(key, delta)
            self._weight_space[(component, path, attr)] = True
        self._deltas[(component, path, attr)] = delta
        if component != "unet" and not self._hooks:
            for m in self.clip.cond_stage_model.modules():
                for ln in inplace_norms(m):
                    self._hooks.append(ln.register_forward_pre_hook(clone_input_hook))
        if component == "unet" and self.flow and not self._unet_hooks:
            for m in self.patcher.model.diffusion_model.modules():
                for ln in inplace_norms(m):
                    self._unet_hooks.append(ln.register_forward_pre_hook(clone_input_hook))

    def clear_deltas(self) -> None:
        """Remove every delta this host installed (from the patchers and from the loaded modules)."""
        import comfy.utils

        import comfy.patcher_extension as pe

        for hnd in self._hooks + self._unet_hooks:
            hnd.remove()
        self._hooks.clear()
        self._unet_hooks.clear()
        for hook in self._act_hooks.values():
            hook.remove()
        self._act_hooks.clear()
        self.patcher.remove_wrappers_with_key(pe.WrappersMP.DIFFUSION_MODEL, "conceptlab_deltas")
        self._weight_space.clear()
        if not self._deltas:
            return
        ours = {id(d) for d in self._deltas.values()}
        for patcher, orig in ((self.patcher, self._orig_wrappers),
                              (self.clip.patcher if self.clip is not None else None, self._clip_orig_wrappers)):
            if patcher is None:
                continue
            for key in list(patcher.weight_wrapper_patches):
                path, attr = strip_attr(key)
                try:
                    mod = comfy.utils.get_attr(patcher.model, path)
                except AttributeError:
                    mod = None
                lst_name = "weight_function" if attr == "weight" else "bias_function"
                if mod is not None and lst_name in vars(mod):  # only instance lists, never the class default
                    setattr(mod, lst_name, [f for f in vars(mod)[lst_name] if id(f) not in ours])
            patcher.weight_wrapper_patches = {k: list(v) for k, v in orig.items()}
            import uuid

            patcher.patches_uuid = uuid.uuid4()  # force a clean reload next time
        self._deltas.clear()

    def installed_deltas(self) -> dict[tuple[str, str, str], DeltaModule]:
        return dict(self._deltas)

    def delta_wrappers(self, which) -> dict[str, list[DeltaModule]]:
        """``{ComfyUI key: [delta]}`` of the activation-space deltas installed on ``which`` (this host's MODEL
        patcher, its CLIP or the CLIP's patcher), for baking them in weight space
        (``iter_patched_weights(which, keys, extra_wrappers=...)``; weight-space deltas are already the patcher's
        own weight wrappers)."""
        clip_side = which is not self.patcher
        out: dict[str, list[DeltaModule]] = {}
        for (comp, path, attr), d in self._deltas.items():
            if (comp != "unet") == clip_side and not self._weight_space.get((comp, path, attr), False):
                out.setdefault(self.model_key(comp, path, attr), []).append(d)
        return out

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the patched UNet (and CLIP) on the compute device with the deltas active (cheap if loaded)."""
        load_patcher(self.patcher, self.patcher.model.diffusion_model, "diffusion_model.")

    def _load_clip(self) -> None:
        if self.clip is None:
            raise ValueError("this operation needs a CLIP: pass clip= to ComfyHost")
        load_patcher(self.clip.patcher, self.clip.cond_stage_model, "")

    # -- conditioning, prediction, VAE ------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The :class:`~conceptlab.training.conditioning.Conditioning` of ``prompts`` from the CLIP object's own
        tokenizer and ``encode_from_tokens(..., return_pooled=True)`` (prompt weighting syntax works):
        ``context`` ``[B, 77·k, D]`` (k = 1 unless a prompt needs more 77-token chunks; shorter ones are repeated
        to the common length as ComfyUI's conditioning batching does) in the compute dtype on :attr:`device`, and
        ``pooled`` ``[B, P]`` for families that use it (SDXL: OpenCLIP-G's projected pooled output). Flux: ``context``
        is T5-XXL's last hidden state ``[B, L, 4096]`` (L ≥ 256, ComfyUI's Flux T5 minimum; a batch is padded with
        T5 pad tokens to its longest prompt) and ``pooled`` CLIP-L's pooled output ``[B, 768]`` (ComfyUI
        ``FluxClipModel.encode_token_weights``). Differentiable when text-encoder deltas are installed and grad is
        enabled. ``ValueError`` without CLIP.
        """
        self._load_clip()
        rows = []
        use_pooled = family(self.arch).pooled if self.arch != "unknown" else True
        with torch.inference_mode(False):
            toks = [self.clip.tokenize(str(p)) for p in prompts]
            if "t5" in self._te:
                # T5 sequences are not chunked: a batch is padded with T5 pad tokens to its longest prompt through
                # ComfyUI's own tokenizer option (what ComfyUI encodes for a longer min_length), never repeated
                n = max((sum(len(b) for b in t.get("t5xxl", [])) for t in toks), default=0)
                toks = [t if sum(len(b) for b in t.get("t5xxl", [])) == n else
                        self.clip.tokenize(str(p), tokenizer_options={"t5xxl_min_length": n})
                        for p, t in zip(prompts, toks)]
            for tokens in toks:
                with self._gate.on():
                    cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
                rows.append(Conditioning(cond, pooled if use_pooled else None))
            return Conditioning.cat(rows).to(self.device, self.dtype)

    #: how the host-neutral Conditioning feeds ComfyUI's ``BaseModel.extra_conds`` keyword arguments (the names
    #: ``comfy/samplers.py`` ``encode_model_conds`` passes from a CONDITIONING entry)
    _SIZE_KWARGS = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")

    def _model_conds(self, cond: Conditioning, x: torch.Tensor) -> dict:
        """ComfyUI model inputs (``c_crossattn``, ``y``, ``guidance``, ...) for ``cond``, built row by row with the
        model's own ``extra_conds`` (SDXL: ``encode_adm`` from ``pooled_output`` and the six size ids) and
        concatenated along the batch, as ComfyUI's sampler does for a batch of conditionings."""
        base = self.patcher.model
        per_key: dict[str, list] = {}
        for i in range(len(cond)):
            params = {"cross_attn": cond.context[i:i + 1], "device": x.device, "noise": x[i:i + 1],
                      "prompt_type": "positive", "width": x.shape[-1] * 8, "height": x.shape[-2] * 8}
            if cond.pooled is not None:
                params["pooled_output"] = cond.pooled[i:i + 1]
            ids = cond.extras.get("size_ids")
            if ids is not None:
                params.update({k: int(round(float(v))) for k, v in zip(self._SIZE_KWARGS, ids[i].tolist())})
            if "guidance" in cond.extras:
                params["guidance"] = float(cond.extras["guidance"][i])
            for k, v in base.extra_conds(**params).items():
                per_key.setdefault(k, []).append(v.process_cond(batch_size=1, device=x.device).cond)
        return {k: torch.cat([to_normal(t) for t in v]) for k, v in per_key.items()}

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning | torch.Tensor) -> torch.Tensor:
        """Raw network output ``[B, C, h, w]`` (ε, v or flow velocity, compute dtype) through ComfyUI's own model call.

        DDPM families: ``x_t`` is DDPM-scaled (``√ᾱ·x0 + √(1−ᾱ)·ε``) and ``timesteps`` are integer indices ``[B]`` in
        ``[0, T)``; σ = ``model_sampling.sigmas[t]`` and the latent goes into ComfyUI's frame
        ``x = x0 + σ·ε = x_t·√(1+σ²)`` (Karras et al. 2022, Table 1). Flow families (Flux): ``x_t`` is
        ``(1 − σ)·x0 + σ·ε`` and ``timesteps`` are float sigmas ``[B]`` in ``[0, 1]``, which is ComfyUI's own frame
        (``CONST.noise_scaling``), so both go in unchanged; the returned velocity is unpacked ``[B, 16, h, w]``
        (ComfyUI's Flux ``_forward`` packs 2×2 patches and builds position ids itself).

        The call is the one ComfyUI's sampler makes: model inputs from the model's own ``extra_conds``
        (:meth:`_model_conds`: ``c_crossattn``, ``y`` = pooled, Flux ``guidance``), then
        ``model.apply_model(x, σ, ...)``, which applies ``calculate_input`` (DDPM: x/√(1+σ²) = x_t; CONST: x), the
        σ → timestep map of the model's ``model_sampling`` (Flux: t = σ, embedded ×1000 by the network), the
        patcher's transformer options and weight wrappers. The network's raw output is taken from inside that call
        by a ComfyUI ``DIFFUSION_MODEL`` wrapper (``comfy/patcher_extension.py``), so it is exactly the ε / v /
        velocity the network produced; the objectives are expressed on it unchanged (``RuntimeError`` for a model
        whose forward runs no such wrappers). Runs outside inference mode (inputs cloned if needed), so gradients
        reach the installed deltas when grad is enabled. ``ValueError`` for an SDXL or Flux model given no pooled
        embedding.
        """
        import comfy.patcher_extension as pe

        cond = Conditioning.wrap(cond)
        base = self.patcher.model
        if (getattr(base, "adm_channels", 0) or self.flow) and cond.pooled is None:
            raise ValueError(f"this model ({self.arch}) needs a pooled text embedding: encode the prompts with this "
                             "host")
        self.load()
        with torch.inference_mode(False):
            x = to_normal(x_t).to(self.device, torch.float32)
            if self.flow:
                sigma = to_normal(timesteps).to(self.device, torch.float32)
                if sigma.dim() == 0:
                    sigma = sigma.expand(x.shape[0])
                if bool(((sigma < 0) | (sigma > 1)).any()):
                    raise ValueError("flow models take sigmas in [0, 1] as timesteps (not kohya's σ·1000)")
                x_in = x
            else:
                t = to_normal(timesteps).to(self.device).long()
                if t.dim() == 0:
                    t = t.expand(x.shape[0])
                ms = self.patcher.get_model_object("model_sampling")
                sigma = ms.sigmas.to(self.device, torch.float32)[t]
                x_in = x * (sigma ** 2 + 1.0).sqrt().view(-1, *([1] * (x.dim() - 1)))
            c = cond.map_tensors(to_normal).to(self.device, self.dtype)
            kwargs = self._model_conds(c, x)
            captured: dict[str, torch.Tensor] = {}

            def capture(executor, *args, **kw):
                out = executor(*args, **kw)
                captured["out"] = out
                return out

            topts = dict(self.patcher.model_options.get("transformer_options", {}))
            wrappers = {k: dict(v) for k, v in topts.get("wrappers", {}).items()}
            wrappers.setdefault(pe.WrappersMP.DIFFUSION_MODEL, {}).setdefault("conceptlab_capture", []).append(capture)
            topts["wrappers"] = wrappers
            topts["sigmas"] = sigma
            c_crossattn = kwargs.pop("c_crossattn", None)
            with self._gate.on():
                base.apply_model(x_in, sigma, c_crossattn=c_crossattn, transformer_options=topts, **kwargs)
            if "out" not in captured:
                raise RuntimeError(f"{type(base.diffusion_model).__name__} does not run ComfyUI's DIFFUSION_MODEL "
                                   "wrappers, so its raw output cannot be read; this model family is not supported")
            return captured["out"]

    def _latent_format(self):
        return self.patcher.get_model_object("latent_format")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE-encode ``[B,3,H,W]`` in ``[-1,1]`` → scaled latents ``[B,4,H/8,W/8]`` fp32 CPU (posterior mean ×
        the model's latent scale, ``latent_format.process_in``; H, W cropped to multiples of 8 as ComfyUI does)."""
        if self.vae is None:
            raise ValueError("encode_images needs a VAE: pass vae= to ComfyHost")
        with torch.inference_mode(False), torch.no_grad():
            img = ((to_normal(pixels.detach()).float().cpu() + 1.0) / 2.0).clamp(0, 1).movedim(1, -1)
            raw = self.vae.encode(img)
            return to_normal(self._latent_format().process_in(raw.float()).cpu())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``[B,4,h,w]`` → images ``[B,3,8h,8w]`` float 0..1 on CPU (``process_out`` + VAE)."""
        if self.vae is None:
            raise ValueError("decode_latents needs a VAE: pass vae= to ComfyHost")
        with torch.inference_mode(False), torch.no_grad():
            raw = self._latent_format().process_out(to_normal(latents.detach()).float().cpu())
            return to_normal(self.vae.decode(raw).float().movedim(-1, 1).clamp(0, 1).cpu())

    def conditioning(self, prompt: str) -> list:
        """ComfyUI CONDITIONING for ``prompt`` from this host's (patched) CLIP, like CLIPTextEncode."""
        self._load_clip()
        with torch.no_grad(), self._gate.on():
            return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(str(prompt)))

    def sample(self, prompts: Sequence[str], negative: str = "", *, width: int = 512, height: int = 512,
               steps: int = 20, cfg: float = 7.0, seed: int = 0, sampler_name: str = "euler",
               scheduler: str = "normal", guidance: float | None = None) -> torch.Tensor:
        """Images ``[B,3,H,W]`` 0..1 (CPU) from ComfyUI's own sampler (``comfy.sample.sample``) on the patched
        clone with the current deltas: prompt ``i`` uses noise seed ``seed + i`` (ComfyUI's CPU noise).
        Needs CLIP and VAE (``ValueError`` otherwise).

        Flux (flow families), with :class:`~conceptlab.training.flux_host.FluxHost`'s meanings (kohya
        ``sample_image_inference``): ``guidance`` is the distilled guidance, kohya ``--g`` (``None`` = 3.5, ComfyUI's
        Flux default), put on the conditioning as ComfyUI's **FluxGuidance** node does (schnell's model has no
        guidance embedding and ignores it); ``cfg`` is the true classifier-free guidance, kohya ``--l`` (1 = off:
        ComfyUI's sampler then skips the negative pass, as ComfyUI's Flux templates sample). The sampler runs on the
        model's own ``model_sampling`` (``ModelSamplingFlux``; schnell ``ModelSamplingDiscreteFlow``).
        """
        if self.vae is None or self.clip is None:
            raise ValueError("sample() needs both clip= and vae=")
        if guidance is not None and not self.flow:
            raise ValueError(f"guidance is the Flux guidance embedding; this {self.arch} model has none")
        if self.flow and guidance is None:
            guidance = 3.5  # comfy/model_base.py Flux.extra_conds default; FluxHost's DEFAULT_GUIDANCE
        neg = self.conditioning(negative)
        imgs = []
        for i, p in enumerate(prompts):
            pos = self.conditioning(p)
            if self.flow:
                import node_helpers  # ComfyUI: what the FluxGuidance node calls

                pos = node_helpers.conditioning_set_values(pos, {"guidance": float(guidance)})
                neg_i = node_helpers.conditioning_set_values(neg, {"guidance": float(guidance)})
            else:
                neg_i = neg
            img = sample_images(self.patcher, pos, neg_i, self.vae, seed=int(seed) + i,
                                steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                width=width, height=height)
            imgs.append(img.movedim(-1, 1))
        return torch.cat(imgs, 0)
