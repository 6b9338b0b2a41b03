"""window: token-exact 2-D / 3-D neighbourhood attention, with dilation.

Each video query sees the ``kernel_size`` tokens around it on every axis, the window shifted
inward at the grid edges so every query sees the same count (Neighborhood Attention, NATTEN).
With ``dilation`` d an axis splits into d interleaved groups (by index mod d) and the window runs
inside the query's group (Dilated NA). Blocks on the window's border are partial and masked
inside the kernel. ``order="tile"`` packs nearby tokens into the same block, so far fewer blocks
are touched than in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionConfig, check_axes, check_choice
from .base import AttentionMethod, check_fits_grid, clamped_window_start


@dataclass(frozen=True)
class WindowConfig(AttentionConfig):
    """kernel_size: window (t, h, w) in tokens, odd; dilation: (t, h, w) >= 1;
    order: "tile" or "raster"; tile: token tile for tile order (None: a block-sized default)."""

    method = "window"
    kernel_size: int | tuple[int, ...] = (3, 9, 9)
    dilation: int | tuple[int, ...] = (1, 1, 1)
    order: str = "tile"
    tile: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "kernel_size", check_axes(self, "kernel_size", self.kernel_size, odd=True))
        object.__setattr__(self, "dilation", check_axes(self, "dilation", self.dilation))
        check_choice(self, "order", self.order, ("tile", "raster"))
        if self.tile is not None:
            object.__setattr__(self, "tile", check_axes(self, "tile", self.tile))


def axis_window(q: torch.Tensor, k: torch.Tensor, length: int, size: int, dilation: int) -> torch.Tensor:
    """May coordinate ``q`` see coordinate ``k`` on one axis of ``length`` tokens?"""
    if dilation == 1:
        start = clamped_window_start(q, size, length)
        return (k >= start) & (k < start + size)
    group = q % dilation
    group_len = (length - group + dilation - 1) // dilation  # tokens in this residue class
    start = clamped_window_start(q // dilation, size, group_len)
    kj = k // dilation
    return (k % dilation == group) & (kj >= start) & (kj < start + size)


class WindowMethod(AttentionMethod):
    name = "window"

    def order(self) -> str:
        return self.config.order

    def validate_grid(self, grid) -> None:
        check_fits_grid(self.config, "kernel_size", self.config.kernel_size, self.config.dilation, grid)

    def video_predicate(self, grid):
        ks, dil = self.config.kernel_size, self.config.dilation

        def allowed(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
            ok = axis_window(qc[..., 0], kc[..., 0], grid[0], ks[0], dil[0])
            for a in (1, 2):
                ok = ok & axis_window(qc[..., a], kc[..., a], grid[a], ks[a], dil[a])
            return ok

        return allowed
