"""Regenerate ``tests/fixtures/kohya_parity.json``: outputs of kohya-ss/sd-scripts' own functions on fixed inputs,
which ``tests/test_kohya_parity.py`` compares with Concept Lab's re-implementations.

Nothing of sd-scripts is copied: this script imports a checkout of it and records what its functions return.
Usage (sd-scripts does not install as a package; its optional heavy imports are stubbed, they are not used by the
functions called here)::

    git --git-dir=<sd-scripts git dir> archive HEAD library networks train_network.py | tar -x -C /tmp/sdscripts
    (or a checkout of sd-scripts)
    python tests/tools/gen_kohya_fixtures.py /tmp/sdscripts

Runs kohya's: ``networks/lora.py`` ``parse_block_lr_kwargs``, ``get_block_dims_and_alphas``,
``remove_block_dims_and_alphas``, ``get_block_index``, ``create_network`` (on the SD1.5 UNet built on the meta
device and a tiny CLIP text encoder, and on kohya's own full-size SDXL UNet ``library/sdxl_original_unet.py`` on
the meta device with two tiny text encoders) + ``prepare_optimizer_params`` + ``apply_max_norm_regularization``;
``library/train_util.py`` ``DreamBoothDataset`` (regularization balancing, on temporary folders),
``line_to_prompt_dict``, ``get_timesteps``; ``library/custom_train_functions.py`` ``pyramid_noise_like`` and
``apply_noise_offset`` (with their random draws replaced by a recorded sequence), ``apply_snr_weight``,
``scale_v_prediction_loss_like_noise_prediction``, ``add_v_prediction_like_loss``, ``apply_debiased_estimation``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))  # tests/ for tiny_models

_HARD = {"torchvision", "cv2", "imagesize", "voluptuous", "lion_pytorch", "dadaptation", "schedulefree", "open_clip",
         "library.lpw_stable_diffusion", "library.sdxl_lpw_stable_diffusion", "library.ipex",
         "library.huggingface_util"}
_SOFT = {"accelerate", "rich", "huggingface_hub", "toml"}


class _Stubs(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Stand-ins for modules sd-scripts imports at module level but the recorded functions never use."""

    def find_spec(self, name, path, target=None):
        root = name.split(".")[0]
        if name in _HARD or (root in _HARD and root != "library") or root in _SOFT:
            if root in _SOFT:
                sys.meta_path.remove(self)
                try:
                    spec = importlib.util.find_spec(name)
                except Exception:  # noqa: BLE001
                    spec = None
                finally:
                    sys.meta_path.insert(0, self)
                if spec is not None:
                    return None
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = mock.MagicMock(name=spec.name)
        m.__path__, m.__spec__ = [], spec
        return m

    def exec_module(self, module):
        pass


def _import_kohya(root: Path):
    import diffusers  # noqa: F401 - import the real stack before the stubs are installed
    import diffusers.optimization  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import DDPMScheduler, UNet2DConditionModel  # noqa: F401
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL  # noqa: F401

    sys.meta_path.insert(0, _Stubs())
    sys.path.insert(0, str(root))
    import library.custom_train_functions as ctf
    import library.train_util as tu
    import networks.lora as kl

    return kl, tu, ctf


def block_cases():
    return [
        (False, {"down_lr_weight": "cosine+.25", "mid_lr_weight": "0.5", "up_lr_weight": "0,0,0,1,1,1,0.5",
                 "block_lr_zero_threshold": "0.1"}),
        (False, {"down_lr_weight": "sine"}), (False, {"up_lr_weight": "linear"}),
        (False, {"down_lr_weight": "reverse_linear", "up_lr_weight": "zeros+0.2"}),
        (False, {"mid_lr_weight": "0"}),
        (False, {"down_lr_weight": "1,,0.5,1,1,1,1,1,1,1,1,1,1,1,1", "up_lr_weight": "0.5,1"}),
        (True, {"down_lr_weight": "cosine", "mid_lr_weight": "1,0.5", "up_lr_weight": "0.1,0.2"}),
        (True, {"up_lr_weight": "reverse_linear+0.1", "block_lr_zero_threshold": "0.5"}),
    ]


