"""What ``accelerate`` checks about a config against the pipeline it is applied to.

Everything a config needs that the pipeline can tell before it runs is checked here, so a bad
combination fails at ``accelerate`` (the pipeline untouched) instead of at the first call:

- schedules that follow the call (``dense_steps`` as a fraction, ``dense_above_noise``,
  ``schedule``) need a pipeline whose scheduler tells the step count and noise levels;
- ``backend='triton'`` needs triton installed and a head dim the kernel supports; the attention
  modules tell it (the device does not count: a pipeline may move to CUDA after ``accelerate``).

What only a call can tell (the token grid) is not an error anywhere: windows and tiles larger than
the grid cover that axis (see the methods' ``stats()["notes"]``).
"""

from __future__ import annotations

import torch

from .config import AttentionConfig
from .schedule import PipelineClock


def head_dim(module: torch.nn.Module) -> int | None:
    """The per-head dim of a diffusers attention module, None when it does not say."""
    heads = getattr(module, "heads", None)
    if not isinstance(heads, int) or heads <= 0:
        return None
    inner = getattr(module, "inner_dim", None)
    if not isinstance(inner, int):
        to_q = getattr(module, "to_q", None)
        inner = getattr(to_q, "out_features", None)
    return inner // heads if isinstance(inner, int) and inner % heads == 0 else None


def check_against_pipeline(config: AttentionConfig, pipe, modules: list[tuple[str, torch.nn.Module]]) -> None:
    """Raise ValueError (naming the field) for what ``config`` cannot do on ``pipe``; ``modules`` are
    the (name, module) self-attention sites that would be hooked."""
    name = type(config).__name__
    if config.follows_call and not PipelineClock(pipe).known:
        fields = [f for f, on in (("dense_steps", isinstance(config.dense_steps, float)),
                                  ("dense_above_noise", config.dense_above_noise is not None),
                                  ("schedule", bool(config.schedule))) if on] or ["rules"]  # a table's step fractions
        what = f"{type(pipe).__name__}" + (" (a bare transformer)" if isinstance(pipe, torch.nn.Module) else "")
        raise ValueError(
            f"{name}.{fields[0]}={getattr(config, fields[0])!r} follows the pipeline call's steps, but {what} "
            f"has no scheduler to count them: accelerate the pipeline, or give dense_steps as an int count "
            f"and no dense_above_noise / schedule")
    if config.backend == "triton":
        try:
            from .kernels.triton_attention import SUPPORTED_HEAD_DIMS
        except ImportError as e:
            raise ValueError(f"{name}.backend='triton' needs the triton package ({e}); use backend='auto' or "
                             f"'grouped', or pip install 'ditaccel[triton]'") from None

        dims = {head_dim(m) for _, m in modules} - {None}
        bad = sorted(d for d in dims if d not in SUPPORTED_HEAD_DIMS)
        if bad:
            site = next(n for n, m in modules if head_dim(m) == bad[0])
            raise ValueError(
                f"{name}.backend='triton': the Triton kernel supports head dims {SUPPORTED_HEAD_DIMS}, but "
                f"{site} has head dim {bad[0]}; use backend='auto' (it falls back per call) or 'grouped'")


__all__ = ["check_against_pipeline", "head_dim"]
