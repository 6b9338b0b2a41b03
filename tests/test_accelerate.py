"""accelerate() on tiny random pipelines of every family: runs, exactness, removal, state."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import ODD_GRID, SECOND_SIZE, pipe_for, run_latents

import ditaccel
from ditaccel.hooks import ATTENTION_HOOK, STEP_HOOK

FAMILY_NAMES = ["wan", "wan22", "hunyuan_video", "cogvideox", "flux"]
SPARSE = {  # per family: sparse configs that fit the tiny grids and leave something out
    "window": dict(kernel_size=(1, 3, 3), block_size=64),
    "tile": dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64),
    "radial": dict(tile=(1, 8, 8), decay=0.25, sink_frames=0, block_size=64),
}






def run(pipe, family, sparse_size=False, **kw):
    return run_latents(pipe, family, sparse_size, **kw)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def assert_unwrapped(pipe):
    for attr in ("transformer", "transformer_2"):
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            registry = getattr(module, "_diffusers_hook", None)
            assert registry is None or (STEP_HOOK not in registry.hooks and ATTENTION_HOOK not in registry.hooks), name
            assert "forward" not in module.__dict__, name
            assert not module._forward_pre_hooks and not module._forward_hooks, name
            assert not [a for a in vars(module) if a.startswith("_ditaccel")], name
            proc = getattr(module, "processor", None)
            if proc is not None:
                assert "_attention_backend" not in vars(proc), name


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_dense_method_matches_original(family):
    pipe = pipe_for(family)
    ref = run(pipe, family)
    with ditaccel.accelerate(pipe, "dense", block_size=64) as handle:
        out = run(pipe, family)
        stats = handle.stats()
    assert rel_err(out, ref) < 1e-5
    assert stats["calls"] > 0 and stats["mean_density"] == 1.0
    assert stats["dense_calls"] == 0  # every call went through our plan, not the model's attention
    assert_unwrapped(pipe)
    assert torch.equal(run(pipe, family), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("method", ["window", "tile", "radial"])
def test_sparse_method_runs_and_remove_is_bit_identical(family, method):
    pipe = pipe_for(family)
    ref = run(pipe, family, sparse_size=True)
    handle = ditaccel.accelerate(pipe, method, dense_steps=1, **SPARSE[method])
    out = run(pipe, family, sparse_size=True)
    stats = handle.stats()
    handle.remove()
    assert torch.isfinite(out).all()
    assert stats["calls"] > 0
    steps = stats["steps"]
    assert steps[0]["density"] == 1.0 and steps[0]["dense_calls"] == steps[0]["calls"]  # dense_steps=1
    later = [s["density"] for k, s in steps.items() if k > 0]
    assert later, "no step after the first was seen"
    if not (family == "flux" and method == "radial"):  # radial on an image (T=1) is dense by definition
        assert max(later) < 1.0
        assert not torch.equal(out, ref)
    assert_unwrapped(pipe)
    assert torch.equal(run(pipe, family, sparse_size=True), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_covering_window_matches_dense(family):
    pipe = pipe_for(family)
    ref = run(pipe, family)
    with ditaccel.accelerate(pipe, "tile", tile=(1, 8, 8), window=(63, 63, 63), block_size=64) as handle:
        out = run(pipe, family)
        assert handle.stats()["mean_density"] == 1.0
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox"])
def test_window_covering_odd_grid_matches_dense(family):
    pipe = pipe_for(family)
    grid = ODD_GRID[family]
    ref = run(pipe, family, **grid["size"])
    with ditaccel.accelerate(pipe, "window", kernel_size=grid["kernel"], block_size=64) as handle:
        out = run(pipe, family, **grid["size"])
        assert handle.stats()["mean_density"] == 1.0
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("batch_size,cfg", [(2, True), (2, False), (1, False)])
def test_batch_and_cfg(family, batch_size, cfg):
    pipe = pipe_for(family)
    ref = run(pipe, family, batch_size=batch_size, cfg=cfg)
    with ditaccel.accelerate(pipe, "dense", block_size=64):
        dense = run(pipe, family, batch_size=batch_size, cfg=cfg)
    with ditaccel.accelerate(pipe, "tile", **SPARSE["tile"]) as handle:
        out = run(pipe, family, batch_size=batch_size, cfg=cfg, sparse_size=True)
        stats = handle.stats()
    assert rel_err(dense, ref) < 1e-5
    assert out.shape[0] == ref.shape[0] and torch.isfinite(out).all()
    branches = {row["branch"] for row in stats["per_layer_step"]}
    separate_cfg = family in ("wan", "wan22", "hunyuan_video", "flux")
    assert ("uncond" in branches) == (cfg and separate_cfg)
    assert torch.equal(run(pipe, family, batch_size=batch_size, cfg=cfg), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_consecutive_calls_at_two_resolutions(family):
    """A wrapped pipeline called at size A then B gives what a fresh wrap gives at B: no stale state."""
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, "tile", dense_steps=1, **SPARSE["tile"]) as handle:
        first = run(pipe, family, sparse_size=True)
        assert handle.stats()["mean_density"] < 1.0 or family == "flux"
        second = run(pipe, family, **SECOND_SIZE[family])
        again = run(pipe, family, sparse_size=True)
    with ditaccel.accelerate(pipe, "tile", dense_steps=1, **SPARSE["tile"]):
        fresh_second = run(pipe, family, **SECOND_SIZE[family])
    assert first.shape != second.shape
    assert torch.equal(second, fresh_second)
    assert torch.equal(first, again)


def test_wan22_hooks_both_transformers():
    pipe = pipe_for("wan22")
    with ditaccel.accelerate(pipe, "tile", **SPARSE["tile"]) as handle:
        run(pipe, "wan22", steps=4)
        stats = handle.stats()
    transformers = {row["transformer"] for row in stats["per_layer_step"]}
    assert transformers == {"transformer", "transformer_2"}
    steps_by = {t: {r["step"] for r in stats["per_layer_step"] if r["transformer"] == t} for t in transformers}
    assert steps_by["transformer"].isdisjoint(steps_by["transformer_2"])  # global step index across both


def test_bare_transformer_and_timestep_clock(tiny_wan):
    x = torch.randn(1, 4, 5, 14, 18, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = tiny_wan(x, torch.tensor([900.0]), ehs, return_dict=False)[0]
        with ditaccel.accelerate(tiny_wan, "window", kernel_size=(3, 5, 5), dense_steps=1, block_size=64) as h:
            for t in (900.0, 500.0, 100.0, 900.0):  # the rise back to 900 starts a new call at step 0
                tiny_wan(x, torch.tensor([t]), ehs, return_dict=False)
            steps = h.stats()["steps"]
        assert set(steps) == {0, 1, 2}
        assert steps[0]["calls"] == 4 and steps[0]["density"] == 1.0  # 2 layers x 2 calls at step 0
        assert steps[1]["density"] < 1.0
        assert torch.equal(tiny_wan(x, torch.tensor([900.0]), ehs, return_dict=False)[0], ref)


def test_dense_layers_stay_dense(tiny_wan):
    x = torch.randn(1, 4, 5, 14, 18, generator=torch.Generator().manual_seed(0))
    ehs = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), ditaccel.accelerate(tiny_wan, "tile", dense_layers=[1], **SPARSE["tile"]) as h:
        tiny_wan(x, torch.tensor([900.0]), ehs, return_dict=False)
        layers = h.stats()["layers"]
    assert layers["transformer.1"]["density"] == 1.0
    assert layers["transformer.0"]["density"] < 1.0


def test_failed_accelerate_leaves_pipeline_untouched(monkeypatch):
    pipe = pipe_for("flux")
    ref = run(pipe, "flux")
    with pytest.raises(ValueError):
        ditaccel.accelerate(pipe, "tile", window=(2, 2, 2))
    assert_unwrapped(pipe)

    # A failure part-way through applying: everything already applied is undone (Flux's sites are
    # marked by torch module hooks, its step by a diffusers hook: fail at the third site).
    real = torch.nn.Module.register_forward_hook
    calls = {"n": 0}

    def flaky(self, hook, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real(self, hook, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        ditaccel.accelerate(pipe, "tile", **SPARSE["tile"])
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook", real)
    assert calls["n"] == 3
    assert_unwrapped(pipe)
    assert torch.equal(run(pipe, "flux"), ref)


def test_double_accelerate_is_refused():
    pipe = pipe_for("wan")
    with ditaccel.accelerate(pipe, "tile", **SPARSE["tile"]):
        with pytest.raises(ValueError, match="already accelerated"):
            ditaccel.accelerate(pipe, "dense")
    assert_unwrapped(pipe)


def test_unsupported_pipeline_names_class():
    class FakePipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"FakePipeline \(transformer: Linear\).*wan.*flux"):
        ditaccel.accelerate(FakePipeline())


def test_preset_and_stats_shape():
    pipe = pipe_for("wan")
    handle = ditaccel.accelerate(pipe, **{})
    try:
        assert handle.config.method == "radial"  # Radial Attention's published Wan 2.1 configuration
        assert "already" not in repr(handle)
    finally:
        handle.remove()
    assert not handle.active
    handle.remove()  # idempotent