def main(argv=None) -> int:
    import torch

    root = Path((argv or sys.argv[1:])[0]).resolve()
    kl, tu, ctf = _import_kohya(root)
    from tiny_models import sd15_unet_meta, tiny_text_encoder

    out: dict = {"source": "kohya-ss/sd-scripts", "generator": "tests/tools/gen_kohya_fixtures.py"}

    # -- block lr weights and block dims --------------------------------------------------------------------
    out["block_lr"] = [{"is_sdxl": sdxl, "args": a, "weights": kl.parse_block_lr_kwargs(sdxl, dict(a))}
                       for sdxl, a in block_cases()]
    n = 25
    dims_cases = [
        {"block_dims": ",".join(str(4 + (i % 3) * 4) for i in range(n)), "block_alphas": ",".join(
            str(1 + i % 2) for i in range(n)), "conv_block_dims": ",".join(str(i % 4) for i in range(n))},
        {"block_dims": ",".join(str(8) for _ in range(n)), "down_lr_weight": "zeros"},
    ]
    out["block_dims"] = []
    for a in dims_cases:
        lrw = kl.parse_block_lr_kwargs(False, dict(a))
        # conv_alpha: the user gave none; create_network turns that into 1.0 before this call (l. 444)
        res = kl.get_block_dims_and_alphas(False, a.get("block_dims"), a.get("block_alphas"), 16, 8.0,
                                           a.get("conv_block_dims"), a.get("conv_block_alphas"), 4, 1.0)
        res = kl.remove_block_dims_and_alphas(False, *[list(x) if x is not None else None for x in res], lrw)
        out["block_dims"].append({"args": a, "network_dim": 16, "network_alpha": 8.0, "conv_dim": 4,
                                  "conv_alpha": None, "result": list(res)})

    # -- networks on the SD1.5 UNet (meta) + a tiny text encoder: module ranks and optimizer groups ------------
    unet = sd15_unet_meta()
    te = tiny_text_encoder()

    def te_name(name: str) -> str:  # transformers 5 drops the text_model. level kohya's names have
        return name.replace("lora_te_encoder_", "lora_te_text_model_encoder_")

    net_cases = [
        {"name": "plain_conv", "network_dim": 8, "network_alpha": 4.0, "kwargs": {"conv_dim": "4"},
         "lrs": (None, None, 1e-4)},
        {"name": "blocks_loraplus", "network_dim": 8, "network_alpha": 4.0,
         "kwargs": {"block_dims": ",".join(str(2 + (i % 3) * 2) for i in range(n)),
                    "block_alphas": ",".join(str(1 + i % 2) for i in range(n)),
                    "conv_block_dims": ",".join(str(i % 3) for i in range(n)),
                    "down_lr_weight": "cosine+.25", "mid_lr_weight": "0", "up_lr_weight": "1,1,1,0.5",
                    "loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"},
         "lrs": (5e-5, 2e-4, 1e-4)},
        {"name": "te_frozen", "network_dim": 4, "network_alpha": 1.0, "kwargs": {}, "lrs": (0.0, None, 1e-4)},
    ]
    out["networks"] = []
    for case in net_cases:
        # kohya extends the class-level target list in place (`target_modules += ...`): one network per process
        # in a real run, so restore it between the cases here
        kl.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
        net = kl.create_network(1.0, case["network_dim"], case["network_alpha"], None, [te], unet,
                                **dict(case["kwargs"]))
        modules = {te_name(m.lora_name): [int(m.lora_dim), float(m.alpha)]
                   for m in net.text_encoder_loras + net.unet_loras}
        te_lr, unet_lr, lr = case["lrs"]
        net.apply_to([te], unet, True, True)  # drops the org_module references (kohya calls it before the optimizer)
        params, descs = net.prepare_optimizer_params(te_lr, unet_lr, lr)
        names = {id(p): f"{te_name(m.lora_name)}.{pn.split('.')[0]}" for m in net.text_encoder_loras + net.unet_loras
                 for pn, p in m.named_parameters()}
        groups = [{"name": d, "lr": g.get("lr"), "params": sorted(names[id(p)] for p in g["params"])}
                  for g, d in zip(params, descs)]
        out["networks"].append({**{k: case[k] for k in ("name", "network_dim", "network_alpha", "kwargs")},
                                "text_encoder_lr": te_lr, "unet_lr": unet_lr, "learning_rate": lr,
                                "modules": modules, "groups": groups})
    names = sorted(set().union(*[c["modules"] for c in out["networks"]]))  # every SD1 module of the cases
    out["block_index"] = {nm: kl.get_block_index(nm, False) for nm in names if nm.startswith("lora_unet_")}
    sdxl_names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                  "lora_unet_output_blocks_8_0_emb_layers_1", "lora_unet_time_embed_0", "lora_unet_out_2",
                  "lora_unet_input_blocks_0_0", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    out["block_index_sdxl"] = {nm: kl.get_block_index(nm, True) for nm in sdxl_names}

    # -- a network on kohya's own SDXL UNet (library/sdxl_original_unet.py, LDM module names, built on the meta
    # device at full size) + the two tiny text encoders: names, ranks, alphas and LoRA weight shapes ---------------
    from library.sdxl_original_unet import SdxlUNet2DConditionModel
    from tiny_models import tiny_text_encoder_2

    with torch.device("meta"):
        xl_unet = SdxlUNet2DConditionModel()
    te1, te2 = tiny_text_encoder(), tiny_text_encoder_2()
    kl.LoRANetwork.UNET_TARGET_REPLACE_MODULE = ["Transformer2DModel"]
    case = {"name": "sdxl_conv", "network_dim": 8, "network_alpha": 4.0, "kwargs": {"conv_dim": "4"}}
    net = kl.create_network(1.0, case["network_dim"], case["network_alpha"], None, [te1, te2], xl_unet,
                            **dict(case["kwargs"]))
    out["network_sdxl"] = {**case, "modules": {
        m.lora_name.replace("lora_te1_encoder_", "lora_te1_text_model_encoder_"):
            [int(m.lora_dim), float(m.alpha), list(m.lora_down.weight.shape), list(m.lora_up.weight.shape)]
        for m in net.text_encoder_loras + net.unet_loras}}

    # -- max-norm regularization (scale_weight_norms) ---------------------------------------------------------
    g = torch.Generator().manual_seed(3)
    mods = {}
    for i, (shape_d, shape_u) in enumerate([((4, 16), (8, 4)), ((2, 8, 3, 3), (6, 2, 1, 1)), ((4, 6, 1, 1),
                                                                                             (5, 4, 1, 1))]):
        mods[f"m{i}"] = {"down": (torch.randn(shape_d, generator=g) * (i + 1)).tolist(),
                         "up": (torch.randn(shape_u, generator=g) * (i + 1)).tolist(), "alpha": float(2 + i)}
    sd = {}
    for k, m in mods.items():
        sd[f"{k}.lora_down.weight"] = torch.tensor(m["down"])
        sd[f"{k}.lora_up.weight"] = torch.tensor(m["up"])
        sd[f"{k}.alpha"] = torch.tensor(m["alpha"])
    holder = mock.MagicMock()
    holder.state_dict = lambda: sd
    res = kl.LoRANetwork.apply_max_norm_regularization(holder, 1.5, "cpu")
    out["max_norm"] = {"max_norm": 1.5, "modules": mods, "result": [res[0], float(res[1]), float(res[2])],
                       "after": {k: {"down": sd[f"{k}.lora_down.weight"].tolist(),
                                     "up": sd[f"{k}.lora_up.weight"].tolist()} for k in mods}}

    # -- regularization balancing (DreamBoothDataset on temporary folders) -------------------------------------
    from PIL import Image

    reg_cases = [((3, [2, 1]), [(2, 5)]), ((2, [4]), [(1, 3), (3, 2)]), ((1, [1, 1]), [(10, 4)]),
                 ((5, [3]), [(1, 2)])]
    out["reg_balance"] = []
    for (train_rep, train_counts), regs in reg_cases:
        with tempfile.TemporaryDirectory() as tmp:
            subsets = []

            def make(folder, count, repeats, is_reg):
                d = Path(tmp) / folder
                d.mkdir()
                for j in range(count):
                    Image.new("RGB", (8, 8)).save(d / f"{j:03d}.png")
                return tu.DreamBoothSubset(str(d), is_reg, folder, ".txt", False, False, repeats, False, ",", 0, None,
                                           None, False, False, False, None, False, 0.0, 0, 0.0, None, None, 1, 0)

            for j, c in enumerate(train_counts):
                subsets.append(make(f"train{j}", c, train_rep, False))
            for j, (rep, c) in enumerate(regs):
                subsets.append(make(f"reg{j}", c, rep, True))
            ds = tu.DreamBoothDataset(subsets, True, 1, (64, 64), 1.0, False, 64, 64, 64, False, 1.0, False, 0.0, None,
                                      None)
            regs_out = [ds.image_data[str(Path(tmp) / f"reg{j}" / f"{k:03d}.png")].num_repeats
                        if str(Path(tmp) / f"reg{j}" / f"{k:03d}.png") in ds.image_data else 0
                        for j, (rep, c) in enumerate(regs) for k in range(c)]
            out["reg_balance"].append({"num_train_images": ds.num_train_images, "num_reg_images": ds.num_reg_images,
                                       "reg_subsets": [list(r) for r in regs], "reg_repeats": regs_out})

    # -- noise: pyramid noise and adaptive noise offset, draws replaced by a recorded sequence -------------------
    torch.manual_seed(0)
    base = torch.randn(2, 2, 16, 12)
    latents = torch.randn(2, 2, 16, 12) * 0.7 + 0.3
    draws_r = [0.25, 0.8, 0.1, 0.6, 0.95, 0.4]
    level_noise = []
    h, w = 16, 12
    for i, r in enumerate(draws_r):
        rr = r * 2 + 2
        hn, wn = max(1, int(h / (rr ** i))), max(1, int(w / (rr ** i)))
        level_noise.append(torch.randn(2, 2, hn, wn))
        if hn == 1 or wn == 1:
            break
    it_r, it_n = iter(draws_r), iter(level_noise)
    with mock.patch.object(ctf.random, "random", lambda: next(it_r)), \
            mock.patch.object(ctf.torch, "randn", lambda *a, **k: next(it_n)):
        pyr = ctf.pyramid_noise_like(base.clone(), "cpu", 6, 0.35)
    out["pyramid"] = {"noise": base.tolist(), "iterations": 6, "discount": 0.35, "r_draws": draws_r[:len(level_noise)],
                      "levels": [t.tolist() for t in level_noise], "result": pyr.tolist()}
    off_noise = torch.randn(2, 2, 1, 1)
    with mock.patch.object(ctf.torch, "randn", lambda *a, **k: off_noise.clone()):
        adapt = ctf.apply_noise_offset(latents, base.clone(), 0.1, -0.05)
    out["adaptive_offset"] = {"latents": latents.tolist(), "noise": base.tolist(), "noise_offset": 0.1,
                              "adaptive_noise_scale": -0.05, "offset_draw": off_noise.tolist(),
                              "result": adapt.tolist()}

    # -- loss post-processing ---------------------------------------------------------------------------------
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          clip_sample=False)
    ctf.prepare_scheduler_for_custom_training(sched, "cpu")
    ts = torch.tensor([0, 1, 10, 250, 500, 999])
    loss = torch.tensor([0.3, 0.2, 0.5, 1.0, 0.7, 0.9])
    post = {}
    for v in (False, True):
        post[f"snr5_v{int(v)}"] = ctf.apply_snr_weight(loss, ts, sched, 5.0, v).tolist()
        post[f"debiased_v{int(v)}"] = ctf.apply_debiased_estimation(loss, ts, sched, v).tolist()
    post["scale_v_like_eps"] = ctf.scale_v_prediction_loss_like_noise_prediction(loss, ts, sched).tolist()
    post["v_pred_like_0.3"] = ctf.add_v_prediction_like_loss(loss, ts, sched, 0.3).tolist()
    out["post_loss"] = {"timesteps": ts.tolist(), "loss": loss.tolist(), "results": post}
    out["fixed_timestep"] = tu.get_timesteps(500, 500, 3, "cpu").tolist()

    # -- sample prompt lines ----------------------------------------------------------------------------------
    lines = ["a cat --n blurry, ugly --w 520 --h 300 --s 2000 --d 7 --l 6.5 --ss euler_a",
             "pixel art knight --W 64 --H 64 --S 8", "plain prompt", "x --l abc --d 3 --foo bar"]
    out["prompt_lines"] = [{"line": ln, "dict": tu.line_to_prompt_dict(ln)} for ln in lines]

    dest = HERE.parents[1] / "fixtures" / "kohya_parity.json"
    dest.parent.mkdir(exist_ok=True)
    dest.write_text(json.dumps(out, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"wrote {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
