"""``accelerate(pipe, method, **overrides)``: the one call, and the handle that undoes it.

Everything that can fail is checked before anything is changed (model family, config, which
modules are self-attention and how their processors compute attention), so a failed call leaves
the pipeline untouched; if applying still fails part-way, what was applied is undone before the
error propagates. ``handle.remove()`` takes out exactly ditaccel's hooks and processor backends,
whatever was registered before or after them (``composition.py``), or refuses, changing nothing.
"""

from __future__ import annotations

from typing import Any


from .caches import CrossStepCaches
from .checks import check_against_pipeline
from .compiled import SITE_ATTR, register_site
from .composition import check_entry, install, uninstall_all
from .config import AttentionConfig, with_overrides
from .hooks import (ATTENTION_HOOK, SITE_OBJECT_ATTR, STEP_HOOK, AttentionHook, SiteMark, StepHook, enter_site,
                    leave_site)
from .intercept import ProcessorKind, backend_member, processor_kind
from .methods import config_class, make_method
from .parallel import context_parallel, unsupported
from .pipelines import ModelAdapter, find_adapter
from .runtime import AttentionSite, Stats, TransformerRuntime
from .schedule import PipelineClock
from .state import StateStore

_MISSING = object()


def resolve_config(adapter: ModelAdapter, method, overrides: dict[str, Any], target=None,
                   notes: set[str] | None = None) -> AttentionConfig:
    """``method`` (None, a name or a config) + field overrides -> a validated config. None means
    the preset for ``target`` (the pipeline or transformer; without one, the family's). A preset's or
    family default's dense fraction on a bare transformer becomes a count (``for_target``; the note
    goes to ``notes``); the user's own fields are taken as given."""
    if isinstance(method, AttentionConfig):
        config = method
    else:
        config = adapter.preset_for(target) if method is None else config_class(method)(**adapter.method_defaults(method, target))
        config, note = adapter.for_target(config, target)
        if note and notes is not None and "dense_steps" not in overrides:
            notes.add(note)
    return with_overrides(config, overrides) if overrides else config


class AccelerationHandle:
    """What ``accelerate`` returns: ``stats()``, ``remove()``, and a context manager."""

    def __init__(self, target, adapter: ModelAdapter, config: AttentionConfig):
        self.target = target
        self.adapter = adapter
        self.config = config
        self.stats_recorder = Stats()
        self.store = StateStore(config.cache_budget_mb)
        self.stats_recorder.store = self.store
        self.runtimes: list[TransformerRuntime] = []
        self._undo: list = []
        self._hooks: list = []  # (where, composition.InstalledHook), in install order
        self._removed = False
        self.notes: set[str] = set()  # how accelerate fitted the config to the target (stats()["notes"])

    @property
    def active(self) -> bool:
        return not self._removed

    def stats(self) -> dict:
        """Per-layer, per-step density, call counts and attention time (ms: CUDA events on CUDA, wall
        clock elsewhere); errors against dense attention at tracked steps; event counters; the
        memory the cross-step caches hold."""
        notes = sorted(set(self.notes).union(*(rt.method.notes for rt in self.runtimes)))
        unreachable = [where for where, hook in self._hooks if not hook.reachable()]
        if unreachable:
            notes.append(f"ditaccel's hooks on {', '.join(unreachable)} are no longer called: a wrapper beneath them "
                         "was removed by restoring the forward from before it (e.g. accelerate's "
                         "remove_hook_from_module); accelerate again after remove() to run sparse there")
        return {"method": self.config.method, "family": self.adapter.family, "config": self.config.to_dict(),
                **self.stats_recorder.summary(), "notes": notes, "unreachable_hooks": unreachable}

    def reset_stats(self) -> None:
        self.stats_recorder.clear()

    def observe(self, fn) -> None:
        """Call ``fn(call, q, k, v)`` on every intercepted self-attention call (``None`` stops).

        ``call``: the ``ditaccel.call.Call`` -- transformer, layer, step, branch, grid (T, H, W), text_len,
        text_position, batch, heads (attributes, or ``call["layer"]``); q, k, v
        are [B, S, H, D] exactly as attention sees them (after the model's norms and RoPE). For
        analysis: it runs before the method decides, whatever the method does with the call.
        """
        if fn is not None and not callable(fn):
            raise ValueError(f"observe(fn): fn must be callable or None, got {type(fn).__name__}")
        for rt in self.runtimes:
            rt.observer = fn

    def time_attention(self, enabled: bool = True) -> None:
        """Time every intercepted attention call (``stats()`` ``time_ms``, ``attention_time_ms``); on by
        default. Off, the call path has no timer at all (no CUDA events, no clock reads)."""
        if not isinstance(enabled, bool):
            raise ValueError(f"time_attention(enabled): a bool, got {enabled!r}")
        for rt in self.runtimes:
            rt.timing = enabled

    def track_attention_error(self, steps=None) -> None:
        """At these denoising steps, also run the model's dense attention on the same q, k, v for every
        sparse or reused call and record ``||out - dense|| / ||dense||`` (``stats()["attention_error"]``).
        ``None`` or empty: stop. The extra dense call is kept out of the attention time."""
        steps = frozenset() if steps is None else frozenset(steps)
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
            raise ValueError(f"track_attention_error(steps): step indices must be ints >= 0, got {sorted(steps)}")
        for rt in self.runtimes:
            rt.error_steps = steps

    def remove(self) -> None:
        """Take ditaccel out (idempotent): exactly its hooks and processor backends, leaving every hook
        registered before or after it working.

        Raises:
            composition.CompositionError: a wrapper installed after ditaccel calls its hook in a way
                that cannot be re-pointed; the message names it. Nothing is changed then.
        """
        uninstall_all(self._hooks)  # raises before changing anything
        self._hooks.clear()
        for rt in self.runtimes:
            rt.detached = True  # a wrapper that still holds our hook's forward (hidden from us) passes through
        while self._undo:
            self._undo.pop()()
        self._removed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "removed" if self._removed else "active"
        return f"AccelerationHandle({self.adapter.family}, {self.config!r}, {state})"


