"""ditaccel composed with diffusers' caches, offloading and accelerate hooks, in either order.

Every end state must equal the pipeline with only the remaining technique, bit for bit: remove()
takes out exactly ditaccel's hooks (ditaccel/composition.py) and leaves every other one working.
The full 7 caches x 2 orders x 2 removal orders matrix runs on Wan by default and on Flux,
HunyuanVideo and CogVideoX under ``-m slow``.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from diffusers.hooks import (FasterCacheConfig, FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                             SeaCacheConfig, TaylorSeerCacheConfig, TextKVCacheConfig)
from tiny_pipelines import pipe_for, run_latents

import ditaccel
from ditaccel.composition import CompositionError
from ditaccel.hooks import ATTENTION_HOOK, STEP_HOOK

SPARSE = dict(kernel_size=(1, 3, 3), block_size=64)  # token-exact window: sparse on the default tiny grids
CACHES = ("pab", "faster", "first_block", "mag", "sea", "taylorseer", "text_kv")  # all that diffusers 0.42.1 ships


def cache_config(name: str, pipe):
    """Each diffusers cache, tuned to act within 3 steps of a tiny pipeline where it can."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    return {
        "pab": lambda: PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                       spatial_attention_timestep_skip_range=(-1, 1001),
                                                       current_timestep_callback=timestep),
        # guidance-distilled mode: the tiny Wan/Flux/Hunyuan pipelines run CFG branches as separate calls;
        # the first step must compute (a skip range that includes it reads an empty cache in diffusers).
        "faster": lambda: FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 900),
                                            current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.5,
                                            is_guidance_distilled=True),
        "first_block": lambda: FirstBlockCacheConfig(threshold=0.5),
        "mag": lambda: MagCacheConfig(threshold=10.0, num_inference_steps=3, retention_ratio=0.0, mag_ratios=[1.0] * 3),
        "sea": lambda: SeaCacheConfig(threshold=10.0, retention_steps=1, cache_end_steps=0),
        # on the self-attention modules ditaccel hooks too (its default identifiers match nothing in Wan)
        "taylorseer": lambda: TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"(blocks|transformer_blocks|single_transformer_blocks)\.\d+\.attn1?"]),
        "text_kv": lambda: TextKVCacheConfig(),
    }[name]()


def run(pipe, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SeaCache's fail-open notice, FasterCache's experimental notice
        return run_latents(pipe, family, steps=3)


def hook_names(model) -> set[str]:
    return {n for m in model.modules() for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})}


def plain_forwards(model) -> bool:
    """No module's forward is wrapped (diffusers' own removal may leave the bound method in __dict__)."""
    for m in model.modules():
        fn = m.__dict__.get("forward")
        if fn is not None and getattr(fn, "__func__", None) is not type(m).forward:
            return False
    return True


def leave_clean(model) -> None:
    """What diffusers' and accelerate's own removals leave behind (the class forward bound into the
    instance __dict__, empty registries; outputs unchanged): cleared, so the shared tiny pipelines look
    untouched to the test files that run after this one."""
    for m in model.modules():
        fn = m.__dict__.get("forward")
        if fn is not None and getattr(fn, "__func__", None) is type(m).forward:
            del m.forward
        registry = getattr(m, "_diffusers_hook", None)
        if registry is not None and not registry.hooks:
            del m._diffusers_hook


def assert_no_ditaccel(model):
    names = hook_names(model)
    assert STEP_HOOK not in names and ATTENTION_HOOK not in names


_REFERENCES: dict = {}


def references(family, cache=None):
    """(plain, ditaccel alone) per family; (cache alone, its hook names) per (family, cache): computed once."""
    key = (family, cache)
    if key not in _REFERENCES:
        pipe = pipe_for(family)
        if cache is None:
            plain = run(pipe, family)
            with ditaccel.accelerate(pipe, "window", **SPARSE):
                sparse_only = run(pipe, family)
            assert not torch.equal(sparse_only, plain)
            _REFERENCES[key] = plain, sparse_only
        else:
            pipe.transformer.enable_cache(cache_config(cache, pipe))
            _REFERENCES[key] = run(pipe, family), hook_names(pipe.transformer)
            pipe.transformer.disable_cache()
    return _REFERENCES[key]


