"""Plans: *what* a sparse attention call computes, as values the kernels execute.

A ``SparsePlan`` is a TokenLayout (the slot permutation) plus a FlexAttention ``BlockMask`` over
the slots. Methods only describe which video tokens may see each other, as a vectorised predicate
on (t, h, w) coordinates; the plan adds the rules every method shares (text rows and columns
are dense, empty slots are never attended) and turns the predicate into block lists:
a block pair is *full* when every real query sees every real key in it (no mask code runs),
*partial* when some do (``mask_mod`` decides token by token), and absent when none do.

Two builders classify block pairs exactly, once per shape (plans are cached by their callers):

- ``build_block_plan`` from the pattern's geometry (``ditaccel.block_geometry``): O(blocks^2),
  no token pair is visited -- what the static methods use;
- ``build_plan`` evaluates the predicate on every token pair (O(tokens^2)): the test oracle, and
  the fallback for a predicate without a box rule.

Key-only conditions (empty slots; a call's text-key padding) are per-key facts, not per-pair ones.
A plan carries them as ``key_valid`` ([n_slots] bool) next to ``pattern_block_mask``, whose partial
blocks are only those the *pattern* cuts; ``call_key_valid`` combines a call's key padding with
them into the one per-key tensor an executor's ``key_valid`` argument takes: that pair is what the
runtime runs for static plans. ``block_mask`` is the self-contained form (blocks holding empty slots
are partial there, masked by ``mask_mod``): what the runtime runs for plans without a pattern-only
form (per-call selections), with the same ``key_valid``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

from .block_geometry import BoxRule, block_boxes, classify_video_pairs
from .layout import PAD, TEXT, VIDEO, TokenLayout

# coords_q [..., 3], coords_k [..., 3] (broadcastable) -> bool: may this video query see this video key?
VideoPredicate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

_CLASSIFY_BUDGET = 64 * 2**20  # token pairs evaluated per chunk


@dataclass(frozen=True)
class SparsePlan:
    layout: TokenLayout
    block_mask: BlockMask
    full_blocks: torch.Tensor  # [nq, nk] bool, or [B|1, H|1, nq, nk] for per-call selections
    any_blocks: torch.Tensor  # same shape, bool (full or partial)
    text_kv_blocks: torch.Tensor  # [nk] bool: blocks holding text keys
    slot_allowed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    density: float | torch.Tensor  # fraction of block pairs computed (a 0-d tensor: no host sync)
    # Full where the pattern does not cut the block pair, whatever its keys' validity (None: as
    # ``full_blocks``). With per-key validity in the kernel these pairs need no mask code.
    pattern_full_blocks: torch.Tensor | None = None
    key_valid: torch.Tensor | None = None  # [n_slots] bool on the plan's device: False on empty slots
    layout_choice: str = "packed"  # "packed" | "padded" (tiles padded to whole blocks)
    layout_note: str = ""  # why: the kernel work of each candidate layout

    @functools.cached_property
    def pattern_block_mask(self) -> BlockMask:
        """The plan's BlockMask with partial blocks only where the pattern cuts a block; to be run
        with ``call_key_valid(...)`` as the executor's per-key validity (empty slots and padded keys
        are not masked by it). Built once per plan, on first use."""
        full = self.full_blocks if self.pattern_full_blocks is None else self.pattern_full_blocks
        allowed = self.slot_allowed

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed(q_idx, kv_idx)

        return _block_mask(full, self.any_blocks & ~full, mask_mod, self.layout.block_size, self.layout.num_slots)

    def call_key_valid(self, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        """The keys one call may attend to, per key slot: [B, Hm, n_slots] bool ([1, 1, n_slots]
        without ``key_padding``). The plan's slot validity AND the call's ``key_padding`` (model
        token order, [B, S] or [B, Hm, S] bool, Hm 1 or the heads; None: every token valid),
        permuted into slot order. Pure device ops, no host sync: the layout's index and validity
        tensors are copied to the device once and kept (``TokenLayout.device_index``); the
        BlockMask stays ``pattern_block_mask`` for every call."""
        layout = self.layout
        if key_padding is None:
            return layout.device_index("slot_valid", self.any_blocks.device)[None, None, :]
        if key_padding.dtype != torch.bool or key_padding.dim() not in (2, 3) or key_padding.shape[-1] != layout.seq_len:
            raise ValueError(f"key_padding must be a bool [B, S] or [B, Hm, S] tensor with S = {layout.seq_len} "
                             f"(this plan's tokens); got {key_padding.dtype} {tuple(key_padding.shape)}")
        kp = key_padding[:, None, :] if key_padding.dim() == 2 else key_padding
        valid = layout.device_index("slot_valid", kp.device)
        if layout.per_head:  # every head has its own slot order: permute per head
            heads = layout.src.shape[0]
            slots = layout.to_slots(kp.expand(-1, heads, -1).transpose(1, 2)[..., None], dim=1)[..., 0]
            return slots.transpose(1, 2) & valid
        return layout.to_slots(kp, dim=-1) & valid

    def with_key_padding(self, key_valid: torch.Tensor) -> BlockMask:
        """The BlockMask for one call whose keys are masked (``key_valid``: [B, Hm, n_slots] bool in
        slot order, Hm 1 or the heads; any key, text or video, may be dropped).

        A block holding a dropped key stops being full (the mask is applied token by token there);
        a block whose every key is dropped is not computed at all. One BlockMask per call: the
        runtime does not use it (it runs ``pattern_block_mask`` with ``call_key_valid`` as the
        executor's ``key_valid``); it is the self-contained statement of that pair's meaning, which
        ``tests/test_plan_call_inputs.py`` checks the pair against.
        """
        bs, nb = self.layout.block_size, self.layout.num_blocks
        n = key_valid.shape[-1]
        # Keys past the end do not exist: they neither keep a block partial nor make it live.
        by_block = torch.nn.functional.pad(key_valid, (0, nb * bs - n), value=True).unflatten(-1, (nb, bs))
        all_valid = by_block.all(-1)[:, :, None, :]  # [B, Hm, 1, nk]
        live = torch.nn.functional.pad(key_valid, (0, nb * bs - n)).unflatten(-1, (nb, bs)).any(-1)[:, :, None, :]
        full4, any4 = self.full_blocks, self.any_blocks
        while full4.dim() < 4:
            full4, any4 = full4.unsqueeze(0), any4.unsqueeze(0)
        anyb = any4 & live
        full = full4 & all_valid & anyb
        partial = anyb & ~full
        base = self.slot_allowed
        per_head = key_valid.shape[1] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            kv = kv_idx.clamp(max=n - 1)
            return base(q_idx, kv_idx) & (key_valid[b, h, kv] if per_head else key_valid[b, 0, kv])

        return _block_mask(full, partial, mask_mod, bs, n)


def _lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[.., nq, nk] bool -> FlexAttention (num_blocks [B, H, nq], indices [B, H, nq, nk]) int32."""
    while blocks.dim() < 4:
        blocks = blocks.unsqueeze(0)
    counts = blocks.sum(-1, dtype=torch.int32)
    # A stable sort of "not selected" puts the selected block indices first, in ascending order.
    indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def _block_mask(full: torch.Tensor, partial: torch.Tensor, mask_mod, block_size: int, n: int) -> BlockMask:
    kv_num, kv_idx = _lists(partial)
    full_num, full_idx = _lists(full)
    # compute_q_blocks=False: the q-major lists serve only the backward pass; inference never needs them.
    return BlockMask.from_kv_blocks(
        kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(n, n),
        compute_q_blocks=False,
    )


def slot_predicate(layout: TokenLayout, video_allowed: VideoPredicate, device) -> Callable:
    """Token-level rule over slots: text rows/columns dense, empty slots never attended."""
    kind = layout.device_index("kind", device)
    coords = layout.device_index("coords", device)
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
    """Classify every block pair of ``layout`` under ``video_allowed`` token by token (O(tokens^2):
    the oracle ``build_block_plan`` is tested against) and build the BlockMask."""
    device = torch.device(device)
    n, bs = layout.num_slots, layout.block_size
    nb = layout.num_blocks
    allowed = slot_predicate(layout, video_allowed, device)
    kind = layout.kind.to(device)

    # Rows past the end or on empty slots are "don't care": they never make a block partial or
    # non-empty. Keys past the end are masked by the kernels' sequence-length bound, likewise;
    # for ``pattern_full`` empty key slots are "don't care" too (per-key validity masks them).
    padded = nb * bs
    q_care = torch.zeros(padded, dtype=torch.bool, device=device)
    q_care[:n] = kind != PAD
    kv_exists = torch.zeros(padded, dtype=torch.bool, device=device)
    kv_exists[:n] = True
    kv_real = torch.zeros(padded, dtype=torch.bool, device=device)
    kv_real[:n] = kind != PAD
    kv_idx = torch.arange(padded, device=device)

    full = torch.empty(nb, nb, dtype=torch.bool, device=device)
    pattern_full = torch.empty(nb, nb, dtype=torch.bool, device=device)
    anyb = torch.empty(nb, nb, dtype=torch.bool, device=device)
    chunk = max(1, _CLASSIFY_BUDGET // (bs * padded))
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        q_idx = torch.arange(c0 * bs, c1 * bs, device=device)
        ok = allowed(q_idx[:, None], kv_idx[None, :])  # [rows, padded]
        care = q_care[c0 * bs : c1 * bs, None] & kv_exists[None, :]
        rows = c1 - c0
        full[c0:c1] = (ok | ~care).view(rows, bs, nb, bs).all(dim=3).all(dim=1)
        pattern_full[c0:c1] = (ok | ~(care & kv_real[None, :])).view(rows, bs, nb, bs).all(dim=3).all(dim=1)
        anyb[c0:c1] = (ok & care).view(rows, bs, nb, bs).any(dim=3).any(dim=1)
    full &= anyb  # a block with no real query or key is not computed at all
    pattern_full &= anyb

    text_slots = torch.zeros(padded, dtype=torch.bool, device=device)
    text_slots[:n] = kind == TEXT
    return _static_plan(layout, full, pattern_full, anyb, text_slots.view(nb, bs).any(dim=1), allowed)


def build_block_plan(layout: TokenLayout, rule: BoxRule, video_allowed: VideoPredicate,
                     device: torch.device | str) -> SparsePlan:
    """The plan ``build_plan`` builds, from the pattern's geometry: block pairs classified by
    ``rule`` on the boxes of their video tokens (O(blocks^2), see ``ditaccel.block_geometry``),
    the shared rules applied per block. ``video_allowed`` must be the token rule ``rule``
    describes: it is the ``mask_mod`` of the partial blocks."""
    device = torch.device(device)
    boxes = block_boxes(layout)
    video_any, video_full = classify_video_pairs(boxes, rule)
    text, pad = boxes.has_text, boxes.has_pad
    real = boxes.has_video | text
    # Text query blocks see every real key; every real query sees the text key blocks.
    text_pair = (text[:, None] & real[None, :]) | (real[:, None] & text[None, :])
    anyb = video_any | text_pair
    pattern_full = anyb & (video_full | text_pair)
    full = pattern_full & ~pad[None, :]  # an empty key slot is masked token by token in ``block_mask``
    allowed = slot_predicate(layout, video_allowed, device)
    return _static_plan(layout, full.to(device), pattern_full.to(device), anyb.to(device), text.to(device), allowed)


def _static_plan(layout, full, pattern_full, anyb, text_kv_blocks, allowed) -> SparsePlan:
    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    return SparsePlan(
        layout=layout,
        block_mask=_block_mask(full, anyb & ~full, mask_mod, layout.block_size, layout.num_slots),
        full_blocks=full,
        any_blocks=anyb,
        text_kv_blocks=text_kv_blocks,
        slot_allowed=allowed,
        density=float(anyb.float().mean().item()),
        pattern_full_blocks=pattern_full,
        key_valid=layout.device_index("slot_valid", anyb.device),
    )


def plan_from_blocks(layout: TokenLayout, keep: torch.Tensor) -> SparsePlan:
    """A plan from a block selection ``keep`` [.., nq, nk] (bool, e.g. [B, H, nq, nk] from a scorer).

    The rules every plan shares are applied here: text query blocks see every key block and every
    query block sees the text key blocks; blocks holding no real token are dropped; key blocks that
    hold empty slots are partial (the empty slots are masked token by token), the rest full. Pure
    device ops: no host synchronisation (``density`` stays a 0-d tensor).
    """
    device = keep.device
    n, bs, nb = layout.num_slots, layout.block_size, layout.num_blocks
    if keep.shape[-2:] != (nb, nb):
        raise ValueError(f"keep must end in [{nb}, {nb}] (query blocks, key blocks) for this layout, "
                         f"got {tuple(keep.shape)}")
    kind = torch.full((nb * bs,), -1, dtype=torch.int8, device=device)  # -1: past the end ("don't care")
    kind[:n] = layout.device_index("kind", device)  # copied to the device once per layout, not per call
    blocks = kind.view(nb, bs)
    has_real = ((blocks == VIDEO) | (blocks == TEXT)).any(1)
    has_empty_slot = (blocks == PAD).any(1)
    text_blocks = (blocks == TEXT).any(1)

    keep = keep | text_blocks[:, None] | text_blocks[None, :]
    keep = keep & has_real[:, None] & has_real[None, :]
    full = keep & ~has_empty_slot[None, :]
    partial = keep & has_empty_slot[None, :]
    real = kind[:n] != PAD

    def allowed(q_idx, kv_idx):
        return real[kv_idx.clamp(max=n - 1)] & (q_idx >= 0)

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed(q_idx, kv_idx)

    return SparsePlan(
        layout=layout, block_mask=_block_mask(full, partial, mask_mod, bs, n), full_blocks=full,
        any_blocks=keep, text_kv_blocks=text_blocks, slot_allowed=allowed, density=keep.float().mean(),
        pattern_full_blocks=keep, key_valid=real,
    )
