"""The ring executor (``ditaccel.parallel.ring``) in one process: each simulated rank's rows, computed
against the KV chunks in ring order and merged by LSE, equal those rows of the whole-sequence plan
(float64 reference) for static, dynamic and per-head-table plans, with text before or after the grid
(rows scattered over the plan's blocks), key padding, degree 2 and 3; chunks a rank's rows keep no
block of are never computed; dense and kept mass match the one-process ones; plans with a token
order per head (cluster, heads) run head by head. And one real ring: 2 processes over
gloo on a bare Flux transformer with 3 heads (not divisible by the degree), tile and topk, equal to one
process (slow, as are the spawned 2-process runs on pipelines of every family in test_parallel_joint.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from plan_reference import plan_reference
from test_plan_properties import _context, _inputs, config_for

from ditaccel.methods import CallShape, make_method
from ditaccel.methods.table_config import TableConfig
from ditaccel.parallel.order import parallel_positions
from ditaccel.parallel.ring import RingCall, RingExecutor
from ditaccel.runtime import PlanExecutor


class _SimulatedPeers:
    """Rank ``rank`` of a ring whose every chunk is known: ``pass_on`` hands over the chunk the previous
    rank sends (what ``RingPeers`` receives over the process group); ``sent`` records the chunks passed."""

    def __init__(self, rank, degree, chunks):
        self.rank, self.degree, self.group, self.chunks, self.sent = rank, degree, None, chunks, []

    def pass_on(self, tensor):
        held = [c for c, chunk in enumerate(self.chunks) if torch.equal(tensor, chunk)]
        assert len(held) == 1, "passed on a tensor that is no chunk"
        self.sent.append(held[0])
        received = self.chunks[(held[0] - 1) % self.degree]  # rank r - 1 holds the chunk before
        return lambda: received.clone()


def _ring_rows(q, k, v, degree, text_len, position, key_valid=None, on_run=None):
    """Per simulated rank: (its RingExecutor, its rows' model positions)."""
    S = q.shape[1]
    positions = parallel_positions(S, text_len, position, degree)
    positions = (torch.arange(S) if positions is None else positions).view(degree, -1)
    chunks = [torch.stack((k[:, p], v[:, p])) for p in positions]
    out = []
    for rank in range(degree):
        ring = RingCall(_SimulatedPeers(rank, degree, chunks), positions)
        rows = positions[rank]
        out.append((RingExecutor(ring, q[:, rows], k[:, rows], v[:, rows], key_valid, None, "reference",
                                 on_run), rows))
    return out


def _table():
    return TableConfig(rules=[{"use": "tile", "heads": [1], "knobs": {"tile": (1, 8, 8), "window": (1, 1, 1)}},
                              {"use": "topk", "heads": [2], "knobs": {"topk": 0.3, "tile": (1, 8, 8)}}], block_size=64)


CASES = [  # (grid, text_len, position, degree, method)
    ((2, 8, 16), 0, "none", 2, "tile"),
    ((2, 8, 16), 20, "prefix", 2, "topk"),
    ((3, 8, 16), 12, "suffix", 3, "xattn"),
    ((2, 8, 16), 20, "prefix", 2, "window"),
    ((3, 8, 16), 12, "suffix", 3, "table"),
    # rank 1's rows start mid-frame: its blocks sit elsewhere in its sub-sequence than in the plan, and
    # a window of one frame is not the same pattern shifted there (a partial-block mask read at the
    # sub-sequence position instead of the plan's slot gives another output)
    ((3, 8, 16), 0, "none", 2, "window_one_frame"),
]


@pytest.mark.parametrize("grid,text_len,position,degree,name", CASES)
def test_ring_rows_equal_the_whole_sequence_plan(grid, text_len, position, degree, name):
    B, H, D = 1, 3, 16
    S = math.prod(grid) + text_len
    q, k, v = _inputs(B, S, H, D, seed=11)
    config = _table() if name == "table" else config_for(name.removesuffix("_one_frame"), grid, "tile", 64)
    if name == "window_one_frame":
        config = dataclasses.replace(config, kernel_size=(1, 3, 3))
    plan = make_method(config).plan_for(_context(CallShape(grid, text_len, position), B, H, v), q, k)
    assert float(plan.density) < 0.95, "a dense plan could not tell a wrong restriction apart"
    expected = plan_reference(plan, q, k, v)  # float64, the whole sequence
    for executor, rows in _ring_rows(q, k, v, degree, text_len, position):
        out = executor.run(plan)
        peers = executor.ring.peers
        assert peers.sent == [(peers.rank - i) % degree for i in range(degree - 1)]  # own chunk first, then on
        assert out.shape == (B, S // degree, H, D) and torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected[:, rows], rtol=1e-4, atol=1e-5)


def test_ring_applies_key_padding_and_its_dense_and_kept_mass_match_one_process():
    grid, text_len, position, degree = (2, 8, 16), 20, "prefix", 2
    B, H, D = 2, 2, 16
    S = math.prod(grid) + text_len
    q, k, v = _inputs(B, S, H, D, seed=3)
    key_valid = torch.ones(B, 1, S, dtype=torch.bool)
    key_valid[1, 0, 14:20] = False  # batch 1: the last 6 text tokens are padding
    plan = make_method(config_for("tile", grid, "tile", 64)).plan(CallShape(grid, text_len, position), q.device)
    whole = PlanExecutor(q, k, v, key_valid, None, "reference")
    sparse, mass = whole.run(plan), whole.kept_mass(plan)
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * D**-0.5
    logits = logits.masked_fill(~key_valid[:, :, None, :], float("-inf"))
    dense = torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v.double())
    for executor, rows in _ring_rows(q, k, v, degree, text_len, position, key_valid):
        torch.testing.assert_close(executor.run(plan), sparse[:, rows], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(executor.dense().double(), dense[:, rows], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(executor.kept_mass(plan), mass[:, rows], rtol=1e-5, atol=1e-6)


def test_chunks_whose_blocks_the_plan_drops_for_a_rank_are_not_computed():
    grid, degree = (4, 8, 8), 2  # tiles (1, 8, 8): one frame a block; rank r holds frames 2r, 2r + 1
    q, k, v = _inputs(1, math.prod(grid), 2, 16, seed=1)
    plan = make_method(config_for("tile", grid, "tile", 64)).plan(CallShape(grid, 0, "none"), q.device)
    expected = plan_reference(plan, q, k, v)
    ran = []
    for executor, rows in _ring_rows(q, k, v, degree, 0, "none", on_run=ran.append):
        torch.testing.assert_close(executor.run(plan).double(), expected[:, rows], rtol=1e-4, atol=1e-5)
    # window (1, 1, 1) of tiles: frames see only their own frame, so each rank's rows need only its own chunk
    assert ran == ["reference"] * degree


def test_restrictions_are_kept_for_a_static_plan_and_dropped_with_a_dynamic_one():
    grid = (2, 8, 16)
    B, H = 1, 2
    q, k, v = _inputs(B, math.prod(grid), H, 16, seed=4)
    shape = CallShape(grid, 0, "none")
    static = make_method(config_for("tile", grid, "tile", 64))
    dynamic = make_method(config_for("topk", grid, "tile", 64))
    executor, _ = _ring_rows(q, k, v, 2, 0, "none")[0]
    ring = executor.ring
    executor.run(static.plan(shape, q.device))
    kept = dict(ring._masks)
    executor.run(static.plan(shape, q.device))  # the method's cached plan: its restrictions are reused
    assert ring._masks.keys() == kept.keys() and len(next(iter(kept.values()))[1]) == 2  # both chunks
    for step in range(3):  # a new plan at every call: nothing of it outlives the call
        executor.run(dynamic.plan_for(_context(shape, B, H, v), q, k))
    assert ring._masks.keys() == kept.keys()


@pytest.mark.parametrize("name", ["cluster", "heads"])
def test_a_plan_with_a_token_order_per_head_runs_head_by_head(name):
    grid, text_len, position, degree = (2, 8, 16), 20, "prefix", 2
    B, H = 1, 3
    S = math.prod(grid) + text_len
    q, k, v = _inputs(B, S, H, 16, seed=2)
    config = config_for(name, grid, "tile", 64)
    plan = make_method(config).plan_for(_context(CallShape(grid, text_len, position), B, H, v), q, k)
    assert plan.layout.per_head and float(plan.density) < 0.95  # heads: its temporal heads' own order
    expected = plan_reference(plan, q, k, v)
    for executor, rows in _ring_rows(q, k, v, degree, text_len, position):
        torch.testing.assert_close(executor.run(plan).double(), expected[:, rows], rtol=1e-4, atol=1e-5)


# --- a real ring: 2 processes over gloo (one bare transformer, seconds) --------------------

def _flux_model(heads: int):
    from diffusers import FluxTransformer2DModel
    from tiny_families import _FLUX_KW, _finish
    from tiny_pipelines import _seeded

    with _seeded(0):
        model = FluxTransformer2DModel(**dict(_FLUX_KW, num_attention_heads=heads), pooled_projection_dim=32)
    return _finish(model)


RING_METHODS = {"tile": dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=1),
                "topk": dict(topk=0.5, block_size=64, dense_steps=1)}


def _ring_worker(rank, port, results):
    from gloo_spawn import init_gloo, reporting

    with reporting(rank, results):
        init_gloo(rank, 2, port)
        from diffusers import ContextParallelConfig
        from tiny_families import _flux_kwargs

        import ditaccel

        inputs = _flux_kwargs(1, 16, 24)  # 384 image tokens after 6 text tokens: 3 text + 192 image a rank

        def run(model):  # step 0 dense, step 1 sparse (falling timesteps)
            with torch.no_grad():
                return torch.cat([model(**dict(inputs, timestep=torch.tensor([t])))[0] for t in (0.9, 0.5)])

        base = _flux_model(heads=3)  # 3 heads over 2 ranks: the ring keeps every head on every rank
        plain, single = run(base), {}
        for name, kw in RING_METHODS.items():
            with ditaccel.accelerate(base, name, **kw):
                single[name] = run(base)
        model = _flux_model(heads=3)
        model.enable_parallelism(config=ContextParallelConfig(ring_degree=2))
        out = {}
        for name, kw in RING_METHODS.items():
            with ditaccel.accelerate(model, name, **kw) as handle:
                got = run(model)
                paths = handle.stats()["paths"]
            out[name] = dict(rel=_rel(got, single[name]), sparse_vs_dense=_rel(single[name], plain),
                             sparse=paths["sparse"], fallback=paths["dense_by_fallback"],
                             finite=bool(torch.isfinite(got).all()))
        results[rank] = out


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.slow  # two spawned interpreters importing torch + diffusers: ~14 s, and the suite is near 10 minutes
def test_two_process_ring_equals_one_process_on_a_joint_attention_transformer():
    from gloo_spawn import spawn

    results = spawn(_ring_worker, 2, 300)
    for rank in range(2):
        assert "error" not in results[rank], results[rank].get("error")
        for name, r in results[rank].items():
            assert r["sparse_vs_dense"] > 1e-3, (name, r)  # the method really changed the output
            assert r["rel"] < 1e-5 and r["finite"], (rank, name, r)
            assert r["sparse"] == 2 and r["fallback"] == {}, (rank, name, r)  # 2 blocks x step 1, on this rank's rows
