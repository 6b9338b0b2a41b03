"""What the dynamic block-selection methods (topk, xattn) share: scoring on the fly, reuse across steps.

A dynamic method looks at each call's q and k: it gathers the video tokens in the layout's slot order,
scores every (query block, key block) pair of video blocks (a subclass's ``block_scores``, each
query block's row a distribution over key blocks), picks the blocks to keep (``select_video_blocks``)
and hands the choice to ``plan_from_blocks``, which adds the rules every plan shares (text query
blocks see everything, every query block sees the text blocks, empty slots are masked).

Across denoising steps, per (transformer, layer, CFG branch) in ``ctx.state``:

- ``refresh`` (mask reuse: AdaSpa, SparseD, LiteAttention): scoring runs at sparse steps
  ``dense_steps + i * refresh`` and the selection is reused at the steps between. A step with no
  stored selection (first call of a transformer, a new shape, a selection the memory budget refused)
  scores too, so a plan is never built from a stale or missing selection.
- ``skip_threshold`` (skip propagation: LiteAttention): at a scoring step, a block whose score falls
  below the threshold joins the layer's skip set, and a block in the skip set is never computed
  again during that pipeline call: the set only grows. The diagonal block is never skipped.

Selections and skip sets are stored bit-packed (one bit per block pair), so their memory counts
little against ``cache_budget_mb``. ``ctx.count("scoring")`` counts every scoring run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import ORDERS, AttentionConfig, check_block_tile, knob
from ..layout import VIDEO, TokenLayout, build_layout
from ..plan import SparsePlan, plan_from_blocks
from .base import AttentionMethod, CallShape, ShapeCache, resolved_dense_steps

KEEP_STATE = "dynamic.keep"  # ctx.state names: the reused selection and the skip set (bit-packed)
SKIP_STATE = "dynamic.skip"


@dataclass(frozen=True)
class DynamicConfig(AttentionConfig):
    """Knobs of every dynamic block-selection method: token order, and reuse across steps."""

    order: str = knob("tile", "choice", choices=ORDERS, help="token order of the kernel's blocks")
    tile: tuple[int, ...] | None = knob(
        None, "optional_axes", help="(t, h, w) tokens per tile for order='tile', product == block_size "
                                    "(None: a block-sized default)")
    refresh: int = knob(1, "int", low=1, help="score at every N-th sparse step and reuse the selection "
                                              "between (1: score every step)")
    skip_threshold: float = knob(
        0.0, "float", low=0.0, high=1.0,
        help="a block whose normalised score falls below this at a scoring step stays skipped for the "
             "rest of the pipeline call (0: off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile is not None:
            if self.order != "tile":
                raise ValueError(f"{type(self).__name__}.tile={self.tile} is only used by order='tile', "
                                 f"got order={self.order!r}; set tile=None or order='tile'")
            object.__setattr__(self, "tile", check_block_tile(self, self.tile, self.block_size))


# --- bit-packed block maps ------------------------------------------------------------------------

def pack_blocks(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., n] -> uint8 [..., ceil(n / 8)], bit j of byte i holding mask[..., 8 * i + j]."""
    n = mask.shape[-1]
    bits = torch.nn.functional.pad(mask.to(torch.uint8), (0, (-n) % 8)).unflatten(-1, (-1, 8))
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def unpack_blocks(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_blocks`: uint8 [..., ceil(n / 8)] -> bool [..., n]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 1).bool().flatten(-2)[..., :n]


def keep_from_lists(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor) -> torch.Tensor:
    """FlexAttention-style lists (``kernels.scoring.select_blocks``) -> the bool keep map [..., nq, nk].

    ``kv_indices`` lists every key block once per row (kept ones first), so scattering "is among the
    first ``kv_num_blocks``" through it marks exactly the kept blocks."""
    nk = kv_indices.shape[-1]
    listed = torch.arange(nk, device=kv_indices.device) < kv_num_blocks[..., None].long()
    return torch.zeros_like(listed).scatter_(-1, kv_indices.long(), listed)


@dataclass(frozen=True)
class VideoBlocks:
    """Where the video tokens of a layout sit: slots ``[first_block * block_size, + num_video)``.

    ``src`` lists, in slot order, the original sequence index of each video token (on the device);
    None when the layout is the identity (raster order, text already block-aligned or absent): the
    video tokens are then the run ``[first_block * block_size, + num_video)`` of the sequence itself."""

    layout: TokenLayout
    first_block: int
    num_blocks: int
    src: torch.Tensor | None

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H, D] in model order -> [B, H, n_video, D] video tokens in slot order (a view if it can)."""
        if self.src is None:
            start = self.first_block * self.layout.block_size
            return x[:, start:start + self.layout.num_video].transpose(1, 2)
        return x.index_select(1, self.src).transpose(1, 2)

    def embed(self, video_keep: torch.Tensor) -> torch.Tensor:
        """[B, H, nv, nv] video-block selection -> [B, H, nb, nb] over every block of the layout
        (text blocks left False: ``plan_from_blocks`` opens them)."""
        nb, f, n = self.layout.num_blocks, self.first_block, self.num_blocks
        if f == 0 and n == nb:
            return video_keep
        full = video_keep.new_zeros(*video_keep.shape[:-2], nb, nb)
        full[..., f:f + n, f:f + n] = video_keep
        return full


def video_blocks(layout: TokenLayout, device) -> VideoBlocks:
    """The video span of ``layout``: it is contiguous and starts on a block boundary (the layout
    keeps text in whole blocks of its own), which is what lets video blocks be scored on their own."""
    slots = torch.nonzero(layout.kind == VIDEO).squeeze(1)
    start, bs = int(slots[0]), layout.block_size
    if start % bs or int(slots[-1]) - start + 1 != layout.num_video:
        raise AssertionError(f"video slots of layout {layout.grid}/{layout.text_position} are not one "
                             f"block-aligned run (start {start}, {slots.numel()} slots)")
    src = None if layout.is_identity else layout.src[start:start + layout.num_video].to(device)
    return VideoBlocks(layout=layout, first_block=start // bs, num_blocks=-(-layout.num_video // bs), src=src)


class DynamicMethod(AttentionMethod):
    """Base of topk and xattn: subclasses define ``block_scores`` and ``select_video_blocks``."""

    kind = "dynamic"

    def __init__(self, config: DynamicConfig):
        super().__init__(config)
        self._video = ShapeCache()

    def order(self) -> str:
        return self.config.order

    # --- what a subclass defines --------------------------------------------------------------
    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k [B, H, n_video, D] in slot order -> [B, H, nv, nv] scores, each row summing to 1."""
        raise NotImplementedError

    def select_video_blocks(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, H, nv, nv] -> bool keep map of the same shape (the diagonal kept)."""
        raise NotImplementedError

    # --- the shared machinery -----------------------------------------------------------------
    def video_blocks_for(self, shape: CallShape, device) -> VideoBlocks:
        def build():
            layout = build_layout(shape.grid, shape.text_len, shape.text_position, self.order(),
                                  self.tile_for(shape.grid), self.config.block_size)
            return video_blocks(layout, device)

        return self._video.get(shape, device, build)

    def is_scoring_step(self, step: int, dense_steps: int | None = None) -> bool:
        """``dense_steps``: the call's resolved count (``ctx.dense_steps``); None: the config's."""
        return (step - resolved_dense_steps(self.config, dense_steps)) % self.config.refresh == 0

    def plan_for(self, ctx, q: torch.Tensor, k: torch.Tensor) -> SparsePlan:
        vb = self.video_blocks_for(ctx.shape, q.device)
        keep = None
        if not self.is_scoring_step(ctx.step, ctx.dense_steps):
            stored = ctx.state.get(KEEP_STATE)
            keep = None if stored is None else unpack_blocks(stored, vb.num_blocks)
        if keep is None:
            keep = self.score_and_select(ctx, q, k, vb)
        return plan_from_blocks(vb.layout, vb.embed(keep))

    def score_and_select(self, ctx, q: torch.Tensor, k: torch.Tensor, vb: VideoBlocks) -> torch.Tensor:
        """Score this call's video blocks, apply and grow the skip set, store the selection for reuse."""
        ctx.count("scoring")
        scores = self.block_scores(vb.gather(q), vb.gather(k))
        keep = self.select_video_blocks(scores)
        if ctx.step < resolved_dense_steps(self.config, ctx.dense_steps):
            # Asked what it would run at a dense step (e.g. by renormalise): state is for sparse steps.
            return keep
        threshold = self.config.skip_threshold
        if threshold > 0:
            n = vb.num_blocks
            skip = (scores < threshold) & ~torch.eye(n, dtype=torch.bool, device=scores.device)
            old = ctx.state.get(SKIP_STATE)
            if old is not None:
                skip |= unpack_blocks(old, n)
            # If the budget refuses the set, later steps start a new one: fewer skips, never wrong ones.
            ctx.state.put(SKIP_STATE, pack_blocks(skip))
            keep = keep & ~skip
        if self.config.refresh > 1:
            ctx.state.put(KEEP_STATE, pack_blocks(keep))
        return keep


def skip_set(state, num_video_blocks: int) -> torch.Tensor | None:
    """The skip set a layer's state holds ([B, H, nv, nv] bool), None if it holds none."""
    stored = state.get(SKIP_STATE)
    return None if stored is None else unpack_blocks(stored, num_video_blocks)


__all__ = ["DynamicConfig", "DynamicMethod", "VideoBlocks", "keep_from_lists", "pack_blocks", "skip_set",
           "unpack_blocks", "video_blocks"]
