"""Block scoring for dynamic sparse attention: which key blocks each query block should attend.

Two scorers, each a Triton kernel with a torch reference twin of the same signature; both feed one
selection routine (torch ops on the device, no host synchronisation) that writes FlexAttention
index lists:

    kv_num_blocks [B, H, nq] int32       how many key blocks each query block keeps
    kv_indices    [B, H, nq, nk] int32   the kept blocks first, in ascending block order, then
                                         the other blocks (ascending) so every slot is a valid index

Selected blocks need no token-level mask: pass them as ``full_kv_num_blocks / full_kv_indices``
(or as ``kv_*`` with a no-op mask_mod) to ``BlockMask.from_kv_blocks``.

- ``mean_pool_block_select``: mean-pool q and k per block (a ragged last block is averaged over
  its real tokens), score pooled pairs ``softmax_k(pool(q) . pool(k) * scale)`` with
  ``scale = 1/sqrt(D)`` by default, keep the ``topk`` fraction of key blocks (``ceil(topk * nk)``,
  at least 1) or the smallest set whose cumulative probability reaches ``cdf``.
  [SpargeAttn, VSA coarse stage, MInference]
- ``antidiagonal_block_select``: XAttention's estimate. q and k are reshaped with ``stride``
  (strided query row r concatenates q[r*s + s-1], ..., q[r*s]; strided key row c concatenates
  k[c*s], ..., k[c*s + s-1]), so a strided product is the sum over one anti-diagonal
  ((i + j) % s == s - 1) of each s x s tile of q.k^T. Strided scores are scaled by
  ``scale / stride``, softmax-normalised over all strided keys, summed per (query block, key
  block), and each query block's row is normalised to sum to 1 (a distribution over key blocks);
  blocks are kept, largest first, until the cumulative score reaches ``threshold``.
  Padding: keys past the end are excluded from the softmax; strided query rows lying wholly past
  the end are left out of the sums. [XAttention]

Both always keep the diagonal block (query block i keeps key block i, when ``keep_diagonal`` and
i < nk) and every key block listed in ``always_keep_kv_blocks`` (e.g. the text blocks).

The Triton versions run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``;
elsewhere they run their reference twin (same results, ties aside).
"""

from __future__ import annotations

import math
import os

import torch

_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Validation and the shared selection
# ----------------------------------------------------------------------------------------------


def _validate_qk(q: torch.Tensor, k: torch.Tensor, block_size: int) -> int:
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D] (rank 4); got shape {tuple(t.shape)}")
        if t.dtype not in _SCORE_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not allowed; allowed: float16, bfloat16, float32")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q and k must have the same batch and head counts; got q {tuple(q.shape[:2])}, k {tuple(k.shape[:2])}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    if not 1 <= q.shape[3] <= 256:
        raise ValueError(f"head dim {q.shape[3]} is not allowed; allowed: 1..256")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"q and k must share dtype and device; got {q.dtype}/{q.device} and {k.dtype}/{k.device}")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q and k need at least one token; got Sq={q.shape[2]}, Skv={k.shape[2]}")
    if (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16
            or block_size & (block_size - 1)):
        raise ValueError(
            f"block_size={block_size!r} is not allowed; allowed: a power of two >= 16 (64 or 128 for the kernel)"
        )
    return block_size


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} is not allowed; allowed: a float in (0, 1]")
    return float(value)


def _check_rule(topk, cdf) -> tuple[float | None, float | None]:
    if (topk is None) == (cdf is None):
        raise ValueError(f"give exactly one of topk and cdf; got topk={topk!r}, cdf={cdf!r}")
    if topk is not None:
        return _check_fraction("topk", topk), None
    return None, _check_fraction("cdf", cdf)


def _check_always_keep(always_keep_kv_blocks, device) -> torch.Tensor | None:
    if always_keep_kv_blocks is None:
        return None
    t = torch.as_tensor(always_keep_kv_blocks, device=device)
    if t.dim() != 1 or t.dtype in (torch.bool,) or t.is_floating_point() or t.is_complex():
        raise ValueError(
            f"always_keep_kv_blocks must be a 1-D integer tensor of key block indices; "
            f"got dtype {t.dtype}, shape {tuple(t.shape)}"
        )
    return t.to(torch.long)


