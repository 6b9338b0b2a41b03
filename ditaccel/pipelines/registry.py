"""The adapter registry and the lookup that picks an adapter for a pipeline (or refuses, saying why)."""

from __future__ import annotations

import torch

from .base import CallFacts, ModelAdapter
from .families import FAMILY_ADAPTERS
from .spec import ModelSpec, SpecAdapter

ADAPTERS: tuple[ModelAdapter, ...] = FAMILY_ADAPTERS
SUPPORTED_FAMILIES = {a.family: a.transformer_classes for a in ADAPTERS}

_LINEAR = ("its self-attention is linear attention (ReLU kernels), not softmax: ditaccel's sparse plans select "
           "softmax attention mass and do not apply")
REFUSED = {
    "SanaTransformer2DModel": _LINEAR,
    "SanaVideoTransformer3DModel": _LINEAR,
    "SanaWMTransformer3DModel": "most of its blocks run gated-delta-net linear attention, not softmax (its few "
                                "softmax blocks are not covered): ditaccel's sparse plans do not apply",
    "WanAnimate2Transformer3DModel": "its generation pass already runs block-sparse attention of its own: the "
                                     "processor forces diffusers' flex backend with the model's BlockMask over a "
                                     "packed [generation | cached reference] buffer, which ditaccel would have to "
                                     "intersect with its plans (not supported yet); the reference pass is dense "
                                     "once per video",
}
"""Transformer classes ditaccel refuses on purpose, and why."""


def _candidates(obj) -> list[torch.nn.Module]:
    if isinstance(obj, torch.nn.Module):
        return [obj]
    return [m for m in (getattr(obj, a, None) for a in ("transformer", "transformer_2")) if isinstance(m, torch.nn.Module)]


def find_adapter(obj, model: ModelSpec | None = None) -> ModelAdapter:
    """The adapter for a pipeline or a bare transformer (``model``: a ``ModelSpec`` instead of the
    registry), or a ValueError listing what is supported and naming the ``ModelSpec`` way out."""
    if model is not None:
        return SpecAdapter(model)
    for candidate in _candidates(obj):
        for adapter in ADAPTERS:
            if adapter.matches(candidate):
                return adapter
    what = type(obj).__name__
    inner = [type(m).__name__ for m in _candidates(obj) if m is not obj]
    if inner:
        what += f" (transformer: {', '.join(inner)})"
    refused = [f"{type(m).__name__}: {REFUSED[type(m).__name__]}" for m in _candidates(obj) if type(m).__name__ in REFUSED]
    if refused:
        raise ValueError(f"unsupported model {what}: {'; '.join(refused)}")
    supported = "; ".join(f"{family}: {', '.join(classes)}" for family, classes in SUPPORTED_FAMILIES.items())
    raise ValueError(
        f"unsupported model {what}. For a transformer no adapter knows, describe it: "
        f"ditaccel.accelerate(pipe, method, model=ditaccel.ModelSpec(attention='blocks.*.attn1', "
        f"grid=(T, H, W) or a callable of the forward's arguments, text='none'|'prefix'|'suffix', text_len=...)). "
        f"Supported families — {supported}")


__all__ = ["ADAPTERS", "REFUSED", "SUPPORTED_FAMILIES", "CallFacts", "ModelAdapter", "ModelSpec", "find_adapter"]
