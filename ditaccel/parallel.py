"""diffusers' context parallelism under ditaccel: Ulysses, for models without text in self-attention.

Under Ulysses (``ContextParallelConfig(ulysses_degree=P)``) each rank holds 1/P of the sequence
between attention calls; diffusers' templated Ulysses attention all-to-alls q, k, v so that every
rank holds the *whole* sequence for H/P heads, calls the backend's forward op, and all-to-alls the
output back. ditaccel's backend runs its plans inside that forward op: the full sequence is
there, so the plan of every head is the one a single process makes for that head (methods plan
each head from that head's q and k only), and the output is the single-process output.

What is refused, before the first step, with the reason:
- ring attention (``ring_degree > 1``), and Ulysses combined with ring or with
  ``ulysses_anything``: no LSE-merging path over rotating KV chunks is built yet;
- models whose self-attention carries text tokens (joint attention: Flux, HunyuanVideo, ...):
  diffusers splits text and image tokens separately, so after the all-to-all the two streams
  interleave across ranks ([text_0, image_0, text_1, image_1]) and the latent grid no longer maps
  onto the sequence as the adapter describes it; that mapping is not built yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def context_parallel(obj):
    """The ``ContextParallelConfig`` diffusers recorded on a model (``enable_parallelism``), or None."""
    return getattr(getattr(obj, "_parallel_config", None), "context_parallel_config", None)


def unsupported(cp, text_position: str | None) -> str | None:
    """Why ditaccel cannot run under ``cp`` (a ``ContextParallelConfig``) on a model whose text sits
    ``text_position`` in self-attention ('none', 'prefix', 'suffix'; None: not known yet); None if it can."""
    if cp is None:
        return None
    degrees = f"ulysses_degree={cp.ulysses_degree}, ring_degree={cp.ring_degree}"
    if cp.ring_degree > 1:
        return (f"ring context parallelism ({degrees}) is not supported by ditaccel yet (its sparse plans need an "
                "LSE merge over rotating KV chunks); use ulysses_degree instead of ring_degree")
    if getattr(cp, "ulysses_anything", False):
        return f"ulysses_anything=True ({degrees}) is not supported by ditaccel; use plain Ulysses"
    if text_position not in (None, "none"):
        return (f"Ulysses context parallelism ({degrees}) on a model with text tokens in self-attention "
                f"(text_position={text_position!r}) is not supported by ditaccel yet: diffusers interleaves text and "
                "image tokens across ranks, which ditaccel does not map onto the latent grid")
    return None


def _sdpa_bshd(q, k, v, attn_mask, scale):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=attn_mask, scale=scale).transpose(1, 2)


def _no_backward(ctx, grad_out, *args):
    raise NotImplementedError("ditaccel's attention under context parallelism is inference-only (no backward)")


def ulysses_attend(site, query, key, value, attn_mask, scale, parallel_config):
    """One attention call under Ulysses: diffusers' all-to-all, ditaccel's plan on the full sequence."""
    from diffusers.models.attention_dispatch import _templated_context_parallel_attention

    def forward_op(ctx, q, k, v, mask, dropout_p, is_causal, scale_, enable_gqa, return_lse, _save_ctx=True,
                   _parallel_config=None):
        if return_lse:
            raise NotImplementedError("ditaccel's Ulysses path returns no LSE")
        if mask is not None and mask.dim() == 2:  # [B, S_k] key padding, as diffusers' backends read it
            mask = mask[:, None, None, :]
        return site.attend(q, k, v, mask, scale_, lambda: _sdpa_bshd(q, k, v, mask, scale_))

    return _templated_context_parallel_attention(query, key, value, attn_mask, 0.0, False, scale, False, False,
                                                 forward_op=forward_op, backward_op=_no_backward,
                                                 _parallel_config=parallel_config)


def merged_stats(handle, group=None) -> dict:
    """``handle.stats()`` of this rank with the call counts and per-path account summed over every rank of
    ``group`` (each rank sees its H/P heads); realised density averaged (every rank runs the same shapes)."""
    import torch.distributed as dist

    mine = handle.stats()
    if not dist.is_initialized():
        return mine
    gathered = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {k: mine[k] for k in ("calls", "dense_calls", "reuse_calls", "paths")}, group=group)
    merged = dict(mine)
    for k in ("calls", "dense_calls", "reuse_calls"):
        merged[k] = sum(g[k] for g in gathered)
    paths = {}
    for name in mine["paths"]:
        values = [g["paths"][name] for g in gathered]
        if isinstance(values[0], dict):
            paths[name] = {r: sum(v.get(r, 0) for v in values) for r in set().union(*values)}
        elif name == "realised_density":
            known = [v for v in values if v is not None]
            paths[name] = sum(known) / len(known) if known else None
        else:
            paths[name] = sum(values)
    merged["paths"] = paths
    merged["ranks"] = len(gathered)
    return merged


__all__ = ["context_parallel", "merged_stats", "ulysses_attend", "unsupported"]
