"""tile: sliding tile attention.

Video tokens are reordered into 3-D tiles of ``tile`` tokens (product = the kernel's block size),
and each query tile attends to the ``window`` tiles around it, the window shifted inward at the
grid edges (Sliding Tile Attention). On grids that are multiples of the tile every block pair is
full or empty, so the kernel runs no mask code. Tiles cut by the grid edge are smaller: packed back
to back, blocks straddle tiles and are masked token by token; the tile-padded layout (each tile on
whole blocks, empty slots after its tokens) keeps every block pair full or empty, and is chosen
when it means less kernel work (see ``AttentionMethod.build``).

Any grid: a ``window`` of more tiles than the grid has on an axis covers that axis (every tile of
it), and a ``tile`` larger than the grid on an axis is cut to the grid there (one tile spans the
axis either way); ``stats()["notes"]`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_geometry import SeparableRule
from ..config import ORDERS, AttentionConfig, check_block_tile, knob
from .base import AttentionMethod, clamped_window_start, num_tiles


@dataclass(frozen=True)
class TileConfig(AttentionConfig):
    """tile: (t, h, w) tokens per tile, product == block_size (None: a block-sized default);
    window: (t, h, w) tiles each query tile sees, odd."""

    method = "tile"
    tile: tuple[int, ...] | None = knob(None, "optional_axes",
                                        help="(t, h, w) tokens per tile, product == block_size (None: default)")
    window: int | tuple[int, ...] = knob((3, 3, 3), "axes", odd=True, help="(t, h, w) tiles each query tile sees")
    order: str = knob("tile", "choice", choices=ORDERS,
                      help="token order of the kernel's blocks (tile: every block full or empty)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile is not None:
            object.__setattr__(self, "tile", check_block_tile(self, self.tile, self.block_size))


def tile_axis_table(length: int, tile: int, window: int) -> torch.Tensor:
    """[length, length] bool: may a token at ``q`` see one at ``k`` on one axis, i.e. is k's tile in
    the ``window`` tiles around q's tile (the window clamped to the axis's tiles)."""
    pos = torch.arange(length)
    n_tiles = -(-length // tile)
    tq, tk = (pos // tile)[:, None], (pos // tile)[None, :]
    start = clamped_window_start(tq, window, n_tiles)
    return (tk >= start) & (tk < start + window)


def tile_window_rule(grid, tile, window) -> SeparableRule:
    """Tile-granular sliding window, a product over axes: query tile sees the clamped ``window`` of tiles around it."""
    return SeparableRule([tile_axis_table(g, t, w) for g, t, w in zip(grid, tile, window)])


def tile_window_predicate(grid, tile, window):
    """The tile window as a token predicate on (t, h, w) coordinates."""
    return tile_window_rule(grid, tile, window).predicate()


class TileMethod(AttentionMethod):
    name = "tile"

    def order(self) -> str:
        return self.config.order

    def box_rule(self, grid) -> SeparableRule:
        tile = self.tile_for(grid)
        n_tiles = num_tiles(grid, tile)
        for axis, w, n in zip("thw", self.config.window, n_tiles):
            if w > n and w > 1:
                self.notes.add(f"tile: window[{axis}]={w} tiles is more than the grid's {n} tiles on {axis}: "
                               f"the window covers that axis")
        return tile_window_rule(grid, tile, self.config.window)

    def video_predicate(self, grid):
        return self.box_rule(grid).predicate()
