"""The rectified-flow objective (training/flow.py) against kohya-ss/sd-scripts' own Flux functions on the same
draws (numbers pinned in tests/data/kohya_flux_objective.json by tests/tools/kohya_flux_fixtures.py, which runs
kohya's source), and its shape/formula properties."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conceptlab.training.flow import (apply_model_prediction_type, flux_mu, noisy_input, sample_sigmas, time_shift,
                                      velocity_target)

FIXTURE = json.loads((Path(__file__).parent / "data" / "kohya_flux_objective.json").read_text())


@pytest.mark.parametrize("row", FIXTURE["cases"], ids=lambda r: f"{r['case']['timestep_sampling']}-{r['seed']}-"
                         f"{r['case'].get('weighting_scheme', '')}{'-ip' if r['case'].get('ip_noise_gamma') else ''}")
def test_objective_equals_kohya_on_the_same_draws(row):
    case = dict(row["case"])
    ip = case.pop("ip_noise_gamma", None)
    g = torch.Generator().manual_seed(row["data_seed"])
    latents = torch.randn(2, 16, 8, 8, generator=g)
    noise = torch.randn(2, 16, 8, 8, generator=g)
    pred = torch.randn(2, 16, 8, 8, generator=g)
    gen = torch.Generator().manual_seed(row["seed"])  # kohya draws from the global RNG seeded the same way
    sigmas, timesteps = sample_sigmas(2, (8, 8), gen, **case)
    torch.testing.assert_close(sigmas, torch.tensor(row["sigmas"]), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(timesteps, torch.tensor(row["timesteps"]), rtol=1e-6, atol=1e-4)
    x = noisy_input(latents, noise, sigmas, ip_noise_gamma=ip, generator=gen)
    torch.testing.assert_close(x.flatten()[:64], torch.tensor(row["noisy"]), rtol=1e-6, atol=1e-6)
    assert abs(float(x.double().sum()) - row["noisy_sum"]) < 1e-3
    for key, ref in row["preds"].items():
        ptype, wscheme = key.split("/")
        p, w = apply_model_prediction_type(pred, x, sigmas, ptype, wscheme)
        torch.testing.assert_close(p.flatten()[:64], torch.tensor(ref["pred"]), rtol=1e-6, atol=1e-6)
        if ref["weighting"] is None:
            assert w is None
        else:
            torch.testing.assert_close(w.flatten(), torch.tensor(ref["weighting"]), rtol=1e-6, atol=1e-6)


def test_forward_process_and_velocity_target():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 16, 4, 4, generator=g), torch.randn(3, 16, 4, 4, generator=g)
    s = torch.tensor([0.0, 0.5, 1.0])
    x = noisy_input(x0, eps, s)
    torch.testing.assert_close(x[0], x0[0])
    torch.testing.assert_close(x[2], eps[2])
    # the exact velocity moves x_σ to x0 in ComfyUI's CONST frame: x̂0 = x − σ·v
    torch.testing.assert_close(x - s.view(-1, 1, 1, 1) * velocity_target(x0, eps), x0, rtol=1e-5, atol=1e-6)


def test_flux_shift_and_validation():
    # Flux's time shift at 1024 px (64×64 latent → 1024 packed tokens): mu = 0.5 + 0.65·768/3840
    assert abs(flux_mu(64, 64) - (0.5 + 0.65 * (1024 - 256) / 3840)) < 1e-12
    t = torch.tensor([0.25, 0.5, 0.75])
    assert bool((time_shift(1.0, 1.0, t) > t).all())  # mu > 0 shifts toward noise
    with pytest.raises(ValueError):
        sample_sigmas(1, (8, 8), torch.Generator(), timestep_sampling="bogus")
    with pytest.raises(ValueError):
        sample_sigmas(1, (8, 8), torch.Generator(), weighting_scheme="bogus")
    with pytest.raises(ValueError):
        apply_model_prediction_type(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.ones(1), "x0")
