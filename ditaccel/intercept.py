"""Swapping only the attention product inside a model's own diffusers processor.

Two doors, chosen per processor (DESIGN.md, "Intercept, don't rewrite"):
- processors that call ``dispatch_attention_fn(..., backend=self._attention_backend)`` get our
  registered diffusers attention backend ``"ditaccel"`` set on that processor alone;
- processors that call ``F.scaled_dot_product_attention`` directly run inside a
  ``TorchFunctionMode`` that routes exactly that call to us.

Either way the call lands in ``AttentionSite.attend`` of the self-attention module that is
running, found through a context variable the module's hook sets for the duration of its forward.
Under diffusers' context parallelism the backend runs our plans on the whole sequence of a rank's
heads (Ulysses) or on a rank's rows round the ring (ring): ``parallel/``. A call with no running site (or an argument we do not model: dropout,
causal, GQA, an unsupported kind of context parallelism) goes to the attention the model would have used; with a site, that fallback is counted
and warned about (``AttentionSite._warn_once``). ``bypass_reason`` says why a self-attention
module's forward never reached us (its processor or backend was swapped after ``accelerate``).
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

BACKEND_NAME = "ditaccel"

current_site: contextvars.ContextVar = contextvars.ContextVar("ditaccel_current_site", default=None)


def _sdpa_bshd(query, key, value, attn_mask=None, scale=None):
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask, scale=scale
    )
    return out.transpose(1, 2)


def _ditaccel_backend(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                      enable_gqa=False, _parallel_config=None):
    """Our diffusers attention backend: q, k, v are [B, S, H, D], as diffusers' dispatch passes them."""
    if torch.compiler.is_compiling():  # dynamo is tracing: one opaque op per call (compiled.py)
        from .compiled import TRACING, site_attention

        if TRACING.site_index is not None and not (dropout_p or is_causal or enable_gqa or _parallel_config):
            return site_attention(query, key, value, attn_mask, scale, TRACING.site_index)
    site = current_site.get()
    if site is not None and _parallel_config is not None and not (dropout_p or is_causal or enable_gqa):
        from .parallel import ring_attend, ulysses_attend, unsupported

        call, cp = site.runtime.current, _parallel_config.context_parallel_config
        if unsupported(cp, call.text_position if call is not None else None) is None:
            attend = ring_attend if (cp.ring_degree or 1) > 1 else ulysses_attend
            return attend(site, query, key, value, attn_mask, scale, _parallel_config)
    if site is None or dropout_p or is_causal or enable_gqa or _parallel_config is not None:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        original = site.original_backend if site is not None else None
        if site is not None:
            site.reached += 1
            site.runtime.reached += 1
            site._warn_once(_unmodelled(dropout_p, is_causal, enable_gqa, _parallel_config, site),
                            4.0 * query.shape[0] * query.shape[2] * query.shape[1] * key.shape[1] * query.shape[3])
        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                     is_causal=is_causal, scale=scale, enable_gqa=enable_gqa,
                                     backend=original, parallel_config=_parallel_config)

    def dense():
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(query, key, value, attn_mask=attn_mask, scale=scale,
                                     backend=site.original_backend)

    site_mask = attn_mask
    if attn_mask is not None and attn_mask.dim() == 2 and tuple(attn_mask.shape) == (query.shape[0], key.shape[1]):
        # diffusers' backends read a 2-D mask [B, S_k] as key padding [B, 1, 1, S_k] (the native one
        # reshapes it so before SDPA); the site reads masks as SDPA does, so hand it that shape.
        site_mask = attn_mask[:, None, None, :]
    return site.attend(query, key, value, site_mask, scale, dense)


def _unmodelled(dropout_p, is_causal, enable_gqa, parallel_config, site) -> str:
    if parallel_config is not None and not (dropout_p or is_causal or enable_gqa):
        from .parallel import unsupported

        call = site.runtime.current
        return unsupported(parallel_config.context_parallel_config, call.text_position if call is not None else None)
    return f"an attention call ditaccel does not model (dropout_p={dropout_p}, is_causal={is_causal}, enable_gqa={enable_gqa})"


