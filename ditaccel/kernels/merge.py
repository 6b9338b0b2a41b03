"""Merge attention outputs computed over disjoint key sets (KV chunks) by their log-sum-exps.

If ``out_i, lse_i`` are attention over key set ``K_i`` (``lse_i`` the natural-log LSE of the scaled
scores, as every executor returns with ``return_lse=True``), attention over the union is

    out = sum_i exp(lse_i - lse) * out_i,   lse = log sum_i exp(lse_i)

which is what ring attention (KV chunks rotating between ranks) and split-KV need. Rows that see
no key in any chunk (every ``lse_i`` = -inf) give zeros and -inf, as a single call would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_by_lse(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of attention over the union of the chunks' keys.

    ``outs``: [..., S, D] tensors (e.g. [B, H, S, D]), ``lses``: the matching [..., S] tensors. The
    merge is computed in float32 (float64 stays float64); ``out`` comes back in ``outs[0]``'s dtype,
    ``lse`` in float32 (float64 when the inputs are).
    """
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_by_lse needs as many outs as lses, at least one; got {len(outs)} outs, "
                         f"{len(lses)} lses")
    for i, (o, l_) in enumerate(zip(outs, lses)):
        if o.shape[:-1] != l_.shape or o.shape != outs[0].shape:
            raise ValueError(f"outs[{i}] has shape {tuple(o.shape)} and lses[{i}] {tuple(l_.shape)}; every out "
                             f"must be {tuple(outs[0].shape)} and every lse its shape without the last dim")
    wide = torch.float64 if outs[0].dtype == torch.float64 else torch.float32
    lse = torch.stack([l_.to(wide) for l_ in lses])  # [n, ..., S]
    top = lse.amax(0)
    top_safe = torch.where(torch.isfinite(top), top, 0.0)  # all chunks empty: -inf - -inf would be NaN
    weights = torch.exp(lse - top_safe)  # exp(-inf) = 0 for empty chunks
    total = weights.sum(0)
    merged_lse = torch.where(total > 0, top_safe + torch.log(total), float("-inf"))
    scale = weights / torch.where(total > 0, total, 1.0)
    out = sum(w[..., None] * o.to(wide) for w, o in zip(scale, outs))
    return out.to(outs[0].dtype), merged_lse.to(wide)


__all__ = ["merge_by_lse"]
