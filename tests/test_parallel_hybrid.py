"""Ulysses combined with ring (``ContextParallelConfig(ulysses_degree=2, ring_degree=2)``, diffusers'
(ring, ulysses) mesh over 4 processes, gloo, spawned here): Ulysses' all-to-all inside each ulysses
group, then ditaccel's LSE ring over the ring group. The sparse output equals the single-process sparse
output for Wan (no text), Flux (text first) and HunyuanVideo (text last, a padding mask), static (tile),
dynamic (topk) and per-head (table: global head indices) methods."""

from __future__ import annotations

import pytest
import torch
from gloo_spawn import init_gloo, reporting, spawn
from test_parallel import _rel
from test_parallel_joint import FAMILIES, METHODS, TABLE, _enable, accelerated_run

WORLD, ULYSSES, RING = 4, 2, 2


def _worker(rank, port, results):
    with reporting(rank, results):
        init_gloo(rank, WORLD, port)
        from tiny_pipelines import FAMILIES as BUILDERS
        from tiny_pipelines import run_latents

        import ditaccel

        out = {}
        configs = {**METHODS, "table": TABLE}
        for family in FAMILIES:
            run = lambda pipe, family=family: run_latents(pipe, family, sparse_size=True, steps=2)  # noqa: E731
            base = BUILDERS[family](seed=0)
            plain, single, single_sparse = run(base), {}, {}
            for name, kw in configs.items():
                with ditaccel.accelerate(base, name, **kw) as handle:
                    single[name] = run(base)
                    single_sparse[name] = handle.stats()["paths"]["sparse"]
            pipe = BUILDERS[family](seed=0)
            _enable(pipe, family, ulysses_degree=ULYSSES, ring_degree=RING)
            for name, kw in configs.items():
                got, seen, local, paths = accelerated_run(pipe, name, kw, run)
                out[(family, name)] = dict(rel=_rel(got, single[name]), sparse_vs_dense=_rel(single[name], plain),
                                           seen=seen, local=local, sparse=paths["sparse"],
                                           single=single_sparse[name], fallback=paths["dense_by_fallback"],
                                           finite=bool(torch.isfinite(got).all()))
        results[rank] = out


@pytest.mark.slow  # four spawned processes on 2 cores: about a minute quiet
def test_ulysses_with_ring_matches_single_process_sparse():
    results = spawn(_worker, WORLD, 840)
    heads = 2
    for rank in range(WORLD):
        out = results[rank]
        assert "error" not in out, out.get("error")
        u = rank % ULYSSES  # diffusers' mesh is ring-major: rank = ring rank * U + ulysses rank
        for family in FAMILIES:
            tokens = 384 + (8 if family != "wan" else 0)
            for name in (*METHODS, "table"):
                r = out[(family, name)]
                print(rank, family, name, r)
                assert r["sparse_vs_dense"] > 1e-3 and r["finite"] and r["fallback"] == {}, (family, name, r)
                assert r["rel"] < 1e-5, (family, name, r["rel"])
                # the ring chunk (tokens / R) of this rank's H / U heads, from global head u * H / U
                assert r["seen"] == [(tokens // RING, heads // ULYSSES, u * heads // ULYSSES)], (family, name, r)
                if name == "table":  # head 1 is the only sparse one: the ranks holding it (u = 1) run sparse
                    assert r["local"] == (r["single"] if u == 1 else 0) and r["sparse"] == RING * r["single"], r
                else:
                    assert r["sparse"] == WORLD * r["single"] > 0, (family, name, r)
