"""What every method shares: a config, a per-call decision, and a cache of plans.

A method never sees a model. Per self-attention call it gets the call (``state.CallContext``: the
``call.Call`` facts -- grid, text span, layer, step, branch, batch, heads -- plus its cross-step
state) and answers with ``None`` (run dense attention) or a ``SparsePlan``. Methods come in two
kinds (``AttentionMethod.kind``):

- **static**: the pattern depends on the call's shape only. The method defines it
  (``video_predicate``, and ``box_rule`` -- the same pattern on boxes of tokens -- so the plan is
  built in O(blocks^2) by ``ditaccel.block_geometry``); its plan is built once per shape and cached,
  so a steady-state call does no planning work at all. In tile order on a grid the tiles do not
  divide, the plan is built on both the packed and the tile-padded layout and the one with less
  kernel work is kept (``SparsePlan.layout_choice`` / ``layout_note`` say which and why).
- **dynamic**: the selection depends on the call's q and k (``plan_for``: scores, clusters, head
  profiles), possibly reused across steps through ``ctx.state``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch

from ..block_geometry import BoxRule, block_work, tiles_are_ragged
from ..call import CallShape
from ..config import AttentionConfig
from ..layout import build_layout, padded_video_slots
from ..plan import SparsePlan, VideoPredicate, build_block_plan, build_plan

_PLAN_CACHE_SIZE = 16
_MAX_PADDING = 2  # padded layouts are tried only up to this many slots per video token


def auto_tile(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """A tile of ``block_size`` tokens: 3-D for video, one frame deep for images (T == 1)."""
    if grid[0] == 1:
        return (1, 8, 16) if block_size == 128 else (1, 8, 8)
    return (2, 8, 8) if block_size == 128 else (1, 8, 8)


def check_fits_grid(config, field_name: str, sizes, dilation, grid) -> None:
    """``sizes[a] * dilation[a] <= grid[a]`` on every axis, or a ValueError naming the field."""
    for axis, s, d, g in zip("thw", sizes, dilation, grid):
        if s * d > g:
            raise ValueError(
                f"{type(config).__name__}.{field_name}={tuple(sizes)} with dilation={tuple(dilation)} needs "
                f"{field_name}[{axis}] * dilation[{axis}] = {s * d} <= grid {axis} = {g} (grid T,H,W = {grid})"
            )


def clamped_window_start(center: torch.Tensor, size: int, length) -> torch.Tensor:
    """First index of a window of ``size`` centred on ``center``, shifted to stay inside [0, length)."""
    start = (center - size // 2).clamp(min=0)
    if isinstance(length, torch.Tensor):
        return torch.minimum(start, (length - size).clamp(min=0))
    return start.clamp(max=max(length - size, 0))


def resolved_dense_steps(config, dense_steps: int | None) -> int:
    """The call's dense-step count (``ctx.dense_steps``) or, when None, the config's own count."""
    if dense_steps is not None:
        return dense_steps
    return config.dense_steps if isinstance(config.dense_steps, int) else 0


class ShapeCache:
    """What a method derives from a call's shape alone (plans, block maps, layouts), kept per
    (shape, device) for the ``size`` most recently used keys."""

    def __init__(self, size: int = _PLAN_CACHE_SIZE):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, shape, device, build):
        """The value for (``shape``, ``device``), from ``build()`` the first time."""
        key = (shape, str(device))
        value = self._items.get(key)
        if value is None:
            value = self._items[key] = build()
            if len(self._items) > self.size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        return value


class AttentionMethod:
    """Base class: dense at ``dense_steps`` / ``dense_layers``, else a plan.

    The runtime asks ``decide(ctx, q, k)`` once per self-attention call; ``q`` and ``k`` are
    [B, S, H, D] in the model's token order, ``ctx`` a ``ditaccel.state.CallContext``. A static
    method only defines ``video_predicate`` (its plan is built once per shape and cached); a
    dynamic method overrides ``plan_for`` and may keep per-(layer, branch) state in ``ctx.state``.
    """

    name = ""
    kind = "static"  # "static": a plan per shape, cached; "dynamic": a selection per call (module doc)

    def __init__(self, config: AttentionConfig):
        self.config = config
        self._plans = ShapeCache()
        self.notes: set[str] = set()  # how the config was adapted to the grids it met (stats()["notes"])

    def is_dense(self, layer: int, step: int, dense_steps: int | None = None) -> bool:
        """``dense_steps``: the call's dense-step count (``ctx.dense_steps``, the config's resolved
        against the call); None: the config's count (a fraction without a call counts as 0)."""
        return step < resolved_dense_steps(self.config, dense_steps) or self.config.layer_is_dense(layer)

    def decide(self, ctx, q: torch.Tensor, k: torch.Tensor) -> SparsePlan | None:
        """None: run the model's own dense attention; else the plan to execute."""
        if self.is_dense(ctx.layer, ctx.step, ctx.dense_steps):
            return None
        return self.plan_for(ctx, q, k)

    def plan_for(self, ctx, q: torch.Tensor, k: torch.Tensor) -> SparsePlan:
        """The plan this method would run for this call, whatever the step (static: cached per shape)."""
        return self.plan(ctx.shape, q.device)

    def plan(self, shape: CallShape, device: torch.device) -> SparsePlan | None:
        return self._plans.get(shape, device, lambda: self.build(shape, device))

    def tile_for(self, grid) -> tuple[int, int, int]:
        """The token tile on ``grid``: the config's (or a block-sized default), cut to the grid on an
        axis it over-spans (the same layout and tile neighbourhoods: every token of that axis is in
        one tile either way)."""
        tile = getattr(self.config, "tile", None)
        if tile is None:
            return tuple(min(t, g) for t, g in zip(auto_tile(grid, self.config.block_size), grid))
        cut = tuple(min(t, g) for t, g in zip(tile, grid))
        if cut != tuple(tile):
            self.notes.add(f"tile={tuple(tile)} is larger than the grid {tuple(grid)} on some axis: cut to {cut}")
        return cut

    def order(self) -> str:
        return "tile"

    def build(self, shape: CallShape, device) -> SparsePlan:
        self.validate_grid(shape.grid)
        grid, order, bs = shape.grid, self.order(), self.config.block_size
        tile = self.tile_for(grid)
        predicate, rule = self.video_predicate(grid), self.box_rule(grid)

        def plan_on(pad_tiles: bool) -> SparsePlan:
            layout = build_layout(grid, shape.text_len, shape.text_position, order, tile, bs, pad_tiles)
            if rule is None:  # a pattern without geometry: token-pair classification
                return build_plan(layout, predicate, device)
            return build_block_plan(layout, rule, predicate, device)

        packed = plan_on(False)
        if rule is None or order != "tile" or not tiles_are_ragged(grid, tile, bs):
            return packed
        if padded_video_slots(grid, tile, bs) > _MAX_PADDING * math.prod(grid):  # tiles far smaller than a block
            return packed
        padded = plan_on(True)
        work_packed, work_padded = block_work(packed.any_blocks, bs), block_work(padded.any_blocks, bs)
        note = (f"kernel work (computed block pairs x {bs}^2): padded tiles {work_padded:,} on "
                f"{padded.layout.num_slots:,} slots, packed {work_packed:,} on {packed.layout.num_slots:,} slots")
        if work_padded < work_packed:
            return dataclasses.replace(padded, layout_choice="padded", layout_note=note)
        return dataclasses.replace(packed, layout_choice="packed", layout_note=note)

    # --- what a static method defines -------------------------------------------------------
    def validate_grid(self, grid) -> None:
        """Raise ValueError if the config cannot apply to this grid."""

    def video_predicate(self, grid) -> VideoPredicate:
        raise NotImplementedError

    def box_rule(self, grid) -> BoxRule | None:
        """The same pattern on boxes of tokens (exact), or None: plans then classify token pairs."""
        return None


def num_tiles(grid, tile) -> tuple[int, int, int]:
    return tuple(math.ceil(g / t) for g, t in zip(grid, tile))
