"""Pick the executor for one block-sparse attention call: the Triton kernel when it covers the call,
the torch reference otherwise, never silently.

- CUDA tensors: the Triton kernel (``triton_attention.triton_block_sparse_attention``);
- CPU tensors: the Triton kernel in the interpreter only when ``TRITON_INTERPRET=1`` (slow: tests);
- anything the kernel does not cover (no triton installed, another device, a dtype other than
  fp16/bf16/fp32, head dim not in 64/96/128, v head dim != q head dim, BlockMask block size not
  64/128, ...): ``reference.block_sparse_attention_reference``, with a ``warnings.warn`` naming the
  reason the first time that reason occurs in the process.

Inputs no attention can take (wrong rank; batch, head, length, head-dim, dtype or device mismatches
between q, k, v) raise ``ValueError`` instead.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask

from .reference import block_sparse_attention_reference

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"ditaccel: block-sparse attention runs on the torch reference (slower), not the Triton "
            f"kernel: unsupported {reason}",
            stacklevel=3,
        )


def _triton_reason(q, k, v, block_mask) -> str | None:
    """None when the Triton kernel takes the call, else why not. Raises ValueError for bad shapes."""
    try:
        from . import triton_attention
    except ImportError as e:  # triton not installed (or broken)
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            raise ValueError(f"q, k, v must be [B, H, S, D] (rank 4); got shapes {shapes}") from None
        return f"environment: triton cannot be imported ({e})"
    triton_attention.validate_shapes(q, k, v)
    return triton_attention.unsupported_reason(q, k, v, block_mask)


def chosen_executor(q, k, v, block_mask: BlockMask):
    """("triton", kernel) when the Triton kernel takes the call, else ("reference", reference) after a
    one-time warning naming the reason."""
    reason = _triton_reason(q, k, v, block_mask)
    if reason is None:
        from .triton_attention import triton_block_sparse_attention

        return "triton", triton_block_sparse_attention
    _warn_once(reason)
    return "reference", block_sparse_attention_reference


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    *,
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of q, k, v ([B, H, S, D], any strides) restricted to ``block_mask`` and ``key_valid``
    ([B, Skv] or [B, H|1, Skv] bool, optional); [B, H, Sq, D], or ``(out, lse)`` with ``return_lse``.
    Every executor takes these same arguments with the same meaning."""
    name, fn = chosen_executor(q, k, v, block_mask)
    return fn(q, k, v, block_mask, scale, key_valid=key_valid, return_lse=return_lse)


__all__ = ["block_sparse_attention", "chosen_executor"]
