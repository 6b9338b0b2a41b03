"""Model adapters, one file per diffusers family, and the registry that picks one."""

from __future__ import annotations

import torch

from .base import CallFacts, ModelAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .wan import WanAdapter

ADAPTERS: tuple[ModelAdapter, ...] = (WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), FluxAdapter())
SUPPORTED_FAMILIES = {a.family: a.transformer_classes for a in ADAPTERS}


def _candidates(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    return [m for m in (getattr(obj, a, None) for a in ("transformer", "transformer_2")) if isinstance(m, torch.nn.Module)]


def find_adapter(obj) -> ModelAdapter:
    """The adapter for a pipeline or a bare transformer, or a ValueError listing what is supported."""
    for model in _candidates(obj):
        for adapter in ADAPTERS:
            if adapter.matches(model):
                return adapter
    what = type(obj).__name__
    inner = [type(m).__name__ for m in _candidates(obj) if m is not obj]
    if inner:
        what += f" (transformer: {', '.join(inner)})"
    supported = "; ".join(f"{family}: {', '.join(classes)}" for family, classes in SUPPORTED_FAMILIES.items())
    raise ValueError(f"unsupported model {what}; ditaccel supports these families — {supported}")


__all__ = ["ADAPTERS", "SUPPORTED_FAMILIES", "CallFacts", "ModelAdapter", "find_adapter"]
