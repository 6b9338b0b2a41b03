"""No silent no-ops: swaps under ditaccel, fallbacks and context parallelism are warned about once,
accounted for in stats()["paths"], and errors under strict=True; compile entry points."""

from __future__ import annotations

import warnings

import pytest
import torch
from tiny_pipelines import pipe_for, run_latents

import ditaccel
from ditaccel.composition import check_entry

SPARSE = dict(kernel_size=(1, 3, 3), block_size=64)
_REF: dict = {}


def run(pipe, family, **kw):
    return run_latents(pipe, family, steps=2, **kw)


def plain(family):
    if family not in _REF:
        _REF[family] = run(pipe_for(family), family)
    return _REF[family]


def self_attention(model):
    from ditaccel.pipelines import find_adapter

    return [m for _, _, m in find_adapter(model).self_attention_modules(model)]


def test_paths_account_for_every_call():
    family = "wan"
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, "window", dense_steps=1, **SPARSE) as handle:
        run(pipe, family)
        stats = handle.stats()
    paths = stats["paths"]
    # 2 steps x 2 CFG branches x 2 layers: step 0 dense by schedule, step 1 sparse
    assert paths["dense_by_schedule"] == 4 and paths["sparse"] == 4 and paths["reused"] == 0
    assert paths["dense_by_fallback"] == {} and paths["bypassed"] == {}
    assert paths["forwards_without_attention"] == 0
    # (60 tokens fit one 64-token block: the token-exact window is sparse inside it, its block density 1)
    assert paths["realised_density"] == pytest.approx(stats["mean_density"])


def _clear_backends(model):
    """set/reset_attention_backend set every attention processor's backend (cross-attention too): undo."""
    for m in model.modules():
        processor = getattr(m, "processor", None)
        if processor is not None:
            vars(processor).pop("_attention_backend", None)


def _swap_processor(model):
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    for m in self_attention(model):
        m.set_processor(WanAttnProcessor())


def _set_backend(model):
    model.set_attention_backend("native")


def _reset_backend(model):
    model.reset_attention_backend()


@pytest.mark.parametrize("swap,expect", [(_swap_processor, "processor was replaced"),
                                         (_set_backend, "backend was changed.*'native'"),
                                         (_reset_backend, "backend was changed.*None")])
def test_swaps_after_accelerate_are_reported_and_strict_raises(swap, expect):
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    family = "wan"
    pipe = pipe_for(family)
    model = pipe.transformer
    ref = plain(family)
    processors = [m.processor for m in self_attention(model)]
    active = _AttentionBackendRegistry._active_backend
    try:
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
        swap(model)
        with pytest.warns(UserWarning, match=expect) as record:
            out = run(pipe, family)
        assert sum(bool(__import__("re").search(expect, str(w.message))) for w in record) == 2  # once per module
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # the model's own attention ran
        paths = handle.stats()["paths"]
        (reason, n), = paths["bypassed"].items()
        assert __import__("re").search(expect, reason) and n == 2 * 2 * 2  # 2 modules x 2 steps x 2 branches
        assert paths["sparse"] == 0 and paths["forwards_without_attention"] == 4
        handle.remove()

        strict = ditaccel.accelerate(pipe, "window", strict=True, **SPARSE)
        swap(model)
        with pytest.raises(ditaccel.StrictModeError, match=expect):
            run(pipe, family)
        strict.remove()
    finally:
        for m, p in zip(self_attention(model), processors):
            m.set_processor(p)
        _clear_backends(model)
        _AttentionBackendRegistry._active_backend = active
    assert torch.equal(run(pipe, family), ref)


def test_remove_keeps_a_backend_the_user_set_afterwards():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    pipe = pipe_for("wan")
    active = _AttentionBackendRegistry._active_backend
    handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    pipe.transformer.set_attention_backend("native")
    handle.remove()
    try:
        assert all(m.processor._attention_backend is AttentionBackendName.NATIVE for m in self_attention(pipe.transformer))
    finally:
        _clear_backends(pipe.transformer)
        _AttentionBackendRegistry._active_backend = active


def test_fallback_is_counted_and_strict_raises(monkeypatch):
    family = "wan"
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, "window", **SPARSE) as handle:
        for rt in handle.runtimes:  # an adapter that cannot plan these forwards (e.g. an unknown grid)
            original = rt.begin
            monkeypatch.setattr(rt, "begin", lambda call, o=original: o(__import__("dataclasses").replace(
                call, dense_reason="test: no plan for this forward")))
        with pytest.warns(UserWarning, match="no plan for this forward"):
            out = run(pipe, family)
        paths = handle.stats()["paths"]
    torch.testing.assert_close(out, plain(family), rtol=1e-5, atol=1e-6)
    assert paths["dense_by_fallback"] == {"test: no plan for this forward": 8} and paths["sparse"] == 0
    assert paths["realised_density"] == 1.0

    with ditaccel.accelerate(pipe, "window", strict=True, **SPARSE) as handle:
        for rt in handle.runtimes:
            original = rt.begin
            monkeypatch.setattr(rt, "begin", lambda call, o=original: o(__import__("dataclasses").replace(
                call, dense_reason="test: no plan for this forward")))
        with pytest.raises(ditaccel.StrictModeError, match="strict=True.*no plan for this forward"):
            run(pipe, family)
    assert torch.equal(run(pipe, family), plain(family))


