"""Torch reference for block-sparse attention on a FlexAttention ``BlockMask``.

This is the twin of the Triton kernel: same signature, same semantics, plain torch ops. It runs on
any device; it is what the other executors are checked against (CPU pipelines run the faster
``grouped.py``). Memory stays bounded at 100k tokens because query blocks are processed in chunks
and only the key blocks each chunk needs are gathered.

Semantics (those of ``flex_attention``):
- ``full_kv_*`` blocks are attended without evaluating ``mask_mod``;
- ``kv_*`` (partial) blocks apply ``mask_mod(b, h, q_idx, kv_idx)`` token by token;
- ``key_valid`` (optional, [B, Skv] or [B, H|1, Skv] bool, in the same key order as k) removes keys
  from every block, full or partial;
- a query row with no allowed key returns zeros, never NaN; ``return_lse=True`` also returns the
  natural-log LSE of the scaled scores per (b, h, q) ([B, H, Sq] float32, -inf for such rows), as
  ``flex_attention(..., return_lse=True)`` does.

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
    return (int(bs), int(bs)) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))


def mask_mod_varies(mask_mod, B: int, H: int, device) -> tuple[bool, bool]:
    """Does ``mask_mod`` depend on b / h? Probe its output shape with broadcast index tensors.

    ``mask_mod`` is written with broadcasting tensor ops, so when it ignores ``b`` its result has
    size 1 along ``b``'s axis; then one bitmap serves every batch (likewise for heads).
    """
    b = torch.arange(B, device=device).view(B, 1, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1, 1)
    zero = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long, device=device)
    out = torch.as_tensor(mask_mod(b, h, zero, zero))
    shape = (1,) * (5 - out.dim()) + tuple(out.shape)
    return shape[0] > 1, shape[1] > 1


def normalize_key_valid(key_valid, B: int, H: int, Skv: int, device) -> torch.Tensor | None:
    """``key_valid`` as a [B|1, H|1, Skv] bool tensor on ``device`` (None stays None); ValueError naming
    the shape or dtype otherwise. Shared by every executor, so all accept the same forms."""
    if key_valid is None:
        return None
    if not isinstance(key_valid, torch.Tensor):
        raise ValueError(f"key_valid must be a bool tensor of shape [B, Skv] or [B, H|1, Skv]; got "
                         f"{type(key_valid).__name__}")
    if key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid must be a bool tensor; got dtype {key_valid.dtype}")
    kv = key_valid[:, None, :] if key_valid.dim() == 2 else key_valid
    if kv.dim() != 3 or kv.shape[0] not in (1, B) or kv.shape[1] not in (1, H) or kv.shape[2] != Skv:
        raise ValueError(
            f"key_valid has shape {tuple(key_valid.shape)}; allowed: [B, Skv] or [B, H|1, Skv] with B={B} "
            f"(or 1), H={H}, Skv={Skv}"
        )
    return kv.to(device)


def _masked_chunks(q, k, v, block_mask: BlockMask, compute_dtype, key_valid=None):
    """Yield ``(start, rows, qc, kc, vc, allowed)`` per chunk of query blocks: queries [B, H*C, BQ, D],
    the keys/values each query block gathers [B, H*C, M*BK, D], and the token mask (None: all allowed)."""
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    BQ, BK = block_sizes(block_mask)
    device = q.device
    nq = (Sq + BQ - 1) // BQ
    # Block lists keep their broadcast batch/head dims (usually [1, 1, ...]): per-token work on
    # them (index and mask building) is then done once, not once per batch and head.
    lists, flags, valid = [], [], []
    for num, idx, partial in (
        (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False),
        (block_mask.kv_num_blocks, block_mask.kv_indices, True),
    ):
        if num is None:
            continue
        idx = idx[:, :, :nq].to(device).long()
        lists.append(idx)
        flags.append(torch.full(idx.shape, partial, dtype=torch.bool, device=device))
        valid.append(torch.arange(idx.shape[-1], device=device) < num[:, :, :nq].to(device).long()[..., None])
    if not lists:
        return
    kv_blocks, is_partial, valid = torch.cat(lists, -1), torch.cat(flags, -1), torch.cat(valid, -1)
    # Pack the valid slots of every row to the front, and keep only as many as the widest row uses.
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)[..., : max(int(valid.sum(-1).max()), 1)]
    kv_blocks, is_partial, valid = (t.gather(-1, order) for t in (kv_blocks, is_partial, valid))
    M = kv_blocks.shape[-1]

    per_block_bytes = B * H * BQ * M * BK * 6 + B * H * M * BK * (k.shape[-1] + v.shape[-1]) * 4
    chunk = max(1, min(nq, _CHUNK_BUDGET_BYTES // max(per_block_bytes, 1)))
    tok = torch.arange(BK, device=device)
    b_idx = torch.arange(B, device=device).view(B, 1, 1, 1, 1)
    h_idx = torch.arange(H, device=device).view(1, H, 1, 1, 1)
    kf, vf = k.to(compute_dtype), v.to(compute_dtype)

    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        C = c1 - c0
        rows = min(c1 * BQ, Sq) - c0 * BQ
        qc = q[:, :, c0 * BQ : c0 * BQ + rows].to(compute_dtype)
        if rows < C * BQ:  # ragged last block: pad queries, dropped by the caller
            qc = torch.nn.functional.pad(qc, (0, 0, 0, C * BQ - rows))

        # Key positions each query block gathers: its listed blocks, token by token.
        kv_idx = (kv_blocks[:, :, c0:c1, :, None] * BK + tok).flatten(-2)  # [Bm, Hm, C, M*BK]
        kv_ok = (kv_idx < Skv) & valid[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, BK).flatten(-2)
        if key_valid is not None:  # per-key validity, looked up at each gathered key position
            bc, hc = max(kv_ok.shape[0], key_valid.shape[0]), max(kv_ok.shape[1], key_valid.shape[1])
            at = kv_idx.clamp(max=Skv - 1).expand(bc, hc, -1, -1)
            kv_ok = kv_ok & key_valid.expand(bc, hc, Skv).gather(-1, at.flatten(2)).view(at.shape)
        flat = kv_idx.clamp(max=Skv - 1).flatten(2).expand(B, H, -1)
        kc = kf.gather(2, flat[..., None].expand(-1, -1, -1, k.shape[-1])).view(B, H, C, M * BK, -1)
        vc = vf.gather(2, flat[..., None].expand(-1, -1, -1, v.shape[-1])).view(B, H, C, M * BK, -1)

        # Token mask: keys past the end or in unused slots, and mask_mod inside partial blocks.
        # Without partial blocks it depends on the key alone ([..., 1, K]), which keeps SDPA on its
        # fast path; tensors are folded to 4-D [B, H*C, ., .] for the same reason.
        allowed = kv_ok[:, :, :, None, :]
        part = is_partial[:, :, c0:c1, :, None].expand(-1, -1, -1, -1, BK).flatten(-2)
        if bool(part.any()):
            # Positions past the ends are clamped (they are masked anyway) so that lookup-table
            # mask_mods never index out of range.
            q_idx = torch.arange(c0 * BQ, c1 * BQ, device=device).clamp(max=Sq - 1).view(1, 1, C, BQ, 1)
            kv_in = kv_idx.clamp(max=Skv - 1)[:, :, :, None, :]
            token_ok = torch.as_tensor(block_mask.mask_mod(b_idx, h_idx, q_idx, kv_in), device=device)
            allowed = allowed & (token_ok | ~part[:, :, :, None, :])
        mask = None
        if not bool(allowed.all()):
            mask = allowed.expand(B, H, C, allowed.shape[3], -1).reshape(B, H * C, allowed.shape[3], -1)
        yield (c0 * BQ, rows, qc.reshape(B, H * C, BQ, D), kc.reshape(B, H * C, M * BK, -1),
               vc.reshape(B, H * C, M * BK, -1), mask)


def _check_rank(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [B, H, S, D]; got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")


def _compute_dtype(q):
    # Half types compute in float32 (as the kernels accumulate); float64 stays float64.
    return q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of ``q, k, v`` ([B, H, S, D]) restricted to ``block_mask`` (and ``key_valid``); returns
    [B, H, Sq, Dv], or ``(out, lse)`` with ``return_lse=True``."""
    _check_rank(q, k, v)
    B, H, Sq, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    valid = normalize_key_valid(key_valid, B, H, k.shape[2], q.device)
    out = q.new_zeros(B, H, Sq, v.shape[-1])
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device) if return_lse else None
    for start, rows, qc, kc, vc, mask in _masked_chunks(q, k, v, block_mask, _compute_dtype(q), valid):
        if return_lse:  # explicit softmax: SDPA does not return its LSE
            logits = (qc @ kc.transpose(-1, -2)) * scale
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            row_lse = torch.logsumexp(logits, -1, keepdim=True)
            o = torch.exp(logits - torch.where(torch.isfinite(row_lse), row_lse, 0.0)) @ vc
            lse[:, :, start : start + rows] = row_lse[..., 0].reshape(B, H, -1)[:, :, :rows].float()
        else:
            o = torch.nn.functional.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale)
        if mask is not None:
            # Rows with nothing allowed: SDPA gives NaN there, FlexAttention gives zeros.
            o = torch.where(mask.any(-1, keepdim=True), o, 0.0)
        out[:, :, start : start + rows] = o.reshape(B, H, -1, o.shape[-1])[:, :, :rows].to(q.dtype)
    return (out, lse) if return_lse else out


def block_sparse_lse_reference(q: torch.Tensor, k: torch.Tensor, block_mask: BlockMask,
                               scale: float | None = None, *, key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Log-sum-exp of the scaled scores over the keys ``block_mask`` allows: [B, H, Sq] float32
    (-inf for rows that see nothing). With the dense LSE it gives the attention mass a plan keeps."""
    _check_rank(q, k, k)
    B, H, Sq, D = q.shape
    scale = D**-0.5 if scale is None else float(scale)
    valid = normalize_key_valid(key_valid, B, H, k.shape[2], q.device)
    lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
    for start, rows, qc, kc, _, mask in _masked_chunks(q, k, k[..., :1], block_mask, _compute_dtype(q), valid):
        logits = (qc @ kc.transpose(-1, -2)) * scale
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        lse[:, :, start : start + rows] = torch.logsumexp(logits, -1).reshape(B, H, -1)[:, :, :rows].float()
    return lse
