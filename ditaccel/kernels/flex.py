"""FlexAttention on a plan's BlockMask, exact on every device.

On CUDA ``flex_attention`` is compiled and its kernel walks the BlockMask's block lists: blocks left
out of them are skipped, full blocks run without ``mask_mod``. Eager FlexAttention (any other device)
materialises every score and applies ``mask_mod`` alone: it ignores the block lists, so a dynamic
plan (topk, xattn, cluster, heads), whose selection lives only in its lists, would silently run
dense. Off CUDA we therefore hand FlexAttention a BlockMask whose ``mask_mod`` encodes the lists too
-- a token is allowed when its block pair is listed full, or listed partial and the plan's own
``mask_mod`` allows it -- so both paths compute the plan exactly (FlexAttention's semantics: full
blocks unmasked, rows that see nothing give zeros).
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention, noop_mask

from .reference import block_sizes, normalize_key_valid

_NONE, _PARTIAL, _FULL = 0, 1, 2

# BlockMask -> the same lists with a mask_mod that encodes them (weak keys: dies with the mask).
_EXACT: weakref.WeakKeyDictionary[BlockMask, BlockMask] = weakref.WeakKeyDictionary()


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def block_table(block_mask: BlockMask, nq: int, nk: int) -> torch.Tensor:
    """[B|1, H|1, nq, nk] int8 from the BlockMask's lists: 2 for a listed full block, 1 for a listed
    partial block, 0 for a block the lists leave out (only the first ``num`` entries of a row count)."""
    table = None
    for num, idx, code in ((block_mask.kv_num_blocks, block_mask.kv_indices, _PARTIAL),
                           (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, _FULL)):
        if num is None:
            continue
        idx = idx[:, :, :nq].long()
        listed = torch.arange(idx.shape[-1], device=idx.device) < num[:, :, :nq, None].long()
        if table is None:
            table = torch.zeros(*idx.shape[:2], nq, nk, dtype=torch.int8, device=idx.device)
        elif table.shape[:2] != idx.shape[:2]:
            shape = torch.broadcast_shapes(table.shape[:2], idx.shape[:2])
            table = table.expand(*shape, nq, nk).clone()
            idx, listed = idx.expand(*shape, *idx.shape[2:]), listed.expand(*shape, *listed.shape[2:])
        code_t = (listed.to(torch.int8) * code).expand(*table.shape[:2], *listed.shape[2:])
        idx = idx.clamp(max=nk - 1).expand(*table.shape[:2], *idx.shape[2:])
        table = table.scatter_reduce(-1, idx, code_t, reduce="amax")
    if table is None:
        table = torch.zeros(1, 1, nq, nk, dtype=torch.int8, device=block_mask.kv_num_blocks.device)
    return table


def exact_block_mask(block_mask: BlockMask) -> BlockMask:
    """``block_mask`` with a ``mask_mod`` that also enforces its block lists (cached per mask)."""
    cached = _EXACT.get(block_mask)
    if cached is not None:
        return cached
    BQ, BK = block_sizes(block_mask)
    Sq, Skv = block_mask.seq_lengths
    nq, nk = -(-Sq // BQ), -(-Skv // BK)
    table = block_table(block_mask, nq, nk)
    per_b, per_h = table.shape[0] > 1, table.shape[1] > 1
    inner = block_mask.mask_mod if block_mask.mask_mod is not None else noop_mask

    def listed_mask_mod(b, h, q_idx, kv_idx):
        code = table[b if per_b else 0, h if per_h else 0, q_idx // BQ, kv_idx // BK]
        return (code == _FULL) | ((code == _PARTIAL) & inner(b, h, q_idx, kv_idx))

    exact = BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices, BLOCK_SIZE=(BQ, BK), mask_mod=listed_mask_mod, seq_lengths=(Sq, Skv),
        compute_q_blocks=False,  # inference: no backward lists
    )
    _EXACT[block_mask] = exact
    return exact


def _key_valid_score_mod(valid: torch.Tensor):
    """A score_mod that sends the scores of keys ``valid`` rejects to -inf: applied on every block, full
    or partial (a mask_mod would be skipped on full blocks by the compiled kernel)."""
    per_b, per_h = valid.shape[0] > 1, valid.shape[1] > 1

    def key_valid_score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(valid[b if per_b else 0, h if per_h else 0, kv_idx], score, float("-inf"))

    return key_valid_score_mod


def flex_block_sparse_attention(q, k, v, block_mask: BlockMask, scale=None, *, key_valid=None, return_lse=False):
    """FlexAttention on ``block_mask``: compiled on CUDA; elsewhere eager (it materialises the scores)
    on :func:`exact_block_mask`, so the block lists are honoured there too. ``key_valid`` ([B, Skv] or
    [B, H|1, Skv] bool) enters as a score_mod; ``return_lse`` returns ``(out, lse)`` with
    FlexAttention's natural-log LSE (-inf for rows that see no key, whose output is zero)."""
    B, H, _, _ = q.shape
    valid = normalize_key_valid(key_valid, B, H, k.shape[2], q.device)
    score_mod = None if valid is None else _key_valid_score_mod(valid)
    aux = AuxRequest(lse=True) if return_lse else None
    if q.is_cuda:
        result = _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, return_aux=aux)
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
            result = flex_attention(q, k, v, score_mod=score_mod, block_mask=exact_block_mask(block_mask),
                                    scale=scale, return_aux=aux)
    if return_lse:
        out, aux_out = result
        return out, aux_out.lse
    return result


__all__ = ["block_table", "exact_block_mask", "flex_block_sparse_attention"]