def test_strict_must_be_a_bool():
    with pytest.raises(ValueError, match="strict must be True or False, got 'yes'"):
        ditaccel.accelerate(pipe_for("wan"), "window", strict="yes", **SPARSE)


def _cp(ulysses, ring, ulysses_anything=False):  # what enable_parallelism records on the model (ParallelConfig)
    return type("P", (), {"context_parallel_config": type("C", (), {"ulysses_degree": ulysses, "ring_degree": ring,
                                                                       "ulysses_anything": ulysses_anything})()})()


UNEVEN = r"ulysses_anything=True \(ulysses_degree=2, ring_degree=1\) is not supported by ditaccel"


@pytest.mark.parametrize("family,cp,expect", [
    ("wan", (2, 1, True), UNEVEN),
    ("cogvideox", (2, 1), r"text tokens in self-attention \(text_position='prefix'\) is not supported.*not been verified"),
])
def test_unsupported_context_parallel_is_refused_before_anything_changes(family, cp, expect):
    model = pipe_for(family).transformer
    model._parallel_config = _cp(*cp)
    try:
        with pytest.raises(ValueError, match=expect):
            ditaccel.accelerate(pipe_for(family), "window", **SPARSE)
        assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook.hooks
    finally:
        del model._parallel_config


def test_unsupported_context_parallel_enabled_after_accelerate_is_refused_at_the_first_forward():
    family = "wan"
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, "window", **SPARSE) as handle:
        pipe.transformer._parallel_config = _cp(2, 1, True)
        try:
            with pytest.raises(ValueError, match=UNEVEN + r".*remove\(\) ditaccel"):
                run(pipe, family)
        finally:
            del pipe.transformer._parallel_config
        assert handle.stats()["calls"] == 0


def test_context_parallel_call_reaching_the_backend_is_a_reported_fallback():
    from ditaccel.intercept import _ditaccel_backend, current_site
    from ditaccel.runtime import AttentionSite, Stats

    class Runtime:
        stats, strict, reached = Stats(), False, 0

    site = AttentionSite(Runtime(), 0, "transformer.blocks.0.attn1")
    Runtime.current = None
    cp = _cp(2, 1, True)  # uneven Ulysses: not supported, so the call falls back (counted, warned)
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    token = current_site.set(site)
    try:
        with pytest.raises(Exception):  # diffusers' native backend then needs a real process group
            with pytest.warns(UserWarning, match=UNEVEN):
                _ditaccel_backend(q, k, v, _parallel_config=cp)
    finally:
        current_site.reset(token)
    (reason,) = Runtime.stats.fallbacks
    assert reason.startswith("ulysses_anything=True (ulysses_degree=2, ring_degree=1) is not supported by ditaccel")


def test_compiled_transformer_on_the_pipeline_is_explained():
    pipe = pipe_for("wan")
    original = pipe.transformer
    pipe.transformer = torch.compile(original)
    try:
        with pytest.raises(ValueError, match=r"torch.compile result.*accelerate.*compile_repeated_blocks"):
            ditaccel.accelerate(pipe, "window", **SPARSE)
        with pytest.raises(ValueError, match=r"the model passed is a torch.compile result"):
            check_entry(pipe.transformer)
    finally:
        pipe.transformer = original
    assert not getattr(original, "_diffusers_hook", None) or not original._diffusers_hook.hooks


@pytest.mark.slow
@pytest.mark.parametrize("how", ["compile", "compile_repeated_blocks"])
@pytest.mark.parametrize("order", ["compile_first", "ditaccel_first"])
def test_compile_in_place_either_order_matches_eager(how, order):
    family = "wan"
    pipe = pipe_for(family)
    model = pipe.transformer
    with ditaccel.accelerate(pipe, "window", **SPARSE):
        eager = run(pipe, family)
    compile_ = lambda: getattr(model, how)(backend="aot_eager")  # noqa: E731  (inductor needs a C++ toolchain)
    try:
        if order == "compile_first":
            compile_()
            handle = ditaccel.accelerate(pipe, "window", **SPARSE)
        else:
            handle = ditaccel.accelerate(pipe, "window", **SPARSE)
            compile_()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = run(pipe, family)
        assert handle.stats()["paths"]["sparse"] > 0
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        handle.remove()
    finally:
        for m in model.modules():
            m._compiled_call_impl = None
    assert torch.equal(run(pipe, family), plain(family))
