"""Attention masks of every form a diffusers processor may pass reach a self-attention site; each is
either applied exactly with the plan (checked against SDPA's own output on the same mask, so against
SDPA's own broadcasting) or makes that call run the model's own attention, with a note in stats().
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from plan_reference import masked_attention_float64, model_token_mask

from ditaccel.caches import CrossStepCaches
from ditaccel.intercept import _ditaccel_backend, current_site
from ditaccel.masks import read_mask
from ditaccel.methods import DenseConfig, TopKConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape
from ditaccel.runtime import AttentionSite, ForwardInfo, Stats, TransformerRuntime
from ditaccel.state import CallContext, StateStore

GRID, TEXT, POSITION = (2, 8, 12), 24, "suffix"  # 192 video tokens, 24 text tokens after them
S = math.prod(GRID) + TEXT
B, H, D = 2, 2, 16  # B == H: SDPA accepts a 3-D [B, 1, S] mask (read as [1, B, 1, S])


def _site(config):
    method = make_method(config)
    stats, store = Stats(), StateStore(64)
    rt = TransformerRuntime("transformer", method, stats, store, CrossStepCaches(config, method))
    rt.begin(ForwardInfo(GRID, TEXT, POSITION, batch=B, step=0, branch="cond"))
    return AttentionSite(rt, 0, "layer0"), rt


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1, S, 1, D, generator=gen)
    return [1.5 * base + torch.randn(B, S, H, D, generator=gen) for _ in range(3)]


def _sdpa(q, k, v, mask):
    """The model's own attention through the SDPA door: q, k, v [B, S, H, D], the mask as SDPA reads it."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def _sdpa64(q, k, v, mask):
    m = mask if mask.dtype == torch.bool else mask.double()
    return _sdpa(q.double(), k.double(), v.double(), m)


