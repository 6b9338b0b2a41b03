"""TokenLayout: where every token of a self-attention call sits in the kernel's block order.

A model hands us a sequence of text tokens (none, a prefix or a suffix) and T*H*W video tokens in
frame-major raster order. Sparse plans are cheapest when tokens that attend to each other share a
block, so the layout permutes the video tokens (raster or tile-major) into *slots*, and keeps the
text in whole blocks of its own: the text run is padded with empty slots up to a block boundary, so
no block mixes text and video. Empty slots hold zeros; plans never let a query attend to them and
their outputs are dropped on the way back.

A layout is a value: built once per (grid, text, order, tile, block size) and cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

TEXT_POSITIONS = ("none", "prefix", "suffix")

# Slot kinds.
VIDEO, TEXT, PAD = 0, 1, 2


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


@dataclass(frozen=True)
class TokenLayout:
    grid: tuple[int, int, int]
    text_len: int
    text_position: str
    order: str
    tile: tuple[int, int, int]
    block_size: int
    src: torch.Tensor  # [n_slots] original index of each slot's token, or seq_len for an empty slot
    inverse: torch.Tensor  # [seq_len] slot of each original token
    kind: torch.Tensor  # [n_slots] VIDEO / TEXT / PAD
    coords: torch.Tensor  # [n_slots, 3] (t, h, w) of video slots, -1 elsewhere
    is_identity: bool  # slots == original sequence: no gather needed

    @property
    def num_video(self) -> int:
        T, H, W = self.grid
        return T * H * W

    @property
    def seq_len(self) -> int:
        return self.num_video + self.text_len

    @property
    def num_slots(self) -> int:
        return int(self.src.numel())

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_slots / self.block_size)

    def to_slots(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Original sequence order -> slot order along ``dim`` (empty slots get zeros)."""
        if self.is_identity:
            return x
        pad_shape = list(x.shape)
        pad_shape[dim] = 1
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        return padded.index_select(dim, self.src.to(x.device))

    def from_slots(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Slot order -> original sequence order along ``dim`` (empty slots dropped)."""
        if self.is_identity:
            return y
        return y.index_select(dim, self.inverse.to(y.device))


def video_order(grid: tuple[int, int, int], order: str, tile: tuple[int, int, int]) -> torch.Tensor:
    """Raster indices of the video tokens, listed in the requested order.

    ``tile`` order visits tiles in raster order of the tile grid, and the tokens of a tile in raster
    order inside it; tiles at the far edges of a grid that is not a multiple of the tile are smaller.
    """
    T, H, W = grid
    n = T * H * W
    if order == "raster":
        return torch.arange(n)
    if order != "tile":
        raise ValueError(f"order must be one of ('raster', 'tile'), got {order!r}")
    tt, th, tw = tile
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
    n_th, n_tw = math.ceil(H / th), math.ceil(W / tw)
    tile_id = ((t // tt) * n_th + h // th) * n_tw + w // tw
    local = ((t % tt) * th + h % th) * tw + w % tw
    return torch.argsort(tile_id * (tt * th * tw) + local)


@functools.lru_cache(maxsize=64)
def build_layout(
    grid: tuple[int, int, int],
    text_len: int,
    text_position: str,
    order: str = "raster",
    tile: tuple[int, int, int] = (1, 1, 1),
    block_size: int = 128,
) -> TokenLayout:
    """The slot layout of one self-attention call (cached: layouts are immutable values)."""
    if text_position not in TEXT_POSITIONS:
        raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {text_position!r}")
    if text_position == "none" and text_len:
        raise ValueError(f"text_len must be 0 when text_position is 'none', got {text_len}")
    if any(g < 1 for g in grid):
        raise ValueError(f"grid sizes must be >= 1, got {grid}")
    T, H, W = grid
    n_video = T * H * W
    seq_len = n_video + text_len
    empty = seq_len  # index of the zero row appended by to_slots

    vid = video_order(grid, order, tile)
    t_c, rem = vid // (H * W), vid % (H * W)
    vid_coords = torch.stack([t_c, rem // W, rem % W], dim=1)

    def segment(src, kind, coords):
        return [src], [torch.full((src.numel(),), kind, dtype=torch.int8)], [coords]

    def pad(n):
        return segment(torch.full((n,), empty), PAD, torch.full((n, 3), -1))

    def text(offset):
        return segment(torch.arange(offset, offset + text_len), TEXT, torch.full((text_len, 3), -1))

    pieces = []
    if text_position == "prefix" and text_len:
        pieces += [text(0), pad(_round_up(text_len, block_size) - text_len), segment(vid + text_len, VIDEO, vid_coords)]
    elif text_position == "suffix" and text_len:
        pieces += [segment(vid, VIDEO, vid_coords), pad(_round_up(n_video, block_size) - n_video), text(n_video)]
    else:
        pieces += [segment(vid, VIDEO, vid_coords)]
    src = torch.cat([s for p in pieces for s in p[0]])
    kind = torch.cat([s for p in pieces for s in p[1]])
    coords = torch.cat([s for p in pieces for s in p[2]])

    inverse = torch.empty(seq_len, dtype=torch.long)
    real = src < empty
    inverse[src[real]] = torch.nonzero(real).squeeze(1)
    is_identity = src.numel() == seq_len and bool((src == torch.arange(seq_len)).all())
    return TokenLayout(
        grid=tuple(grid), text_len=text_len, text_position=text_position, order=order, tile=tuple(tile),
        block_size=block_size, src=src, inverse=inverse, kind=kind, coords=coords, is_identity=is_identity,
    )
