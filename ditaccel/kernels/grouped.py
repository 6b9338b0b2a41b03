"""Block-sparse attention in plain torch that is fast off CUDA: query blocks grouped by how many key
blocks they keep, one SDPA call per group.

The torch reference (``reference.py``) pads every query block to the widest row's key list and
evaluates ``mask_mod`` token by token on every call; its cost is the widest row's, plus the mask.
This executor is what ``backend="auto"`` runs on CPU. Per BlockMask (cached with weak keys, like the
Triton kernel's tables) it works out once:

- every row's key blocks, in ascending order (a row is a query block, or a (batch, head, query
  block) when the block lists or ``mask_mod`` differ across batches or heads);
- groups of rows that keep the same number of key blocks, split into rows that need a token mask
  (they keep a partial block) and rows that do not; a ragged last key block needs none, it comes
  last in its row and its missing keys are cut off by length;
- in the shared (per query block) mode, rows that keep the very same list, which then run as one
  SDPA head and gather their keys once (whole frames of query blocks, in tile and window plans);
- the token mask of the masked rows, evaluated once and kept as an additive bias.

Per call each group is one ``scaled_dot_product_attention`` over its rows' gathered key blocks, so
the work follows the plan's density with no padding to the widest row, and full blocks run with no
mask at all. Rows that keep every key block with no mask attend to k itself (no gather): a fully
dense plan costs one SDPA. Semantics are FlexAttention's, as in the reference; rows with no allowed
key return zeros.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from .reference import _check_rank, _compute_dtype, block_sizes, mask_mod_varies, normalize_key_valid

# Bytes of gathered keys and values (or of token mask) one SDPA call may hold.
_GATHER_BUDGET_BYTES = 128 * 2**20


@dataclass(frozen=True)
class _Group:
    """Rows keeping ``count`` key blocks. Indices address the block-flat views of the call (see
    :func:`grouped_block_sparse_attention`): query rows of [G, rows, BQ * D], key rows of [G, rows, BK * D]."""

    count: int
    keys: int  # keys each row attends over: count * BK, less the ragged last block's missing keys
    per_list: int  # rows sharing each key list (they run as one SDPA head)
    rows: torch.Tensor  # [lists * per_list] long: the rows' query blocks, list by list
    kv_rows: torch.Tensor | None  # [lists * count] long: each list's key blocks; None: every key, k as is
    mask: torch.Tensor | None  # [lists * per_list, BQ, keys] additive, 0 or -inf (None: no mask)
    row_any: torch.Tensor | None  # [lists * per_list, BQ, 1] bool: rows with an allowed key (None: all)


@dataclass(frozen=True)
class _Groups:
    shared: bool  # rows stand for every (batch, head): SDPA's batch is B * H, else 1 and rows are per (b, h)
    groups: tuple[_Group, ...]


# BlockMask -> {(device, B, H, Sq, Skv): _Groups}. Weak keys: groups die with the mask.
_GROUPS: weakref.WeakKeyDictionary[BlockMask, dict] = weakref.WeakKeyDictionary()


def _row_lists(block_mask: BlockMask, nq: int, B: int, H: int, shared: bool, device):
    """(key blocks [R, nq, M], is_partial [R, nq, M], count [R, nq]): each row's blocks in ascending
    order, then the unused slots; R rows of (b, h) (1 in shared mode, else B * H)."""
    lists = []
    for num, idx, partial in ((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False),
                              (block_mask.kv_num_blocks, block_mask.kv_indices, True)):
        if num is None:
            continue
        num, idx = num[:, :, :nq].to(device).long(), idx[:, :, :nq].to(device).long()
        if not shared:
            num, idx = num.expand(B, H, nq), idx.expand(B, H, *idx.shape[2:])
        valid = torch.arange(idx.shape[-1], device=device) < num[..., None]
        lists.append((idx.flatten(0, 1), torch.full_like(valid, partial).flatten(0, 1), valid.flatten(0, 1)))
    blocks = torch.cat([x[0] for x in lists], -1)
    partial = torch.cat([x[1] for x in lists], -1)
    valid = torch.cat([x[2] for x in lists], -1)
    # Ascending block order, unused slots last: rows keeping the same blocks then hold equal lists,
    # and the ragged last key block, when kept, comes last in its row, so its missing keys are the
    # last gathered ones and are cut off by length instead of masked.
    order = torch.argsort(torch.where(valid, blocks, torch.iinfo(torch.int64).max), dim=-1, stable=True)
    return blocks.gather(-1, order), partial.gather(-1, order), valid.sum(-1)


def _token_mask(block_mask: BlockMask, b, h, qb, kv, part, BQ: int, BK: int, Sq: int, Skv: int, keys: int,
                device) -> torch.Tensor:
    """[n, BQ, keys] bool for rows (b, h, query block qb) keeping key blocks ``kv`` [n, c] (``part``:
    which are partial): ``mask_mod`` inside partial blocks, everything inside full ones. Evaluated in
    chunks of rows on the BlockMask's device (its mask_mod's closures live there)."""
    mask_device = block_mask.kv_num_blocks.device
    n, c = kv.shape
    masks = []
    rows_per_chunk = max(1, _GATHER_BUDGET_BYTES // (BQ * c * BK * 8))
    for s in range(0, n, rows_per_chunk):
        sl = slice(s, s + rows_per_chunk)
        kv_tok = (kv[sl, :, None] * BK + torch.arange(BK, device=device)).flatten(1)  # [rows, c*BK]
        q_tok = qb[sl, None] * BQ + torch.arange(BQ, device=device)  # [rows, BQ]
        ok = torch.as_tensor(block_mask.mask_mod(
            b[sl, None, None].to(mask_device), h[sl, None, None].to(mask_device),
            q_tok.clamp(max=Sq - 1)[:, :, None].to(mask_device),
            kv_tok.clamp(max=Skv - 1)[:, None, :].to(mask_device),
        ), device=mask_device).to(device)
        ok = ~part[sl].repeat_interleave(BK, -1)[:, None, :] | ok  # full blocks: no mask_mod
        masks.append(ok.expand(len(kv_tok), BQ, c * BK)[:, :, :keys])
    return torch.cat(masks)


def _by_shared_lists(count: int, keys: int, rows, kv_rows, mask, dtype) -> list[_Group]:
    """Split rows keeping ``count`` key blocks into groups whose rows share their key list with the
    same number of other rows: a list's rows run as one SDPA head of (rows x BQ) queries and gather
    their keys once (in a tile or window plan, whole frames of query blocks share a list)."""
    lists, which, members_per_list = torch.unique(kv_rows, dim=0, return_inverse=True, return_counts=True)
    by_list = torch.argsort(which, stable=True)  # rows, list by list
    first = torch.cumsum(members_per_list, 0) - members_per_list
    groups = []
    for per_list in torch.unique(members_per_list).tolist():
        chosen = torch.nonzero(members_per_list == per_list).flatten()
        members = by_list[(first[chosen, None] + torch.arange(per_list, device=rows.device)).flatten()]
        allowed = None if mask is None else mask[members]
        groups.append(_group(count, keys, per_list, rows[members], lists[chosen].flatten(), allowed, dtype))
    return groups


def _group(count: int, keys: int, per_list: int, rows, kv_rows, allowed, dtype) -> _Group:
    if allowed is None:
        return _Group(count, keys, per_list, rows, kv_rows, None, None)
    row_any = allowed.any(-1, keepdim=True)
    # Additive form (0 / -inf), made once: SDPA converts a boolean mask on every call.
    bias = torch.zeros(allowed.shape, dtype=dtype, device=rows.device).masked_fill_(~allowed, float("-inf"))
    return _Group(count, keys, per_list, rows, kv_rows, bias, None if bool(row_any.all()) else row_any)


def _group_rows(block_mask: BlockMask, B: int, H: int, Sq: int, Skv: int, device, dtype) -> _Groups:
    BQ, BK = block_sizes(block_mask)
    nq, nk = -(-Sq // BQ), -(-Skv // BK)
    lists_b = max(t.shape[0] for t in (block_mask.kv_num_blocks, block_mask.full_kv_num_blocks) if t is not None)
    lists_h = max(t.shape[1] for t in (block_mask.kv_num_blocks, block_mask.full_kv_num_blocks) if t is not None)
    vary_b, vary_h = mask_mod_varies(block_mask.mask_mod, B, H, device)
    shared = lists_b == 1 and lists_h == 1 and not vary_b and not vary_h
    blocks, partial, count = _row_lists(block_mask, nq, B, H, shared, device)
    R = blocks.shape[0]
    row_bh = torch.arange(R, device=device)
    rows_b, rows_h = (torch.zeros_like(row_bh),) * 2 if shared else (row_bh // H, row_bh % H)

    in_row = torch.arange(blocks.shape[-1], device=device) < count[..., None]
    tail = nk * BK - Skv
    has_tail = ((blocks == nk - 1) & in_row).any(-1) if tail else torch.zeros_like(count, dtype=torch.bool)
    needs_mask = (partial & in_row).any(-1)  # [R, nq]: a row needs a token mask for partial blocks only

    groups = []
    kinds = torch.stack([count, needs_mask.long(), has_tail.long()], -1).flatten(0, 1)
    for c, m, t in torch.unique(kinds, dim=0).tolist():
        if c == 0:
            continue  # rows keeping nothing stay zero
        r, qb = torch.nonzero((count == c) & (needs_mask == bool(m)) & (has_tail == bool(t)), as_tuple=True)
        kv = blocks[r, qb, :c]
        b, h = rows_b[r], rows_h[r]
        keys_kept = c * BK - (tail if t else 0)
        # Block-flat row indices: per query block when shared, else per (b, h, query block).
        rows = qb if shared else (b * H + h) * nq + qb
        if not m and c == nk and shared:
            groups.append(_Group(c, keys_kept, 1, rows, None, None, None))  # every key, unmasked: k as is
            continue
        kv_rows = kv if shared else ((b * H + h) * nk)[:, None] + kv
        mask = _token_mask(block_mask, b, h, qb, kv, partial[r, qb, :c], BQ, BK, Sq, Skv, keys_kept, device) if m else None
        if shared:
            groups.extend(_by_shared_lists(c, keys_kept, rows, kv_rows, mask, dtype))
        else:
            # Per-(b, h) lists come from dynamic selections, rebuilt every call and rarely equal:
            # finding shared lists would cost more than it saves.
            groups.append(_group(c, keys_kept, 1, rows, kv_rows.flatten(), mask, dtype))
    return _Groups(shared, tuple(groups))


def _groups(block_mask: BlockMask, B: int, H: int, Sq: int, Skv: int, device, dtype) -> _Groups:
    per_mask = _GROUPS.setdefault(block_mask, {})
    key = (str(device), B, H, Sq, Skv, dtype)
    if key not in per_mask:
        per_mask[key] = _group_rows(block_mask, B, H, Sq, Skv, device, dtype)
    return per_mask[key]


def _pad_to(x: torch.Tensor, blocks: int, size: int) -> torch.Tensor:
    extra = blocks * size - x.shape[2]
    return F.pad(x, (0, 0, 0, extra)) if extra else x


def _attend(q, k, v, mask, scale: float, return_lse: bool):
    """(out, lse or None) of one SDPA-shaped call; ``mask`` additive (0 / -inf) or None. With
    ``return_lse`` the softmax is explicit (SDPA does not return its LSE), in chunks of queries so
    the score matrix stays under the budget."""
    if not return_lse:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale), None
    rows = max(1, _GATHER_BUDGET_BYTES // max(1, q.shape[0] * q.shape[1] * k.shape[2] * q.element_size()))
    outs, lses = [], []
    for r0 in range(0, q.shape[2], rows):
        logits = (q[:, :, r0 : r0 + rows] @ k.transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits + (mask if mask.shape[2] == 1 else mask[:, :, r0 : r0 + rows])
        lse = torch.logsumexp(logits, -1, keepdim=True)
        outs.append(torch.exp(logits - torch.where(torch.isfinite(lse), lse, 0.0)) @ v)
        lses.append(lse[..., 0])
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _key_bias(valid, B: int, H: int, Skv: int, nk: int, BK: int, dtype) -> torch.Tensor:
    """[B * H * nk, BK] additive bias of a call's per-key validity: 0 where valid, -inf elsewhere
    (keys past the end, in the padded last block, count as invalid: they are cut off anyway)."""
    padded = F.pad(valid.expand(B, H, Skv), (0, nk * BK - Skv))
    return torch.zeros(padded.shape, dtype=dtype, device=valid.device).masked_fill_(~padded, float("-inf")).view(-1, BK)


def grouped_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask,
                                   scale: float | None = None, *, key_valid: torch.Tensor | None = None,
                                   return_lse: bool = False):
    """Attention of ``q, k, v`` ([B, H, S, D]) restricted to ``block_mask`` and ``key_valid`` ([B, Skv]
    or [B, H|1, Skv] bool, optional); returns [B, H, Sq, Dv], or ``(out, lse)`` with ``return_lse``
    (natural-log LSE [B, H, Sq] float32, -inf for rows that see no key).

    The groups are cached per BlockMask; ``key_valid`` changes per call, so it enters each group's
    SDPA as an additive per-key bias gathered with the group's key blocks (no regrouping)."""
    _check_rank(q, k, v)
    B, H, Sq, D = q.shape
    Skv, Dv = k.shape[2], v.shape[-1]
    BQ, BK = block_sizes(block_mask)
    nq, nk = -(-Sq // BQ), -(-Skv // BK)
    scale = D**-0.5 if scale is None else float(scale)
    dtype = _compute_dtype(q)
    valid = normalize_key_valid(key_valid, B, H, Skv, q.device)
    plan = _groups(block_mask, B, H, Sq, Skv, q.device, dtype)
    qc, kc, vc = q.to(dtype), k.to(dtype), v.to(dtype)
    # Block-flat views: one row per (batch, head, block), grouped as [G, rows, block].
    G = B * H if plan.shared else 1
    qf = _pad_to(qc, nq, BQ).contiguous().view(G, -1, BQ * D)
    kf = _pad_to(kc, nk, BK).contiguous().view(G, -1, BK * D)
    vf = _pad_to(vc, nk, BK).contiguous().view(G, -1, BK * Dv)
    key_bias = None if valid is None else _key_bias(valid, B, H, Skv, nk, BK, dtype).view(G, -1, BK)
    out = torch.zeros(G, qf.shape[1], BQ * Dv, dtype=dtype, device=q.device)
    lse = torch.full((G, qf.shape[1], BQ), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None

    for g in plan.groups:
        if g.kv_rows is None:
            # Every key block, no mask: the rows attend to k as it is (a dense plan is one SDPA).
            n = len(g.rows)
            qs = qf.index_select(1, g.rows).view(B, H, n * BQ, D)
            mask = None if key_bias is None else key_bias.reshape(B, H, 1, nk * BK)[..., :Skv]
            o, l_ = _attend(qs, kc, vc, mask, scale, return_lse)
            if valid is not None:  # rows of a (b, h) with no valid key at all: zeros, not NaN
                o = torch.where(valid.any(-1)[..., None, None], o, 0.0)
            out.index_copy_(1, g.rows, o.reshape(G, n, BQ * Dv))
            if return_lse:
                lse.index_copy_(1, g.rows, l_.reshape(G, n, BQ).float())
            continue
        # Lists per SDPA call: the gathered keys and values stay under the budget.
        m, c = g.per_list, g.count
        step = max(1, _GATHER_BUDGET_BYTES // (G * c * BK * (D + Dv) * qc.element_size()))
        if key_bias is not None or return_lse:  # a per-call mask [G, lists, m * BQ, keys] is made too
            step = max(1, min(step, _GATHER_BUDGET_BYTES // (G * m * BQ * g.keys * qc.element_size())))
        for s in range(0, len(g.kv_rows) // c, step):
            n_lists = min(step, len(g.kv_rows) // c - s)
            rows = g.rows[s * m : (s + n_lists) * m]
            kv_rows = g.kv_rows[s * c : (s + n_lists) * c]
            # Lists are SDPA's heads and (batch, head) pairs its batch, so the masks broadcast over
            # batch and head without a copy; a list's rows are one run of per_list * BQ queries.
            qs = qf.index_select(1, rows).view(G, n_lists, m * BQ, D)
            ks = kf.index_select(1, kv_rows).view(G, n_lists, c * BK, D)[:, :, : g.keys]
            vs = vf.index_select(1, kv_rows).view(G, n_lists, c * BK, Dv)[:, :, : g.keys]
            mask = None
            if g.mask is not None:
                mask = g.mask[s * m : (s + n_lists) * m].view(1, n_lists, m * BQ, g.keys)
            row_any = None if g.row_any is None else g.row_any[s * m : (s + n_lists) * m].view(1, n_lists, m * BQ, 1)
            if key_bias is not None:
                kb = key_bias.index_select(1, kv_rows).view(G, n_lists, 1, c * BK)[..., : g.keys]
                mask = kb if mask is None else mask + kb
                row_any = torch.isfinite(mask).any(-1, keepdim=True)
            o, l_ = _attend(qs, ks, vs, mask, scale, return_lse)
            if row_any is not None:
                # Rows with nothing allowed: SDPA gives NaN there, FlexAttention gives zeros.
                o = torch.where(row_any, o, 0.0)
            out.index_copy_(1, rows, o.reshape(G, n_lists * m, BQ * Dv))
            if return_lse:
                lse.index_copy_(1, rows, l_.reshape(G, n_lists * m, BQ).float())
    result = out.view(B, H, nq * BQ, Dv)[:, :, :Sq].to(q.dtype)
    if return_lse:
        return result, lse.view(B, H, nq * BQ)[:, :, :Sq]
    return result


__all__ = ["grouped_block_sparse_attention"]