def accelerate(pipe, method: str | AttentionConfig | None = None, *, model=None, preset=None, strict: bool = False,
               **overrides) -> AccelerationHandle:
    """Make the self-attention of ``pipe`` (a diffusers pipeline or bare transformer) sparse.

    Args:
        pipe: a diffusers pipeline (``WanPipeline``, ``HunyuanVideoPipeline``, ``FluxPipeline``, ...)
            or a bare transformer of a supported family (``ditaccel.SUPPORTED_FAMILIES``).
        method: None for the preset (the family's, or the embedded pipeline's own), a method name
            (one of ``ditaccel.METHODS``; ``ditaccel methods`` lists their knobs) or a config
            instance such as ``ditaccel.TileConfig(window=(3, 3, 3))``.
        model: a ``ditaccel.ModelSpec`` describing a transformer no adapter knows (which modules are
            its self-attention, the token grid, the text span); it replaces the adapter lookup.
        preset: a preset file written by ``ditaccel calibrate`` (instead of ``method``); refused when it
            was calibrated on another transformer (class or configuration).
        strict: True turns every fallback to the model's own attention (an unsupported mask, an
            unexpected sequence, ...) and every self-attention call that bypasses ditaccel (a processor
            or backend swapped after ``accelerate``) into a ``ditaccel.StrictModeError``, for benchmarks
            that must prove they ran sparse. Dense steps and layers the config asks for are no fallback.
        **overrides: that config's fields, e.g. ``window=(3, 3, 3), dense_steps=2``.

    Returns:
        An :class:`AccelerationHandle`: ``stats()``, ``observe(fn)``, ``track_attention_error(steps)``,
        ``reset_stats()``, ``remove()`` (the pipeline back, bit-identical), and a context manager.

    Raises:
        ValueError: an unsupported model (the message lists the supported families and names
            ``ModelSpec``), a bad ``ModelSpec`` or one that matches no module, an unknown method or
            field, a value out of range (the message names the field, the value and what is
            allowed), or a pipeline that is already accelerated. Nothing is changed then.

    Example:
        >>> handle = ditaccel.accelerate(pipe, "tile", window=(3, 3, 3), dense_steps=2)  # doctest: +SKIP
        >>> video = pipe(prompt, num_inference_steps=20).frames[0]  # doctest: +SKIP
        >>> handle.stats()["mean_density"], handle.remove()  # doctest: +SKIP
    """
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    check_entry(pipe)
    adapter = find_adapter(pipe, model)
    if preset is not None:
        if method is not None:
            raise ValueError(f"accelerate: give a method or preset=, not both (got method={method!r}, preset={preset!r})")
        from .calibration.preset import preset_config

        method = preset_config(preset, pipe)
    notes: set[str] = set()
    config = resolve_config(adapter, method, overrides, pipe, notes)
    transformers = adapter.transformers(pipe)
    for attr, transformer in transformers:
        reason = unsupported(context_parallel(transformer), adapter.text_position, adapter.context_parallel_streams)
        if reason is not None:
            raise ValueError(f"{type(pipe).__name__}.{attr} has diffusers' context parallelism enabled: {reason}")
    if not transformers:
        raise ValueError(f"{type(pipe).__name__} has no transformer to accelerate (looked for {adapter.pipeline_attrs})")
    for attr, transformer in transformers:
        if not adapter.matches(transformer):
            raise ValueError(f"{type(pipe).__name__}.{attr} is a {type(transformer).__name__}, not one of "
                             f"{adapter.transformer_classes} ({adapter.family})")
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(STEP_HOOK) is not None:
            raise ValueError(f"{type(pipe).__name__}.{attr} is already accelerated; remove() the first handle")

    # Plan everything before touching anything.
    work = []
    for attr, transformer in transformers:
        sites = []
        for name, layer, module in adapter.self_attention_modules(transformer):
            processor = getattr(module, "processor", None)
            if processor is None and not adapter.accepts_plain_modules:
                raise ValueError(f"{attr}.{name} ({type(module).__name__}) has no attention processor to intercept")
            kind = ProcessorKind.SDPA if processor is None else processor_kind(processor)
            sites.append((name, layer, module, processor, kind))
        if not sites:
            raise ValueError(f"found no self-attention modules in {attr} ({type(transformer).__name__})")
        work.append((attr, transformer, sites))
    check_against_pipeline(config, pipe, [(f"{attr}.{s[0]}", s[2]) for attr, _, sites in work for s in sites])
    dispatching = (ProcessorKind.DISPATCH, ProcessorKind.DISPATCH_ACTIVE)
    member = backend_member() if any(s[4] in dispatching for w in work for s in w[2]) else None

    handle = AccelerationHandle(pipe, adapter, config)
    handle.notes |= notes
    method_impl = make_method(config)
    caches = CrossStepCaches(config, method_impl)
    handle._undo.append(lambda: _invalidate_registry_caches([t for _, t, _ in work]))
    try:
        for attr, transformer, sites in work:
            runtime = TransformerRuntime(attr, method_impl, handle.stats_recorder, handle.store, caches,
                                         clock=PipelineClock(pipe))
            runtime.strict = strict
            handle.runtimes.append(runtime)
            for name, layer, module, processor, kind in sites:
                original = getattr(processor, "_attention_backend", None)
                site = AttentionSite(runtime, layer, f"{attr}.{name}", original_backend=original)
                handle._undo.append(_restore_attr(module, SITE_ATTR))
                setattr(module, SITE_ATTR, register_site(site))  # compiled.py: the site as a graph input
                if kind is ProcessorKind.DISPATCH:
                    # Shared torch module hooks, removable in any order (hooks.py: compile-friendly).
                    handle._undo.append(_restore_attr(module, SITE_OBJECT_ATTR))
                    setattr(module, SITE_OBJECT_ATTR, SiteMark(site, kind, member, processor))
                    handle._undo.append(module.register_forward_pre_hook(enter_site).remove)
                    handle._undo.append(module.register_forward_hook(leave_site).remove)
                else:
                    hook = AttentionHook(site, kind, member, processor)
                    handle._hooks.append((f"{attr}.{name}", install(module, hook, ATTENTION_HOOK)))
                if kind is ProcessorKind.DISPATCH:
                    handle._undo.append(_restore_attr(processor, "_attention_backend", member))
                    processor._attention_backend = member
            handle._hooks.append((attr, install(transformer, StepHook(runtime, adapter), STEP_HOOK)))
            transformer._diffusers_hook.invalidate_child_registries_cache()
    except BaseException:
        handle.remove()
        raise
    return handle


def _invalidate_registry_caches(transformers) -> None:
    """Registries that outlive us cache their children's registries: refresh those lists."""
    for transformer in transformers:
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


def _restore_attr(obj, name: str, ours=_MISSING):
    """Undo for setting ``obj.name``; when ``ours`` is given, only while it still holds ``ours`` (a value
    the user set since, e.g. ``set_attention_backend``, is theirs to keep)."""
    had = name in vars(obj)
    old = vars(obj).get(name, _MISSING)

    def undo():
        if ours is not _MISSING and vars(obj).get(name, _MISSING) is not ours:
            return
        if had:
            setattr(obj, name, old)
        elif name in vars(obj):
            delattr(obj, name)

    return undo