def select_blocks(
    scores: torch.Tensor,
    *,
    topk: float | None = None,
    cdf: float | None = None,
    keep_diagonal: bool = True,
    always_keep_kv_blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks to keep per query block from ``scores`` [B, H, nq, nk] (each row sums to 1).

    Exactly one of ``topk`` (fraction of key blocks, ``ceil(topk * nk)`` kept, at least 1) and
    ``cdf`` (smallest set, largest first, whose cumulative score reaches ``cdf``; ties broken by
    lower block index) must be given; 1.0 keeps everything. Returns ``(kv_num_blocks [B, H, nq]
    int32, kv_indices [B, H, nq, nk] int32)``, kept blocks first in ascending order. Device ops
    only: no host synchronisation.
    """
    topk, cdf = _check_rule(topk, cdf)
    if scores.dim() != 4:
        raise ValueError(f"scores must be [B, H, nq, nk] (rank 4); got shape {tuple(scores.shape)}")
    B, H, nq, nk = scores.shape
    if topk is not None:
        n_keep = min(nk, max(1, math.ceil(topk * nk)))
        keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        keep.scatter_(-1, torch.topk(scores, n_keep, dim=-1, sorted=False).indices, True)
    else:
        if cdf >= 1.0:
            keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        else:
            ranked, order = torch.sort(scores, dim=-1, descending=True, stable=True)
            mass_before = torch.cumsum(ranked, dim=-1) - ranked
            keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            keep.scatter_(-1, order, mass_before < cdf)
    if keep_diagonal:
        keep.diagonal(dim1=-2, dim2=-1).fill_(True)  # in place: no index tensor, no value tensor from the host
    keep_cols = _check_always_keep(always_keep_kv_blocks, scores.device)
    if keep_cols is not None and keep_cols.numel():
        cols = torch.zeros(nk, dtype=torch.bool, device=scores.device).index_fill_(0, keep_cols, True)
        keep |= cols
    kv_num_blocks = keep.sum(-1, dtype=torch.int32)
    # Stable sort of "not kept": kept block indices first, ascending, then the others ascending.
    kv_indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return kv_num_blocks, kv_indices


def _use_triton(q: torch.Tensor) -> bool:
    """The Triton scorers run on CUDA and under TRITON_INTERPRET=1, when triton is installed (it is an
    optional dependency: without it every scorer is its torch twin)."""
    from . import _has_triton

    return (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1") and _has_triton()


# ----------------------------------------------------------------------------------------------
# Mean-pool scoring
# ----------------------------------------------------------------------------------------------


def mean_pool_block_scores_reference(q, k, block_size: int, *, scale: float | None = None) -> torch.Tensor:
    """softmax over key blocks of pool(q) . pool(k) * scale; [B, H, nq, nk] float32."""
    _validate_qk(q, k, block_size)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    def pool(x):
        B, H, S, D = x.shape
        n = -(-S // block_size)
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, n * block_size - S))
        counts = torch.full((n,), float(block_size), device=x.device)
        counts[-1].fill_(S - (n - 1) * block_size)  # fill_: a scalar argument, not a tensor made on the host
        return x.view(B, H, n, block_size, D).sum(3) / counts[:, None]

    logits = torch.einsum("bhqd,bhkd->bhqk", pool(q), pool(k)) * scale
    return torch.softmax(logits, dim=-1)


def mean_pool_block_scores(q, k, block_size: int, *, scale: float | None = None) -> torch.Tensor:
    """Triton twin of ``mean_pool_block_scores_reference`` (reference where Triton cannot run)."""
    _validate_qk(q, k, block_size)
    if not _use_triton(q):
        return mean_pool_block_scores_reference(q, k, block_size, scale=scale)
    from .scoring_triton import mean_pool_block_scores_triton

    return mean_pool_block_scores_triton(q, k, block_size, scale)



def mean_pool_block_select_reference(
    q, k, block_size: int, *, topk=None, cdf=None, keep_diagonal: bool = True, always_keep_kv_blocks=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``mean_pool_block_select``."""
    _check_rule(topk, cdf)
    scores = mean_pool_block_scores_reference(q, k, block_size)
    return select_blocks(scores, topk=topk, cdf=cdf, keep_diagonal=keep_diagonal,
                         always_keep_kv_blocks=always_keep_kv_blocks)


def mean_pool_block_select(
    q, k, block_size: int, *, topk=None, cdf=None, keep_diagonal: bool = True, always_keep_kv_blocks=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-pool block selection (see the module docstring); (kv_num_blocks, kv_indices) int32."""
    _check_rule(topk, cdf)
    scores = mean_pool_block_scores(q, k, block_size)
    return select_blocks(scores, topk=topk, cdf=cdf, keep_diagonal=keep_diagonal,
                         always_keep_kv_blocks=always_keep_kv_blocks)


# ----------------------------------------------------------------------------------------------
# Anti-diagonal (XAttention) scoring
# ----------------------------------------------------------------------------------------------


def _check_stride(stride, block_size: int) -> int:
    if (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1 or stride & (stride - 1)
            or block_size % stride):
        raise ValueError(
            f"stride={stride!r} is not allowed; allowed: a power of two dividing block_size={block_size} "
            "(8 or 16 typical)"
        )
    return stride


def antidiagonal_block_scores_reference(
    q, k, block_size: int, *, stride: int = 8, scale: float | None = None
) -> torch.Tensor:
    """XAttention block scores, each query block's row normalised to sum to 1; [B, H, nq, nk] float32."""
    _validate_qk(q, k, block_size)
    _check_stride(stride, block_size)
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    rpb = block_size // stride  # strided rows per block
    nq, nk = -(-Sq // block_size), -(-Skv // block_size)
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, nq * block_size - Sq))
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, nk * block_size - Skv))
    # Strided rows: query row r = [q[r*s + s-1], ..., q[r*s]], key row c = [k[c*s], ..., k[c*s + s-1]].
    q_str = torch.cat([qp[:, :, stride - 1 - i :: stride] for i in range(stride)], dim=-1)
    k_str = torch.cat([kp[:, :, i::stride] for i in range(stride)], dim=-1)
    col_ok = torch.arange(nk * rpb, device=q.device) * stride < Skv
    row_ok = torch.arange(nq * rpb, device=q.device) * stride < Sq

    sums = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    chunk = max(1, (64 * 2**20) // max(1, B * H * rpb * nk * rpb))  # query blocks per chunk
    for c0 in range(0, nq, chunk):
        c1 = min(nq, c0 + chunk)
        r0, r1 = c0 * rpb, c1 * rpb
        logits = torch.einsum("bhrd,bhcd->bhrc", q_str[:, :, r0:r1], k_str) * (scale / stride)
        probs = torch.softmax(logits.masked_fill(~col_ok, float("-inf")), dim=-1)
        probs = probs * row_ok[r0:r1, None]
        sums[:, :, c0:c1] = probs.view(B, H, c1 - c0, rpb, nk, rpb).sum(dim=(3, 5))
    return sums / sums.sum(-1, keepdim=True)


def antidiagonal_block_scores(q, k, block_size: int, *, stride: int = 8, scale: float | None = None) -> torch.Tensor:
    """Triton twin of ``antidiagonal_block_scores_reference`` (reference where Triton cannot run)."""
    _validate_qk(q, k, block_size)
    _check_stride(stride, block_size)
    if not _use_triton(q):
        return antidiagonal_block_scores_reference(q, k, block_size, stride=stride, scale=scale)
    from .scoring_triton import antidiagonal_block_scores_triton

    return antidiagonal_block_scores_triton(q, k, block_size, stride, scale)



def antidiagonal_block_select_reference(
    q, k, block_size: int, *, stride: int = 8, threshold: float = 0.9, keep_diagonal: bool = True,
    always_keep_kv_blocks=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of ``antidiagonal_block_select``."""
    threshold = _check_fraction("threshold", threshold)
    scores = antidiagonal_block_scores_reference(q, k, block_size, stride=stride)
    return select_blocks(scores, cdf=threshold, keep_diagonal=keep_diagonal,
                         always_keep_kv_blocks=always_keep_kv_blocks)


def antidiagonal_block_select(
    q, k, block_size: int, *, stride: int = 8, threshold: float = 0.9, keep_diagonal: bool = True,
    always_keep_kv_blocks=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """XAttention block selection (see the module docstring); (kv_num_blocks, kv_indices) int32."""
    threshold = _check_fraction("threshold", threshold)
    scores = antidiagonal_block_scores(q, k, block_size, stride=stride)
    return select_blocks(scores, cdf=threshold, keep_diagonal=keep_diagonal,
                         always_keep_kv_blocks=always_keep_kv_blocks)


__all__ = [
    "antidiagonal_block_scores", "antidiagonal_block_scores_reference", "antidiagonal_block_select",
    "antidiagonal_block_select_reference", "mean_pool_block_scores", "mean_pool_block_scores_reference",
    "mean_pool_block_select", "mean_pool_block_select_reference", "select_blocks",
]
