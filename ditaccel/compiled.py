"""The intercepted attention product under ``torch.compile``: one opaque op per call.

Eagerly, an attention module's hook marks its site as running (a context variable) and our
diffusers backend hands the call to ``AttentionSite.attend``. Dynamo can trace neither the context
variable nor the runtime behind the site (plan caches, stats, data-dependent selections), so while
it traces, the hook instead leaves the module's *site index* -- a 0-d tensor attribute set on every
hooked module at ``accelerate`` -- in ``TRACING``, and the backend emits one call of the custom op
``ditaccel::site_attention(q, k, v, mask, scale, site_index)``. The op runs ``AttentionSite.attend``
eagerly at run time, so:

- the compiled graph has no graph break in the attention path and does not change when the method
  does (dense step, sparse step, reused output: the same op), so nothing recompiles when the first
  sparse step begins;
- the site index is a graph *input* (a tensor attribute of the module), not a constant, so the
  repeated blocks of ``compile_repeated_blocks`` share one graph whichever layer they are.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_SITES: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_NEXT = itertools.count()
SITE_ATTR = "_ditaccel_site_index"


class _Tracing:
    """The site index of the attention module dynamo is tracing (None outside one)."""

    site_index: torch.Tensor | None = None


TRACING = _Tracing()


def register_site(site) -> torch.Tensor:
    """A fresh index for ``site`` (kept while the site lives), as the 0-d tensor set on its module."""
    index = next(_NEXT)
    _SITES[index] = site
    return torch.tensor(index, dtype=torch.int64)


def _site(site_index: torch.Tensor):
    site = _SITES.get(int(site_index))
    if site is None:
        raise RuntimeError(f"ditaccel: attention site {int(site_index)} is gone (its handle was removed); "
                           f"recompile the model after handle.remove()")
    return site


@torch.library.custom_op("ditaccel::site_attention", mutates_args=())
def site_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                   scale: float | None, site_index: torch.Tensor) -> torch.Tensor:
    """``AttentionSite.attend`` of the site ``site_index`` on [B, S, H, D] q, k, v; its dense fallback
    is the model's own backend (the one the processor had before ``accelerate``)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    site = _site(site_index)

    def dense():
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, scale=scale,
                                     backend=site.original_backend)

    site_mask = attn_mask
    if attn_mask is not None and attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        site_mask = attn_mask[:, None, None, :]  # diffusers' 2-D key padding, as SDPA reads it (intercept.py)
    out = site.attend(query, key, value, site_mask, scale, dense)
    # The op's contract (its fake below): a fresh, contiguous [B, S, H, D] tensor.
    if out.data_ptr() in (query.data_ptr(), key.data_ptr(), value.data_ptr()):
        out = out.clone()
    return out.contiguous()


@site_attention.register_fake
def _(query, key, value, attn_mask, scale, site_index):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


__all__ = ["SITE_ATTR", "TRACING", "register_site", "site_attention"]
