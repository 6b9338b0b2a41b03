"""One attention call under context parallelism: the whole sequence for a rank's heads, in the model's order.

Both modes end in ``_attend_whole_sequence``: a rank holds every token for H/P heads (global heads
[r*H/P, (r+1)*H/P)); the sequence is permuted into the model's single-process order
(``order.SequenceMap``), ``site.attend`` runs the plan there with the heads' global offset (a
per-head table reads global head indices), and the output is permuted back.

- Ulysses: diffusers' templated Ulysses attention does the all-to-all and calls our forward op.
- Ring (``ring_degree=P``): ditaccel does not run diffusers' ring loop. That loop hands a backend one
  contiguous chunk of the parallel sequence of queries and one of keys at a time and merges by LSE;
  a plan is made on the whole sequence in a planning order (tiles, text runs) in which a rank's
  chunk is scattered over many blocks, and a dynamic method scores blocks that mix tokens of
  several ranks. Instead the ring group exchanges heads for sequence, as Ulysses does (one
  all-to-all of q, k, v and one of the output, over the ring group): each rank runs the exact
  single-process plan of its H/P heads, the work splits P ways, and the output equals the single
  process's. The price against a real ring: H must be divisible by P and each rank holds the whole
  sequence for its heads (as under Ulysses), and communication does not overlap compute.
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
    call = site.runtime.current
    if call is None:
        return 0, "none"
    text_len = call.text_len
    if text_len is None:  # the adapter left the dense span to the call: all beyond the grid
        T, H, W = call.grid
        text_len = max(seq_len - T * H * W, 0)
    return text_len, call.text_position


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


def _sequence_for_heads(x: torch.Tensor, degree: int, group) -> torch.Tensor:
    """[B, S/P, H, D] (this rank's tokens, every head) -> [B, S, H/P, D] (every token, this rank's heads)."""
    from diffusers.models.attention_dispatch import _all_to_all_single

    B, s, H, D = x.shape
    x = x.reshape(B, s, degree, H // degree, D).permute(2, 1, 0, 3, 4).contiguous()  # [P, s, B, H/P, D]
    x = _all_to_all_single(x, group)  # chunk j now holds rank j's tokens of this rank's heads
    return x.flatten(0, 1).permute(1, 0, 2, 3).contiguous()


def _heads_for_sequence(x: torch.Tensor, degree: int, group) -> torch.Tensor:
    """The inverse of ``_sequence_for_heads``: [B, S, H/P, D] -> [B, S/P, H, D]."""
    from diffusers.models.attention_dispatch import _all_to_all_single

    B, S, h, D = x.shape
    x = x.reshape(B, degree, S // degree, h, D).permute(1, 3, 0, 2, 4).contiguous()  # [P, h, B, s, D]
    x = _all_to_all_single(x, group)  # chunk j now holds this rank's tokens of rank j's heads
    return x.flatten(0, 1).permute(1, 2, 0, 3).contiguous()


def ring_attend(site, query, key, value, attn_mask, scale, parallel_config):
    """One attention call under ring context parallelism, run as a head exchange over the ring group
    (module docstring): exact, the work split ``ring_degree`` ways."""
    import torch.distributed as dist

    cp = parallel_config.context_parallel_config
    degree = cp.ring_degree
    heads = query.shape[2]
    if heads % degree:
        raise ValueError(f"ditaccel: {site.name}: ring context parallelism with ring_degree={degree} needs the "
                         f"heads ({heads}) divisible by the degree (ditaccel exchanges heads for sequence over the "
                         "ring group); use a ring_degree that divides the heads")
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"ditaccel: {site.name}: ring context parallelism needs self-attention (queries of "
                         f"{query.shape[1]} tokens, keys of {key.shape[1]})")
    group = cp._ring_mesh.get_group()
    mask, mask_parallel = attn_mask, False
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() >= 3 and attn_mask.shape[-2] == query.shape[1] > 1:
        raise ValueError(f"ditaccel: {site.name}: ring context parallelism with a per-query attention mask "
                         f"(shape {tuple(attn_mask.shape)}) is not supported; only key masks ([B, S] or [B, 1, 1, S])")
    if isinstance(attn_mask, torch.Tensor) and attn_mask.shape[-1] == key.shape[1]:
        local = attn_mask.contiguous()
        wire = local.to(torch.uint8) if local.dtype == torch.bool else local  # gloo gathers no bool
        pieces = [torch.empty_like(wire) for _ in range(degree)]  # one rank's keys: gather them all
        dist.all_gather(pieces, wire, group=group)
        mask, mask_parallel = torch.cat(pieces, dim=-1).to(local.dtype), True
    q, k, v = (_sequence_for_heads(x, degree, group) for x in (query, key, value))
    offset = cp._ring_local_rank * q.shape[2]
    out = _attend_whole_sequence(site, q, k, v, mask, mask_parallel, scale, degree, offset)
    return _heads_for_sequence(out, degree, group)


__all__ = ["ring_attend", "ulysses_attend"]
