"""The escape hatch: ``ModelSpec`` describes a transformer no adapter knows.

    spec = ditaccel.ModelSpec(attention="blocks.*.attn1",
                              grid=lambda hidden_states, **_: (hidden_states.shape[2] // 1,
                                                               hidden_states.shape[3] // 2,
                                                               hidden_states.shape[4] // 2),
                              text="none")
    handle = ditaccel.accelerate(pipe, "tile", model=spec)

``attention``: glob pattern(s) over the transformer's module names (``fnmatch``: ``*`` matches
across dots too) naming its self-attention modules over the latent tokens. ``grid``: the (T, H, W)
token grid, a fixed tuple or a callable taking the forward's arguments by name (``T = 1`` for
images). ``text``: where the other tokens of that attention sit, ``"none"``, ``"prefix"`` or
``"suffix"``; ``text_len``: how many, an int, a callable of the forward's arguments, or ``None``
for "every token of the attention call beyond the grid's". Modules with a diffusers processor are
intercepted as their processor computes attention; modules without one must call
``F.scaled_dot_product_attention`` in their forward.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import AttentionConfig
from ..layout import TEXT_POSITIONS
from .base import CallFacts, ModelAdapter, conservative_preset

GridSpec = tuple[int, int, int] | Callable[..., tuple[int, int, int]]


@dataclass(frozen=True)
class ModelSpec:
    attention: str | tuple[str, ...]
    grid: GridSpec
    text: str = "none"
    text_len: int | Callable[..., int] | None = 0
    family: str = "custom"
    transformer_attrs: tuple[str, ...] = ("transformer",)
    timestep: str | None = "timestep"
    preset: AttentionConfig | None = None

    def __post_init__(self) -> None:
        patterns = (self.attention,) if isinstance(self.attention, str) else self.attention
        if not isinstance(patterns, tuple) or not patterns or not all(isinstance(p, str) and p for p in patterns):
            raise ValueError(f"ModelSpec.attention={self.attention!r}: give a module-name pattern such as "
                             f"'blocks.*.attn1' or a non-empty tuple of them")
        object.__setattr__(self, "attention", patterns)
        if not callable(self.grid):
            if (not isinstance(self.grid, (tuple, list)) or len(self.grid) != 3
                    or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in self.grid)):
                raise ValueError(f"ModelSpec.grid={self.grid!r}: give (T, H, W) as three ints >= 1 or a callable "
                                 f"of the forward's arguments returning them")
            object.__setattr__(self, "grid", tuple(self.grid))
        if self.text not in TEXT_POSITIONS:
            raise ValueError(f"ModelSpec.text={self.text!r}: must be one of {TEXT_POSITIONS}")
        n = self.text_len
        if not (n is None or callable(n) or (isinstance(n, int) and not isinstance(n, bool) and n >= 0)):
            raise ValueError(f"ModelSpec.text_len={n!r}: give an int >= 0, a callable of the forward's arguments, "
                             f"or None (every token beyond the grid's)")
        if self.text == "none" and n not in (0, None) and not callable(n):
            raise ValueError(f"ModelSpec.text_len={n!r} with text='none': a text span needs text='prefix' or 'suffix'")
        attrs = self.transformer_attrs
        if isinstance(attrs, str) or not isinstance(attrs, tuple) or not attrs or not all(isinstance(a, str) for a in attrs):
            raise ValueError(f"ModelSpec.transformer_attrs={attrs!r}: give a non-empty tuple of attribute names")
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"ModelSpec.family={self.family!r}: give a non-empty name")
        if self.timestep is not None and not isinstance(self.timestep, str):
            raise ValueError(f"ModelSpec.timestep={self.timestep!r}: give the forward argument's name or None")
        if self.preset is not None and not isinstance(self.preset, AttentionConfig):
            raise ValueError(f"ModelSpec.preset={self.preset!r}: give an AttentionConfig (e.g. ditaccel.TileConfig()) "
                             f"or None")


class SpecAdapter(ModelAdapter):
    """An adapter made from a ``ModelSpec``: it accepts the transformers the spec names."""

    accepts_plain_modules = True
    preset_source = "ModelSpec: the spec's preset, else a conservative choice (not yet calibrated)"

    def __init__(self, spec: ModelSpec):
        if not isinstance(spec, ModelSpec):
            raise ValueError(f"model={spec!r}: give a ditaccel.ModelSpec (or None to use the adapters)")
        self.spec = spec
        self.family = spec.family
        self.text_position = spec.text
        self.pipeline_attrs = spec.transformer_attrs
        self.transformer_classes = ()
        self.attention_route = "as found"

    def matches(self, transformer) -> bool:
        return isinstance(transformer, torch.nn.Module)

    def transformers(self, obj):
        found = super().transformers(obj)
        if not found:
            raise ValueError(f"ModelSpec.transformer_attrs={self.spec.transformer_attrs}: {type(obj).__name__} has "
                             f"none of these attributes")
        return found

    def self_attention_modules(self, transformer):
        names = [name for name, _ in transformer.named_modules() if name]
        found, seen = [], set()
        for pattern in self.spec.attention:
            hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise ValueError(f"ModelSpec.attention pattern {pattern!r} matches no module of "
                                 f"{type(transformer).__name__} (module names look like {names[:4]})")
            found += [n for n in hits if n not in seen]
            seen.update(hits)
        modules = dict(transformer.named_modules())
        order = {n: i for i, n in enumerate(names)}
        return [(n, i, modules[n]) for i, n in enumerate(sorted(found, key=order.__getitem__))]

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        a.pop("self", None)
        arguments = {**{k: v for k, v in a.items() if k != "kwargs"}, **a.get("kwargs", {})}
        grid = self.spec.grid(**arguments) if callable(self.spec.grid) else self.spec.grid
        if (not isinstance(grid, (tuple, list)) or len(grid) != 3
                or not all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
            raise ValueError(f"ModelSpec.grid returned {grid!r}: it must return (T, H, W) as three ints >= 1")
        n = self.spec.text_len
        text_len = n(**arguments) if callable(n) else n
        if text_len is not None and (not isinstance(text_len, int) or text_len < 0):
            raise ValueError(f"ModelSpec.text_len returned {text_len!r}: it must return an int >= 0")
        if self.spec.text == "none":
            text_len = 0
        first = next((v for v in arguments.values() if isinstance(v, torch.Tensor)), None)
        batch = int(first.shape[0]) if first is not None and first.dim() else 1
        t = arguments.get(self.spec.timestep) if self.spec.timestep else None
        return CallFacts(tuple(grid), text_len, batch, self.scalar_timestep(t))

    def preset(self):
        return self.spec.preset if self.spec.preset is not None else conservative_preset()


def adapter_for_spec(spec: Any) -> SpecAdapter:
    return SpecAdapter(spec)