def check_cell(family, cache, order, first):
    pipe = pipe_for(family)
    model = pipe.transformer
    plain, sparse_only = references(family)
    cache_only, cache_hooks = references(family, cache)
    assert cache_hooks

    if order == "cache_first":
        model.enable_cache(cache_config(cache, pipe))
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    else:
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
        model.enable_cache(cache_config(cache, pipe))
    both = run(pipe, family)
    assert torch.isfinite(both).all() and handle.stats()["calls"] > 0
    if first == "remove":
        handle.remove()
        assert_no_ditaccel(model)
        assert hook_names(model) == cache_hooks  # every cache hook still registered ...
        assert torch.equal(run(pipe, family), cache_only)  # ... and working exactly as alone
        calls = handle.stats()["calls"]
        model.disable_cache()
        assert torch.equal(run(pipe, family), plain)
        assert handle.stats()["calls"] == calls  # the removed handle sees nothing
    else:
        model.disable_cache()
        assert torch.equal(run(pipe, family), sparse_only)  # ditaccel alone, still sparse
        handle.remove()
        assert torch.equal(run(pipe, family), plain)
    assert not hook_names(model) and plain_forwards(model)
    leave_clean(model)


MATRIX = [(f, c, o, r) for f in ("wan", "flux", "hunyuan_video", "cogvideox") for c in CACHES
          for o in ("cache_first", "ditaccel_first") for r in ("remove", "disable")]
# The default run (13 cells): every cache once on Wan in the orders that broke before (ditaccel first, removed
# first: the cache was switched off; cache first, disabled first: ditaccel was), and each other family
# once; the other 99 of the 112 cells under -m slow.
REPRESENTATIVE = ([("wan", c, "ditaccel_first", "remove") for c in CACHES]
                  + [("wan", c, "cache_first", "disable") for c in ("pab", "faster", "taylorseer")]
                  + [("flux", "taylorseer", "ditaccel_first", "remove"), ("hunyuan_video", "pab", "cache_first", "disable"),
                     ("cogvideox", "faster", "ditaccel_first", "remove")])


@pytest.mark.parametrize("family,cache,order,first", REPRESENTATIVE)
def test_cache_matrix_representative(family, cache, order, first):
    check_cell(family, cache, order, first)


@pytest.mark.slow
@pytest.mark.parametrize("family,cache,order,first", [c for c in MATRIX if c not in REPRESENTATIVE])
def test_cache_matrix_full(family, cache, order, first):
    check_cell(family, cache, order, first)


# --- accelerate's hooks (sequential offload's AlignDevicesHook, model offload's) ----------------------

