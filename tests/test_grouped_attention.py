"""The grouped torch executor (what ``backend="auto"`` runs off CUDA) against a float64 dense-masked
attention on the shared random cases, against FlexAttention, and on the plans methods build."""

from __future__ import annotations

import pytest
import torch
from block_mask_cases import (
    check_output,
    dense_reference,
    dense_token_mask,
    random_case,
)
from torch.nn.attention.flex_attention import (
    BlockMask,
    create_block_mask,
    flex_attention,
)

from ditaccel.kernels import grouped, run_plan
from ditaccel.kernels.grouped import grouped_block_sparse_attention
from ditaccel.kernels.reference import block_sparse_attention_reference
from ditaccel.methods import RadialConfig, TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape

N_CASES = 240


def _groups_of(bm, q, k):
    B, H, Sq, _ = q.shape
    dtype = torch.float32 if q.dtype != torch.float64 else q.dtype
    return grouped._groups(bm, B, H, Sq, k.shape[2], q.device, dtype)


def test_random_cases_match_dense_float64():
    """>= 200 seeded cases: ragged lengths, broadcast and per-(b, h) lists, partial and empty blocks,
    mask_mods reading b and h, strided inputs; both row modes (shared and per (b, h)) occur."""
    modes = set()
    for i in range(N_CASES):
        q, k, v, bm, allowed, _, desc = random_case(1000 + i, device="cpu")
        out = grouped_block_sparse_attention(q, k, v, bm)
        assert out.shape == q.shape[:3] + v.shape[-1:] and out.dtype == q.dtype
        check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, desc)
        modes.add(_groups_of(bm, q, k).shared)
    assert modes == {True, False}


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_agrees_with_flex_attention(seed):
    torch.manual_seed(seed)
    B, H, S, D = 2, 3, 200, 64

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() <= 40 + 30 * h) | (ki < 8)  # a per-head band plus a sink

    bm = create_block_mask(mask_mod, 1, H, S, S, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    torch.testing.assert_close(grouped_block_sparse_attention(q, k, v, bm), flex_attention(q, k, v, block_mask=bm),
                               rtol=1e-4, atol=1e-5)


def test_mask_mod_reading_batch_and_head_with_broadcast_lists():
    torch.manual_seed(2)
    B, H, S, D = 2, 3, 140, 32
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    lens, widths = torch.tensor([90, 140]), torch.tensor([5, 30, 200])

    def mask_mod(b, h, qi, ki):
        return (ki < lens[b]) & ((qi - ki).abs() <= widths[h])

    nq = -(-S // 64)
    bm = BlockMask.from_kv_blocks(torch.full((1, 1, nq), nq, dtype=torch.int32),
                                  torch.arange(nq, dtype=torch.int32).expand(1, 1, nq, nq).contiguous(),
                                  BLOCK_SIZE=64, mask_mod=mask_mod, seq_lengths=(S, S))
    out = grouped_block_sparse_attention(q, k, v, bm)
    allowed = dense_token_mask(mask_mod, B, H, S, S, "cpu")
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, "b/h-dependent mask_mod")
    assert not _groups_of(bm, q, k).shared  # rows are per (b, h): the mask differs between them


def test_mask_mod_is_evaluated_once_per_block_mask():
    calls = []

    def mask_mod(b, h, qi, ki):
        calls.append(1)
        return qi >= ki

    bm = create_block_mask(mask_mod, 1, 1, 300, 300, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    calls.clear()
    first = grouped_block_sparse_attention(q, k, v, bm)
    n_calls = len(calls)
    assert n_calls > 0
    second = grouped_block_sparse_attention(q, k, v, bm)
    assert len(calls) == n_calls, "mask_mod was evaluated again for the same BlockMask"
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_rows_that_see_nothing_are_zero_not_nan():
    S = 130
    bm = create_block_mask(lambda b, h, qi, ki: (qi < 64) & (ki <= qi), 1, 1, S, S, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, 1, S, 32) for _ in range(3))
    out = grouped_block_sparse_attention(q, k, v, bm)
    assert not out.isnan().any()
    assert (out[:, :, 64:] == 0).all() and (out[:, :, :64] != 0).any()


def test_fp16_and_bf16_compute_in_float32_and_return_the_input_dtype():
    bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() < 70, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, 2, 200, 64) for _ in range(3))
    exact = grouped_block_sparse_attention(q, k, v, bm)
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        out = grouped_block_sparse_attention(q.to(dtype), k.to(dtype), v.to(dtype), bm)
        assert out.dtype == dtype
        assert (out.float() - exact).norm() / exact.norm() < tol


@pytest.mark.parametrize("config", [TileConfig(), TileConfig(block_size=64), RadialConfig(block_size=64),
                                    WindowConfig(block_size=64, kernel_size=(3, 11, 11))],
                         ids=["tile128", "tile64", "radial64", "window64"])
def test_method_plans_match_the_reference(config):
    """The embedded pipeline's grid (5 x 18 x 24, ragged in blocks of 64 and 128)."""
    plan = make_method(config).plan(CallShape((5, 18, 24), 0, "none"), torch.device("cpu"))
    n = plan.layout.num_slots
    q, k, v = (torch.randn(1, 4, n, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = block_sparse_attention_reference(q, k, v, plan.block_mask)
    torch.testing.assert_close(grouped_block_sparse_attention(q, k, v, plan.block_mask), ref, rtol=1e-4, atol=1e-5)


def test_rows_sharing_a_key_list_run_as_one_head():
    """A frame-local tile window: every query block of a frame keeps the same key blocks, so they
    gather those keys once; the result still matches the reference."""
    plan = make_method(TileConfig(block_size=64, window=(1, 3, 3))).plan(CallShape((5, 16, 24), 0, "none"),
                                                                         torch.device("cpu"))
    n = plan.layout.num_slots
    q, k, v = (torch.randn(2, 3, n, 32, generator=torch.Generator().manual_seed(i)) for i in range(3))
    groups = _groups_of(plan.block_mask, q, k).groups
    assert max(g.per_list for g in groups) == 6  # the 2 x 3 tiles of (1, 8, 8) in a 16 x 24 frame
    ref = block_sparse_attention_reference(q, k, v, plan.block_mask)
    torch.testing.assert_close(grouped_block_sparse_attention(q, k, v, plan.block_mask), ref, rtol=1e-4, atol=1e-5)


def test_a_fully_dense_plan_is_one_sdpa_on_k_as_it_is(monkeypatch):
    plan = make_method(TileConfig()).plan(CallShape((5, 18, 24), 0, "none"), torch.device("cpu"))
    assert plan.density == 1.0
    n = plan.layout.num_slots
    q, k, v = (torch.randn(1, 4, n, 32) for _ in range(3))
    groups = _groups_of(plan.block_mask, q, k).groups
    assert [g.kv_rows for g in groups] == [None]  # no gather at all
    torch.testing.assert_close(grouped_block_sparse_attention(q, k, v, plan.block_mask),
                               torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)


def test_auto_backend_off_cuda_runs_the_grouped_executor(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    used = []
    real = grouped_block_sparse_attention

    def spy(*args, **kwargs):
        used.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr("ditaccel.kernels.grouped_block_sparse_attention", spy)
    bm = create_block_mask(lambda b, h, qi, ki: qi >= ki, 1, 1, 128, 128, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(1, 1, 128, 64) for _ in range(3))
    out = run_plan("auto", q, k, v, bm)
    assert used == [True]
    torch.testing.assert_close(out, run_plan("reference", q, k, v, bm), rtol=1e-5, atol=1e-6)
