"""Block-level geometry: classify every block pair of a static plan without visiting token pairs.

A block's video tokens are described as a few axis-aligned *boxes* in (t, h, w) -- products of one
integer interval per axis -- found by merging the block's tokens, in slot order, into runs along
one axis, the runs into rectangles, the rectangles into boxes. A tile-order block is one box per
tile piece, a raster block a partial row, whole rows and a partial row. A method's rule says, for
a pair of boxes, whether *some* and whether *every* query token of the first may see every key
token of the second (``BoxRule.classify``); a block pair is then

- *any* (computed) when some box pair is, and *full* when every box pair is.

Cost: one bounding-box test per block pair (``nb ** 2``), then box pairs only for the block pairs
the bounding boxes leave undecided (a bounding box that is full, or that nothing in it may see, is
decided for the whole block pair, since the block's tokens lie inside it). No token pair is ever
evaluated; the token-level rule only runs inside partial blocks, in the kernel's ``mask_mod``.

Rules here are exact, not conservative: ``tests/test_block_geometry.py`` checks them against the
brute-force token classifier (``ditaccel.plan.build_plan``) on random grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import PAD, TEXT, VIDEO, TokenLayout

_BOX_PAIR_BUDGET = 1 << 22  # box pairs evaluated per chunk (a few tens of MiB of int64 temporaries)


@dataclass(frozen=True)
class BlockBoxes:
    """The video tokens of every block as boxes (inclusive bounds), padded to ``M`` per block."""

    lo: torch.Tensor  # [nb, M, 3] int64
    hi: torch.Tensor  # [nb, M, 3] int64, >= lo on valid boxes
    valid: torch.Tensor  # [nb, M] bool
    has_video: torch.Tensor  # [nb] bool
    has_text: torch.Tensor  # [nb] bool
    has_pad: torch.Tensor  # [nb] bool: the block holds empty slots

    @property
    def boxes_per_block(self) -> int:
        return int(self.valid.shape[1])


def _merge_along(lo, hi, block, axis: int):
    """Merge consecutive boxes that differ only on ``axis`` and touch there, inside one block."""
    if lo.shape[0] <= 1:
        return lo, hi, block
    others = [a for a in range(3) if a != axis]
    touch = (lo[1:, axis] == hi[:-1, axis] + 1) | (hi[1:, axis] == lo[:-1, axis] - 1)
    cont = (block[1:] == block[:-1]) & touch
    for a in others:
        cont &= (lo[1:, a] == lo[:-1, a]) & (hi[1:, a] == hi[:-1, a])
    start = torch.cat([torch.ones(1, dtype=torch.bool), ~cont])
    first = torch.nonzero(start).squeeze(1)
    last = torch.cat([first[1:] - 1, torch.tensor([lo.shape[0] - 1])])
    # Tokens are distinct, so a run never turns back: its ends are its first and last members.
    return torch.minimum(lo[first], lo[last]), torch.maximum(hi[first], hi[last]), block[first]


def block_boxes(layout: TokenLayout) -> BlockBoxes:
    """Decompose each block's video tokens of ``layout`` (one shared slot order) into boxes."""
    if layout.per_head:
        raise ValueError("block_boxes needs one slot order for every head; got a per-head layout")
    n, bs, nb = layout.num_slots, layout.block_size, layout.num_blocks
    kind = torch.full((nb * bs,), -1, dtype=torch.int8)  # -1: past the end (no slot)
    kind[:n] = layout.kind
    per_block = kind.view(nb, bs)
    video_slots = torch.nonzero(layout.kind == VIDEO).squeeze(1)
    coords = layout.coords[video_slots].long()
    block = video_slots // bs
    lo, hi = coords, coords.clone()
    # Merge along the axis the order walks fastest first (transpose: frames of one position).
    axes = (0, 2, 1) if layout.order == "transpose" else (2, 1, 0)
    for axis in axes:
        lo, hi, block = _merge_along(lo, hi, block, axis)
    counts = torch.bincount(block, minlength=nb)
    M = max(1, int(counts.max()) if counts.numel() else 1)
    first_of_block = torch.cumsum(counts, 0) - counts
    slot = torch.arange(block.numel()) - first_of_block[block]
    box_lo = torch.zeros(nb, M, 3, dtype=torch.long)
    box_hi = torch.zeros(nb, M, 3, dtype=torch.long)
    valid = torch.zeros(nb, M, dtype=torch.bool)
    box_lo[block, slot], box_hi[block, slot], valid[block, slot] = lo, hi, True
    return BlockBoxes(lo=box_lo, hi=box_hi, valid=valid, has_video=(per_block == VIDEO).any(1),
                      has_text=(per_block == TEXT).any(1), has_pad=(per_block == PAD).any(1))


