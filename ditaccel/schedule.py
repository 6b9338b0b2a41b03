"""Schedules that follow the call: what a pipeline call's step count and noise levels are.

A config may say ``dense_steps=0.24`` (a fraction of the call's steps), ``dense_above_noise=0.9``
(dense while the noise level is above 0.9) or ``schedule={"topk": [0.4, 0.3, 0.2]}`` (a knob that
changes over the call's steps). All three need the call's facts, which the pipeline holds, not the
transformer: ``PipelineClock`` reads them at the first transformer forward of every call (the
pipeline has set its scheduler's timesteps by then) and ``TransformerRuntime.begin`` hands the
resolved dense-step count and total to every attention call (``CallContext.dense_steps`` /
``total_steps``). The step count changes between calls; every call is resolved afresh.

Where it comes from: ``pipe._num_timesteps`` (set before the denoising loop by diffusers'
pipelines, after any ``strength`` truncation), else ``len(pipe.scheduler.timesteps)``; the noise
levels are the call's timesteps (the last ``total`` of the scheduler's) over the scheduler's
``num_train_timesteps`` (1000 when absent): sigma on flow-matching schedulers, t / T on DDPM-style ones.
"""

from __future__ import annotations

import torch


class PipelineClock:
    """The step facts of the pipeline call in flight; ``pipe`` None (a bare transformer): unknown."""

    def __init__(self, pipe):
        self.pipe = None if pipe is None or isinstance(pipe, torch.nn.Module) else pipe
        self._noise_key = None
        self._noise: tuple[float, ...] | None = None

    @property
    def known(self) -> bool:
        return self.pipe is not None and getattr(self.pipe, "scheduler", None) is not None

    def _timesteps(self):
        scheduler = getattr(self.pipe, "scheduler", None) if self.pipe is not None else None
        return scheduler, getattr(scheduler, "timesteps", None)

    def total_steps(self) -> int | None:
        """Denoising steps of the call in flight, None when nothing tells."""
        if self.pipe is None:
            return None
        n = getattr(self.pipe, "_num_timesteps", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
        _, timesteps = self._timesteps()
        return len(timesteps) if timesteps is not None and len(timesteps) > 0 else None

    def noise_levels(self, total: int | None) -> tuple[float, ...] | None:
        """The call's noise level at every step (decreasing), None when unknown."""
        scheduler, timesteps = self._timesteps()
        if timesteps is None or len(timesteps) == 0:
            return None
        key = (id(timesteps), getattr(timesteps, "_version", None), len(timesteps), total)
        if key != self._noise_key:
            train = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None) or 1000
            levels = [float(t) / float(train) for t in torch.as_tensor(timesteps).flatten().tolist()]
            if total is not None and 0 < total < len(levels):
                levels = levels[-total:]  # img2img-style truncation keeps the last steps
            self._noise_key, self._noise = key, tuple(levels)
        return self._noise


__all__ = ["PipelineClock"]
