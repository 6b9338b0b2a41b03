"""A method whose knobs change over the call's steps (``AttentionConfig.schedule``).

``schedule={"topk": [0.4, 0.3, 0.2]}`` splits every pipeline call's steps into three equal parts
and runs ``topk=0.4`` in the first, 0.3 in the second, 0.2 in the third (SGLang-diffusion's
``topk_ratio_list`` is the case of one value per step). The parts follow the call's step count
(``ctx.total_steps``, see ``ditaccel.schedule``): 30 steps or 12, the same three parts.
One instance of the underlying method per distinct set of values, built when first needed, so
each part keeps its plan cache; per-layer state (``ctx.state``) is the call's and is shared by the
parts, so a selection reused across steps may come from the previous part's value.
"""

from __future__ import annotations

from ..config import AttentionConfig
from .base import AttentionMethod


class ScheduledMethod(AttentionMethod):
    def __init__(self, config: AttentionConfig, method_cls: type[AttentionMethod]):
        super().__init__(config)
        self.method_cls = method_cls
        self.name = method_cls.name
        self.kind = method_cls.kind
        self._parts: dict[tuple[int, ...], AttentionMethod] = {}  # part index per scheduled knob -> method

    def part(self, ctx) -> AttentionMethod:
        """The underlying method for this call's step (built once per distinct part)."""
        step, total = ctx.step, ctx.total_steps
        if total is None:
            # accelerate() refuses schedules where no scheduler tells the step count; a pipeline
            # that hides it anyway runs the schedule's first part throughout.
            self.notes.add("schedule: the call's step count is unknown, the first part runs throughout")
            step, total = 0, 1
        key = tuple(min(len(seq) - 1, step * len(seq) // max(total, 1)) for _, seq in self.config.schedule)
        method = self._parts.get(key)
        if method is None:
            method = self._parts[key] = self.method_cls(self.config.at_step(step, total))
            method.notes = self.notes  # one set of notes for the handle
        return method

    def decide(self, ctx, q, k, *args):
        return self.part(ctx).decide(ctx, q, k, *args)

    def plan_for(self, ctx, q, k, *args):
        return self.part(ctx).plan_for(ctx, q, k, *args)


__all__ = ["ScheduledMethod"]
