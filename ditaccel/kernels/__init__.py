"""Kernels that execute plans, each with a torch reference twin.

``run_plan`` picks the executor named by a config's ``backend``:
- ``"auto"``: the Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the grouped
  torch executor elsewhere (see ``dispatch.block_sparse_attention`` for the documented fallback);
- ``"triton"``: the Triton kernel, wherever it can run;
- ``"grouped"``: torch SDPA per group of query blocks keeping as many key blocks (``grouped.py``):
  the fast executor off CUDA;
- ``"flex"``: PyTorch FlexAttention on the very same BlockMask (compiled on CUDA);
- ``"reference"``: the chunked torch reference (the twin the others are checked against).
All take q, k, v as [B, H, S, D] (any strides) and return [B, H, S, D].
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .grouped import grouped_block_sparse_attention
from .reference import block_sparse_attention_reference


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def flex_block_sparse_attention(q, k, v, block_mask: BlockMask, scale=None):
    """FlexAttention on ``block_mask``: compiled on CUDA, eager (it materialises scores) elsewhere."""
    if q.is_cuda:
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale)
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)


def block_sparse_attention(q, k, v, block_mask: BlockMask, scale=None):
    """Triton on CUDA (or under TRITON_INTERPRET=1), else the torch reference with a one-time warning."""
    if _has_triton():
        from .dispatch import block_sparse_attention as dispatched

        return dispatched(q, k, v, block_mask, scale)
    return block_sparse_attention_reference(q, k, v, block_mask, scale)


def run_plan(backend: str, q, k, v, block_mask: BlockMask, scale=None):
    if backend == "reference":
        return block_sparse_attention_reference(q, k, v, block_mask, scale)
    if backend == "grouped" or (backend == "auto" and not q.is_cuda and not _interpreting()):
        return grouped_block_sparse_attention(q, k, v, block_mask, scale)
    if backend == "flex":
        return flex_block_sparse_attention(q, k, v, block_mask, scale)
    if backend == "triton":
        if not _has_triton():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'ditaccel[triton]'")
        from .triton_attention import triton_block_sparse_attention

        return triton_block_sparse_attention(q, k, v, block_mask, scale)
    return block_sparse_attention(q, k, v, block_mask, scale)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


__all__ = [
    "block_sparse_attention", "block_sparse_attention_reference", "flex_block_sparse_attention",
    "grouped_block_sparse_attention", "run_plan",
]
