"""TokenLayout: where every token of a self-attention call sits in the kernel's block order.

A model hands us a sequence of text tokens (none, a prefix or a suffix) and T*H*W video tokens in
frame-major raster order. Sparse plans are cheapest when tokens that attend to each other share a
block, so the layout permutes the video tokens (raster or tile-major) into *slots*, and keeps the
text in whole blocks of its own: the text run is padded with empty slots up to a block boundary, so
no block mixes text and video. Empty slots hold zeros; plans never let a query attend to them and
their outputs are dropped on the way back.

In tile order a grid that is not a multiple of the tile has smaller (ragged) tiles at its far edges.
Packed (the default), the next tile starts right after a ragged one, so blocks straddle tiles; with
``pad_tiles`` every tile starts on a block boundary and owns ``round_up(tile volume, block)`` slots,
its real tokens first and empty slots after them, so tile-shaped plans are made of whole blocks.

A layout is a value: built once per (grid, text, order, tile, block size, padding) and cached. The
index tensors live on the CPU; ``to_slots`` / ``from_slots`` keep one copy per device they meet
(``device_index``), so steady-state calls make no host-to-device copies.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

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
    pad_tiles: bool = False  # tile order with every tile padded to whole blocks (see the module doc)
    # Device copies of the index tensors, per (name, device): filled on first use. Not an init field,
    # so ``dataclasses.replace`` (per-head layouts) starts with an empty cache of its own.
    _device_copies: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    @property
    def video_slots(self) -> torch.Tensor:
        """The slots holding video tokens, ascending (host); ``device_index("video_slots", d)`` on a device."""
        key = ("video_slots", None)
        if key not in self._device_copies:
            self._device_copies[key] = torch.nonzero(self.kind == VIDEO).squeeze(1)
        return self._device_copies[key]

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

    @property
    def slot_valid(self) -> torch.Tensor:
        """[n_slots] bool: slots that hold a token (False on empty slots), on the CPU."""
        return self.kind != PAD

    def device_index(self, name: str, device: torch.device | str) -> torch.Tensor:
        """``self.<name>`` (``src``, ``inverse``, ``kind``, ``coords``, ``slot_valid``) on ``device``,
        copied once per device and kept: the copy of a CPU tensor to an accelerator is a blocking
        host-to-device transfer, which a per-call path must not repeat."""
        device = torch.device(device)
        key = (name, device)
        cached = self._device_copies.get(key)
        if cached is None:
            cached = self._device_copies[key] = getattr(self, name).to(device)
        return cached

    def to_slots(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Original sequence order -> slot order along ``dim`` (empty slots get zeros).

        One scatter of every token into its slot of a zero tensor (no concatenated zero row, no
        gather through it). Per-head layouts take ``x`` as [B, S, H, D] with ``dim=1``."""
        if self.is_identity:
            return x
        dim = dim % x.dim()
        inverse = self.device_index("inverse", x.device)
        out_shape = list(x.shape)
        out_shape[dim] = self.num_slots
        out = x.new_zeros(out_shape)
        if self.per_head:
            _check_per_head(x, inverse, dim)
            B, _, H, D = x.shape
            return out.scatter_(1, inverse.t()[None, :, :, None].expand(B, -1, H, D), x)
        return out.index_copy_(dim, inverse, x)

    def from_slots(self, y: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Slot order -> original sequence order along ``dim`` (empty slots dropped)."""
        if self.is_identity:
            return y
        inverse = self.device_index("inverse", y.device)
        if self.per_head:
            return _gather_per_head(y, inverse, dim)
        return y.index_select(dim, inverse)


def _check_per_head(x: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    if dim != 1 or x.dim() != 4 or x.shape[2] != index.shape[0]:
        raise ValueError(f"per-head layouts gather [B, S, H, D] along dim 1 with H == {index.shape[0]}; "
                         f"got shape {tuple(x.shape)}, dim {dim}")


def _gather_per_head(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """x [B, S, H, D] (dim 1), index [H, n] -> [B, n, H, D] with out[:, i, h] = x[:, index[h, i], h]."""
    _check_per_head(x, index, dim)
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
    video_slots = layout.device_index("video_slots", video_orders.device)
    offset = layout.text_len if layout.text_position == "prefix" else 0
    src = (layout.device_index("src", video_orders.device) if layout.src.dim() == 1
           else src1.to(video_orders.device)).repeat(H, 1)
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


def padded_video_slots(grid: tuple[int, int, int], tile: tuple[int, int, int], block_size: int) -> int:
    """Slots of the video run when every tile is padded to ``round_up(tile volume, block_size)``."""
    n_tiles = math.prod(math.ceil(g / t) for g, t in zip(grid, tile))
    return n_tiles * _round_up(math.prod(tile), block_size)


def padded_tile_positions(grid: tuple[int, int, int], tile: tuple[int, int, int], block_size: int,
                          vid: torch.Tensor) -> torch.Tensor:
    """Tile order with whole tiles: the slot, inside the video run, of each entry of
    ``vid = video_order(grid, "tile", tile)``. Tile ``i`` owns slots ``[i * s, (i + 1) * s)`` with
    ``s = round_up(tile volume, block_size)``; its tokens fill them from the start."""
    _, H, W = grid
    tt, th, tw = tile
    n_th, n_tw = math.ceil(H / th), math.ceil(W / tw)
    t, rem = vid // (H * W), vid % (H * W)
    tile_id = ((t // tt) * n_th + (rem // W) // th) * n_tw + (rem % W) // tw  # non-decreasing along vid
    first = torch.searchsorted(tile_id, tile_id, side="left")  # index of each tile's first entry
    return tile_id * _round_up(tt * th * tw, block_size) + (torch.arange(vid.numel()) - first)


@functools.lru_cache(maxsize=64)
def build_layout(
    grid: tuple[int, int, int],
    text_len: int,
    text_position: str,
    order: str = "raster",
    tile: tuple[int, int, int] = (1, 1, 1),
    block_size: int = 128,
    pad_tiles: bool = False,
) -> TokenLayout:
    """The slot layout of one self-attention call (cached: layouts are immutable values).

    ``pad_tiles`` (tile order only): every tile starts on a block boundary (see the module doc)."""
    if text_position not in TEXT_POSITIONS:
        raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {text_position!r}")
    if text_position == "none" and text_len:
        raise ValueError(f"text_len must be 0 when text_position is 'none', got {text_len}")
    if any(g < 1 for g in grid):
        raise ValueError(f"grid sizes must be >= 1, got {grid}")
    if pad_tiles and order != "tile":
        raise ValueError(f"pad_tiles=True needs order='tile' (tiles to pad), got order={order!r}")
    T, H, W = grid
    n_video = T * H * W
    seq_len = n_video + text_len
    empty = seq_len  # src of an empty slot: one past the last token

    vid = video_order(grid, order, tile)
    t_c, rem = vid // (H * W), vid % (H * W)
    vid_coords = torch.stack([t_c, rem // W, rem % W], dim=1)

    def segment(src, kind, coords):
        return [src], [torch.full((src.numel(),), kind, dtype=torch.int8)], [coords]

    def pad(n):
        return segment(torch.full((n,), empty), PAD, torch.full((n, 3), -1))

    def text(offset):
        return segment(torch.arange(offset, offset + text_len), TEXT, torch.full((text_len, 3), -1))

    def video(offset):
        if not pad_tiles:
            return segment(vid + offset, VIDEO, vid_coords)
        positions = padded_tile_positions(grid, tile, block_size, vid)
        length = padded_video_slots(grid, tile, block_size)
        src = torch.full((length,), empty)
        kind = torch.full((length,), PAD, dtype=torch.int8)
        coords = torch.full((length, 3), -1)
        src[positions], kind[positions], coords[positions] = vid + offset, VIDEO, vid_coords
        return [src], [kind], [coords]

    video_slots = padded_video_slots(grid, tile, block_size) if pad_tiles else n_video
    pieces = []
    if text_position == "prefix" and text_len:
        pieces += [text(0), pad(_round_up(text_len, block_size) - text_len), video(text_len)]
    elif text_position == "suffix" and text_len:
        pieces += [video(0), pad(_round_up(video_slots, block_size) - video_slots), text(n_video)]
    else:
        pieces += [video(0)]
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
        pad_tiles=pad_tiles,
    )
