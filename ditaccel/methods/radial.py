"""radial: a static mask from spatio-temporal energy decay (Radial Attention).

Attention energy in video DiTs falls with temporal distance, and the spatial spread that still
matters shrinks as it does. At tile granularity (so every block is full or empty on grids that
are multiples of the tile): a query tile sees every key tile of its own temporal tile row; at
temporal tile distance dt >= 1 it sees key tiles within a spatial (Chebyshev, in tiles) band of
``floor(max(n_th, n_tw) * decay ** (floor(log2(dt)) + 1))`` tiles — each doubling of distance
multiplies the band by ``decay`` (0.5 halves it); a band of 0 still keeps its own spatial tile. Key tiles
in the first ``sink_frames`` frames (rounded up to whole tiles) stay visible to everyone, as an
attention sink. Built once per shape and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import ORDERS, AttentionConfig, check_block_tile, knob
from .base import AttentionMethod, num_tiles


@dataclass(frozen=True)
class RadialConfig(AttentionConfig):
    """Radial attention: a spatial band that shrinks with temporal distance, plus sink frames."""

    method = "radial"
    decay: float = knob(0.5, "float", low=0.0, high=1.0, low_open=True,
                        help="band factor per doubling of temporal distance (1 = dense)")
    sink_frames: int = knob(1, "int", low=0, help="leading frames every query sees (attention sink)")
    tile: tuple[int, ...] | None = knob(None, "optional_axes", help="as in TileConfig")
    order: str = knob("tile", "choice", choices=ORDERS,
                      help="token order of the kernel's blocks (tile: every block full or empty)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile is not None:
            object.__setattr__(self, "tile", check_block_tile(self, self.tile, self.block_size))


def radial_band(dt: torch.Tensor, full_band: int, decay: float) -> torch.Tensor:
    """Spatial band (in tiles) visible at temporal tile distance ``dt``."""
    level = torch.floor(torch.log2(dt.clamp(min=1).double())) + 1
    band = torch.floor(full_band * torch.pow(torch.tensor(decay, dtype=torch.float64), level) + 1e-9)
    return torch.where(dt == 0, torch.full_like(band, full_band), band).long()


class RadialMethod(AttentionMethod):
    name = "radial"

    def order(self) -> str:
        return self.config.order

    def video_predicate(self, grid):
        tile = self.tile_for(grid)
        n_tiles = num_tiles(grid, tile)
        full_band = max(n_tiles[1], n_tiles[2])
        sink_tiles = math.ceil(self.config.sink_frames / tile[0])
        decay = self.config.decay
        tile_t = torch.tensor(tile)

        def allowed(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
            tt = tile_t.to(qc.device)
            tq, tk = qc // tt, kc // tt
            dt = (tq[..., 0] - tk[..., 0]).abs()
            spatial = torch.maximum((tq[..., 1] - tk[..., 1]).abs(), (tq[..., 2] - tk[..., 2]).abs())
            return (spatial <= radial_band(dt, full_band, decay)) | (tk[..., 0] < sink_tiles)

        return allowed
