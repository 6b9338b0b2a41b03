"""Kernels that execute plans, each with a torch reference twin.

``run_plan`` picks the executor named by a config's ``backend``:
- ``"auto"``: the Triton kernel on CUDA (and on CPU under ``TRITON_INTERPRET=1``), the grouped
  torch executor elsewhere (see ``dispatch.block_sparse_attention`` for the documented fallback);
- ``"triton"``: the Triton kernel, wherever it can run;
- ``"grouped"``: torch SDPA per group of query blocks keeping as many key blocks (``grouped.py``):
  the fast executor off CUDA;
- ``"flex"``: PyTorch FlexAttention on the very same BlockMask (compiled on CUDA; eager elsewhere,
  with the block lists folded into ``mask_mod`` because eager FlexAttention ignores them: ``flex.py``);
- ``"reference"``: the chunked torch reference (the twin the others are checked against).
All take q, k, v as [B, H, S, D] (any strides) and return [B, H, S, D], with the same keywords:
``key_valid`` ([B, Skv] or [B, H|1, Skv] bool: keys where it is False are never attended) and
``return_lse`` (also return the natural-log LSE [B, H, Sq] float32, -inf for rows that see no key).
``merge_by_lse`` combines outputs computed over disjoint key sets (KV chunks) into one.
"""

from __future__ import annotations

from typing import Callable

from torch.nn.attention.flex_attention import BlockMask

from .flex import flex_block_sparse_attention
from .grouped import grouped_block_sparse_attention
from .merge import merge_by_lse
from .reference import block_sparse_attention_reference


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def block_sparse_attention(q, k, v, block_mask: BlockMask, scale=None, *, key_valid=None, return_lse=False):
    """Triton on CUDA (or under TRITON_INTERPRET=1), else the torch reference with a one-time warning."""
    return _triton_or_reference(q, k, v, block_mask)[1](q, k, v, block_mask, scale, key_valid=key_valid,
                                                        return_lse=return_lse)


def _triton_or_reference(q, k, v, block_mask: BlockMask) -> tuple[str, Callable]:
    if not _has_triton():
        return "reference", block_sparse_attention_reference
    from .dispatch import chosen_executor

    return chosen_executor(q, k, v, block_mask)


def select_executor(backend: str, q, k, v, block_mask: BlockMask) -> tuple[str, Callable]:
    """(name, fn) of the executor that really runs this call under ``backend``; ``fn(q, k, v,
    block_mask, scale, *, key_valid=None, return_lse=False)``. Every executor runs the plan's block lists exactly; one that cannot take
    the call refuses it: ``backend="triton"`` raises naming the reason, ``"auto"`` on CUDA falls
    back to the reference with a one-time warning naming it (and the name says "reference")."""
    if backend == "reference":
        return "reference", block_sparse_attention_reference
    if backend == "grouped" or (backend == "auto" and not q.is_cuda and not _interpreting()):
        return "grouped", grouped_block_sparse_attention
    if backend == "flex":
        return "flex", flex_block_sparse_attention
    if backend == "triton":
        if not _has_triton():
            raise RuntimeError("backend='triton' needs the triton package: pip install 'ditaccel[triton]'")
        from .triton_attention import triton_block_sparse_attention

        return "triton", triton_block_sparse_attention
    return _triton_or_reference(q, k, v, block_mask)


def run_plan(backend: str, q, k, v, block_mask: BlockMask, scale=None, *, key_valid=None, return_lse=False):
    return select_executor(backend, q, k, v, block_mask)[1](q, k, v, block_mask, scale, key_valid=key_valid,
                                                            return_lse=return_lse)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


__all__ = [
    "block_sparse_attention", "block_sparse_attention_reference", "flex_block_sparse_attention",
    "grouped_block_sparse_attention", "merge_by_lse", "run_plan", "select_executor",
]
