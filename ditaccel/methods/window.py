"""window: token-exact 2-D / 3-D neighbourhood attention, with dilation.

Each video query sees the ``kernel_size`` tokens around it on every axis, the window shifted
inward at the grid edges so every query sees the same count (Neighborhood Attention, NATTEN).
With ``dilation`` d an axis splits into d interleaved groups (by index mod d) and the window runs
inside the query's group (Dilated NA). Blocks on the window's border are partial and masked
inside the kernel. ``order="tile"`` packs nearby tokens into the same block, so far fewer blocks
are touched than in raster order.

Any grid: on an axis where the window spans more than the grid (``kernel_size * dilation > grid``)
the window covers that axis (every query sees the whole axis, dilation dropped there), as a window
of exactly the grid's size would; ``stats()["notes"]`` says so. Images (T = 1) and single frames
are such a case on t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_geometry import SeparableRule
from ..config import ORDERS, AttentionConfig, knob
from .base import AttentionMethod, clamped_window_start


@dataclass(frozen=True)
class WindowConfig(AttentionConfig):
    """Neighbourhood attention: every video query sees the ``kernel_size`` tokens around it."""

    method = "window"
    kernel_size: int | tuple[int, ...] = knob((3, 9, 9), "axes", odd=True, help="window (t, h, w) in tokens, odd")
    dilation: int | tuple[int, ...] = knob((1, 1, 1), "axes", help="(t, h, w) gaps between window taps")
    order: str = knob("tile", "choice", choices=ORDERS, help="token order of the kernel's blocks")
    tile: tuple[int, ...] | None = knob(None, "optional_axes", help="token tile for tile order (None: block-sized)")


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

    def effective_window(self, grid) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(kernel_size, dilation) on ``grid``: an axis the window over-spans is covered whole."""
        ks, dil = list(self.config.kernel_size), list(self.config.dilation)
        for a, axis in enumerate("thw"):
            if ks[a] * dil[a] > grid[a]:
                if ks[a] > 1 or dil[a] > 1:
                    self.notes.add(f"window: kernel_size[{axis}]={ks[a]} x dilation[{axis}]={dil[a]} spans more "
                                   f"than the grid's {axis} = {grid[a]}: the window covers that axis")
                ks[a], dil[a] = grid[a], 1
        return tuple(ks), tuple(dil)

    def box_rule(self, grid) -> SeparableRule:
        """The window is a product over axes: one [g, g] table per axis of ``axis_window``."""
        ks, dil = self.effective_window(grid)
        tables = []
        for g, k, d in zip(grid, ks, dil):
            pos = torch.arange(g)
            tables.append(axis_window(pos[:, None], pos[None, :], g, k, d))
        return SeparableRule(tables)

    def video_predicate(self, grid):
        return self.box_rule(grid).predicate()
