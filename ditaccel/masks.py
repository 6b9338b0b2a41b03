"""Reading the attention mask a diffusers processor passes, as ``scaled_dot_product_attention`` reads it.

Processors pass masks in many forms: bool (True keeps a key) or additive (0 keeps, a very negative
value drops), of rank 2, 3 or 4, key-only (``[B, 1, 1, S]``) or per query row (``[B, 1, S, S]``,
``[S, S]``). SDPA broadcasts a mask of rank < 4 by prepending size-1 dims: a 3-D ``[B, 1, S]`` mask
is ``[1, B, 1, S]`` (its first dim meets the *heads*), a 2-D ``[S, S]`` one ``[1, 1, S, S]``. We
read every mask that way (the diffusers backend door first turns a 2-D ``[B, S_k]`` mask into
``[B, 1, 1, S_k]``, as diffusers' own native backend does).

A mask can be run exactly with any plan when it factors into *key validity* times *live query
rows*: ``allowed[b, h, q, k] == key_valid[b, h, k] & row_live[b, h, q]``. Key validity then joins
the plan token by token (every block holding a dropped key becomes partial, a block whose keys are
all dropped is skipped), and rows that see no key are set to zero -- what SDPA returns for them
with a bool or ``-inf`` mask. Anything else makes the call fall back to the model's own attention,
with the reason: a mask that depends on query and key together, an additive mask holding a bias
(values other than 0 and <= ``DROP_BELOW``), a row whose every key is dropped by a *finite*
additive value (SDPA then averages over all keys), a shape SDPA would not broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DROP_BELOW = -1e4  # an additive value at or below this drops its key (exp underflows to 0 in float32)


@dataclass(frozen=True)
class MaskReading:
    """What a mask does to one call: ``key_valid`` [B, Hm, S] and ``row_live`` [B, Hm, S] bool (Hm 1 or
    H; None where every key / row passes), or ``fallback`` naming why the plan cannot apply it."""

    key_valid: torch.Tensor | None = None
    row_live: torch.Tensor | None = None
    fallback: str | None = None


def read_mask(attn_mask: torch.Tensor, batch: int, heads: int, seq_len: int) -> MaskReading:
    """Read ``attn_mask`` for a self-attention call of ``batch`` x ``heads`` x ``seq_len`` tokens."""
    m = attn_mask
    if m.dim() == 0 or m.dim() > 4:
        return MaskReading(fallback=f"attention mask of rank {m.dim()} (SDPA takes rank 1 to 4)")
    target = (batch, heads, seq_len, seq_len)
    shape = (1,) * (4 - m.dim()) + tuple(m.shape)
    try:
        broadcast_ok = torch.broadcast_shapes(shape, target) == target
    except RuntimeError:
        broadcast_ok = False
    if not broadcast_ok:
        return MaskReading(fallback=f"attention mask of shape {tuple(m.shape)} does not broadcast to "
                                    f"[B, H, S, S] = {list(target)} as SDPA reads it")
    m = m.reshape(shape)
    if m.dtype == torch.bool:
        allowed, keep_or_drop, finite_drop = m, None, None
    elif m.is_floating_point():
        keep, drop = m == 0, m <= DROP_BELOW
        allowed, keep_or_drop, finite_drop = keep, (keep | drop).all(), drop & torch.isfinite(m)
    else:
        return MaskReading(fallback=f"attention mask of dtype {m.dtype} (bool or floating point is read)")

    row_live = allowed.any(-1, keepdim=True)  # [Bm, Hm, Qm, 1]
    key_valid = allowed.any(-2, keepdim=True)  # [Bm, Hm, 1, Km]
    # Every verdict is a 0-d bool on the mask's device: read them all on the host at once (one sync).
    no = torch.zeros((), dtype=torch.bool, device=m.device)
    yes = ~no
    checks = torch.stack([
        yes if keep_or_drop is None else keep_or_drop,
        (allowed == (row_live & key_valid)).all(),
        no if finite_drop is None else (~row_live & finite_drop.any(-1, keepdim=True)).any(),
        key_valid.all(),
        row_live.all(),
    ]).tolist()
    only_keep_or_drop, factors, finite_dead_row, all_keys, all_rows = checks
    if not only_keep_or_drop:
        return MaskReading(fallback=f"additive attention mask with values other than 0 and <= {DROP_BELOW:g} "
                                    f"(a bias, not a mask)")
    if not factors:
        return MaskReading(fallback="attention mask depends on query and key together (not key padding "
                                    "with masked query rows)")
    if finite_dead_row:
        return MaskReading(fallback="attention mask drops every key of some row with a finite value (SDPA "
                                    "then averages over all keys)")
    Hm = heads if shape[1] > 1 else 1
    key_valid = key_valid[:, :, 0, :].expand(batch, Hm, seq_len)
    row_live = row_live[..., 0].expand(batch, Hm, seq_len)
    return MaskReading(key_valid=None if all_keys else key_valid.contiguous(),
                       row_live=None if all_rows else row_live.contiguous())


__all__ = ["DROP_BELOW", "MaskReading", "read_mask"]
