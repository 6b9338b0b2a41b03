"""Installing and removing ditaccel's diffusers hooks so that any other hook, before or after, survives.

diffusers chains the hooks of one module's ``HookRegistry`` through ``HookFunctionReference``
objects: each hook's wrapper calls the wrapper of the hook registered before it. Two things in
that scheme break composition, and this module works around both without patching diffusers:

- ``HookRegistry.remove_hook`` of a hook that is not the last one sets the *next* hook's
  ``fn_ref.forward`` to what lay beneath the removed one. For a next hook that has a
  ``new_forward`` that replaces the call of ``new_forward`` itself, so the next hook silently
  stops running (cache first, ditaccel second, ``disable_cache()`` then turned ditaccel off).
  Our hooks' function references are *pinned*: assigning their ``forward`` re-points what they
  wrap (``original_forward``) instead, which is what the removal meant.
- Undoing a hook by restoring ``module.forward`` to its value from before drops every wrapper
  put on top since (a cache, accelerate's ``AlignDevicesHook``). ``uninstall`` instead finds the
  one place that calls our wrapper -- the module's ``forward`` (we are outermost), the next hook's
  function reference, or accelerate's ``module._old_forward`` -- and points it at what our
  wrapper called. A foreign wrapper that calls ours in a way we cannot re-point makes ``remove()``
  refuse with a message naming it, before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.hooks import HookFunctionReference

from .parallel import context_parallel, unsupported


class CompositionError(RuntimeError):
    """``remove()`` cannot take ditaccel out without changing a wrapper someone else installed."""


class _PinnedFunctionReference(HookFunctionReference):
    """A function reference whose ``forward`` (our hook's ``new_forward``) cannot be replaced.

    diffusers' ``remove_hook`` of the hook registered just before ours assigns ``forward`` meaning
    "call this beneath you"; for a ``new_forward`` hook that is ``original_forward``.
    """

    @property
    def forward(self):
        return self.__dict__["_pinned_forward"]

    @forward.setter
    def forward(self, fn):
        self.original_forward = fn


def _inner(fn_ref) -> object:
    """What a function reference's wrapper calls beneath its hook."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_inner(fn_ref, fn) -> None:
    if fn_ref.original_forward is not None:
        fn_ref.original_forward = fn
    else:
        fn_ref.forward = fn


@dataclass
class InstalledHook:
    """One of our hooks on one module: enough to take exactly it out again."""

    module: torch.nn.Module
    name: str
    wrapper: object  # module.forward right after registering: the callable that runs our hook
    created_registry: bool

    @property
    def registry(self):
        return getattr(self.module, "_diffusers_hook", None)

    def fn_ref(self):
        registry = self.registry
        if registry is None or self.name not in registry.hooks:
            return None
        return registry._fn_refs[registry._hook_order.index(self.name)]

    def reachable(self) -> bool:
        """Does the module's forward still lead to our hook? ``False`` after a wrapper beneath ours was
        removed by restoring the forward from before it (accelerate's ``remove_hook_from_module``)."""
        return self.fn_ref() is not None and _wraps(getattr(self.module, "forward", None), self.wrapper)

    def plan_removal(self, where: str):
        """-> a function that unlinks the hook (None: already gone). Raises ``CompositionError`` when a
        foreign wrapper calls ours in a way that cannot be re-pointed; nothing is changed then."""
        fn_ref = self.fn_ref()
        if fn_ref is None:
            return None
        registry = self.registry
        below = _inner(fn_ref)
        index = registry._hook_order.index(self.name)
        setters = []
        for later in registry._fn_refs[index + 1:]:
            if _inner(later) is self.wrapper:
                setters.append(lambda later=later: _set_inner(later, below))
        current = self.module.__dict__.get("forward")
        if current is self.wrapper:
            setters.append(lambda: _restore_forward(self.module, below))
        if self.module.__dict__.get("_old_forward") is self.wrapper:  # accelerate's add_hook_to_module
            setters.append(lambda: setattr(self.module, "_old_forward", below))
        if not setters and current is not None and _wraps(current, self.wrapper):
            raise CompositionError(
                f"cannot remove ditaccel's hook {self.name!r} from {where}: its forward was wrapped afterwards by "
                f"{_describe(current)}, which ditaccel cannot re-point; remove that wrapper first, then call remove()"
            )

        def unlink():
            for set_ in setters:
                set_()
            registry.hooks[self.name].deinitalize_hook(self.module)
            del registry.hooks[self.name]
            registry._hook_order.pop(index)
            registry._fn_refs.pop(index)
            if self.created_registry and not registry.hooks and getattr(self.module, "_diffusers_hook", None) is registry:
                del self.module._diffusers_hook

        return unlink


def install(module: torch.nn.Module, hook, name: str) -> InstalledHook:
    """Register ``hook`` under ``name`` in ``module``'s registry with a pinned function reference."""
    created = not hasattr(module, "_diffusers_hook")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    try:
        registry.register_hook(hook, name)
    except BaseException:
        if created and not registry.hooks:
            del module._diffusers_hook
        raise
    fn_ref = registry._fn_refs[-1]
    if fn_ref.original_forward is not None:  # a new_forward hook: pin it
        pinned = fn_ref.__dict__.pop("forward")
        fn_ref.__class__ = _PinnedFunctionReference
        fn_ref.__dict__["_pinned_forward"] = pinned
    return InstalledHook(module, name, module.__dict__["forward"], created)


def uninstall_all(installed: list[tuple[str, InstalledHook]]) -> None:
    """Take every hook of ``installed`` ((where, hook) pairs) out, or none of them."""
    plans = [(where, h.plan_removal(where)) for where, h in installed]  # raises before any change
    for _, unlink in reversed(plans):
        if unlink is not None:
            unlink()


def _restore_forward(module: torch.nn.Module, fn) -> None:
    bound = getattr(fn, "__func__", None)
    if getattr(fn, "__self__", None) is module and bound is getattr(type(module), "forward", None):
        module.__dict__.pop("forward", None)  # the class's own forward again, as before any hook
    else:
        module.forward = fn


def _wraps(fn, target, depth: int = 64) -> bool:
    """Does ``fn`` reach ``target`` through ``__wrapped__`` links (``functools.update_wrapper``)?"""
    for _ in range(depth):
        if fn is target:
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _describe(fn) -> str:
    """Where a wrapper was defined (its code, not the names ``update_wrapper`` copied from what it wraps)."""
    func = getattr(fn, "func", fn)  # a functools.partial
    code = getattr(func, "__code__", None)
    if code is None:
        return type(fn).__qualname__
    return f"{code.co_qualname} ({code.co_filename}:{code.co_firstlineno})"


def check_entry(pipe) -> None:
    """Refuse, before anything changes, what ``accelerate`` cannot act on, saying what to do instead:
    a ``torch.compile`` result (an ``OptimizedModule`` wrapping the transformer) and a transformer
    with a kind of diffusers' context parallelism that ditaccel does not run under (``parallel.py``)."""
    components = getattr(pipe, "components", None)
    candidates = [("the model", pipe)] + (list(components.items()) if isinstance(components, dict) else [])
    for name, obj in candidates:
        if isinstance(obj, torch._dynamo.eval_frame.OptimizedModule):
            where = "the model passed" if obj is pipe else f"{type(pipe).__name__}.{name}"
            raise ValueError(
                f"{where} is a torch.compile result (OptimizedModule of a {type(obj._orig_mod).__name__}); ditaccel "
                "hooks the transformer's own modules, which a compiled wrapper hides. Accelerate the uncompiled "
                "transformer, then compile in place: ditaccel.accelerate(pipe) followed by "
                "pipe.transformer.compile() or pipe.transformer.compile_repeated_blocks() (or put "
                f"{name}._orig_mod back on the pipeline before accelerate)")
        reason = unsupported(context_parallel(obj), None)
        if reason is not None:
            where = type(obj).__name__ if obj is pipe else f"{type(pipe).__name__}.{name}"
            raise ValueError(f"{where} has diffusers' context parallelism enabled: {reason}")