@pytest.mark.parametrize("order", ["align_first", "ditaccel_first"])
@pytest.mark.parametrize("first", ["remove", "detach"])
def test_align_devices_hook_either_order(order, first):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    class CountingAlign(AlignDevicesHook):
        def pre_forward(self, module, *args, **kwargs):
            fired[0] += 1
            return super().pre_forward(module, *args, **kwargs)

    family = "wan"
    pipe = pipe_for(family)
    model = pipe.transformer
    targets = [model] + [b.attn1 for b in model.blocks] + [b.attn2 for b in model.blocks]  # 5 modules
    plain, sparse_only = references(family)
    fired = [0]

    def attach():
        for m in targets:
            add_hook_to_module(m, CountingAlign(execution_device="cpu", io_same_device=True))

    def detach():
        for m in targets:
            remove_hook_from_module(m)

    if order == "align_first":
        attach()
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    else:
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
        attach()
    assert torch.equal(run(pipe, family), sparse_only)
    if first == "remove":
        handle.remove()
        fired[0] = 0
        assert torch.equal(run(pipe, family), plain)
        assert fired[0] == 5 * 3 * 2  # every AlignDevicesHook still fires: 5 modules x 3 steps x 2 branches
        detach()
    elif order == "ditaccel_first":
        detach()
        assert torch.equal(run(pipe, family), sparse_only)
        assert not handle.stats()["unreachable_hooks"]
        handle.remove()
    else:
        # accelerate's remove_hook_from_module restores the forward from before its hook, dropping every
        # wrapper put on top since (ours): not preventable from here, but reported, never silent.
        detach()
        assert torch.equal(run(pipe, family), plain)
        # Wan's attention sites are marked by torch module hooks (hooks.enter_site), which restoring a
        # forward does not drop; the step hook on the root is a forward wrapper, and is dropped.
        assert set(handle.stats()["unreachable_hooks"]) == {"transformer"}
        assert any("remove_hook_from_module" in n for n in handle.stats()["notes"])
        handle.remove()
    assert torch.equal(run(pipe, family), plain)
    assert not hook_names(model) and not any(hasattr(m, "_hf_hook") for m in model.modules())
    leave_clean(model)


@pytest.mark.parametrize("order", ["offload_first", "ditaccel_first"])
def test_group_offload_either_order(order):
    family = "wan"
    pipe = pipe_for(family)
    model = pipe.transformer
    plain, sparse_only = references(family)

    def offload():
        model.enable_group_offload(onload_device=torch.device("cpu"), offload_type="leaf_level")

    if order == "offload_first":
        offload()
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    else:
        handle = ditaccel.accelerate(pipe, "window", **SPARSE)
        offload()
    offload_hooks = hook_names(model) - {STEP_HOOK, ATTENTION_HOOK}
    assert offload_hooks
    assert torch.equal(run(pipe, family), sparse_only)
    handle.remove()
    assert hook_names(model) == offload_hooks
    assert torch.equal(run(pipe, family), plain)
    for name in sorted(offload_hooks):  # back to the plain model for the tests that share it
        model._diffusers_hook.remove_hook(name, recurse=True)
    leave_clean(model)
    assert torch.equal(run(pipe, family), plain)


# --- wrappers ditaccel cannot see through ------------------------------------------------------------

def test_remove_refuses_under_a_foreign_wrapper_and_changes_nothing():
    # The step hook wraps the transformer's forward (Wan's attention sites are torch module hooks,
    # which a forward wrapper cannot hide): a user's wrapper put over it after ditaccel.
    family = "wan"
    pipe = pipe_for(family)
    plain, sparse_only = references(family)
    handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    model = pipe.transformer
    ours = model.forward

    def foreign(*args, **kwargs):  # a user's own wrapper, installed after ditaccel
        return ours(*args, **kwargs)

    model.forward = functools.update_wrapper(foreign, ours)
    with pytest.raises(CompositionError, match=r"transformer.*foreign.*remove that wrapper first"):
        handle.remove()
    assert handle.active and torch.equal(run(pipe, family), sparse_only)  # nothing was changed
    model.forward = ours
    handle.remove()
    assert torch.equal(run(pipe, family), plain)
    assert not hook_names(pipe.transformer)


def test_a_hidden_caller_of_a_removed_hook_only_passes_through():
    family = "wan"
    pipe = pipe_for(family)
    plain, _ = references(family)
    handle = ditaccel.accelerate(pipe, "window", **SPARSE)
    model = pipe.transformer
    ours = model.forward
    model.forward = lambda *a, **k: ours(*a, **k)  # no __wrapped__: ditaccel cannot know it calls its hook
    handle.remove()
    calls = handle.stats()["calls"]
    assert torch.equal(run(pipe, family), plain)
    assert handle.stats()["calls"] == calls
    del model.forward
