"""tile: sliding tile attention.

Video tokens are reordered into 3-D tiles of ``tile`` tokens (product = the kernel's block size),
and each query tile attends to the ``window`` tiles around it, the window shifted inward at the
grid edges (Sliding Tile Attention). On grids that are multiples of the tile every block pair is
full or empty, so the kernel runs no mask code; tiles cut by the grid edge are smaller, and the
blocks that straddle them are masked token by token.

Any grid: a ``window`` of more tiles than the grid has on an axis covers that axis (every tile of
it), and a ``tile`` larger than the grid on an axis is cut to the grid there (one tile spans the
axis either way); ``stats()["notes"]`` says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def tile_window_predicate(grid, tile, window):
    """Tile-granular sliding window: query tile sees the clamped ``window`` of tiles around it."""
    n_tiles = num_tiles(grid, tile)
    tile_t = torch.tensor(tile)

    def allowed(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
        tt = tile_t.to(qc.device)
        tq, tk = qc // tt, kc // tt
        ok = None
        for a in range(3):
            start = clamped_window_start(tq[..., a], window[a], n_tiles[a])
            axis_ok = (tk[..., a] >= start) & (tk[..., a] < start + window[a])
            ok = axis_ok if ok is None else ok & axis_ok
        return ok

    return allowed


class TileMethod(AttentionMethod):
    name = "tile"

    def order(self) -> str:
        return self.config.order

    def video_predicate(self, grid):
        tile = self.tile_for(grid)
        n_tiles = num_tiles(grid, tile)
        for axis, w, n in zip("thw", self.config.window, n_tiles):
            if w > n and w > 1:
                self.notes.add(f"tile: window[{axis}]={w} tiles is more than the grid's {n} tiles on {axis}: "
                               f"the window covers that axis")
        return tile_window_predicate(grid, tile, self.config.window)
