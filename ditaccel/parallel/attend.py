"""One attention call under context parallelism, in the model's order.

- Ulysses: diffusers' templated Ulysses attention all-to-alls q, k, v so that a rank holds every
  token for H/P heads (global heads [r*H/P, (r+1)*H/P)) and calls our forward op;
  ``_attend_whole_sequence`` permutes that sequence into the model's single-process order
  (``order.SequenceMap``), ``site.attend`` runs the plan there with the heads' global offset (a
  per-head table reads global head indices), and the output is permuted back.
- Ring (``ring_degree=P``): a rank keeps its own rows of every head; ``ring_attend`` builds the
  call's ``ring.RingCall`` (where every rank's tokens sit in the model's order), turns a key mask
  into key validity over the whole sequence, and ``site.attend_ring`` runs the plan of the whole
  call over the KV chunks as they rotate round the ring, merged by LSE (``ring.py``). diffusers'
  own ring loop is not used: it hands a backend one KV chunk at a time with no say over which
  chunks a plan can skip, and needs a dense attention that returns an LSE for the dense side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .order import SequenceMap, reorder_mask

_MAPS = SequenceMap()


def _sdpa_bshd(q, k, v, attn_mask, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=attn_mask, scale=scale).transpose(1, 2)


def _no_backward(ctx, grad_out, *args, **kwargs):
    raise NotImplementedError("ditaccel's attention under context parallelism is inference-only (no backward)")


def _text_span(site, seq_len: int) -> tuple[int, str]:
    from ..runtime import with_text_len

    call = site.runtime.current
    if call is None:
        return 0, "none"
    call = with_text_len(call, seq_len)
    return call.text_len, call.text_position


def _attend_whole_sequence(site, q, k, v, mask, mask_parallel_order: bool, scale, degree: int, head_offset: int):
    """q, k, v: [B, S, H/P, D], the whole sequence in parallel order for this rank's heads."""
    S = q.shape[1]
    text_len, text_position = _text_span(site, S)
    maps = _MAPS.get(S, text_len, text_position, degree, q.device)
    if maps is not None:
        to_model, to_parallel = maps
        q, k, v = (x.index_select(1, to_model) for x in (q, k, v))
        if isinstance(mask, torch.Tensor) and mask_parallel_order:
            mask = reorder_mask(mask, to_model, S)
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:  # [B, S_k] key padding, as diffusers' backends read it
        mask = mask[:, None, None, :]
    out = site.attend(q, k, v, mask, scale, lambda: _sdpa_bshd(q, k, v, mask, scale), head_offset=head_offset)
    return out if maps is None else out.index_select(1, to_parallel)


