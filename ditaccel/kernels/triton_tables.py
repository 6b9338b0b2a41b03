"""BlockMask -> the index tables and partial-block bitmaps the Triton kernel reads, built once per mask.

Everything here runs on the first call of a BlockMask (for a given device, batch, heads and lengths)
and is cached with a weak key on the BlockMask; later calls look the tables up and launch, with no
host synchronisation. The first call may synchronise: counting a mask's partial entries needs one
``.item()`` (it sizes the bitmap), once per BlockMask.

Bitmaps exist only where they are needed: a mask_mod other than FlexAttention's no-op mask *and* at
least one partial entry. Each partial entry (query block, key block) stores, per query row, the
verdicts of its BK keys as ``ceil(BK / 64)`` int64 words (bit j of word w: key w * 64 + j), so the
kernel loads one word per query row per sub-block of <= 64 keys (two for 128-key sub-blocks).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.nn.attention.flex_attention import BlockMask, noop_mask

from .reference import block_sizes, mask_mod_varies

WORD_BITS = 64  # keys per bitmap word


@dataclass(frozen=True)
class KernelTables:
    """What the kernel reads besides q, k, v. Rows are indexed by (b % mask_b) * mask_h + h % mask_h."""

    meta: torch.Tensor  # [mask_b, mask_h, nq, 3] int32: n_full, n_partial, first bitmap entry
    order: torch.Tensor  # [mask_b, mask_h, nq] int32: query blocks, heaviest first (or 0..nq-1)
    full_idx: torch.Tensor  # [mask_b, mask_h, nq, nk_full] int32
    part_idx: torch.Tensor  # [mask_b, mask_h, nq, nk_part] int32
    bits: torch.Tensor  # [bits_b, bits_h, entries, BQ, ceil(BK / 64)] int64 (at least one entry)
    has_bits: bool  # False when no partial entry needs a token mask: the kernel compiles without one
    mask_b: int
    mask_h: int


# BlockMask -> {(device, B, H, Sq, Skv, longest_first): KernelTables}. Weak keys: tables die with the mask.
TABLES: "weakref.WeakKeyDictionary[BlockMask, dict]" = weakref.WeakKeyDictionary()


def _broadcast_dim(name: str, size: int, want: int, what: str) -> int:
    if size not in (1, want):
        raise ValueError(f"block_mask.{name} has {what} size {size}; allowed: 1 (broadcast) or {want} (from q)")
    return size


def pack_bits(ok: torch.Tensor) -> torch.Tensor:
    """[..., K] bool -> [..., ceil(K / 64)] int64; bit j of word w is key w * 64 + j (K padded with False)."""
    K = ok.shape[-1]
    words = -(-K // WORD_BITS)
    if words * WORD_BITS != K:
        ok = torch.nn.functional.pad(ok, (0, words * WORD_BITS - K))
    bits = ok.reshape(*ok.shape[:-1], words, WORD_BITS).to(torch.int64)
    shifts = torch.arange(WORD_BITS, device=ok.device, dtype=torch.int64)
    # Distinct powers of two: the sum never carries, and bit 63 wraps to int64's sign bit as intended.
    return (bits << shifts).sum(-1)


def _partial_bitmaps(mask_mod, part_num, part_idx, BQ, BK, B, H, Sq, Skv, device):
    """Evaluate ``mask_mod`` on every partial entry once: (bits or None when there is no entry, first
    entry per row). Entries are in (b, h, query block, slot) row-major order, matching ``first``."""
    mask_b, mask_h, nq = part_num.shape
    counts = part_num.to(torch.int64).flatten()
    first = (torch.cumsum(counts, 0) - counts).view(mask_b, mask_h, nq)
    n_entries = int(counts.sum().item())  # the one host sync of a BlockMask's first call
    if n_entries == 0:
        return None, first

    slots = torch.arange(part_idx.shape[-1], device=device)
    bm, hm, qb, j = torch.nonzero(slots < part_num[..., None].to(torch.int64), as_tuple=True)
    kvb = part_idx[bm, hm, qb, j].to(torch.int64)

    # A mask list shared by all batches (heads) still gets per-batch (per-head) bits when
    # mask_mod reads b (h): FlexAttention evaluates mask_mod with the real indices.
    vary_b, vary_h = mask_mod_varies(mask_mod, B, H, device)
    bits_b = B if (mask_b == 1 and vary_b) else 1
    bits_h = H if (mask_h == 1 and vary_h) else 1
    words = -(-BK // WORD_BITS)
    bits = torch.empty(bits_b, bits_h, n_entries, BQ, words, dtype=torch.int64, device=device)

    rows = torch.arange(BQ, device=device)
    keys = torch.arange(BK, device=device)
    chunk = max(1, (32 * 2**20) // (bits_b * bits_h * BQ * BK))
    for e0 in range(0, n_entries, chunk):
        e1 = min(n_entries, e0 + chunk)
        n = e1 - e0
        # Index tensors broadcast as [b, h, entry, q, kv]; positions past the end are clamped
        # (the kernel masks them anyway) so lookup-table mask_mods never index out of range.
        b_t = torch.arange(B, device=device).view(B, 1, 1, 1, 1) if bits_b > 1 else bm[e0:e1].view(1, 1, n, 1, 1)
        h_t = torch.arange(H, device=device).view(1, H, 1, 1, 1) if bits_h > 1 else hm[e0:e1].view(1, 1, n, 1, 1)
        q_t = (qb[e0:e1, None] * BQ + rows).clamp(max=Sq - 1).view(1, 1, n, BQ, 1)
        kv_t = (kvb[e0:e1, None] * BK + keys).clamp(max=Skv - 1).view(1, 1, n, 1, BK)
        ok = torch.as_tensor(mask_mod(b_t, h_t, q_t, kv_t), device=device).to(torch.bool)
        bits[:, :, e0:e1] = pack_bits(ok.expand(bits_b, bits_h, n, BQ, BK))
    return bits, first


def _checked_lists(block_mask: BlockMask, B: int, H: int, nq: int, nk: int, BQ: int, BK: int, Sq: int, Skv: int):
    part_num, part_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if full_num is None:  # no full blocks: an empty list per row
        full_num = torch.zeros_like(part_num)
        full_idx = torch.zeros_like(part_idx[..., :1])
    for name, t, rank in (("kv_num_blocks", part_num, 3), ("kv_indices", part_idx, 4),
                          ("full_kv_num_blocks", full_num, 3), ("full_kv_indices", full_idx, 4)):
        if t.dim() != rank:
            raise ValueError(f"block_mask.{name} must have rank {rank}; got shape {tuple(t.shape)}")
        _broadcast_dim(name, t.shape[0], B, "batch")
        _broadcast_dim(name, t.shape[1], H, "head")
        if t.shape[2] < nq:
            raise ValueError(
                f"block_mask.{name} covers {t.shape[2]} query blocks of {BQ} tokens but q has "
                f"{Sq} tokens ({nq} blocks); build the BlockMask for this sequence length"
            )
    for name, t in (("kv_indices", part_idx), ("full_kv_indices", full_idx)):
        if t.shape[3] > nk:
            raise ValueError(
                f"block_mask.{name} addresses {t.shape[3]} key blocks of {BK} tokens but k has {Skv} "
                f"tokens ({nk} blocks); build the BlockMask for this sequence length"
            )
    return part_num, part_idx, full_num, full_idx


def kernel_tables(block_mask: BlockMask, B: int, H: int, Sq: int, Skv: int, device, longest_first: bool) -> KernelTables:
    """The kernel's tables for ``block_mask`` at this call's shape (cached: built on the first call only)."""
    per_mask = TABLES.get(block_mask)
    if per_mask is None:
        per_mask = {}
        TABLES[block_mask] = per_mask
    key = (str(device), B, H, Sq, Skv, bool(longest_first))
    if key in per_mask:
        return per_mask[key]

    BQ, BK = block_sizes(block_mask)
    nq, nk = -(-Sq // BQ), -(-Skv // BK)
    part_num, part_idx, full_num, full_idx = _checked_lists(block_mask, B, H, nq, nk, BQ, BK, Sq, Skv)

    # One broadcast shape for every table, so the kernel needs a single row index.
    mask_b = max(part_num.shape[0], full_num.shape[0])
    mask_h = max(part_num.shape[1], full_num.shape[1])

    def prep(t):
        t = t[:, :, :nq].to(device=device, dtype=torch.int32)
        return t.expand(mask_b, mask_h, *t.shape[2:]).contiguous()

    part_num, part_idx, full_num, full_idx = prep(part_num), prep(part_idx), prep(full_num), prep(full_idx)

    bits = None
    first = torch.zeros_like(part_num)
    if block_mask.mask_mod is not noop_mask and block_mask.mask_mod is not None:
        # mask_mod runs where the BlockMask lives (its closures hold tensors there); bits move to q's device.
        mask_device = block_mask.kv_num_blocks.device
        bits, first = _partial_bitmaps(block_mask.mask_mod, part_num.to(mask_device), part_idx.to(mask_device),
                                       BQ, BK, B, H, Sq, Skv, mask_device)
        first = first.to(device)
    has_bits = bits is not None
    if has_bits:
        bits = bits.to(device)
    else:  # no-op mask or no partial entry: the kernel never reads bits (a one-entry placeholder)
        bits = torch.zeros(1, 1, 1, BQ, -(-BK // WORD_BITS), dtype=torch.int64, device=device)
    meta = torch.stack([full_num, part_num, first.to(torch.int32)], dim=-1).contiguous()

    # Longest rows first: the last wave of programs is then made of short rows, not long ones.
    if longest_first:
        work = full_num.to(torch.int64) + part_num.to(torch.int64)
        order = torch.argsort(work, dim=-1, descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(nq, device=device, dtype=torch.int32).expand(mask_b, mask_h, nq)
    tables = KernelTables(meta, order.contiguous(), full_idx, part_idx, bits, has_bits, mask_b, mask_h)
    per_mask[key] = tables
    return tables


__all__ = ["TABLES", "KernelTables", "kernel_tables", "pack_bits"]
