"""One self-attention call's facts, as one value.

``Call`` is built once when an intercepted self-attention call arrives, from the transformer
forward in flight (the step hook's ``runtime.ForwardInfo``: grid, text span, step, branch, the call's step
schedule) and the attention call itself (layer, batch, heads). Everything downstream reads it: the
method (``AttentionMethod.decide`` gets a ``state.CallContext``, which is the ``Call`` plus handles
to its cross-step state), the cross-step caches, ``Stats`` and ``handle.observe`` observers.

``CallShape`` is the part a static plan depends on (grid and text span): plans are cached by it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class CallShape:
    """The facts about one self-attention call that a plan depends on."""

    grid: tuple[int, int, int]
    text_len: int
    text_position: str

    @property
    def seq_len(self) -> int:
        T, H, W = self.grid
        return T * H * W + self.text_len


@dataclass(frozen=True)
class Call:
    """Where a self-attention call is (transformer, layer, denoising step, CFG branch), what it
    attends over (``shape``: grid + text span; ``batch``, ``heads``) and the pipeline call's step
    schedule (``dense_steps``: its leading dense steps, None for the config's own count;
    ``total_steps``: its step count, None when unknown, e.g. a bare transformer). ``heads`` are the
    model's heads [head_offset, head_offset + heads): all of them in one process, a rank's share under
    context parallelism."""

    transformer: str
    layer: int
    step: int
    branch: str
    shape: CallShape
    batch: int
    heads: int
    dense_steps: int | None = None
    total_steps: int | None = None
    head_offset: int = 0  # the model's index of this call's first head (context parallelism: a rank's heads)

    @property
    def grid(self) -> tuple[int, int, int]:
        return self.shape.grid

    @property
    def text_len(self) -> int:
        return self.shape.text_len

    @property
    def text_position(self) -> str:
        return self.shape.text_position

    @property
    def shape_key(self) -> tuple:
        """What per-(layer, branch) state is valid for: a new shape, batch or head count drops it."""
        return (self.shape, self.batch, self.heads)

    def __getitem__(self, name: str):
        """``call["layer"]`` as ``call.layer``: observers may read a call as a mapping of its facts."""
        if name not in _FACTS:
            raise KeyError(f"{name!r} is not a fact of a call; facts: {sorted(_FACTS)}")
        return getattr(self, name)

    def keys(self):
        """The fact names: with ``__getitem__``, a call reads as a mapping (``dict(call)``)."""
        return sorted(_FACTS)

    def __iter__(self):
        return iter(self.keys())

    def facts(self) -> dict:
        """The call's facts as plain values (JSON-ready)."""
        return {name: getattr(self, name) for name in sorted(_FACTS)}


_FACTS = frozenset(f.name for f in fields(Call) if f.name != "shape") | {"grid", "text_len", "text_position"}

__all__ = ["Call", "CallShape"]
