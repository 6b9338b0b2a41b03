"""Property test: every method, on random (grid, text length, text position, order, block size), builds
a plan without crashing, the plan keeps the rules every plan shares, and executing it (reference and
grouped executors, through the layout) gives the float64 attention *the plan itself describes*.

The cases include the block-aligned identity layouts that once crashed topk and xattn (raster order
with a text run that is a multiple of the block size, a video run that is one, a tile order equal
to raster on a 3x8x8 grid).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from plan_reference import check_shared_rules, plan_reference

from ditaccel.config import ORDERS
from ditaccel.layout import build_layout
from ditaccel.methods import REGISTRY, CallShape, make_method
from ditaccel.runtime import PlanExecutor
from ditaccel.state import CallContext, StateStore

# Named cases (grid, text_len, position, order, block size): the aligned identity layouts.
ALIGNED = [
    ((1, 8, 16), 128, "prefix", "raster", 128),  # Flux, raster, text a multiple of the block
    ((1, 8, 8), 64, "prefix", "raster", 64),
    ((2, 8, 8), 13, "suffix", "raster", 128),  # HunyuanVideo, raster, T*H*W a multiple of the block
    ((1, 8, 8), 40, "suffix", "raster", 64),
    ((3, 8, 8), 0, "none", "tile", 64),  # tile order == raster
    ((3, 8, 8), 64, "prefix", "tile", 64),
    ((3, 8, 8), 7, "suffix", "tile", 64),
    ((2, 8, 8), 0, "none", "raster", 64),
    ((1, 8, 8), 0, "prefix", "raster", 64),  # a text position with no text tokens
    ((3, 16, 8), 0, "none", "tile", 64),  # two spatial tiles per frame: radial is sparse here
    ((2, 16, 8), 20, "prefix", "tile", 64),
]


def random_cases(n: int, seed: int):
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        bs = rng.choice([64, 128])
        grid = (rng.randint(1, 3), rng.randint(1, 12), rng.randint(1, 16))
        position = rng.choice(["none", "prefix", "suffix"])
        if position == "none":
            text_len = 0
        else:  # often a multiple of the block: the aligned layouts
            text_len = rng.choice([bs, rng.randint(1, 150), rng.randint(1, 20)])
        cases.append((grid, text_len, position, rng.choice(ORDERS), bs))
    return cases


CASES = ALIGNED + random_cases(4, seed=17)
MORE_CASES = random_cases(24, seed=18)  # the wider sweep, kept out of the default run (slow)


def _odd_at_most(limit: int, g: int) -> int:
    return max(1, min(limit, g if g % 2 else g - 1))


def config_for(name: str, grid, order: str, bs: int):
    """A config of method ``name`` that applies to ``grid`` and gives a sparse plan where it can."""
    cls = REGISTRY[name][0]
    kw = dict(block_size=bs)
    if "order" in cls.field_names():
        kw["order"] = order
    if name == "window":
        kw["kernel_size"] = tuple(_odd_at_most(3, g) for g in grid)
    elif name == "tile":
        kw["window"] = (1, 1, 1)
    elif name == "radial":
        kw.update(decay=0.1, sink_frames=0)
    elif name == "topk":
        kw["topk"] = 0.3
    elif name == "xattn":
        kw["threshold"] = 0.6
    elif name == "cluster":
        kw.update(q_clusters=4, k_clusters=8, iters_first=3, top_p=0.6)
    elif name == "heads":
        kw.update(tolerance=1e9, sample_rows=16)  # every head takes its cheapest pattern
    return cls(**kw)


def _context(shape, B, H, v):
    store = StateStore(64)
    return CallContext(transformer="t", layer=0, step=0, branch="cond", shape=shape, batch=B, heads=H,
                       state=store.state("t", 0, "cond", (shape, B, H)), store=store, values=v)


def _inputs(B, S, H, D, seed):
    gen = torch.Generator().manual_seed(seed)
    # A shared component per token makes scores far from uniform, so selections are sparse.
    base = torch.randn(B, S, 1, D, generator=gen)
    return [base * 1.5 + torch.randn(B, S, H, D, generator=gen) for _ in range(3)]


def test_layouts_are_permutations_with_text_in_whole_blocks():
    for grid, text_len, position, order, bs in CASES:
        layout = build_layout(grid, text_len, position, order, (1, 8, 8) if bs == 64 else (1, 8, 16), bs)
        S = math.prod(grid) + text_len
        x = torch.randn(1, S, 2, 3)
        assert torch.equal(layout.from_slots(layout.to_slots(x)), x)
        slots = layout.to_slots(torch.arange(S).view(1, S))
        real = layout.src < S
        assert sorted(slots[0][real].tolist()) == list(range(S))
        kinds = layout.kind.view(-1)
        blocks = torch.nn.functional.pad(kinds, (0, layout.num_blocks * bs - layout.num_slots), value=2)
        per_block = blocks.view(-1, bs)
        mixes = ((per_block == 0).any(1) & (per_block == 1).any(1))
        assert not mixes.any(), f"a block mixes text and video: {(grid, text_len, position, order, bs)}"


# ``table`` composes the other methods by rules (an empty table is dense): its plans are checked against
# per-head brute force in test_table_method.py.
COMPUTING = sorted(set(REGISTRY) - {"table"})


@pytest.mark.parametrize("name", COMPUTING)
def test_every_method_computes_its_plan_on_every_layout(name):
    check_method_on_cases(name, CASES)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPUTING)
def test_every_method_computes_its_plan_on_more_random_layouts(name):
    check_method_on_cases(name, MORE_CASES, need_sparse=False)


def check_method_on_cases(name, cases, need_sparse=True):
    B, H, D = 2, 2, 16
    sparse_seen = False
    for i, (grid, text_len, position, order, bs) in enumerate(cases):
        case = (name, grid, text_len, position, order, bs)
        S = math.prod(grid) + text_len
        q, k, v = _inputs(B, S, H, D, seed=i)
        method = make_method(config_for(name, grid, order, bs))
        ctx = _context(CallShape(grid, text_len, position), B, H, v)
        plan = method.decide(ctx, q, k)
        if plan is None:  # dense by choice (heads with every head dense): the plan it reports still runs
            plan = method.plan_for(ctx, q, k)
        check_shared_rules(plan, B, H)
        assert abs(float(plan.density) - float(plan.any_blocks.float().mean())) < 1e-6, case
        sparse_seen |= float(plan.density) < 1.0
        expected = plan_reference(plan, q, k, v)
        for backend in ("reference", "grouped"):
            out = PlanExecutor(q, k, v, None, None, backend).run(plan)
            assert out.shape == q.shape, case
            assert torch.isfinite(out).all(), (backend, case)
            torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend} {case}: {m}")
    if name != "dense" and need_sparse:
        assert sparse_seen, f"{name} never built a sparse plan: the test would not see a wrong block list"
