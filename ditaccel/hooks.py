"""The two diffusers hooks ditaccel registers, in the style of ``diffusers.hooks``.

- ``StepHook`` (name ``STEP_HOOK``) on each transformer root: reads the latent grid, text span,
  denoising step and CFG branch of every forward into the transformer's runtime. Stateful: its
  per-branch state lives in a ``StateManager`` that the pipeline's ``cache_context`` switches, and
  diffusers resets it at the end of every pipeline call (``maybe_free_model_hooks``).
- ``AttentionHook`` (name ``ATTENTION_HOOK``) on each self-attention module: marks its site as
  the one running, so the intercepted attention product knows its layer.
Both are removed with ``remove_hook(name, recurse=True)``.
"""

from __future__ import annotations

import warnings

from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

from .parallel import context_parallel, unsupported
from .intercept import ProcessorKind, SDPAIntercept, active_backend, bypass_reason, current_site
from .runtime import AttentionSite, CallInfo, StrictModeError, TransformerRuntime

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

    def new_forward(self, module, *args, **kwargs):
        if self.runtime.detached:  # removed, but a wrapper we could not see still calls us
            return self.fn_ref.original_forward(*args, **kwargs)
        reason = unsupported(context_parallel(module), self.adapter.text_position)
        if reason is not None:  # enable_parallelism after accelerate: refuse before anything runs
            raise ValueError(f"ditaccel: {self.runtime.name}: {reason}; remove() ditaccel or disable parallelism")
        facts = self.adapter.call_facts(module, args, kwargs)
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
        self.runtime.begin(CallInfo(
            grid=facts.grid, text_len=facts.text_len, text_position=facts.text_position or self.adapter.text_position,
            batch=facts.batch, step=state.step, branch=branch, token_order=facts.token_order,
            dense_reason=facts.dense_reason,
        ))
        try:
            out = self.fn_ref.original_forward(*args, **kwargs)
        finally:
            reached = self.runtime.reached
            self.runtime.end()
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


class AttentionHook(ModelHook):
    def __init__(self, site: AttentionSite, kind: ProcessorKind, member=None, processor=None):
        super().__init__()
        self.site = site
        self.kind = kind
        self.member = member  # our backend's AttentionBackendName member (set on DISPATCH processors)
        self.processor = processor  # the processor seen at accelerate (swap detection)

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
            self._no_attention_reached(module)
        return out

    def _no_attention_reached(self, module) -> None:
        stats = self.site.runtime.stats
        reason = bypass_reason(module, self.processor, self.kind, self.member)
        if reason is None:
            stats.skipped += 1  # a hook beneath ours (a cache) answered without attention
            return
        stats.record_bypass(reason)
        message = f"ditaccel: {self.site.name}: {reason}"
        if self.site.runtime.strict:
            raise StrictModeError(f"ditaccel (strict=True): {self.site.name}: {reason}")
        if reason not in self.site._warned:
            self.site._warned.add(reason)
            stats.note(reason, message)
            warnings.warn(message, stacklevel=2)


class _DefaultContext:
    name = "default"
    step_index = None


_DEFAULT_CONTEXT = _DefaultContext()
