"""The two diffusers hooks ditaccel registers, in the style of ``diffusers.hooks``.

- ``StepHook`` (name ``STEP_HOOK``) on each transformer root: reads the latent grid, text span,
  denoising step and CFG branch of every forward into the transformer's runtime. Stateful: its
  per-branch state lives in a ``StateManager`` that the pipeline's ``cache_context`` switches, and
  diffusers resets it at the end of every pipeline call (``maybe_free_model_hooks``).
- ``AttentionHook`` (name ``ATTENTION_HOOK``) on each self-attention module of the SDPA and
  active-backend routes: marks its site as the one running and enters the interception around the
  module's forward, so the intercepted attention product knows its layer.
Both are installed and removed through ``composition.py`` (in any order with other hooks). The
dispatch route marks its site with two shared torch module hooks instead (``enter_site`` /
``leave_site``, below: compile-friendly).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from .compiled import SITE_ATTR, TRACING
from .intercept import ProcessorKind, SDPAIntercept, active_backend, bypass_reason, current_site
from .parallel import context_parallel, unsupported, unsupported_forward, whole_inputs
from .runtime import AttentionSite, ForwardInfo, StrictModeError, TransformerRuntime

STEP_HOOK = "ditaccel_step"
ATTENTION_HOOK = "ditaccel_attention"


class BranchState(BaseState):
    """Step clock of one CFG branch: the step index, inferred from timesteps when the pipeline
    does not pass ``step_index`` in its cache context."""

    def __init__(self):
        self.reset()

    def reset(self, *args, **kwargs) -> None:
        self.step = 0
        self.last_timestep: float | None = None
        self.shape: tuple | None = None


class StepHook(ModelHook):
    _is_stateful = True

    def __init__(self, runtime: TransformerRuntime, adapter):
        super().__init__()
        self.runtime = runtime
        self.adapter = adapter
        self.state_manager = StateManager(BranchState)

    def _branch_state(self) -> tuple[str, BranchState, int | None]:
        context = self.state_manager._context
        if context is None:  # a bare transformer call, outside any pipeline's cache_context
            self.state_manager.set_context(_DEFAULT_CONTEXT)
            try:
                return "default", self.state_manager.get_state(), None
            finally:
                self.state_manager.set_context(None)
        return context.name, self.state_manager.get_state(), context.step_index

    # Run eagerly even inside a compiled transformer (``transformer.compile()``): the step facts are
    # host values that change every step (dynamo would guard on them and recompile per step) and must
    # be in place before the compiled blocks run (dynamo replays traced side effects only after its
    # graph). ``recursive=False``: the transformer's own forward, called from here, is still compiled.
    @torch._dynamo.disable(recursive=False)
    def new_forward(self, module, *args, **kwargs):
        if self.runtime.detached:  # removed, but a wrapper we could not see still calls us
            return self.fn_ref.original_forward(*args, **kwargs)
        cp = context_parallel(module)
        reason = unsupported(cp, self.adapter.text_position, self.adapter.context_parallel_streams)
        if reason is not None:  # enable_parallelism after accelerate: refuse before anything runs
            raise ValueError(f"ditaccel: {self.runtime.name}: {reason}; remove() ditaccel or disable parallelism")
        # enable_parallelism after accelerate: a plan that splits the transformer's own inputs (Flux) split
        # them before this hook; the facts are read from the whole inputs, gathered back
        whole_args, whole_kwargs = whole_inputs(module, STEP_HOOK, args, kwargs) if cp is not None else (args, kwargs)
        facts = self.adapter.call_facts(module, whole_args, whole_kwargs)
        reason = unsupported_forward(cp, type(module).__name__, facts.grid, facts.text_len,
                                     facts.text_position or self.adapter.text_position, facts.token_order,
                                     facts.dense_reason)
        if reason is not None:  # what only this forward's shape shows: refused before its first block
            raise ValueError(f"ditaccel: {self.runtime.name}: {reason}; remove() ditaccel or disable parallelism")
        branch, state, step_index = self._branch_state()
        shape = (facts.grid, facts.text_len, facts.batch)
        t = facts.timestep
        if step_index is not None:
            state.step = step_index
        elif state.last_timestep is None or (t is not None and t > state.last_timestep):
            state.step = 0  # first call, or the noise level rose again: a new pipeline call
        elif t is not None and t < state.last_timestep:
            state.step += 1
        state.last_timestep = t
        state.shape = shape
        self.runtime.begin(ForwardInfo(
            grid=facts.grid, text_len=facts.text_len, text_position=facts.text_position or self.adapter.text_position,
            batch=facts.batch, step=state.step, branch=branch, token_order=facts.token_order,
            dense_reason=facts.dense_reason,
        ))
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            reached = self.runtime.reached
            self.runtime.end()
            if current_site.get() is not None:  # an attention forward that raised left its site marked
                current_site.set(None)
        if not reached:  # no self-attention call reached ditaccel in this forward: say so, once
            stats = self.runtime.stats
            stats.forwards_without_attention += 1
            if stats.forwards_without_attention == 1:
                message = (f"ditaccel: a forward of {self.runtime.name} ran with no self-attention call reaching "
                           "ditaccel (a cache skipped every attention module, or they bypass ditaccel; see "
                           "stats()['paths'])")
                stats.note("forward without attention", message)
                warnings.warn(message, stacklevel=2)
        return out

    def reset_state(self, module):
        self.state_manager.reset()
        self.runtime.reset()
        return module


@dataclass
class SiteMark:
    """What the hooks of one self-attention module know: its site, how its attention is intercepted,
    our backend member and the processor seen at ``accelerate`` (to tell a swap from a cache)."""

    site: AttentionSite
    kind: ProcessorKind
    member: object = None
    processor: object = None


def no_attention_reached(mark: SiteMark, module) -> None:
    """The module's forward ran and no attention call reached ditaccel: a cache beneath answered (counted),
    or its processor/backend was swapped (warned once, recorded; an error under ``strict=True``)."""
    site = mark.site
    stats = site.runtime.stats
    reason = bypass_reason(module, mark.processor, mark.kind, mark.member)
    if reason is None:
        stats.skipped += 1  # a hook beneath ours (a cache) answered without attention
        return
    stats.record_bypass(reason)
    message = f"ditaccel: {site.name}: {reason}"
    if site.runtime.strict:
        raise StrictModeError(f"ditaccel (strict=True): {site.name}: {reason}")
    if reason not in site._warned:
        site._warned.add(reason)
        stats.note(reason, message)
        warnings.warn(message, stacklevel=3)


class AttentionHook(ModelHook):
    """The SDPA and active-backend routes: the interception entered around the module's forward."""

    def __init__(self, site: AttentionSite, kind: ProcessorKind, member=None, processor=None):
        super().__init__()
        self.site = site
        self.kind = kind
        self.member = member  # our backend's AttentionBackendName member (DISPATCH_ACTIVE)
        self.mark = SiteMark(site, kind, member, processor)

    def new_forward(self, module, *args, **kwargs):
        if self.site.runtime.detached:
            return self.fn_ref.original_forward(*args, **kwargs)
        token = current_site.set(self.site)
        reached = self.site.reached
        try:
            if self.kind is ProcessorKind.SDPA:
                with SDPAIntercept(self.site):
                    out = self.fn_ref.original_forward(*args, **kwargs)
            elif self.kind is ProcessorKind.DISPATCH_ACTIVE:
                with active_backend(self.site, self.member):
                    out = self.fn_ref.original_forward(*args, **kwargs)
            else:
                out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            current_site.reset(token)
        if self.site.reached == reached:
            no_attention_reached(self.mark, module)
        return out


