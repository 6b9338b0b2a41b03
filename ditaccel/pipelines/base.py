"""What an adapter tells ditaccel about one diffusers model family.

This is the only place that knows models. An adapter answers: which transformer(s) a pipeline
has, which of their modules are self-attention over the latent tokens (with their layer index),
where text tokens sit in that attention (none / prefix / suffix), and how a forward's arguments
give the token grid (T, H, W), the text length, the batch and the timestep. It also holds the
family's presets: the config ``method=None`` picks and per-method defaults tuned for the family.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AttentionConfig


@dataclass(frozen=True)
class CallFacts:
    grid: tuple[int, int, int]
    text_len: int
    batch: int
    timestep: float | None


class ModelAdapter:
    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    pipeline_attrs: tuple[str, ...] = ("transformer",)
    text_position: str = "none"
    preset_source: str = ""  # where the family's preset comes from (paper / repository and its configuration)

    # --- finding things -------------------------------------------------------------------------
    def matches(self, transformer: torch.nn.Module) -> bool:
        return type(transformer).__name__ in self.transformer_classes

    def transformers(self, obj) -> list[tuple[str, torch.nn.Module]]:
        """(attribute name, transformer) pairs of a pipeline, or [("transformer", obj)] for a bare model."""
        if isinstance(obj, torch.nn.Module):
            return [("transformer", obj)]
        found = [(a, getattr(obj, a, None)) for a in self.pipeline_attrs]
        return [(a, m) for a, m in found if m is not None]

    def self_attention_modules(self, transformer) -> list[tuple[str, int, torch.nn.Module]]:
        """(module name, layer index, module) of every self-attention over the latent tokens."""
        raise NotImplementedError

    # --- reading a forward ----------------------------------------------------------------------
    def call_facts(self, transformer, args: tuple, kwargs: dict[str, Any]) -> CallFacts:
        raise NotImplementedError

    @staticmethod
    def bind(transformer, args, kwargs) -> dict[str, Any]:
        sig = _signature(type(transformer))
        return sig.bind(transformer, *args, **kwargs).arguments

    @staticmethod
    def scalar_timestep(timestep) -> float | None:
        if timestep is None:
            return None
        if isinstance(timestep, torch.Tensor):
            return float(timestep.detach().float().max().item()) if timestep.numel() else None
        return float(timestep)

    # --- presets --------------------------------------------------------------------------------
    def preset(self) -> AttentionConfig:
        raise NotImplementedError

    def preset_for(self, obj) -> AttentionConfig:
        """The preset for this pipeline (or bare transformer; None: no object): the family's, unless
        the adapter knows a better one for its architecture."""
        return self.preset()

    def method_defaults(self, method: str) -> dict[str, Any]:
        """Family-tuned field defaults for ``method`` (overridden by the user's fields)."""
        return {}


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(cls) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def blocks(transformer, attr_paths: tuple[tuple[str, str], ...]) -> list[tuple[str, int, torch.nn.Module]]:
    """Self-attention modules found at ``<block list>.<i>.<attention attr>``, numbered in order."""
    found = []
    for list_name, attn_attr in attr_paths:
        for i, block in enumerate(getattr(transformer, list_name, None) or []):
            module = getattr(block, attn_attr, None)
            if module is not None:
                found.append((f"{list_name}.{i}.{attn_attr}", len(found), module))
    return found