def bypass_reason(module, processor, kind: "ProcessorKind", member) -> str | None:
    """Why ``module``'s forward (ditaccel's attention hook around it) reached no ditaccel attention:
    a reason if its processor or backend was changed after ``accelerate``; None if it is as ditaccel set
    it (then a hook beneath ditaccel's returned without computing attention, e.g. a cache)."""
    now = getattr(module, "processor", None)
    if now is not processor:
        return (f"its attention processor was replaced after accelerate (set_attn_processor: now a "
                f"{type(now).__name__}); ditaccel no longer sees its attention -- remove() and accelerate again")
    if kind is ProcessorKind.DISPATCH and getattr(processor, "_attention_backend", None) is not member:
        backend = getattr(processor, "_attention_backend", None)
        return (f"its attention backend was changed after accelerate (set_attention_backend / "
                f"reset_attention_backend: now {getattr(backend, 'value', backend)!r}); ditaccel no longer sees "
                "its attention -- remove() and accelerate again")
    return None


def backend_member():
    """The ``AttentionBackendName`` member for our backend, registered with diffusers once.

    diffusers names backends with a closed Enum, so registering a new one means adding a member.
    Adding it changes no default: only processors we set to it use it.
    """
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = AttentionBackendName._value2member_map_.get(BACKEND_NAME)
    if member is None:
        member = str.__new__(AttentionBackendName, BACKEND_NAME)
        member._name_, member._value_ = "DITACCEL", BACKEND_NAME
        member.__objclass__ = AttentionBackendName
        AttentionBackendName._value2member_map_[BACKEND_NAME] = member
        AttentionBackendName._member_map_["DITACCEL"] = member
        if hasattr(AttentionBackendName, "_member_names_"):
            AttentionBackendName._member_names_.append("DITACCEL")
    if member not in _AttentionBackendRegistry._backends:
        # context-parallel capable: Ulysses and ring run our plans on a rank's heads (parallel/)
        _AttentionBackendRegistry.register(member, supports_context_parallel=True)(_ditaccel_backend)
    return member


_SDPA_SIGNATURE = inspect.signature(
    lambda query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False: None
)


class SDPAIntercept(TorchFunctionMode):
    """Routes ``F.scaled_dot_product_attention`` ([B, H, S, D]) made under it to ``site``."""

    def __init__(self, site):
        super().__init__()
        self.site = site

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        a = _SDPA_SIGNATURE.bind(*args, **kwargs).arguments
        if a.get("dropout_p") or a.get("is_causal") or a.get("enable_gqa"):
            return func(*args, **kwargs)
        q, k, v = (a[n].transpose(1, 2) for n in ("query", "key", "value"))
        out = self.site.attend(q, k, v, a.get("attn_mask"), a.get("scale"), lambda: func(*args, **kwargs).transpose(1, 2))
        return out.transpose(1, 2)


class ProcessorKind(str, enum.Enum):
    DISPATCH = "dispatch"
    DISPATCH_ACTIVE = "dispatch-active"
    SDPA = "sdpa"


def processor_kind(processor) -> ProcessorKind:
    """How a diffusers processor computes attention, read from the processor itself.

    A processor with an ``_attention_backend`` attribute passes it to ``dispatch_attention_fn``; one
    without it that still calls ``dispatch_attention_fn`` (Cosmos) uses diffusers' *active* backend,
    which a per-processor setting cannot reach; anything else is taken to call SDPA itself.
    """
    if hasattr(processor, "_attention_backend"):
        return ProcessorKind.DISPATCH
    call = getattr(type(processor), "__call__", None)
    if "dispatch_attention_fn" in getattr(getattr(call, "__code__", None), "co_names", ()):
        return ProcessorKind.DISPATCH_ACTIVE
    return ProcessorKind.SDPA


@contextlib.contextmanager
def active_backend(site, member):
    """Make our backend diffusers' active one for one module's forward; the backend that was active
    is what a dense call of ``site`` falls back to (and is active again afterwards)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    previous = _AttentionBackendRegistry._active_backend
    site.original_backend = previous
    _AttentionBackendRegistry.set_active_backend(member)
    try:
        yield
    finally:
        _AttentionBackendRegistry.set_active_backend(previous)

