"""Torch reference for block-sparse attention on a FlexAttention ``BlockMask``.

This is the twin of the Triton kernel: same signature, same semantics, plain torch ops. It runs on
any device, and it is what CPU pipelines use. Memory stays bounded at 100k tokens because query
blocks are processed in chunks and only the key blocks each chunk needs are gathered.

Semantics (those of ``flex_attention``):
- ``full_kv_*`` blocks are attended without evaluating ``mask_mod``;
- ``kv_*`` (partial) blocks apply ``mask_mod(b, h, q_idx, kv_idx)`` token by token;
- a query row with no allowed key returns zeros, never NaN.

``mask_mod`` is evaluated on broadcast index tensors, so it must be written with tensor ops that
broadcast (every mask ditaccel builds is; so are the usual causal / sliding-window / lookup-table
mask_mods).
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask

# Bytes of score matrix a chunk of query blocks may hold (float32 scores + bool mask).
_CHUNK_BUDGET_BYTES = 256 * 2**20


def block_sizes(block_mask: BlockMask) -> tuple[int, int]:
    bs = block_mask.BLOCK_SIZE
    return (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))


def _expanded(t: torch.Tensor, B: int, H: int) -> torch.Tensor:
    # BlockMask tensors broadcast over batch and heads ([1, 1, ...] is common).
    return t.expand(B, H, *t.shape[2:])


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``q, k, v`` ([B, H, S, D]) restricted to ``block_mask``; returns [B, H, Sq, Dv]."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    BQ, BK = block_sizes(block_mask)
    scale = D**-0.5 if scale is None else float(scale)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    device = q.device

    nq = (Sq + BQ - 1) // BQ
    # Combined list per query block: full blocks first, then partial ones, with a flag.
    lists, flags, counts = [], [], []
    for num, idx, partial in (
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False),
        (block_mask.kv_num_blocks, block_mask.kv_indices, True),
    ):
        if num is None:
            continue
        num = _expanded(num, B, H)[:, :, :nq].to(device)
        idx = _expanded(idx, B, H)[:, :, :nq].to(device)
        lists.append(idx.long())
        flags.append(torch.full(idx.shape, partial, dtype=torch.bool, device=device))
        counts.append(num.long())
    if not lists:
        return q.new_zeros(B, H, Sq, v.shape[-1])
    # Slot j of list i is valid when j < count_i.
    valid = torch.cat(
        [torch.arange(l.shape[-1], device=device) < c[..., None] for l, c in zip(lists, counts)], dim=-1
    )
    kv_blocks = torch.cat(lists, dim=-1)
    is_partial = torch.cat(flags, dim=-1)
    # Drop slots that no query block uses, so the gather is as narrow as the widest row.
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    width = int(valid.sum(-1).max().item()) if valid.numel() else 0
    order = order[..., :max(width, 1)]
    kv_blocks = kv_blocks.gather(-1, order)
    is_partial = is_partial.gather(-1, order)
    valid = valid.gather(-1, order)
    M = kv_blocks.shape[-1]

    out = torch.empty(B, H, Sq, v.shape[-1], dtype=q.dtype, device=device)
    per_block_bytes = B * H * BQ * M * BK * 6
    chunk = max(1, min(nq, _CHUNK_BUDGET_BYTES // max(per_block_bytes, 1)))
    tok = torch.arange(BK, device=device)
    b_idx = torch.arange(B, device=device).view(B, 1, 1, 1, 1)
    h_idx = torch.arange(H, device=device).view(1, H, 1, 1, 1)
    mask_mod = block_mask.mask_mod

    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        C = c1 - c0
        q_idx = (torch.arange(c0 * BQ, c1 * BQ, device=device)).view(C, BQ)
        q_ok = q_idx < Sq
        qc = q[:, :, c0 * BQ : min(c1 * BQ, Sq)].to(compute_dtype)
        if qc.shape[2] < C * BQ:  # ragged last block: pad queries, dropped below
            qc = torch.nn.functional.pad(qc, (0, 0, 0, C * BQ - qc.shape[2]))
        qc = qc.view(B, H, C, BQ, D)

        blk = kv_blocks[:, :, c0:c1]  # [B, H, C, M]
        kv_idx = (blk[..., None] * BK + tok).flatten(-2)  # [B, H, C, M*BK]
        kv_ok = (kv_idx < Skv) & valid[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, BK).flatten(-2)
        kv_safe = kv_idx.clamp(max=Skv - 1)
        flat = kv_safe.flatten(2)  # gather rows of k and v per (b, h)
        kc = k.to(compute_dtype).gather(2, flat[..., None].expand(-1, -1, -1, k.shape[-1]))
        vc = v.to(compute_dtype).gather(2, flat[..., None].expand(-1, -1, -1, v.shape[-1]))
        kc = kc.view(B, H, C, M * BK, k.shape[-1])
        vc = vc.view(B, H, C, M * BK, v.shape[-1])

        scores = torch.einsum("bhcqd,bhckd->bhcqk", qc, kc) * scale
        allowed = kv_ok[:, :, :, None, :].expand(-1, -1, -1, BQ, -1)
        part = is_partial[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, BK).flatten(-2)
        if bool(part.any()):
            token_ok = mask_mod(b_idx, h_idx, q_idx.view(1, 1, C, BQ, 1), kv_idx[:, :, :, None, :])
            token_ok = torch.as_tensor(token_ok, device=device).expand_as(allowed)
            allowed = allowed & (token_ok | ~part[:, :, :, None, :])
        scores = scores.masked_fill(~allowed, float("-inf"))
        # Rows with nothing allowed: softmax of all -inf is NaN; FlexAttention returns zeros.
        row_any = allowed.any(-1, keepdim=True)
        probs = torch.softmax(scores.masked_fill(~row_any, 0.0), dim=-1) * row_any
        o = torch.einsum("bhcqk,bhckd->bhcqd", probs, vc).reshape(B, H, C * BQ, -1)
        n_rows = int(q_ok.sum().item())
        out[:, :, c0 * BQ : c0 * BQ + n_rows] = o[:, :, :n_rows].to(q.dtype)
    return out
