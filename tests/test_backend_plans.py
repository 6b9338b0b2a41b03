"""Every executor runs the plan's block lists exactly: on dynamic plans (topk, xattn, cluster, heads),
whose selection lives only in the block lists, each backend's output equals the float64 attention
*of the plan* (not of dense), so a backend that ignored the lists (as eager FlexAttention does)
fails; query blocks that keep no key block give zero rows; ``stats()`` names the executor that ran.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from plan_reference import masked_attention_float64, plan_reference, slot_token_mask
from test_plan_properties import _context, _inputs, config_for

import ditaccel
from ditaccel.kernels import select_executor
from ditaccel.kernels.flex import block_table
from ditaccel.layout import build_layout
from ditaccel.methods import CallShape, make_method
from ditaccel.plan import plan_from_blocks
from ditaccel.runtime import PlanExecutor

BACKENDS = ("reference", "grouped", "flex", "triton")
DYNAMIC = ("topk", "xattn", "cluster", "heads")


def _backend_env(backend, monkeypatch):
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel on CPU tensors


@pytest.mark.parametrize("name", DYNAMIC)
def test_every_backend_computes_the_dynamic_plan_not_dense(name, monkeypatch):
    grid, text_len, position, order, bs = (2, 8, 16), 20, "prefix", "tile", 64
    B, H, D = 1, 2, 64  # head dim 64: the smallest the Triton kernel takes
    S = math.prod(grid) + text_len
    q, k, v = _inputs(B, S, H, D, seed=5)
    config = config_for(name, grid, order, bs)
    if name in ("xattn", "cluster"):  # sparser selections at this small size
        config = dataclasses.replace(config, **{"threshold" if name == "xattn" else "top_p": 0.3})
    plan = make_method(config).plan_for(_context(CallShape(grid, text_len, position), B, H, v), q, k)
    expected = plan_reference(plan, q, k, v)
    dense = masked_attention_float64(q, k, v, torch.ones(B, H, S, S, dtype=torch.bool))
    assert float(plan.density) < 0.8
    assert (expected - dense).abs().max() > 1e-2, "plan equals dense: the test could not tell them apart"
    for backend in BACKENDS:
        _backend_env(backend, monkeypatch)
        ran = []
        out = PlanExecutor(q, k, v, None, None, backend, ran.append).run(plan)
        assert ran == [backend]
        assert torch.isfinite(out).all(), backend
        tol = dict(rtol=1e-3, atol=1e-4) if backend == "triton" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.double(), expected, **tol, msg=lambda m: f"{name} on {backend}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_blocks_keeping_nothing_give_zero_rows(backend, monkeypatch):
    _backend_env(backend, monkeypatch)
    layout = build_layout((1, 8, 24), 0, "none", "raster", (1, 1, 1), 64)  # 3 blocks, no text
    gen = torch.Generator().manual_seed(1)
    keep = torch.tensor([[True, False, True], [False, False, False], [False, True, True]])
    keep = keep[None, None].repeat(1, 2, 1, 1)
    keep[0, 1, 2] = False  # head 1: query block 2 keeps nothing either
    plan = plan_from_blocks(layout, keep)
    q, k, v = (torch.randn(1, 192, 2, 64, generator=gen) for _ in range(3))
    out = PlanExecutor(q, k, v, None, None, backend).run(plan)
    assert torch.isfinite(out).all()
    assert (out[:, 64:128] == 0).all()
    assert (out[:, 128:, 1] == 0).all()
    assert (out[:, 128:, 0].abs() > 0).any()
    tol = dict(rtol=1e-3, atol=1e-4) if backend == "triton" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.double(), plan_reference(plan, q, k, v), **tol)


def test_block_table_reads_lists_only_up_to_their_counts():
    layout = build_layout((1, 8, 24), 10, "suffix", "raster", (1, 1, 1), 64)  # video 3 blocks, text 1
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, 0, 2] = True
    plan = plan_from_blocks(layout, keep)
    table = block_table(plan.block_mask, 4, 4)
    # Block 3 (text, holding no empty slot) is full; query block 0 keeps 2; text block 3's row is dense.
    expected = torch.zeros(4, 4, dtype=torch.int8)
    expected[:, 3] = 2
    expected[3, :] = 2
    expected[0, 2] = 2
    assert torch.equal(table[0, 0], expected)
    assert torch.equal(slot_token_mask(plan, 1, 1)[0, 0, ::64, ::64].to(torch.int8) * 2, expected)


def test_select_executor_names_what_runs(monkeypatch):
    q = torch.randn(1, 1, 64, 16)
    plan = plan_from_blocks(build_layout((1, 8, 8), 0, "none", "raster", (1, 1, 1), 64),
                            torch.ones(1, 1, 1, 1, dtype=torch.bool))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert select_executor("auto", q, q, q, plan.block_mask)[0] == "grouped"  # CPU: the grouped executor
    for backend in ("reference", "grouped", "flex"):
        assert select_executor(backend, q, q, q, plan.block_mask)[0] == backend
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # Head dim 16 is not one the kernel takes: "auto" falls back to the reference, and says so.
    with pytest.warns(UserWarning, match="head dim 16"):
        assert select_executor("auto", q, q, q, plan.block_mask)[0] == "reference"
    with pytest.raises(ValueError, match="head dim 16"):
        select_executor("triton", q, q, q, plan.block_mask)[1](q, q, q, plan.block_mask)


@pytest.mark.parametrize("backend,expected", [("auto", "grouped"), ("flex", "flex")])
def test_stats_report_the_backend_that_ran(tiny_wan, backend, expected, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(3)
    x, ehs = torch.randn(1, 4, 3, 16, 16, generator=gen), torch.randn(1, 7, 32, generator=gen)
    with torch.no_grad(), ditaccel.accelerate(tiny_wan, "topk", block_size=64, backend=backend, topk=0.5) as handle:
        tiny_wan(x, torch.tensor([700.0]), ehs, return_dict=False)
        stats = handle.stats()
    assert stats["backends"] == {expected: stats["calls"] - stats["dense_calls"] - stats["reuse_calls"]}
    assert stats["calls"] == 2
