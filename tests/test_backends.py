"""The same plan through every executor gives the same attention: reference, grouped, FlexAttention
and the Triton kernel (in the interpreter) plug into the same call inside a wrapped model."""

from __future__ import annotations

import pytest
import torch

import ditaccel


@pytest.fixture
def wan64():
    """A one-layer Wan transformer with head dim 64, the smallest the Triton kernel takes."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=64, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=1, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()


def _inputs():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 3, 32, 40, generator=gen)  # grid (3, 16, 20): 15 blocks of 64 tokens
    ehs = torch.randn(1, 7, 32, generator=gen)
    return x, ehs


@pytest.mark.parametrize("method,fields", [
    ("window", dict(kernel_size=(1, 3, 5), dilation=(1, 2, 1))),  # partial blocks: token masks
    ("tile", dict(tile=(1, 8, 8), window=(1, 1, 1))),
])
def test_backends_agree_inside_a_model(wan64, monkeypatch, method, fields):
    x, ehs = _inputs()
    t = torch.tensor([700.0])
    outs = {}
    with torch.no_grad():
        for backend in ("reference", "grouped", "flex", "triton"):
            if backend == "triton":
                monkeypatch.setenv("TRITON_INTERPRET", "1")
            with ditaccel.accelerate(wan64, method, block_size=64, backend=backend, **fields) as handle:
                outs[backend] = wan64(x, t, ehs, return_dict=False)[0]
                density = handle.stats()["mean_density"]
        dense = wan64(x, t, ehs, return_dict=False)[0]
    assert density < 1.0
    assert not torch.allclose(outs["reference"], dense, atol=1e-4)  # the plan really changed attention
    torch.testing.assert_close(outs["flex"], outs["reference"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["grouped"], outs["reference"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1e-3, atol=1e-4)


def test_auto_backend_on_cpu_runs_without_warning(tiny_wan, recwarn):
    x, ehs = _inputs()
    with torch.no_grad(), ditaccel.accelerate(tiny_wan, "tile", block_size=64, tile=(1, 8, 8), window=(1, 3, 3)):
        out = tiny_wan(x, torch.tensor([700.0]), ehs, return_dict=False)[0]
    assert torch.isfinite(out).all()
    assert not [w for w in recwarn if "ditaccel" in str(w.message)]