def _key_drop(seed, p=0.3):
    """[B, S] bool: random video and text keys dropped; batch element 1 keeps only its first 100 keys."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(B, S, generator=gen) > p
    keep[1, 100:] = False
    return keep


def _additive(keep, value=float("-inf")):
    return torch.zeros(keep.shape).masked_fill(~keep, value)


def _forms():
    keep = _key_drop(1)
    gen = torch.Generator().manual_seed(2)
    head_keep = torch.rand(B, H, S, generator=gen) > 0.4
    rows = torch.rand(B, S, generator=gen) > 0.2  # live query rows
    dead_batch = keep.clone()
    dead_batch[0] = False  # every key of batch element 0 masked: SDPA gives zeros there
    return {
        "bool [B,1,1,S] drops video keys": keep[:, None, None, :],
        "bool [B,1,1,S] a batch element fully masked": dead_batch[:, None, None, :],
        "-inf [B,1,1,S]": _additive(keep)[:, None, None, :],
        "finfo.min [B,1,1,S]": _additive(keep, torch.finfo(torch.float32).min)[:, None, None, :],
        "bool [1,S]": keep[:1],
        "bool [S,S] key padding as rows": keep[0][None, :].expand(S, S).clone(),
        "bool [B,1,S] (SDPA: [1,B,1,S], per head)": keep[:, None, :],
        "bool [B,S,S] (SDPA: [1,B,S,S])": (keep[:, None, :] & rows[:, :, None]),
        "bool [B,H,1,S] per head": head_keep[:, :, None, :],
        "bool [B,1,S,S] dead query rows": (keep[:, None, :] & rows[:, :, None])[:, None],
        "-inf [B,1,S,S] dead query rows": _additive(keep[:, None, :] & rows[:, :, None])[:, None],
    }


FALLBACK_FORMS = {
    "bool [S,S] causal": (lambda: torch.ones(S, S, dtype=torch.bool).tril(), "query and key together"),
    "additive bias": (lambda: torch.randn(B, 1, 1, S) * 0.1, "a bias"),
    "finite mask drops a whole row": (
        lambda: _additive(torch.zeros(B, S, dtype=torch.bool), -1e9)[:, None, None, :], "finite value"),
    "int mask": (lambda: torch.ones(B, 1, 1, S, dtype=torch.int64), "dtype"),
}


@pytest.mark.parametrize("form", sorted(_forms()))
def test_dense_plan_with_mask_equals_sdpa(form):
    """The all-blocks plan combined with the mask is SDPA on that mask, whatever its form."""
    mask = _forms()[form]
    q, k, v = _qkv()
    site, rt = _site(DenseConfig(block_size=64))
    out = site.attend(q, k, v, mask, None, lambda: _sdpa(q, k, v, mask))
    assert rt.stats.summary()["notes"] == [], form
    assert rt.stats.summary()["dense_calls"] == 0  # the plan ran, not the fallback
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _sdpa64(q, k, v, mask), rtol=1e-4, atol=1e-5)


WINDOW = WindowConfig(kernel_size=(1, 3, 5), block_size=64)
TOPK = TopKConfig(topk=0.4, block_size=64, order="raster")


@pytest.mark.parametrize("config,form", [
    (WINDOW, "bool [B,1,1,S] drops video keys"),
    (WINDOW, "-inf [B,1,S,S] dead query rows"),
    (TOPK, "bool [B,1,S] (SDPA: [1,B,1,S], per head)"),
    (TOPK, "bool [B,1,1,S] a batch element fully masked"),
])
def test_sparse_plan_with_mask_is_plan_and_mask(config, form):
    """A sparse plan with a mask computes exactly (plan's token mask) & (mask as SDPA reads it)."""
    mask = _forms()[form]
    q, k, v = _qkv(3)
    site, rt = _site(config)
    out = site.attend(q, k, v, mask, None, lambda: _sdpa(q, k, v, mask))
    store = StateStore(64)
    shape = CallShape(GRID, TEXT, POSITION)
    ctx = CallContext(transformer="t", layer=0, step=0, branch="cond", shape=shape, batch=B, heads=H,
                      state=store.state("t", 0, "cond", (shape, B, H)), store=store)
    plan = make_method(config).plan_for(ctx, q, k)
    assert float(plan.density) < 1.0
    allowed4 = mask if mask.dtype == torch.bool else mask == 0
    allowed4 = allowed4.reshape((1,) * (4 - allowed4.dim()) + tuple(allowed4.shape))
    allowed = model_token_mask(plan, B, H) & allowed4.expand(B, H, S, S)
    expected = masked_attention_float64(q, k, v, allowed)
    assert rt.stats.summary()["notes"] == []
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    # Dropped video keys really are dropped: the plan alone would differ.
    plan_only = masked_attention_float64(q, k, v, model_token_mask(plan, B, H))
    assert (plan_only - expected).abs().max() > 1e-2


@pytest.mark.parametrize("form", sorted(FALLBACK_FORMS))
def test_masks_the_plan_cannot_apply_fall_back_with_one_note(form):
    build, reason = FALLBACK_FORMS[form]
    mask = build()
    q, k, v = _qkv()
    site, rt = _site(WindowConfig(kernel_size=(1, 3, 5), block_size=64))
    calls = []

    def dense():
        calls.append(1)
        return torch.zeros(B, S, H, D) if mask.dtype == torch.int64 else _sdpa(q, k, v, mask)

    with pytest.warns(UserWarning, match=reason):
        first = site.attend(q, k, v, mask, None, dense)
    second = site.attend(q, k, v, mask, None, dense)
    assert torch.equal(first, dense()) and torch.equal(second, first)
    summary = rt.stats.summary()
    assert summary["dense_calls"] == 2 and len(calls) == 3
    assert len(summary["notes"]) == 1 and reason in summary["notes"][0]


def test_3d_mask_follows_sdpa_broadcasting_not_batch_first():
    """[B, 1, S] is [1, B, 1, S] for SDPA: element i masks head i of every batch element."""
    keep = _key_drop(4)
    reading = read_mask(keep[:, None, :], B, H, S)
    assert reading.fallback is None
    assert torch.equal(reading.key_valid, keep[None].expand(B, H, S))
    # With B != H SDPA would not broadcast it: the call runs the model's own attention.
    assert "does not broadcast" in read_mask(keep[:, None, :], B, 3, S).fallback


def test_diffusers_door_reads_2d_masks_as_key_padding():
    """Through the diffusers backend, a 2-D [B, S] mask is key padding, as diffusers' native backend has it."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    keep = _key_drop(5)
    q, k, v = _qkv(6)
    site, rt = _site(WindowConfig(kernel_size=(1, 3, 5), block_size=64))
    token = current_site.set(site)
    try:
        out = _ditaccel_backend(q, k, v, attn_mask=keep)
    finally:
        current_site.reset(token)
    assert rt.stats.summary()["notes"] == [] and rt.stats.summary()["dense_calls"] == 0
    dense_site, _ = _site(DenseConfig(block_size=64))
    token = current_site.set(dense_site)
    try:
        dense_out = _ditaccel_backend(q, k, v, attn_mask=keep)
    finally:
        current_site.reset(token)
    native = dispatch_attention_fn(q, k, v, attn_mask=keep)
    torch.testing.assert_close(dense_out, native, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, native, atol=1e-3)  # the window plan did apply
