"""What a method sees of one self-attention call, and the state it may keep across calls.

``CallContext`` is handed to ``AttentionMethod.decide`` for every intercepted call: where the call
is (transformer, layer, denoising step, CFG branch), its shape, and ``state``: a per-(transformer,
layer, branch) ``LayerState`` that lives across denoising steps. ``StateStore`` owns every
``LayerState`` of one ``accelerate`` handle: it drops them at the start of every pipeline call and
whenever a (layer, branch) sees a new shape (resolution, frame count, text length or batch), and it
accounts the bytes of the tensors they hold against ``cache_budget_mb``: a tensor that would exceed
the budget is not stored (``put`` returns False and the caller computes instead of reusing).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from .call import Call


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


class LayerState:
    """Named values one (transformer, layer, branch) keeps across steps, with their bytes accounted."""

    def __init__(self, store: "StateStore", key: tuple, shape_key: tuple):
        self._store = store
        self.key = key
        self.shape_key = shape_key
        self._values: dict[str, Any] = {}

    def get(self, name: str, default=None):
        return self._values.get(name, default)

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def put(self, name: str, value: Any) -> bool:
        """Keep ``value`` under ``name``; False (and nothing kept) if it would exceed the budget."""
        old = _nbytes(self._values.get(name))
        new = _nbytes(value)
        if not self._store._reserve(new - old):
            self.pop(name)
            return False
        self._values[name] = value
        return True

    def pop(self, name: str, default=None):
        if name in self._values:
            value = self._values.pop(name)
            self._store._release(_nbytes(value))
            return value
        return default

    def clear(self) -> None:
        for name in list(self._values):
            self.pop(name)


class StateStore:
    """Every ``LayerState`` of one handle, under one memory budget."""

    def __init__(self, budget_mb: float):
        self.budget_bytes = int(budget_mb * 2**20)
        self.bytes = 0
        self.peak_bytes = 0
        self.refused = 0
        self._states: dict[tuple, LayerState] = {}

    def _reserve(self, delta: int) -> bool:
        if delta > 0 and self.bytes + delta > self.budget_bytes:
            self.refused += 1
            return False
        self.bytes += delta
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        return True

    def _release(self, nbytes: int) -> None:
        self.bytes -= nbytes

    def state(self, transformer: str, layer: int, branch: str, shape_key: tuple) -> LayerState:
        """The state of (transformer, layer, branch), emptied first if its shape changed."""
        key = (transformer, layer, branch)
        st = self._states.get(key)
        if st is not None and st.shape_key != shape_key:
            st.clear()
            st.shape_key = shape_key
        if st is None:
            st = self._states[key] = LayerState(self, key, shape_key)
        return st

    def peek(self, transformer: str, layer: int, branch: str, shape_key: tuple) -> LayerState | None:
        """Another branch's state if it exists with the same shape (for sharing across CFG branches)."""
        st = self._states.get((transformer, layer, branch))
        return st if st is not None and st.shape_key == shape_key else None

    def reset(self, transformer: str | None = None) -> None:
        """Drop the states of one transformer (a new pipeline call), or of all."""
        for key, st in list(self._states.items()):
            if transformer is None or key[0] == transformer:
                st.clear()
                del self._states[key]

    def summary(self) -> dict:
        return {"bytes": self.bytes, "peak_bytes": self.peak_bytes, "budget_bytes": self.budget_bytes,
                "refused": self.refused}


@dataclass(frozen=True)
class CallContext(Call):
    """One self-attention call as a method sees it: the ``Call`` plus handles to its state --
    ``state`` (this (transformer, layer, branch)'s ``LayerState``), the store, the handle's event
    counters and reports, and the call's ``values`` for methods that profile outputs."""

    state: LayerState | None = None
    store: StateStore | None = None
    counters: dict = field(default_factory=lambda: defaultdict(int))
    reports: dict = field(default_factory=dict)
    values: torch.Tensor | None = None  # the call's v [B, S, H, D]

    def count(self, name: str, n: int = 1) -> None:
        """Count an event of this call (e.g. "scoring"): ``handle.stats()["counters"][name][step]``."""
        self.counters[(name, self.transformer, self.step)] += n

    def report(self, name: str, value: Any) -> None:
        """Publish a per-(layer, branch) fact (e.g. chosen patterns): ``stats()["reports"][name]``;
        unlike ``state`` it outlives the pipeline call."""
        self.reports.setdefault(name, {})[f"{self.transformer}.{self.layer}.{self.branch}"] = value


__all__ = ["CallContext", "LayerState", "StateStore"]
