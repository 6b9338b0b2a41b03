"""Plans: *what* a sparse attention call computes, as values the kernels execute.

A ``SparsePlan`` is a TokenLayout (the slot permutation) plus a FlexAttention ``BlockMask`` over
the slots. Methods only describe which video tokens may see each other, as a vectorised predicate
on (t, h, w) coordinates; ``build_plan`` adds the rules every method shares (text rows and columns
are dense, empty slots are never attended) and turns the predicate into block lists:
a block pair is *full* when every real query sees every real key in it (no mask code runs),
*partial* when some do (``mask_mod`` decides token by token), and absent when none do.

Classification is exact: the predicate is evaluated on every token pair, a chunk of query blocks at
a time on the plan's device, once per shape (plans are cached by their callers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from .layout import PAD, TEXT, VIDEO, TokenLayout

# coords_q [..., 3], coords_k [..., 3] (broadcastable) -> bool: may this video query see this video key?
VideoPredicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CLASSIFY_BUDGET = 64 * 2**20  # token pairs evaluated per chunk


@dataclass(frozen=True)
class SparsePlan:
    layout: TokenLayout
    block_mask: BlockMask
    full_blocks: torch.Tensor  # [nq, nk] bool
    any_blocks: torch.Tensor  # [nq, nk] bool (full or partial)
    text_kv_blocks: torch.Tensor  # [nk] bool: blocks holding text keys
    slot_allowed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    density: float  # fraction of block pairs computed: what the kernel pays for

    def with_key_padding(self, key_valid: torch.Tensor) -> BlockMask:
        """The BlockMask for one call whose text keys are padded (``key_valid``: [B, n_slots] bool).

        Blocks holding text keys stop being full: the padding mask must be applied token by token.
        """
        full = self.full_blocks & ~self.text_kv_blocks[None, :]
        partial = self.any_blocks & ~full
        n = key_valid.shape[1]
        base = self.slot_allowed

        def mask_mod(b, h, q_idx, kv_idx):
            kv = kv_idx.clamp(max=n - 1)
            return base(q_idx, kv_idx) & key_valid[b, kv]

        return _block_mask(full, partial, mask_mod, self.layout.block_size, n)


def _lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[nq, nk] bool -> FlexAttention (num_blocks [1, 1, nq], indices [1, 1, nq, nk]) int32."""
    counts = blocks.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected block indices first, in ascending order.
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def _block_mask(full: torch.Tensor, partial: torch.Tensor, mask_mod, block_size: int, n: int) -> BlockMask:
    kv_num, kv_idx = _lists(partial)
    full_num, full_idx = _lists(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n, n)
    )


def slot_predicate(layout: TokenLayout, video_allowed: VideoPredicate, device) -> Callable:
    """Token-level rule over slots: text rows/columns dense, empty slots never attended."""
    kind = layout.kind.to(device)
    coords = layout.coords.to(device)
    n = layout.num_slots

    def allowed(q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        q = q_idx.clamp(max=n - 1)
        kv = kv_idx.clamp(max=n - 1)
        kq, kk = kind[q], kind[kv]
        both_video = (kq == VIDEO) & (kk == VIDEO)
        # Evaluate the method's rule on every pair; its verdict counts only for video-video pairs.
        video_ok = video_allowed(coords[q], coords[kv])
        return (kk != PAD) & (~both_video | video_ok)

    return allowed


def build_plan(layout: TokenLayout, video_allowed: VideoPredicate, device: torch.device | str) -> SparsePlan:
    """Classify every block pair of ``layout`` under ``video_allowed`` and build the BlockMask."""
    device = torch.device(device)
    n, bs = layout.num_slots, layout.block_size
    nb = layout.num_blocks
    allowed = slot_predicate(layout, video_allowed, device)
    kind = layout.kind.to(device)

    # Rows past the end or on empty slots are "don't care": they never make a block partial or
    # non-empty. Keys past the end are masked by the kernels' sequence-length bound, likewise.
    padded = nb * bs
    q_care = torch.zeros(padded, dtype=torch.bool, device=device)
    q_care[:n] = kind != PAD
    kv_exists = torch.zeros(padded, dtype=torch.bool, device=device)
    kv_exists[:n] = True
    kv_idx = torch.arange(padded, device=device)

    full = torch.empty(nb, nb, dtype=torch.bool, device=device)
    anyb = torch.empty(nb, nb, dtype=torch.bool, device=device)
    chunk = max(1, _CLASSIFY_BUDGET // (bs * padded))
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        q_idx = torch.arange(c0 * bs, c1 * bs, device=device)
        ok = allowed(q_idx[:, None], kv_idx[None, :])  # [rows, padded]
        care = q_care[c0 * bs : c1 * bs, None] & kv_exists[None, :]
        rows = c1 - c0
        full[c0:c1] = (ok | ~care).view(rows, bs, nb, bs).all(dim=3).all(dim=1)
        anyb[c0:c1] = (ok & care).view(rows, bs, nb, bs).any(dim=3).any(dim=1)
    full &= anyb  # a block with no real query or key is not computed at all
    partial = anyb & ~full

    text_slots = torch.zeros(padded, dtype=torch.bool, device=device)
    text_slots[:n] = kind == TEXT
    text_kv_blocks = text_slots.view(nb, bs).any(dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    return SparsePlan(
        layout=layout,
        block_mask=_block_mask(full, partial, mask_mod, bs, n),
        full_blocks=full,
        any_blocks=anyb,
        text_kv_blocks=text_kv_blocks,
        slot_allowed=allowed,
        density=float(anyb.float().mean().item()),
    )