def ulysses_attend(site, query, key, value, attn_mask, scale, parallel_config):
    """One attention call under Ulysses: diffusers' all-to-all, ditaccel's plan on the whole sequence."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    cp = parallel_config.context_parallel_config
    degree = cp.ulysses_degree
    # A mask of one rank's length is all-gathered by diffusers (its pieces side by side: parallel order);
    # a mask of the whole length was never split: it is in the model's order.
    mask_parallel = isinstance(attn_mask, torch.Tensor) and attn_mask.shape[-1] == key.shape[1]

    def forward_op(ctx, q, k, v, mask, dropout_p, is_causal, scale_, enable_gqa, return_lse, _save_ctx=True,
                   _parallel_config=None):
        if return_lse:
            raise NotImplementedError("ditaccel's Ulysses path returns no LSE")
        offset = cp._ulysses_local_rank * q.shape[2]
        return _attend_whole_sequence(site, q, k, v, mask, mask_parallel, scale_, degree, offset)

    return _templated_context_parallel_attention(query, key, value, attn_mask, 0.0, False, scale, False, False,
                                                 forward_op=forward_op, backward_op=_no_backward,
                                                 _parallel_config=parallel_config)


def _model_order_key_mask(mask: torch.Tensor, ring, group, pieces: int) -> torch.Tensor:
    """A key mask of this rank's keys (diffusers split it with them over the ``pieces`` ranks of
    ``group``, the flattened context-parallel mesh) or of the whole sequence (never split: already in
    the model's order) -> the whole sequence's, in the model's order."""
    from .ring import gather_in_model_order

    if mask.shape[-1] == ring.seq_len:
        return mask
    return gather_in_model_order(mask, mask.dim() - 1, group, ring.chunk_positions.flatten().view(pieces, -1))


def ring_attend(site, query, key, value, attn_mask, scale, parallel_config):
    """One attention call under ring context parallelism (``ring_degree`` R > 1): this rank's rows
    against the KV chunks as they rotate round the ring, merged by LSE (``ring.py``). Combined with
    Ulysses (``ulysses_degree`` U > 1, diffusers' (ring, ulysses) mesh): Ulysses' all-to-all over the
    ulysses group first, so the rank holds its ring chunk (the U pieces of its ulysses group, side by
    side) for H/U heads, then the ring over the ring group, then the all-to-all back."""
    from diffusers.models.attention_dispatch import _all_to_all_dim_exchange

    from ..masks import read_mask
    from .ring import RingExecutor, ring_call

    cp = parallel_config.context_parallel_config
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"ditaccel: {site.name}: ring context parallelism needs self-attention (queries of "
                         f"{query.shape[1]} tokens, keys of {key.shape[1]})")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() >= 3 and attn_mask.shape[-2] == query.shape[1] > 1:
        raise ValueError(f"ditaccel: {site.name}: ring context parallelism with a per-query attention mask "
                         f"(shape {tuple(attn_mask.shape)}) is not supported; only key masks ([B, S] or [B, 1, 1, S])")
    ulysses, rings = cp.ulysses_degree or 1, cp.ring_degree
    B, s, H, _ = query.shape
    if H % ulysses:
        raise ValueError(f"ditaccel: {site.name}: ulysses_degree={ulysses} needs the heads ({H}) divisible by it")
    if ulysses > 1 and cp._flattened_mesh.get_local_rank() != cp._ring_local_rank * ulysses + cp._ulysses_local_rank:
        raise ValueError(f"ditaccel: {site.name}: this (ring, ulysses) mesh does not number its ranks ring-major "
                         "as diffusers' own mesh does; ditaccel cannot place this rank's tokens")
    text_len, text_position = _text_span(site, s * ulysses * rings)
    ring = ring_call(cp, s * ulysses, text_len, text_position)
    key_valid = row_live = None
    if isinstance(attn_mask, torch.Tensor):
        mask = _model_order_key_mask(attn_mask, ring, cp._flattened_mesh.get_group(), ulysses * rings)
        if mask.dim() == 2:  # [B, S_k] key padding, as diffusers' backends read it
            mask = mask[:, None, None, :]
        reading = read_mask(mask, B, H, ring.seq_len)
        if reading.fallback is not None:  # no model attention to fall back to: diffusers' ring needs an LSE
            raise ValueError(f"ditaccel: {site.name}: ring context parallelism cannot apply this attention "
                             f"mask ({reading.fallback}); only key masks (bool, or additive 0 / -inf)")
        heads = slice(None)
        if ulysses > 1:  # a per-head mask follows its heads
            h = H // ulysses
            heads = slice(cp._ulysses_local_rank * h, (cp._ulysses_local_rank + 1) * h)
        key_valid = reading.key_valid if reading.key_valid is None or reading.key_valid.shape[1] == 1 \
            else reading.key_valid[:, heads]
        if reading.row_live is not None:
            live = reading.row_live if reading.row_live.shape[1] == 1 else reading.row_live[:, heads]
            row_live = live.index_select(-1, ring.chunk_positions[ring.peers.rank].to(query.device))
    group = cp._ulysses_mesh.get_group() if ulysses > 1 else None
    if ulysses > 1:  # diffusers' Ulysses all-to-all: the group's tokens side by side, this rank's H/U heads
        query, key, value = (_all_to_all_dim_exchange(x, 2, 1, group) for x in (query, key, value))
    executor = RingExecutor(ring, query, key, value, key_valid, scale, site.runtime.method.config.backend,
                            site.runtime.stats.count_backend, row_live=row_live)
    out = site.attend_ring(ring, executor, head_offset=cp._ulysses_local_rank * query.shape[2] if ulysses > 1 else 0)
    return _all_to_all_dim_exchange(out, 1, 2, group) if ulysses > 1 else out


__all__ = ["ring_attend", "ulysses_attend"]
