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

import dataclasses
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
        return int(self.src.shape[-1])  # per-head layouts: src is [H, n_slots]

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.num_slots / self.block_size)

    @property
    def per_head(self) -> bool:
        """True when every head has its own video permutation (``src`` is [H, n_slots])."""
        return self.src.dim() == 2

    def to_slots(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Original sequence order -> slot order along ``dim`` (empty slots get zeros).

        Per-head layouts take ``x`` as [B, S, H, D] with ``dim=1``."""
        if self.is_identity:
            return x
        pad_shape = list(x.shape)
        pad_shape[dim] = 1
        padded = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
        if self.per_head:
            return _gather_per_head(padded, self.src.to(x.device), dim)
        return padded.index_select(dim, self.src.to(x.device))

    def from_slots(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Slot order -> original sequence order along ``dim`` (empty slots dropped)."""
        if self.is_identity:
            return y
        if self.per_head:
            return _gather_per_head(y, self.inverse.to(y.device), dim)
        return y.index_select(dim, self.inverse.to(y.device))


def _gather_per_head(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, S, H, D] (dim 1), index [H, n] -> [B, n, H, D] with out[:, i, h] = x[:, index[h, i], h]."""
    if dim != 1 or x.dim() != 4 or x.shape[2] != index.shape[0]:
        raise ValueError(f"per-head layouts gather [B, S, H, D] along dim 1 with H == {index.shape[0]}; "
                         f"got shape {tuple(x.shape)}, dim {dim}")
    B, _, H, D = x.shape
    idx = index.t()[None, :, :, None].expand(B, -1, H, D)
    return x.gather(1, idx)


def _grid_coords(grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(t, h, w) of every video token, in raster order."""
    T, H, W = grid
    t = torch.arange(T).view(T, 1, 1).expand(T, H, W).reshape(-1)
    h = torch.arange(H).view(1, H, 1).expand(T, H, W).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(T, H, W).reshape(-1)
    return t, h, w


def hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Distance along a 3-D Hilbert curve of side ``2**bits`` of each point ``coords`` [N, 3] (int64).

    Skilling's transform ("Programming the Hilbert curve", 2004): undo the excess work per bit
    level, Gray-encode, then interleave the bits of the three transposed axes (t most significant).
    Consecutive indices are neighbouring cells, so runs of the curve are compact 3-D blobs.
    """
    x = [coords[:, i].clone().long() for i in range(3)]
    q = 1 << (bits - 1)
    while q > 1:
        p = q - 1
        for i in range(3):
            hit = (x[i] & q) != 0
            swap = (x[0] ^ x[i]) & p
            x0_new = torch.where(hit, x[0] ^ p, x[0] ^ swap)
            if i:
                x[i] = torch.where(hit, x[i], x[i] ^ swap)
            x[0] = x0_new
        q >>= 1
    for i in (1, 2):
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    index = torch.zeros_like(x[0])
    for b in range(bits - 1, -1, -1):
        for i in range(3):
            index = (index << 1) | ((x[i] >> b) & 1)
    return index


def video_order(grid: tuple[int, int, int], order: str, tile: tuple[int, int, int]) -> torch.Tensor:
    """Raster indices of the video tokens, listed in the requested order.

    - ``raster``: as the model has it (frame-major);
    - ``tile``: tiles in raster order of the tile grid, the tokens of a tile in raster order inside it;
      tiles at the far edges of a grid that is not a multiple of the tile are smaller;
    - ``hilbert``: along a 3-D Hilbert curve over (t, h, w), so neighbours share blocks at any grid size;
    - ``transpose``: position-major, the frames of one spatial position contiguous (temporal heads).
    """
    T, H, W = grid
    n = T * H * W
    if order == "raster":
        return torch.arange(n)
    t, h, w = _grid_coords(grid)
    if order == "transpose":
        return torch.argsort((h * W + w) * T + t)
    if order == "hilbert":
        bits = max(1, math.ceil(math.log2(max(grid))))
        return torch.argsort(hilbert_index(torch.stack([t, h, w], dim=1), bits))
    if order != "tile":
        raise ValueError(f"order must be one of ('raster', 'tile', 'hilbert', 'transpose'), got {order!r}")
    tt, th, tw = tile
    n_th, n_tw = math.ceil(H / th), math.ceil(W / tw)
    tile_id = ((t // tt) * n_th + h // th) * n_tw + w // tw
    local = ((t % tt) * th + h % th) * tw + w % tw
    return torch.argsort(tile_id * (tt * th * tw) + local)


def per_head_layout(layout: "TokenLayout", video_orders: torch.Tensor) -> "TokenLayout":
    """``layout`` with its video tokens permuted per head: ``video_orders`` [H, n_video] lists, per
    head, raster video indices in slot order (a permutation each). Text and empty slots stay where
    ``layout`` put them, so its block structure (and ``kind``) is shared by every head."""
    n_video = layout.num_video
    if video_orders.dim() != 2 or video_orders.shape[1] != n_video:
        raise ValueError(f"video_orders must be [H, {n_video}], got {tuple(video_orders.shape)}")
    src1 = layout.src if layout.src.dim() == 1 else layout.src[0]
    H = video_orders.shape[0]
    video_slots = torch.nonzero(layout.kind == VIDEO).squeeze(1).to(video_orders.device)
    offset = layout.text_len if layout.text_position == "prefix" else 0
    src = src1.to(video_orders.device).repeat(H, 1)
    src[:, video_slots] = video_orders.long() + offset
    T, H_, W = layout.grid
    coords = torch.full((H, layout.num_slots, 3), -1, dtype=torch.long, device=video_orders.device)
    vo = video_orders.long()
    coords[:, video_slots] = torch.stack([vo // (H_ * W), (vo // W) % H_, vo % W], dim=-1)
    seq_len = layout.seq_len
    # Empty slots point at index seq_len: scatter into one spare column, then drop it.
    inverse = torch.empty(H, seq_len + 1, dtype=torch.long, device=video_orders.device)
    inverse.scatter_(1, src, torch.arange(layout.num_slots, device=video_orders.device).expand(H, -1))
    inverse = inverse[:, :seq_len].contiguous()
    return dataclasses.replace(layout, order="per_head", src=src, inverse=inverse, coords=coords, is_identity=False)


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
