"""diffusers' Ulysses context parallelism under ditaccel, 2 processes over gloo spawned here (bounded
in time): the sparse output equals the single-process sparse output, in either order of
enable_parallelism and accelerate, for a static (tile) and a dynamic (topk) method; stats merge
across ranks (Wan). Joint-attention models and ring: test_parallel_joint.py; refusals: test_parallel_refusals.py."""

from __future__ import annotations


import pytest
import torch
from gloo_spawn import init_gloo, reporting, spawn

WORLD = 2
METHODS = {  # 384-token grid (3, 8, 16): 6 blocks of 64, so both leave blocks out
    "tile": dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=1),
    "topk": dict(topk=0.5, block_size=64, dense_steps=1),
}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _worker(rank, port, results):
    with reporting(rank, results):
        init_gloo(rank, WORLD, port)
        from diffusers import ContextParallelConfig
        from tiny_pipelines import pipe_for, run_latents

        import ditaccel
        from ditaccel.parallel import merged_stats

        out = {}
        pipe = pipe_for("wan")
        run = lambda: run_latents(pipe, "wan", sparse_size=True, steps=2)  # noqa: E731
        plain, single = run(), {}
        for name, kw in METHODS.items():
            with ditaccel.accelerate(pipe, name, **kw) as handle:
                single[name] = run()
                out[f"{name}_single_calls"] = handle.stats()["paths"]["sparse"]
        # accelerate first, then Ulysses
        handle = ditaccel.accelerate(pipe, "tile", **METHODS["tile"])
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        got = run()
        out["tile_after"] = _rel(got, single["tile"])
        stats = merged_stats(handle)
        out["tile_after_paths"] = stats["paths"]
        handle.remove()
        out["plain_under_cp"] = _rel(run(), plain)
        # Ulysses first, then accelerate
        for name, kw in METHODS.items():
            with ditaccel.accelerate(pipe, name, **kw) as handle:
                seen = set()
                handle.observe(lambda info, q, k, v: seen.add((q.shape[1], q.shape[2])))
                got = run()
                out[f"{name}_seen"] = sorted(seen)  # (tokens, heads) that ditaccel's plans ran on
                out[f"{name}_before"] = _rel(got, single[name])
                out[f"{name}_finite"] = bool(torch.isfinite(got).all())
                out[f"{name}_paths"] = merged_stats(handle)["paths"]
                out[f"{name}_sparse_rel_plain"] = _rel(got, plain)
        results[rank] = out


@pytest.mark.slow  # two spawned processes import torch + diffusers: ~40 s on a quiet 2-core machine, minutes loaded
def test_ulysses_matches_single_process_sparse():
    results = spawn(_worker, WORLD, 420)
    for rank in range(WORLD):
        out = results[rank]
        assert "error" not in out, out.get("error")
        print(rank, out)
        assert out["plain_under_cp"] < 1e-5  # diffusers' own Ulysses, for scale
        for name in METHODS:
            assert out[f"{name}_before"] < 1e-5, (name, out[f"{name}_before"])
            assert out[f"{name}_finite"] and out[f"{name}_sparse_rel_plain"] > 1e-3  # sparse, not dense
            paths = out[f"{name}_paths"]
            # merged over ranks: each rank ran every call for its H/P heads, so twice the single-process count
            assert paths["sparse"] == WORLD * out[f"{name}_single_calls"] and paths["dense_by_fallback"] == {}
        assert out["tile_after"] < 1e-5
        heads = 2  # tiny pipelines: 2 heads; each rank plans the whole sequence for one
        for name in METHODS:
            assert out[f"{name}_seen"] == [(3 * 8 * 16, heads // WORLD)], out[f"{name}_seen"]
        assert out["tile_after_paths"]["bypassed"] == {} and out["tile_after_paths"]["sparse"] > 0