class BoxRule:
    """A video pattern evaluated on box pairs. ``classify(qlo, qhi, klo, khi)`` takes broadcastable
    [..., 3] inclusive bounds and returns (any, full) bool tensors of the broadcast shape: may some
    query token of the query box see some key token of the key box; may every one see every one."""

    def classify(self, qlo, qhi, klo, khi) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class SeparableRule(BoxRule):
    """A pattern that is a product over axes: ``allowed(q, k) = all_a table_a[q_a, k_a]``.

    On a box pair the allowed pairs are the product of the per-axis allowed pairs, so the pair is
    any (full) when every axis is; an axis is counted with a summed-area table of its relation.
    """

    def __init__(self, tables: list[torch.Tensor]):
        self.tables = [t.bool() for t in tables]
        self._sums = []
        for t in self.tables:
            s = torch.zeros(t.shape[0] + 1, t.shape[1] + 1, dtype=torch.long)
            s[1:, 1:] = t.long().cumsum(0).cumsum(1)
            self._sums.append(s)

    def classify(self, qlo, qhi, klo, khi):
        any_ok = full_ok = None
        for a, s in enumerate(self._sums):
            q0, q1, k0, k1 = qlo[..., a], qhi[..., a] + 1, klo[..., a], khi[..., a] + 1
            count = s[q1, k1] - s[q0, k1] - s[q1, k0] + s[q0, k0]
            a_any, a_full = count > 0, count == (q1 - q0) * (k1 - k0)
            any_ok = a_any if any_ok is None else any_ok & a_any
            full_ok = a_full if full_ok is None else full_ok & a_full
        return any_ok, full_ok

    def predicate(self):
        """The token rule the tables define, as a ``VideoPredicate`` (the kernel's mask_mod)."""
        tables = self.tables

        def allowed(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
            ok = None
            for a, t in enumerate(tables):
                t = t.to(qc.device)
                axis_ok = t[qc[..., a].clamp(min=0), kc[..., a].clamp(min=0)]
                ok = axis_ok if ok is None else ok & axis_ok
            return ok

        return allowed


def _range_tables(values: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, n] min and max of ``values[i..j]`` (i <= j)."""
    v = torch.tensor(values, dtype=torch.long)
    n = v.numel()
    lo = torch.zeros(n, n, dtype=torch.long)  # entries below the diagonal are never read
    hi = torch.zeros(n, n, dtype=torch.long)
    for i in range(n):
        lo[i, i:] = torch.cummin(v[i:], 0).values
        hi[i, i:] = torch.cummax(v[i:], 0).values
    return lo, hi


class RadialRule(BoxRule):
    """Radial attention on boxes: key frames ``< sink`` always seen; else ``|p_q - p_k| <= band[|t_q - t_k|]``
    with ``p = h * W + w`` (band -1: the frame pair is left out).

    On a box pair the in-frame offsets ``dp = dh * W + dw`` do not depend on the frames, so the pair is
    any when the widest band over its frame distances reaches the smallest ``|dp|``, full when the
    narrowest band covers the largest ``|dp|``. Frame distances of two intervals form an interval, so
    the band extremes come from range-min/max tables over distance.
    """

    def __init__(self, grid, bands: list[int], sink: int):
        self.T, _, self.W = grid
        self.sink = sink
        self.band_min, self.band_max = _range_tables(bands)

    def _distances(self, q0, q1, k0, k1):
        """Interval [d0, d1] of |tq - tk| for tq in [q0, q1], tk in [k0, k1] (non-empty intervals)."""
        e0, e1 = q0 - k1, q1 - k0
        straddle = (e0 <= 0) & (e1 >= 0)
        d0 = torch.where(straddle, torch.zeros_like(e0), torch.minimum(e0.abs(), e1.abs()))
        d1 = torch.maximum(e0.abs(), e1.abs())
        return d0.clamp(max=self.T - 1), d1.clamp(max=self.T - 1)

    def classify(self, qlo, qhi, klo, khi):
        W = self.W
        a0, a1 = qlo[..., 1] - khi[..., 1], qhi[..., 1] - klo[..., 1]  # dh range
        c0, c1 = qlo[..., 2] - khi[..., 2], qhi[..., 2] - klo[..., 2]  # dw range
        max_dp = torch.maximum((a1 * W + c1).abs(), (a0 * W + c0).abs())
        # min |dh * W + dw| over the box: the distance from 0 to [dh*W + c0, dh*W + c1] is convex in dh,
        # least at the integer next to -(c0 + c1) / (2W) on either side (clamped to [a0, a1]).
        below = torch.div(-(c0 + c1), 2 * W, rounding_mode="floor")
        min_dp = None
        for cand in (below, below + 1):
            dh = torch.minimum(torch.maximum(cand, a0), a1)
            gap = torch.clamp(torch.maximum(dh * W + c0, -(dh * W + c1)), min=0)
            min_dp = gap if min_dp is None else torch.minimum(min_dp, gap)
        tq0, tq1, tk0, tk1 = qlo[..., 0], qhi[..., 0], klo[..., 0], khi[..., 0]
        has_sink = tk0 < self.sink
        nonsink0 = torch.clamp(tk0, min=self.sink)
        has_nonsink = nonsink0 <= tk1
        d0, d1 = self._distances(tq0, tq1, nonsink0, tk1)
        widest, narrowest = self.band_max[d0, d1], self.band_min[d0, d1]
        any_ok = has_sink | (has_nonsink & (widest >= min_dp))
        full_ok = ~has_nonsink | (narrowest >= max_dp)
        return any_ok, full_ok


def _bounding_boxes(boxes: BlockBoxes) -> tuple[torch.Tensor, torch.Tensor]:
    big = torch.iinfo(torch.long).max
    lo = torch.where(boxes.valid[..., None], boxes.lo, big).amin(1)
    hi = torch.where(boxes.valid[..., None], boxes.hi, -1).amax(1)
    return lo, hi


def classify_video_pairs(boxes: BlockBoxes, rule: BoxRule) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full) [nb, nb] bool over the *video* tokens of every block pair (False where a block has none)."""
    nb, M = boxes.valid.shape
    both = boxes.has_video[:, None] & boxes.has_video[None, :]
    bb_lo, bb_hi = _bounding_boxes(boxes)
    none = ~boxes.has_video[:, None]  # blocks without video: any box will do, ``both`` masks them
    bb_lo, bb_hi = bb_lo.masked_fill(none, 0), bb_hi.masked_fill(none, 0)
    any_b, full_b = rule.classify(bb_lo[:, None], bb_hi[:, None], bb_lo[None, :], bb_hi[None, :])
    any_b, full_b = any_b & both, full_b & both
    undecided = torch.nonzero(any_b & ~full_b)
    if M > 1 and undecided.numel():
        qb, kb = undecided[:, 0], undecided[:, 1]
        chunk = max(1, _BOX_PAIR_BUDGET // (M * M))
        box_any = torch.empty(qb.numel(), dtype=torch.bool)
        box_full = torch.empty(qb.numel(), dtype=torch.bool)
        for c0 in range(0, qb.numel(), chunk):
            q, k = qb[c0:c0 + chunk], kb[c0:c0 + chunk]
            a, f = rule.classify(boxes.lo[q][:, :, None], boxes.hi[q][:, :, None],
                                 boxes.lo[k][:, None, :], boxes.hi[k][:, None, :])  # [P, M, M]
            pair_valid = boxes.valid[q][:, :, None] & boxes.valid[k][:, None, :]
            box_any[c0:c0 + chunk] = (a & pair_valid).flatten(1).any(1)
            box_full[c0:c0 + chunk] = (f | ~pair_valid).flatten(1).all(1)
        any_b[qb, kb] = box_any
        full_b[qb, kb] = box_full & box_any
    return any_b, full_b & any_b


def block_work(any_blocks: torch.Tensor, block_size: int) -> int:
    """Kernel work of a plan as the issue defines it: computed block pairs x block size^2."""
    return int(any_blocks.sum()) * block_size * block_size


def tiles_are_ragged(grid, tile, block_size: int) -> bool:
    """True when packing tiles back to back would make blocks straddle tiles (edge tiles smaller
    than the rest, or a tile that is not a whole number of blocks)."""
    return any(g % t for g, t in zip(grid, tile)) or math.prod(tile) % block_size != 0


__all__ = ["BlockBoxes", "BoxRule", "RadialRule", "SeparableRule", "block_boxes", "block_work",
           "classify_video_pairs", "tiles_are_ragged"]
