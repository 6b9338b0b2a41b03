"""diffusers' context parallelism under ditaccel: Ulysses and ring, exact against one process.

Under Ulysses (``ContextParallelConfig(ulysses_degree=P)``) each rank holds 1/P of the sequence
between attention calls; diffusers' templated Ulysses attention all-to-alls q, k, v so that every
rank holds the *whole* sequence for H/P heads, calls the backend's forward op, and all-to-alls the
output back; ditaccel's plan runs on that whole sequence of a rank's heads (methods plan each head
from that head's q and k only, so every head's plan is the one a single process makes for it).
Under ring (``ring_degree=P``) a rank keeps its 1/P of the sequence for every head: ditaccel makes
the whole call's plan (a dynamic method from q, k, v all-gathered over the ring group), and runs the
rank's rows against the KV chunks as they rotate round the ring, skipping chunks the plan keeps
nothing of for those rows, merging by LSE (``ring.py``). Either way the output is the single-process
output. Joint-attention models (text tokens in self-attention: Flux, HunyuanVideo) have their text
and latent streams split separately by diffusers; ``order.py`` maps the resulting sequence onto the
model's own order. Per-head state sees global head indices. Either
order of ``enable_parallelism`` and ``accelerate`` works: when a plan splits the transformer's own
inputs before ditaccel's step hook reads them (Flux, parallelism enabled second), the hook reads its
facts from the inputs gathered back (``whole_inputs``).

What is refused, before the first step (or, for what only an attention call shows, at the first
attention call, before any output), with the reason:
- ``ulysses_anything`` and ``ring_anything`` (uneven splits);
- text in self-attention on a model whose adapter does not state how diffusers splits its streams
  (``ModelAdapter.context_parallel_streams``), or whose dense tokens are not one text run before or
  after the latent grid's (a planning ``token_order``: Kontext, Framepack, ...);
- a text or latent length that does not divide by the degree;
- under ring, a per-query attention mask (only key masks), or cross-attention.
"""

from __future__ import annotations

import torch

from .attend import ring_attend, ulysses_attend


def context_parallel(obj):
    """The ``ContextParallelConfig`` diffusers recorded on a model (``enable_parallelism``), or None."""
    return getattr(getattr(obj, "_parallel_config", None), "context_parallel_config", None)


def _degrees(cp) -> str:
    return f"ulysses_degree={cp.ulysses_degree}, ring_degree={cp.ring_degree}"


def unsupported(cp, text_position: str | None, streams_split: bool | None = None) -> str | None:
    """Why ditaccel cannot run under ``cp`` (a ``ContextParallelConfig``) on a model whose text sits
    ``text_position`` in self-attention ('none', 'prefix', 'suffix'; None: not known yet) and whose
    adapter says (``streams_split``) that diffusers splits its text and latent streams as ``order.py``
    maps them (None: not known yet); None if it can."""
    if cp is None:
        return None
    degrees = _degrees(cp)
    if getattr(cp, "ulysses_anything", False):
        return f"ulysses_anything=True ({degrees}) is not supported by ditaccel; use plain Ulysses"
    if getattr(cp, "ring_anything", False):
        return f"ring_anything=True ({degrees}) is not supported by ditaccel; use plain ring"
    if text_position not in (None, "none", "prefix", "suffix"):
        return (f"context parallelism ({degrees}) with text_position={text_position!r} is not supported by "
                "ditaccel (only no text, or one text run before or after the latent grid)")
    if text_position in ("prefix", "suffix") and streams_split is False:
        return (f"context parallelism ({degrees}) on this model with text tokens in self-attention "
                f"(text_position={text_position!r}) is not supported by ditaccel: how diffusers splits its text "
                "and latent streams across ranks has not been verified for it, so its tokens cannot be mapped onto "
                "the latent grid")
    return None


def unsupported_forward(cp, model: str, grid, text_len, text_position: str, token_order, dense_reason: str = "")\
        -> str | None:
    """Why one transformer forward (the step hook's facts) cannot run under ``cp``; None if it can.
    ``model``: the transformer's class name, for the message."""
    if cp is None or dense_reason:
        return None  # a forward ditaccel runs dense anyway (its reason is counted at each call)
    degree = (cp.ulysses_degree or 1) * (cp.ring_degree or 1)  # the sequence splits over every rank
    head = f"{model} under context parallelism ({_degrees(cp)})"
    if token_order is not None:
        return (f"{head}: this forward's dense tokens are not one text run before or after the latent grid (a "
                "planning token order, e.g. a context image or history latents), which ditaccel does not map "
                "across ranks")
    n_latent = grid[0] * grid[1] * grid[2]
    if n_latent % degree:
        return f"{head}: the latent grid {tuple(grid)} ({n_latent} tokens) does not split evenly over degree {degree}"
    if text_position != "none" and text_len is not None and text_len % degree:
        return f"{head}: the {text_len} text tokens do not split evenly over degree {degree}"
    return None


def _split_hooks_before(module, hook_name: str) -> list:
    """diffusers' context-parallel split hooks on ``module`` registered after ``hook_name``: they run
    before it, so a hook registered earlier (ditaccel's step hook, when enable_parallelism came after
    accelerate) sees a rank's piece of the inputs they split (e.g. Flux's plan splits the
    transformer's own inputs)."""
    registry = getattr(module, "_diffusers_hook", None)
    order = list(getattr(registry, "_hook_order", ()))
    if hook_name not in order:
        return []
    return [registry.get_hook(name) for name in order[order.index(hook_name) + 1:] if name.startswith("cp_input---")]


def whole_inputs(module, hook_name: str, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``module``'s forward arguments as its caller passed them: every tensor a split hook that runs before
    ``hook_name`` (``_split_hooks_before``) split is gathered back over the context-parallel mesh (a
    collective: every rank calls it); the arguments themselves when no such hook split anything."""
    from diffusers.hooks.context_parallel import (
        ContextParallelInput,
        EquipartitionSharder,
    )

    for hook in _split_hooks_before(module, hook_name):
        args, kwargs = list(args), dict(kwargs)
        for name, cpm in hook.metadata.items():
            if not isinstance(cpm, ContextParallelInput) or cpm.split_output:
                continue  # outputs split after the module ran (or a per-element list): not an input piece
            value, is_kwarg, index = hook.module_forward_metadata._get_parameter_from_args_kwargs(name, args, kwargs)
            if not isinstance(value, torch.Tensor) or (cpm.expected_dims is not None
                                                       and value.dim() != cpm.expected_dims):
                continue  # diffusers' split left it whole
            whole = EquipartitionSharder.unshard(value, cpm.split_dim, hook.parallel_config._flattened_mesh)
            if is_kwarg:
                kwargs[name] = whole
            else:
                args[index] = whole
        args = tuple(args)
    return args, kwargs


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


__all__ = ["context_parallel", "merged_stats", "ring_attend", "ulysses_attend", "unsupported", "unsupported_forward",
           "whole_inputs"]
