"""Regenerate ``tests/data/kohya_flux_objective.json``: kohya-ss/sd-scripts' own Flux objective functions run on
fixed draws, for ``tests/test_flow.py`` to compare Concept Lab's :mod:`conceptlab.training.flow` with.

    python tests/tools/kohya_flux_fixtures.py /path/to/sd-scripts

The functions are taken from the checkout's ``library/flux_train_utils.py`` source (parsed with ``ast`` and run in
a namespace with torch and math only; importing the module itself needs kohya's whole GPU stack):
``get_noisy_model_input_and_timesteps``, ``apply_model_prediction_type``, ``time_shift``, ``get_lin_function``,
``compute_density_for_timestep_sampling``, ``compute_loss_weighting_for_sd3``, ``get_sigmas``. kohya's noise
scheduler is its copy of diffusers' ``FlowMatchEulerDiscreteScheduler``; diffusers' class is used for it here.
Nothing of kohya's is copied into the repository: only the numbers it computes.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

FUNCS = ("get_noisy_model_input_and_timesteps", "apply_model_prediction_type", "time_shift", "get_lin_function",
         "compute_density_for_timestep_sampling", "compute_loss_weighting_for_sd3", "get_sigmas")
OUT = Path(__file__).resolve().parents[1] / "data" / "kohya_flux_objective.json"

CASES = [
    dict(timestep_sampling="uniform"),
    dict(timestep_sampling="sigmoid", sigmoid_scale=1.0),
    dict(timestep_sampling="sigmoid", sigmoid_scale=2.5),
    dict(timestep_sampling="shift", sigmoid_scale=1.0, discrete_flow_shift=3.1582),
    dict(timestep_sampling="flux_shift", sigmoid_scale=1.0),
    dict(timestep_sampling="sigma", weighting_scheme="uniform", discrete_flow_shift=3.0),
    dict(timestep_sampling="sigma", weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0,
         discrete_flow_shift=3.0),
    dict(timestep_sampling="sigma", weighting_scheme="mode", mode_scale=1.29, discrete_flow_shift=1.0),
    dict(timestep_sampling="shift", discrete_flow_shift=3.1582, ip_noise_gamma=0.1),
]
PRED_TYPES = [("raw", "uniform"), ("additive", "uniform"), ("sigma_scaled", "uniform"), ("sigma_scaled", "sigma_sqrt"),
              ("sigma_scaled", "cosmap")]


def kohya_namespace(sd_scripts: Path) -> dict:
    src = (sd_scripts / "library" / "flux_train_utils.py").read_text(encoding="utf-8")
    tree = ast.parse(src)
    body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in FUNCS]
    missing = set(FUNCS) - {n.name for n in body}
    if missing:
        raise SystemExit(f"not found in flux_train_utils.py: {sorted(missing)}")
    ns: dict = {"torch": torch, "math": math}
    from typing import Callable, Optional, Tuple

    ns.update(Callable=Callable, Optional=Optional, Tuple=Tuple)
    exec(compile(ast.Module(body=body, type_ignores=[]), "flux_train_utils.py", "exec"), ns)  # noqa: S102
    return ns


def main(argv=None) -> int:
    sd_scripts = Path((argv or sys.argv[1:] or [""])[0])
    if not (sd_scripts / "library" / "flux_train_utils.py").is_file():
        raise SystemExit("usage: kohya_flux_fixtures.py /path/to/sd-scripts")
    from diffusers import FlowMatchEulerDiscreteScheduler

    ns = kohya_namespace(sd_scripts)
    try:
        commit = subprocess.run(["git", "-C", str(sd_scripts), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=False).stdout.strip() or "unknown"
    except OSError:
        commit = "unknown"
    out = {"source": "kohya-ss/sd-scripts library/flux_train_utils.py", "commit": commit, "cases": []}
    for ci, case in enumerate(CASES):
        for seed in (0, 1):
            args = SimpleNamespace(timestep_sampling="sigma", sigmoid_scale=1.0, discrete_flow_shift=3.0,
                                   weighting_scheme="uniform", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                   ip_noise_gamma=None, ip_noise_gamma_random_strength=False,
                                   model_prediction_type="raw")
            for k, v in case.items():
                setattr(args, k, v)
            g = torch.Generator().manual_seed(1000 + seed)
            latents = torch.randn(2, 16, 8, 8, generator=g)
            noise = torch.randn(2, 16, 8, 8, generator=g)
            pred = torch.randn(2, 16, 8, 8, generator=g)
            sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift)
            torch.manual_seed(seed)
            noisy, timesteps, sigmas = ns["get_noisy_model_input_and_timesteps"](args, sched, latents, noise, "cpu",
                                                                                  torch.float32)
            preds = {}
            for ptype, wscheme in PRED_TYPES:
                args.model_prediction_type, args.weighting_scheme = ptype, wscheme
                mp, w = ns["apply_model_prediction_type"](args, pred.clone(), noisy, sigmas)
                preds[f"{ptype}/{wscheme}"] = {"pred": mp.flatten()[:64].tolist(),
                                               "weighting": None if w is None else w.flatten().tolist()}
            out["cases"].append({"case": case, "seed": seed, "data_seed": 1000 + seed,
                                 "sigmas": sigmas.flatten().tolist(), "timesteps": timesteps.flatten().tolist(),
                                 "noisy": noisy.flatten()[:64].tolist(), "noisy_sum": float(noisy.double().sum()),
                                 "preds": preds})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1), encoding="utf-8")
    print("wrote", OUT, len(out["cases"]), "cases")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