# --- the dispatch route: the running site, marked by torch module hooks ---------------------------
#
# A diffusers hook replaces the module's ``forward`` with a per-module wrapper; dynamo guards on that
# object's identity, so every block of ``compile_repeated_blocks`` would get a graph of its own. The
# dispatch route needs no wrapper around the forward (our backend is set on the processor; it only has
# to know which site is running), so it uses two *shared* module-level functions as forward pre/post
# hooks: one graph serves every block. (``always_call`` is not used: dynamo guards on each hook's id
# in that table. A forward that raises leaves no stale site: the step hook clears it.)

SITE_OBJECT_ATTR = "_ditaccel_site"  # the module's SiteMark
_ENTRY_ATTR = "_ditaccel_site_entry"  # (context token, the site's reached count) of the forward in flight


def enter_site(module, args) -> None:
    if torch.compiler.is_compiling():
        TRACING.site_index = getattr(module, SITE_ATTR)  # a graph input (compiled.py)
        return
    site = module.__dict__[SITE_OBJECT_ATTR].site
    module.__dict__[_ENTRY_ATTR] = (current_site.set(site), site.reached)


def leave_site(module, args, output) -> None:
    if torch.compiler.is_compiling():
        TRACING.site_index = None
        return
    entry = module.__dict__.pop(_ENTRY_ATTR, None)
    if entry is None:
        return
    token, reached = entry
    current_site.reset(token)
    mark = module.__dict__[SITE_OBJECT_ATTR]
    if mark.site.reached == reached:
        no_attention_reached(mark, module)


class _DefaultContext:
    name = "default"
    step_index = None


_DEFAULT_CONTEXT = _DefaultContext()
