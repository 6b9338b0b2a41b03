"""torch.compile over an accelerated transformer: the intercepted attention is one opaque op
(``ditaccel/compiled.py``), so the compiled blocks trace with no graph break, share one graph per
block class whatever the layer, do not recompile when the first sparse step begins, and give the
eager output.

Dynamo's behaviour (graph breaks, graphs, guards) is the same whatever backend lowers the graphs;
the default run uses the ``eager`` backend (no code generation, seconds); inductor is ``slow``.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from tiny_pipelines import FAMILIES, run_latents

import ditaccel

SPARSE = {  # static and dynamic configs that leave blocks out on the tiny pipelines' sparse sizes
    "window": dict(kernel_size=(1, 3, 3), block_size=64, dense_steps=1),
    "topk": dict(topk=0.5, block_size=64, dense_steps=1),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _uncompile(transformer) -> None:
    for module in transformer.modules():
        module._compiled_call_impl = None


def _graph_breaks() -> dict:
    return {reason: n for reason, n in counters["graph_break"].items()}


def _plain_compile_graphs(family) -> int:
    """Graphs dynamo makes for the unaccelerated pipeline (the model's own, e.g. a stride recompile)."""
    pipe = FAMILIES[family](seed=0)
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    run_latents(pipe, family, sparse_size=True)
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    return graphs


@pytest.mark.parametrize("family,method", [
    ("wan", "window"), ("hunyuan_video", "topk"),  # a static and a dynamic method, with and without text
    pytest.param("wan", "topk", marks=pytest.mark.slow), pytest.param("hunyuan_video", "window", marks=pytest.mark.slow),
])
def test_repeated_blocks_compile_fullgraph_and_match_eager(family, method):
    plain_graphs = _plain_compile_graphs(family)
    pipe = FAMILIES[family](seed=0)
    with ditaccel.accelerate(pipe, method, **SPARSE[method]) as handle:
        eager = run_latents(pipe, family, sparse_size=True)
        eager_stats = handle.stats()
        handle.reset_stats()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        compiled = run_latents(pipe, family, sparse_size=True)
        stats = handle.stats()
    assert _graph_breaks() == {}  # fullgraph would have raised; nothing broke anywhere
    assert torch.isfinite(compiled).all()
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel <= 1e-5, rel
    # The runtime really ran inside the compiled blocks: the same calls, the same sparse density.
    assert stats["calls"] == eager_stats["calls"] and stats["dense_calls"] == eager_stats["dense_calls"]
    assert stats["mean_density"] == pytest.approx(eager_stats["mean_density"]) and stats["mean_density"] < 1.0
    # No graph of our own: the blocks share their graphs whatever the layer (the site index is a graph
    # input, the site is marked by shared hooks), as in the unaccelerated model.
    assert counters["stats"]["unique_graphs"] == plain_graphs, dict(counters["stats"])
    _uncompile(pipe.transformer)


def test_no_recompile_when_the_first_sparse_step_begins():
    pipe = FAMILIES["wan"](seed=0)
    with ditaccel.accelerate(pipe, "window", **SPARSE["window"]) as handle:
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
        run_latents(pipe, "wan", sparse_size=True, steps=1)  # dense_steps=1: every call dense
        assert handle.stats()["dense_calls"] == handle.stats()["calls"]
        graphs_dense = counters["stats"]["unique_graphs"]
        run_latents(pipe, "wan", sparse_size=True, steps=3)  # steps 1, 2 sparse
        assert handle.stats()["mean_density"] < 1.0
        assert counters["stats"]["unique_graphs"] == graphs_dense
    _uncompile(pipe.transformer)


def test_whole_transformer_compile_matches_eager_and_breaks_only_at_the_step_hook():
    pipe = FAMILIES["wan"](seed=0)
    with ditaccel.accelerate(pipe, "window", **SPARSE["window"]) as handle:
        eager = run_latents(pipe, "wan", sparse_size=True)
        pipe.transformer.compile(backend="eager")
        compiled = run_latents(pipe, "wan", sparse_size=True)
        assert handle.stats()["mean_density"] < 1.0
    assert ((compiled - eager).norm() / eager.norm()).item() <= 1e-5
    ours = [r for r in _graph_breaks() if "ditaccel" in r]
    assert all("StepHook.new_forward" in r for r in ours), ours  # the documented one: the step hook runs eagerly
    _uncompile(pipe.transformer)


def test_remove_after_compile_gives_the_plain_model_back():
    pipe = FAMILIES["wan"](seed=0)
    plain = run_latents(pipe, "wan", sparse_size=True)
    handle = ditaccel.accelerate(pipe, "window", **SPARSE["window"])
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="eager")
    sparse = run_latents(pipe, "wan", sparse_size=True)
    handle.remove()
    after = run_latents(pipe, "wan", sparse_size=True)
    assert not torch.equal(sparse, plain)
    assert ((after - plain).norm() / plain.norm()).item() <= 1e-6  # recompiled without our hooks
    assert not any(hasattr(m, "_ditaccel_site_index") for m in pipe.transformer.modules())
    _uncompile(pipe.transformer)


@pytest.mark.slow
def test_repeated_blocks_with_inductor_match_eager():
    pipe = FAMILIES["wan"](seed=0)
    with ditaccel.accelerate(pipe, "window", **SPARSE["window"]):
        eager = run_latents(pipe, "wan", sparse_size=True)
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        compiled = run_latents(pipe, "wan", sparse_size=True)
    assert ((compiled - eager).norm() / eager.norm()).item() <= 1e-5
    _uncompile(pipe.transformer)
