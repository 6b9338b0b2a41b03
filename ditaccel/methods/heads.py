"""heads: one static pattern per (layer, head), chosen by a short profiling pass.

Attention heads of video DiTs specialise: some look at their own frame, some at the same place in
every frame, some at a narrow band or a few global tokens (Sparse VideoGen, Sparse-vDiT). This
method measures that on the running model: at a profiling step it samples ``sample_rows`` video
query rows (seeded by ``seed``, the same rows every time), computes their exact dense attention and
their attention under every candidate pattern, token by token in torch, and gives each head the
cheapest pattern whose relative error stays within ``tolerance``, else dense. The choice is kept
in the layer's state and re-profiled every ``refresh`` steps.

Patterns are block maps over the kernel's blocks (``block_size`` tokens after reordering), so the
plan is one BlockMask ``[1, H, nq, nk]`` and one kernel call runs every head. Tokens are ordered by
``order`` (tile order by default, tiles of ``tile``); heads whose pattern is temporal use the
position-major ``transpose`` order instead, through a per-head layout. Among video blocks i, j
(a block's *tokens* are the video tokens it holds; text query blocks see everything and every
query block sees the text blocks, as in every plan):

- ``spatial``: j is kept when it holds a token whose frame is within ``spatial_frames`` of the
  frame of a token of i (own frame and neighbours);
- ``temporal`` (in ``transpose`` order): j is kept when it shares a spatial position (h, w) with
  i, so every query sees its own position in every frame;
- ``diagonal``: |i - j| <= ``diagonal_width``;
- ``multi_diagonal``: j is kept when it holds a token whose spatial tile index
  ``(h // tile_h) * n_tiles_w + w // tile_w`` is within ``diagonal_width`` of one of i's, in any
  frame: in tile order, the diagonal band repeated at every frame stride;
- ``vertical_stripe``: the diagonal band plus, for every query block, the ``stripe_blocks`` key
  blocks that drew the most attention mass from the head's sampled rows (chosen per head when
  profiling: the head's global "sink" tokens);
- ``dense``: every block.

Cost is the number of video block pairs a pattern keeps for the head; ties go to the earlier
pattern in the list above; a pattern that keeps every block is reported as ``dense``. When every
head of a layer is dense, ``decide`` returns None (the model's own attention runs; ``plan_for``
still returns the all-blocks plan).

Error per head: ``||o_p - o|| / ||o||`` over the sampled rows' outputs (all batch items), where
``o`` is dense attention and ``o_p`` the pattern's, when the values ``v`` are handed in (the
``v`` argument of ``decide``, else ``ctx.values``); without
``v`` it is the attention mass the pattern drops, averaged over the sampled rows. Profiling uses
the default scale ``1/sqrt(D)`` and ignores text key padding (text keys are kept by every pattern).

State (``ctx.state``, per transformer, layer and CFG branch): ``"heads.patterns"`` holds the
chosen pattern name of every head (a tuple of H str, for ``handle.stats()``), ``"heads.choice"``
the full ``HeadChoice`` (step, patterns, stripes, errors), ``"heads.plan"`` the built plan (its
tensors count against ``cache_budget_mb``; when refused, the plan is rebuilt from the choice at
every step, without re-profiling). A profiling pass is counted as ``ctx.count("profiling")`` and
syncs with the host once (to read the errors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import ORDERS, AttentionConfig, check_block_tile, knob
from ..layout import TEXT, VIDEO, TokenLayout, build_layout, per_head_layout, video_order
from ..plan import SparsePlan, plan_from_blocks
from .base import AttentionMethod, CallShape, ShapeCache, num_tiles

PATTERNS = ("spatial", "temporal", "diagonal", "multi_diagonal", "vertical_stripe", "dense")
PATTERNS_KEY = "heads.patterns"
CHOICE_KEY = "heads.choice"
PLAN_KEY = "heads.plan"

_PROFILE_BUDGET_BYTES = 256 * 2**20  # float32 score rows per head chunk while profiling


@dataclass(frozen=True)
class HeadsConfig(AttentionConfig):
    """Per-head patterns chosen by profiling sampled query rows (Sparse VideoGen)."""

    method = "heads"
    tolerance: float = knob(0.05, "float", low=0.0,
                            help="largest relative error of a head's sampled rows under its pattern")
    sample_rows: int = knob(64, "int", low=1, help="video query rows sampled per profiling pass")
    refresh: int = knob(10, "int", low=1, help="re-profile every N steps (the choice is reused between)")
    spatial_frames: int = knob(1, "int", low=0, help="spatial pattern: frames either side of the query's")
    diagonal_width: int = knob(1, "int", low=0, help="diagonal patterns: blocks (tiles) either side")
    stripe_blocks: int = knob(2, "int", low=1, help="vertical-stripe pattern: key blocks every query keeps")
    order: str = knob("tile", "choice", choices=ORDERS, help="token order of the non-temporal heads")
    tile: tuple[int, ...] | None = knob(
        None, "optional_axes", help="(t, h, w) tokens per tile, product == block_size (None: a block-sized "
                                    "default): the tile order's tiles and the multi-diagonal pattern's")
    seed: int = knob(0, "int", low=0, help="seed of the sampled query rows")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile is not None:
            object.__setattr__(self, "tile", check_block_tile(self, self.tile, self.block_size))


@dataclass(frozen=True)
class HeadChoice:
    """What one profiling pass chose for one (transformer, layer, branch)."""

    step: int
    shape: CallShape
    patterns: tuple[str, ...]  # per head, one of PATTERNS
    stripes: tuple[tuple[int, ...], ...]  # per head, the vertical-stripe key blocks (base layout)
    errors: tuple[tuple[float, ...], ...]  # per head, the sampled error of every pattern (PATTERNS order)


# --- block maps --------------------------------------------------------------------------------

def _video_blocks(layout: TokenLayout, device) -> torch.Tensor:
    """[nb] bool: blocks holding a video token."""
    nb, bs = layout.num_blocks, layout.block_size
    is_video = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    is_video[: layout.num_slots] = layout.kind.to(device) == VIDEO
    return is_video.view(nb, bs).any(1)


def blocks_sharing(layout: TokenLayout, feature: torch.Tensor, n_features: int, radius: int) -> torch.Tensor:
    """[nb, nb] bool: video block j is kept for video block i when one of j's tokens has a feature
    within ``radius`` of a feature of one of i's tokens. ``feature`` [n_slots] long (any value on
    non-video slots)."""
    device = feature.device
    nb, bs = layout.num_blocks, layout.block_size
    video = layout.kind.to(device) == VIDEO
    slots = torch.nonzero(video).squeeze(1)
    member = torch.zeros(nb, n_features, device=device)
    member[slots // bs, feature[slots]] = 1.0
    near = member
    radius = min(radius, n_features - 1)  # a wider radius covers no more (and a huge one overflows the pool)
    if radius > 0:
        near = F.max_pool1d(member[:, None], 2 * radius + 1, stride=1, padding=radius)[:, 0]
    return (near @ member.t()) > 0


def diagonal_blocks(layout: TokenLayout, width: int, device) -> torch.Tensor:
    """[nb, nb] bool: video blocks with |i - j| <= width."""
    nb = layout.num_blocks
    idx = torch.arange(nb, device=device)
    video = _video_blocks(layout, device)
    return ((idx[:, None] - idx[None, :]).abs() <= width) & video[:, None] & video[None, :]


def fixed_pattern_maps(base: TokenLayout, transposed: TokenLayout, config: HeadsConfig, tile, device) -> dict:
    """The q/k-independent patterns' block maps [nb, nb] (``temporal`` in ``transposed``'s blocks)."""
    T, H, W = base.grid
    coords = base.coords.to(device).clamp(min=0)
    n_tw = num_tiles(base.grid, tile)[2]
    tile_id = (coords[:, 1] // tile[1]) * n_tw + coords[:, 2] // tile[2]
    n_tile_ids = num_tiles(base.grid, tile)[1] * n_tw
    tcoords = transposed.coords.to(device).clamp(min=0)
    video = _video_blocks(base, device)
    return {
        "spatial": blocks_sharing(base, coords[:, 0], T, config.spatial_frames),
        "temporal": blocks_sharing(transposed, tcoords[:, 1] * W + tcoords[:, 2], H * W, 0),
        "diagonal": diagonal_blocks(base, config.diagonal_width, device),
        "multi_diagonal": blocks_sharing(base, tile_id, n_tile_ids, config.diagonal_width),
        "dense": video[:, None] & video[None, :],
    }


def stripe_maps(diagonal: torch.Tensor, stripes: torch.Tensor) -> torch.Tensor:
    """[H, nb, nb]: the diagonal band plus, per head, key block columns ``stripes`` [H, n] for every
    video query block."""
    H, nb = stripes.shape[0], diagonal.shape[0]
    video_rows = diagonal.any(1)
    cols = torch.zeros(H, nb, dtype=torch.bool, device=diagonal.device)
    cols.scatter_(1, stripes.long(), True)
    return diagonal[None] | (video_rows[None, :, None] & cols[:, None, :])


def _text_blocks(layout: TokenLayout, device) -> torch.Tensor:
    nb, bs = layout.num_blocks, layout.block_size
    text = torch.zeros(nb * bs, dtype=torch.bool, device=device)
    text[: layout.num_slots] = layout.kind.to(device) == TEXT
    return text.view(nb, bs).any(1)


# --- profiling ---------------------------------------------------------------------------------

def profile_heads(q, k, v, rows, base: TokenLayout, transposed: TokenLayout, maps: dict, stripe_blocks: int,
                  diagonal: torch.Tensor):
    """Errors of every pattern on the sampled query ``rows`` (original token indices).

    q, k, v: [B, S, H, D] (v may be None: dropped attention mass instead of output error).
    Returns ``(errors [H, len(PATTERNS)] float32, stripes [H, n] long, costs [H, len(PATTERNS)])``,
    all on q's device.
    """
    B, S, H, D = q.shape
    device = q.device
    P = len(PATTERNS)
    bs = base.block_size
    # Per pattern, the block of every original token in that pattern's order.
    blk = torch.stack([(transposed if name == "temporal" else base).inverse.to(device) // bs for name in PATTERNS])
    video_blk = _video_blocks(base, device)
    text_cols = _text_blocks(base, device)  # the same blocks in both layouts
    n_video_blocks = int(_video_blocks(base, "cpu").sum())  # host-side layout: no device sync
    n_stripes = min(stripe_blocks, n_video_blocks)
    R, nb = rows.numel(), base.num_blocks
    # All patterns at once (few, large ops): masked scores are [B, P, heads, R, S] per head chunk.
    chunk = max(1, _PROFILE_BUDGET_BYTES // (B * (P + 2) * R * S * 4))
    errors, stripes_all, costs = [], [], []
    qr = q[:, rows].float()
    kf = k.float()
    vf = v.float() if v is not None else None
    for h0 in range(0, H, chunk):
        h1 = min(H, h0 + chunk)
        n = h1 - h0
        logits = torch.einsum("brhd,bshd->bhrs", qr[:, :, h0:h1], kf[:, :, h0:h1]) * D**-0.5
        probs = torch.softmax(logits, dim=-1)
        # Vertical stripes: the video key blocks with the most sampled attention mass, per head.
        mass = torch.zeros(n, nb, device=device)
        mass.index_add_(1, blk[0], probs.sum(dim=(0, 2)))
        stripes = mass.masked_fill(~video_blk, -1.0).topk(n_stripes, dim=-1).indices
        head_maps = dict(maps, vertical_stripe=stripe_maps(diagonal, stripes))
        keep = torch.stack([head_maps[name].expand(n, nb, nb) for name in PATTERNS])  # [P, n, nb, nb]
        costs.append(keep.sum(dim=(2, 3)).t().float())
        keep = keep | text_cols  # every query sees the text blocks
        # allowed[p, h, r, s] = keep[p, h, blk[p, rows[r]], blk[p, s]]
        rows_keep = keep.gather(2, blk[:, rows][:, None, :, None].expand(P, n, R, nb))
        allowed = rows_keep.gather(3, blk[:, None, None, :].expand(P, n, R, S))
        if vf is None:
            # Summed over the dropped keys (not 1 - kept): exactly 0 only when nothing is dropped.
            err = (probs[:, None] * ~allowed).sum(-1).mean(dim=(0, 3))
        else:
            vh = vf[:, :, h0:h1]
            dense = torch.einsum("bhrs,bshd->bhrd", probs, vh)
            sparse = torch.softmax(logits[:, None].masked_fill(~allowed, float("-inf")), dim=-1)
            out = torch.einsum("bphrs,bshd->bphrd", sparse, vh)
            diff = (out - dense[:, None]).square().sum(dim=(0, 3, 4)).sqrt()  # [P, n]
            err = diff / dense.square().sum(dim=(0, 2, 3)).sqrt().clamp(min=1e-30)
        errors.append(err.t())
        stripes_all.append(stripes)
    return torch.cat(errors), torch.cat(stripes_all), torch.cat(costs)


def choose_patterns(errors, costs, tolerance: float) -> tuple[str, ...]:
    """Per head, the cheapest pattern whose error is within ``tolerance`` (dense always is); lists
    of floats [H][P]. A pattern as costly as dense is reported as dense."""
    dense = PATTERNS.index("dense")
    chosen = []
    for err, cost in zip(errors, costs):
        ok = [p for p in range(len(PATTERNS)) if err[p] <= tolerance or p == dense]
        best = min(ok, key=lambda p: (cost[p], p))
        chosen.append("dense" if cost[best] >= cost[dense] else PATTERNS[best])
    return tuple(chosen)


# --- the method --------------------------------------------------------------------------------

class HeadsMethod(AttentionMethod):
    kind = "dynamic"
    name = "heads"

    def __init__(self, config: HeadsConfig):
        super().__init__(config)
        self._maps = ShapeCache()

    def order(self) -> str:
        return self.config.order

    def layouts(self, shape: CallShape) -> tuple[TokenLayout, TokenLayout]:
        """(base layout in ``order``, the same call in ``transpose`` order)."""
        tile = self.tile_for(shape.grid)
        args = (shape.grid, shape.text_len, shape.text_position)
        return (build_layout(*args, self.config.order, tile, self.config.block_size),
                build_layout(*args, "transpose", tile, self.config.block_size))

    def maps(self, shape: CallShape, device) -> dict:
        """Fixed pattern maps of ``shape``, cached per (shape, device) like static plans."""
        def build():
            base, transposed = self.layouts(shape)
            return fixed_pattern_maps(base, transposed, self.config, self.tile_for(shape.grid), device)

        return self._maps.get(shape, device, build)

    def decide(self, ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> SparsePlan | None:
        """None (the model's own attention) at dense steps/layers and where every head chose dense."""
        if self.is_dense(ctx.layer, ctx.step, ctx.dense_steps):
            return None
        plan = self.plan_for(ctx, q, k, v)
        return None if all(p == "dense" for p in ctx.state.get(PATTERNS_KEY)) else plan

    def plan_for(self, ctx, q, k, v=None) -> SparsePlan:
        """The plan of the current choice, profiling first when none is fresh (``refresh``)."""
        if v is None:
            v = ctx.values  # the call's v: profiling then measures output error, not dropped mass
        state = ctx.state
        choice: HeadChoice | None = state.get(CHOICE_KEY)
        if (choice is None or choice.shape != ctx.shape or len(choice.patterns) != q.shape[2]
                or not 0 <= ctx.step - choice.step < self.config.refresh):
            choice = self.profile(ctx, q, k, v)
            state.pop(PLAN_KEY)
            state.put(CHOICE_KEY, choice)
            state.put(PATTERNS_KEY, choice.patterns)
            ctx.report(PATTERNS_KEY, choice.patterns)  # handle.stats()["reports"]["heads.patterns"]
        cached = state.get(PLAN_KEY)
        if cached is not None:
            return cached["plan"]
        plan = self.plan_from_choice(ctx.shape, choice, q.device)
        # The plan's BlockMask tensors are listed so that the store accounts their bytes.
        state.put(PLAN_KEY, {"plan": plan, "tensors": plan.block_mask.as_tuple()})
        return plan

    def sample_rows(self, shape: CallShape, device) -> torch.Tensor:
        """The sampled video query rows (original token indices), the same at every profiling pass."""
        T, H, W = shape.grid
        n_video = T * H * W
        gen = torch.Generator().manual_seed(self.config.seed)
        rows = torch.randperm(n_video, generator=gen)[: min(self.config.sample_rows, n_video)]
        offset = shape.text_len if shape.text_position == "prefix" else 0
        return (rows.sort().values + offset).to(device)

    def profile(self, ctx, q, k, v=None) -> HeadChoice:
        ctx.count("profiling")
        shape = ctx.shape
        base, transposed = self.layouts(shape)
        maps = self.maps(shape, q.device)
        rows = self.sample_rows(shape, q.device)
        errors, stripes, costs = profile_heads(q, k, v, rows, base, transposed, maps, self.config.stripe_blocks,
                                               maps["diagonal"])
        errors, stripes, costs = errors.tolist(), stripes.tolist(), costs.tolist()  # the one host sync
        patterns = choose_patterns(errors, costs, self.config.tolerance)
        return HeadChoice(step=ctx.step, shape=shape, patterns=patterns,
                          stripes=tuple(tuple(s) for s in stripes), errors=tuple(tuple(e) for e in errors))

    def head_maps(self, shape: CallShape, choice: HeadChoice, device) -> torch.Tensor:
        """[H, nb, nb]: every head's chosen block map, in that head's own token order."""
        maps = self.maps(shape, device)
        stripes = torch.tensor(choice.stripes, dtype=torch.long, device=device)
        striped = stripe_maps(maps["diagonal"], stripes)
        return torch.stack([striped[h] if name == "vertical_stripe" else maps[name]
                            for h, name in enumerate(choice.patterns)])

    def plan_from_choice(self, shape: CallShape, choice: HeadChoice, device) -> SparsePlan:
        base, _ = self.layouts(shape)
        keep = self.head_maps(shape, choice, device)
        temporal = [name == "temporal" for name in choice.patterns]
        plan = plan_from_blocks(base, keep[None])
        if not any(temporal) or self.config.order == "transpose":
            return plan
        # Blocks are classified on the base layout (text and empty slots sit where they do for every
        # head); the plan then carries the per-head order the kernel's inputs go through.
        tile = self.tile_for(shape.grid)
        orders = {o: video_order(shape.grid, o, tile).to(device) for o in (self.config.order, "transpose")}
        video_orders = torch.stack([orders["transpose" if t else self.config.order] for t in temporal])
        return dataclasses.replace(plan, layout=per_head_layout(base, video_orders))


__all__ = ["HeadsConfig", "HeadsMethod", "HeadChoice", "PATTERNS", "PATTERNS_KEY", "CHOICE_KEY", "PLAN_KEY",
           "blocks_sharing", "diagonal_blocks", "fixed_pattern_maps", "stripe_maps", "profile_heads",
           "choose_patterns"]
