"""kohya's ``blocks_to_swap`` on the diffusers Flux host (training/block_swap.py), tested on the CPU with a simulated
second device: "offloading" a block replaces its frozen tensors by NaN and keeps the real values aside, so a block
that computed (forward, checkpoint recomputation or backward through saved weights) while offloaded would poison the
output or the gradients. The swapped runs must equal the unswapped run exactly, block by block placement must follow
kohya's ModelOffloader schedule, and the device must never hold more than N − S blocks of a list."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TINY_FLUX_CONFIG, tiny_flux_host

from conceptlab.training.block_swap import BlockSwap, _frozen_modules, flux_swap_counts
from conceptlab.training.lora.network import LoRANetwork


def test_kohya_split_and_limits():
    # kohya flux_models.py enable_block_swap: double = n // 2, single = (n - double) * 2, each <= count - 2
    assert flux_swap_counts(0, 19, 38) == (0, 0)
    assert flux_swap_counts(18, 19, 38) == (9, 18)  # kohya's split_mode replacement value
    assert flux_swap_counts(35, 19, 38) == (17, 36)  # Flux.1's maximum
    with pytest.raises(ValueError, match="blocks_to_swap <= 35"):
        flux_swap_counts(36, 19, 38)
    with pytest.raises(ValueError, match=">= 0"):
        flux_swap_counts(-1, 19, 38)


class FakeOffload:
    """Transfer for :class:`BlockSwap`: the 'offload device' holds the real values; the module keeps NaN."""

    def __init__(self):
        self.stash: dict[int, torch.Tensor] = {}
        self.moves = 0

    def __call__(self, block, device):
        self.moves += 1
        with torch.no_grad():
            for m in _frozen_modules(block):
                for p in m._parameters.values():
                    if p is None or p.requires_grad:
                        continue
                    if device.type == "meta":  # offload: keep the values aside, leave NaN behind
                        self.stash[id(p)] = p.data
                        p.data = torch.full_like(p.data, float("nan"))
                    else:
                        p.data = self.stash.pop(id(p))


def _host_with_lora(n_double=5, n_single=8, seed=0):
    import conceptlab.training.flux_host as fh
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    tr = FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, "num_layers": n_double, "num_single_layers": n_single})
    host = tiny_flux_host(seed)
    host = fh.FluxHost(tr, host.clip, host.clip_tokenizer, host.t5, host.t5_tokenizer, None,
                       t5xxl_max_token_length=host.t5xxl_max_token_length)
    net = LoRANetwork.create(host, network_dim=4, network_alpha=4, seed=seed)
    with torch.no_grad():
        for d in net.loras.values():
            d.lora_up.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    net.install(host)
    return host, net


def _swap(host, blocks_to_swap, fake):
    """enable_block_swap with the fake device: compute device cpu, offload 'meta' (values kept by ``fake``)."""
    tr = host.transformer
    d, s = flux_swap_counts(blocks_to_swap, len(tr.transformer_blocks), len(tr.single_transformer_blocks))
    host._swaps = [BlockSwap(tr.transformer_blocks, d, "cpu", offload_device="meta", transfer=fake),
                   BlockSwap(tr.single_transformer_blocks, s, "cpu", offload_device="meta", transfer=fake)]

    def prepare(module, args, kwargs):
        for sw in host._swaps:
            sw.prepare(forward_only=not torch.is_grad_enabled())
    host._swap_hook = tr.register_forward_pre_hook(prepare, with_kwargs=True)
    for sw in host._swaps:
        sw.log = []
    return host._swaps


def _step(host, net, x, sig, cond):
    net.zero_grad(set_to_none=True)
    out = host.predict(x, sig, cond)
    loss = (out.float() ** 2).mean()
    loss.backward()
    return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointed", "plain"])
def test_swapped_training_step_equals_unswapped_and_follows_kohyas_schedule(checkpointing):
    host, net = _host_with_lora()
    host.set_gradient_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(1)
    x, sig = torch.randn(2, 16, 4, 4, generator=g), torch.tensor([0.3, 0.8])
    cond = host.encode_prompts(["a cat", "a dog"]).detach()
    ref_out, ref_grads = _step(host, net, x, sig, cond)

    fake = FakeOffload()
    swaps = _swap(host, 4, fake)  # kohya: 4 // 2 = 2 of the 5 double blocks, (4 - 2) * 2 = 4 of the 8 single
    assert [sw.s for sw in swaps] == [2, 4]
    for _ in range(2):  # twice: the layout after backward is the starting one again
        out, grads = _step(host, net, x, sig, cond)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert grads.keys() == ref_grads.keys() and len(grads) > 10
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=0)
        for sw in swaps:
            n, s = sw.n, sw.s
            start = ("cpu",) * (n - s) + ("offload",) * s
            assert sw.log[0] == ("prepare", -1, start) and sw.location_types() == start
            events = [e for e in sw.log if e[0] in ("forward", "recompute", "backward")]
            assert [i for e, i, _ in events if e == "forward"] == list(range(n))
            assert all(lay.count("cpu") <= n - s for _, _, lay in sw.log)  # never more than N − S resident
            for e, i, lay in events:
                if e in ("forward", "recompute"):
                    assert lay[i] == "cpu"
            # after the forward, kohya's layout: the first S blocks offloaded, the rest resident
            last_fwd = max(k for k, ev in enumerate(sw.log) if ev[0] == "forward")
            after_fwd = sw.log[last_fwd + 1][2] if last_fwd + 1 < len(sw.log) else None
            assert after_fwd is None or after_fwd[:s].count("offload") >= s - 1
            if checkpointing:
                assert [i for e, i, _ in events if e == "recompute"] == list(range(n - 1, -1, -1))
            sw.log.clear()
    assert fake.moves > 0
    for sw in swaps:  # resident blocks hold real values, offloaded ones the NaN placeholders
        for i, b in enumerate(sw.blocks):
            nan = any(torch.isnan(p).any() for p in b.parameters() if not p.requires_grad)
            assert nan == (sw.location[i] != sw.device)

    # sampling / validation: no backward, every block rotates and the starting layout is restored
    with torch.no_grad():
        torch.testing.assert_close(host.predict(x, sig, cond), ref_out, rtol=0, atol=0)
    for sw in swaps:
        assert sw.location_types() == ("cpu",) * (sw.n - sw.s) + ("offload",) * sw.s


def test_enable_block_swap_on_the_host():
    host, net = _host_with_lora()
    g = torch.Generator().manual_seed(2)
    x, sig = torch.randn(1, 16, 4, 4, generator=g), torch.tensor([0.5])
    cond = host.encode_prompts(["a cat"]).detach()
    ref = host.predict(x, sig, cond).detach()
    assert host.enable_block_swap(4) == (2, 4)
    swapped = [*host.transformer.transformer_blocks[3:], *host.transformer.single_transformer_blocks[4:]]
    assert all(sw.location[i] == sw.offload for sw in host._swaps for i in range(sw.n - sw.s, sw.n))
    out = host.predict(x, sig, cond)
    torch.testing.assert_close(out.detach(), ref)
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad) and len(swapped) == 6
    with pytest.raises(ValueError, match="blocks_to_swap <= 6"):  # 7 // 2 = 3 double, (7 - 3) * 2 = 8 > 8 - 2
        host.enable_block_swap(7)
    host.disable_block_swap()
    assert host.blocks_to_swap == 0 and not host.transformer._forward_pre_hooks


def test_constructor_swap_and_the_refusals_by_name():
    import conceptlab.training.flux_host as fh
    from conceptlab.nodes.lora import _check_toml_keys
    from conceptlab.training.lora.kohya_args import KohyaSettingError, classify

    host, _ = _host_with_lora()
    tr = host.transformer
    swapped = fh.FluxHost(tr, host.clip, host.clip_tokenizer, host.t5, host.t5_tokenizer, None,
                          t5xxl_max_token_length=host.t5xxl_max_token_length, blocks_to_swap=6)
    assert swapped.blocks_to_swap == 6 and [sw.s for sw in swapped._swaps] == [3, 6]
    swapped.disable_block_swap()
    with pytest.raises(ValueError, match="blocks_to_swap <= 0"):  # the tiny 1 + 2 block model swaps nothing
        tiny_flux_host(0).enable_block_swap(1)
    assert classify("blocks_to_swap") == "honoured"
    with pytest.raises(KohyaSettingError, match="blocks_to_swap is not supported by the Train LoRA node"):
        _check_toml_keys({"blocks_to_swap": 8, "network_dim": 4})
    assert _check_toml_keys({"blocks_to_swap": 0, "network_dim": 4})["network_dim"] == 4


def test_quantize_base_with_swapped_blocks_quantizes_each_block_on_the_device_once(monkeypatch):
    """An offloaded block is brought to the device, quantized there (int4 / fp8 kernels need CUDA) and sent back;
    the resident rest is quantized in one pass that skips those blocks. Moves are recorded, not made (the second
    device is simulated)."""
    pytest.importorskip("torchao")
    import conceptlab.training.block_swap as bs
    from conceptlab.training.quantize import is_quantized

    host, _ = _host_with_lora()
    host.clear_deltas()  # quantize before installing deltas
    tr = host.transformer
    moves = []
    monkeypatch.setattr(bs, "move_frozen", lambda m, dev, skip=(): moves.append((m, torch.device(dev).type)))
    _swap(host, 4, FakeOffload())
    for sw in host._swaps:  # the starting layout, as bookkeeping only
        sw.location = [sw.device] * (sw.n - sw.s) + [sw.offload] * sw.s
    n = host.quantize_base("int8")
    off = [*tr.transformer_blocks[3:], *tr.single_transformer_blocks[4:]]
    assert [m for m, _ in moves] == [b for b in off for _ in range(2)]
    assert [d for _, d in moves] == ["cpu", "meta"] * len(off)
    linears = [m for m in tr.modules() if isinstance(m, torch.nn.Linear) and m.in_features >= 16]
    assert n == len(linears) + sum(isinstance(m, torch.nn.Linear) and m.in_features >= 16
                                   for m in host.t5.modules())
    assert all(is_quantized(m.weight) for m in linears)
