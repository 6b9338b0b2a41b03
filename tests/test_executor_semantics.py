"""Every executor (triton in the interpreter on CPU, grouped, flex, reference) gives the same answer
through ``run_plan`` for per-key validity (``key_valid``) and the LSE (``return_lse``), and
``merge_by_lse`` of outputs over disjoint key chunks equals one call over all keys."""

from __future__ import annotations

import pytest
import torch
from block_mask_cases import DEVICE, check_output, dense_reference, dense_token_mask
from torch.nn.attention.flex_attention import create_block_mask

from ditaccel.kernels import merge_by_lse, run_plan

BACKENDS = ["triton", "grouped", "flex", "reference"]


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _band(b, h, qi, ki):
    return ((qi - ki).abs() <= 45 + 20 * h) | (ki < 9)


def _float64_lse(q, k, allowed):
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * q.shape[-1] ** -0.5
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_head", [False, True])
def test_key_valid_and_lse_mean_the_same_on_every_executor(backend, per_head):
    torch.manual_seed(21)
    B, H, S, D = 2, 2, 130, 64
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE) for _ in range(3))
    bm = create_block_mask(_band, 1, H, S, S, device=DEVICE, BLOCK_SIZE=64)
    key_valid = torch.rand(B, H if per_head else 1, S, device=DEVICE) < 0.6
    key_valid[1, 0] = False  # (b=1, all heads or head 0) sees nothing: zeros and -inf
    out, lse = run_plan(backend, q, k, v, bm, key_valid=key_valid if per_head else key_valid[:, 0],
                        return_lse=True)
    allowed = dense_token_mask(_band, B, H, S, S, DEVICE) & key_valid[:, :, None, :]
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, backend)
    ref = _float64_lse(q, k, allowed)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref)), backend
    seen = torch.isfinite(ref)
    assert (lse.double()[seen] - ref[seen]).abs().max() < 1e-4, backend
    # Callers passing neither keyword get the plain tensor, as before.
    plain = run_plan(backend, q, k, v, bm)
    assert isinstance(plain, torch.Tensor) and plain.shape == (B, H, S, D)


@pytest.mark.parametrize("backend", ["triton", "grouped", "reference"])
def test_merging_key_chunks_by_lse_equals_one_call(backend):
    """Ring attention in miniature: keys split into 3 chunks by key_valid, merged == all keys."""
    torch.manual_seed(22)
    B, H, S, D = 1, 2, 140, 64
    q, k, v = (torch.randn(B, H, S, D, device=DEVICE) for _ in range(3))
    bm = create_block_mask(_band, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=64)
    chunk = torch.randint(0, 3, (B, S), device=DEVICE)
    parts = [run_plan(backend, q, k, v, bm, key_valid=chunk == c, return_lse=True) for c in range(3)]
    merged, merged_lse = merge_by_lse([p[0] for p in parts], [p[1] for p in parts])
    whole, whole_lse = run_plan(backend, q, k, v, bm, return_lse=True)
    torch.testing.assert_close(merged, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged_lse, whole_lse, rtol=1e-5, atol=1e-5)


def test_merge_by_lse_against_float64_and_with_empty_rows():
    torch.manual_seed(23)
    B, H, S, D, K = 2, 3, 17, 8, 40
    q, k, v = (torch.randn(B, H, n, D, dtype=torch.float64) for n in (S, K, K))
    s = q @ k.transpose(-1, -2)
    pieces = [slice(0, 10), slice(10, 25), slice(25, 40)]
    outs = [torch.softmax(s[..., p], -1) @ v[:, :, p] for p in pieces]
    lses = [torch.logsumexp(s[..., p], -1) for p in pieces]
    # An empty chunk for some rows (-inf, output zero) must not change them; a row empty everywhere gives 0.
    outs[1][:, :, :5] = 0.0
    lses[1][:, :, :5] = float("-inf")
    for o, l_ in zip(outs, lses):
        o[0, 0, 3] = 0.0
        l_[0, 0, 3] = float("-inf")
    out, lse = merge_by_lse([o.float() for o in outs], [l_.float() for l_ in lses])
    keep = torch.ones(K, dtype=torch.bool).expand(B, H, S, K).clone()
    keep[:, :, :5, 10:25] = False
    keep[0, 0, 3] = False
    sm = s.masked_fill(~keep, float("-inf"))
    ref_lse = torch.logsumexp(sm, -1)
    ref = torch.nan_to_num(torch.softmax(sm, -1)) @ v
    assert out.dtype == torch.float32 and not out.isnan().any()
    assert (out[0, 0, 3] == 0).all() and lse[0, 0, 3] == float("-inf")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-6, atol=1e-6)


def test_merge_by_lse_rejects_mismatched_inputs():
    o = torch.zeros(1, 2, 5, 4)
    with pytest.raises(ValueError, match=r"as many outs as lses"):
        merge_by_lse([o, o], [torch.zeros(1, 2, 5)])
    with pytest.raises(ValueError, match=r"outs\[1\] has shape \(1, 2, 5, 3\)"):
        merge_by_lse([o, torch.zeros(1, 2, 5, 3)], [torch.zeros(1, 2, 5)] * 2)
