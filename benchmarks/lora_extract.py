"""LoRA extraction / resize benchmark: Concept Lab's SVD paths vs kohya's, on SD1.5-shaped layers, one process.

* **extract**: ``training.extract.extract_lora`` on two single-file checkpoints holding the SD1.5 UNet layers kohya
  extracts (attention, feed-forward, proj_in/out; real names and shapes, random weights, the fine-tune = base + a
  rank-24 change + noise), rank 32, vs kohya-style: the same deltas factorised as
  ``networks/extract_lora_from_models.py`` does (``torch.linalg.svd(mat)`` with full matrices, then the 0.99
  quantile clamp). Reported: seconds, and the relative Frobenius error of the LoRA vs the true delta for both.
* **resize**: a rank-128 LoRA over the same layers → rank 32: ``training.extract.resize_lora`` (thin QR of both
  factors, an r×r SVD) vs ``networks/resize_lora.py`` (``up @ down`` merged to ``out × in``, full SVD). Reported:
  seconds and the max |ΔW| difference between the two results.

Usage: ``python benchmarks/lora_extract.py [--blocks 16] [--device cpu] [--threads N]`` (``--blocks`` limits how many of the 16
transformer blocks are used, for a quick run).
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def sd15_layers(blocks: int) -> dict[str, tuple[int, ...]]:
    """LDM key → shape of the SD1.5 layers kohya's LoRA targets, from the first ``blocks`` transformer blocks."""
    from diffusers import UNet2DConditionModel

    from conceptlab.formats import ldm_keys

    with torch.device("meta"):
        unet = UNet2DConditionModel(**ldm_keys.unet_config_for("sd1"))
    d2l = ldm_keys.diffusers_to_ldm_unet("sd1")
    out, seen = {}, []
    for name, p in unet.state_dict().items():
        m = re.match(r"((?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.", name)
        if not m or not name.endswith(".weight") or p.dim() < 2:
            continue
        if m[1] not in seen:
            seen.append(m[1])
        if len(seen) > blocks:
            break
        out["model.diffusion_model." + d2l[name]] = tuple(p.shape)
    return out


def kohya_extract(delta: torch.Tensor, rank: int, clamp_quantile: float = 0.99):
    """kohya extract_lora_from_models.py, lines 175-205 in spirit: full SVD, S into U, quantile clamp."""
    mat = delta.reshape(delta.shape[0], -1)
    U, S, Vh = torch.linalg.svd(mat)
    U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
    U = U @ torch.diag(S)
    dist = torch.cat([U.flatten(), Vh.flatten()])
    hi = torch.quantile(dist.float()[:2 ** 24], clamp_quantile)  # torch.quantile caps its input size
    return U.clamp(-hi, hi), Vh.clamp(-hi, hi)


def kohya_resize(down, up, alpha, new_rank):
    """kohya resize_lora.py merge_linear / extract_linear (fixed rank)."""
    W = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    U, S, Vh = torch.linalg.svd(W)
    r = min(new_rank, S.numel())
    return Vh[:r], U[:, :r] @ torch.diag(S[:r]), alpha / down.shape[0] * r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from conceptlab.training.lora.extract import extract_lora, resize_lora

    dev = torch.device(a.device)
    shapes = sd15_layers(a.blocks)
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for k, s in shapes.items():
        w = torch.randn(*s, generator=g) * 0.02
        o, i = s[0], int(torch.tensor(s[1:]).prod())
        low = (torch.randn(o, 24, generator=g) @ torch.randn(24, i, generator=g)).reshape(s) * 2e-3
        base[k], tuned[k] = w, w + low + 1e-4 * torch.randn(*s, generator=g)
    n_params = sum(v.numel() for v in base.values())
    print(f"{len(shapes)} layers, {n_params / 1e6:.1f} M parameters, device {dev}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as td:
        pa, pb = Path(td) / "a.safetensors", Path(td) / "b.safetensors"
        save_file(base, str(pa))
        save_file(tuned, str(pb))
        t0 = time.perf_counter()
        res = extract_lora(pa, pb, rank=32, arch="sd1", device=dev)
        t_ours = time.perf_counter() - t0
    err_ours = err_k = tot = 0.0
    t_k = 0.0
    for k in shapes:
        d = (tuned[k] - base[k]).to(dev)
        tot += float((d.double() ** 2).sum())
        t0 = time.perf_counter()
        up, down = kohya_extract(d, 32)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_k += time.perf_counter() - t0
        err_k += float(((up @ down).reshape(d.shape).double() - d.double()).pow(2).sum())
    err_ours = (1 - res.report["overall"]["energy_kept"]) * tot
    print(f"extract rank 32:  ours {t_ours:7.2f} s (incl. file reads)  kohya-style {t_k:7.2f} s  "
          f"ratio {t_k / t_ours:5.2f}x | rel. error ours {(err_ours / tot) ** 0.5:.4f}  "
          f"kohya-style (0.99 clamp) {(err_k / tot) ** 0.5:.4f}")

    lora = {}
    for k, s in shapes.items():
        o, i = s[0], int(torch.tensor(s[1:]).prod())
        nm = "lora_unet_" + k[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
        lora[nm + ".lora_down.weight"] = torch.randn(128, i, generator=g) / i ** 0.5
        lora[nm + ".lora_up.weight"] = torch.randn(o, 128, generator=g) * 0.01
        lora[nm + ".alpha"] = torch.tensor(64.0)
    t0 = time.perf_counter()
    out, rep, _ = resize_lora(lora, rank=32, device=dev)
    t_ours = time.perf_counter() - t0
    t_k, worst = 0.0, 0.0
    for k in [k for k in lora if k.endswith(".lora_down.weight")]:
        b = k[: -len(".lora_down.weight")]
        t0 = time.perf_counter()
        dn, upk, al = kohya_resize(lora[k].to(dev), lora[b + ".lora_up.weight"].to(dev), 64.0, 32)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_k += time.perf_counter() - t0
        dk = (upk @ dn) * (al / 32)
        do = (out[b + ".lora_up.weight"] @ out[b + ".lora_down.weight"]) * (float(out[b + ".alpha"]) / 32)
        worst = max(worst, float((dk.cpu() - do).abs().max()))
    print(f"resize 128 -> 32: ours {t_ours:7.2f} s  kohya-style {t_k:7.2f} s  ratio {t_k / t_ours:5.2f}x | "
          f"max |dW ours - dW kohya| {worst:.2e}; energy kept {rep['overall']['energy_kept']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
