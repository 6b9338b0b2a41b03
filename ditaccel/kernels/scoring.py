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

import torch
import triton
import triton.language as tl

from .triton_attention import interpreting, launchable

# See triton_attention: reductions through tl.reduce keep these kernels launchable in the
# interpreter whatever TRITON_INTERPRET was when triton was imported.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine

_SCORE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _mean_pool_kernel(
    X, Out,
    stride_xb, stride_xh, stride_xs, stride_xd,
    H, S, N_BLOCKS,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    # One program averages one block of tokens of one (batch, head) into a pooled fp32 row.
    blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_s = blk * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    # Tokens past S (ragged last block) and head-dim padding load zeros.
    x = tl.load(
        X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs + offs_d[None, :] * stride_xd,
        mask=(offs_s[:, None] < S) & (offs_d[None, :] < HEAD_DIM), other=0.0,
    ).to(tl.float32)

    # The mean is over the block's real tokens only.
    count = tl.minimum(S - blk * BLOCK_SIZE, BLOCK_SIZE).to(tl.float32)
    pooled = tl.reduce(x, 0, _SUM) / count
    tl.store(Out + (pid_bh * N_BLOCKS + blk) * HEAD_DIM_PAD + offs_d, pooled)


@triton.jit
def _pooled_softmax_kernel(
    PQ, PK, Out,
    NQ, NK, qk_scale,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One program scores BLOCK_Q pooled query blocks of one (batch, head) against every pooled key
    # block: softmax over key blocks, in two passes (row max and denominator, then probabilities).
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    pq = tl.load(PQ + (pid_bh * NQ + offs_q[:, None]) * HEAD_DIM_PAD + offs_d[None, :],
                 mask=offs_q[:, None] < NQ, other=0.0)

    # Pass 1: online max and denominator over all key blocks (log2 domain).
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_Q], 0.0, dtype=tl.float32)
    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        pk = tl.load(PK + (pid_bh * NK + offs_k[None, :]) * HEAD_DIM_PAD + offs_d[:, None],
                     mask=offs_k[None, :] < NK, other=0.0)
        s = tl.dot(pq, pk, input_precision="ieee") * qk_scale
        s = tl.where(offs_k[None, :] < NK, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.reduce(tl.math.exp2(s - m_new[:, None]), 1, _SUM)
        m_i = m_new

    # Pass 2: recompute the scores and write normalised probabilities.
    for k0 in range(0, NK, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        pk = tl.load(PK + (pid_bh * NK + offs_k[None, :]) * HEAD_DIM_PAD + offs_d[:, None],
                     mask=offs_k[None, :] < NK, other=0.0)
        s = tl.dot(pq, pk, input_precision="ieee") * qk_scale
        p = tl.math.exp2(s - m_i[:, None]) / l_i[:, None]
        tl.store(Out + (pid_bh * NQ + offs_q[:, None]) * NK + offs_k[None, :], p,
                 mask=(offs_q[:, None] < NQ) & (offs_k[None, :] < NK))


@triton.jit
def _antidiagonal_kernel(
    Q, K, Out,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    H, Sq, Skv, NQ, NK, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, STRIDE: tl.constexpr,
    ROWS_PER_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program owns BLOCK_R strided query rows (BLOCK_R // ROWS_PER_BLOCK whole query blocks)
    # of one (batch, head) and walks every strided key row in tiles of BLOCK_C.
    pid_r = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # strided query rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM
    n_cols = NK * ROWS_PER_BLOCK  # strided key rows, padded to whole key blocks

    # Pass 1: online max and denominator of the softmax over strided keys (log2 domain).
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_R], 0.0, dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        # Strided product: sum over i of q[r*S + S-1-i] . k[c*S + i] (one anti-diagonal per tile).
        s = tl.full([BLOCK_R, BLOCK_C], 0.0, dtype=tl.float32)
        for i in range(STRIDE):  # a loop, not unrolled: keeps shared memory to one tile pair
            q_pos = rows * STRIDE + (STRIDE - 1 - i)
            k_pos = cols * STRIDE + i
            qi = tl.load(q_base + q_pos[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                         mask=(q_pos[:, None] < Sq) & d_ok[None, :], other=0.0)
            ki = tl.load(k_base + k_pos[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=(k_pos[None, :] < Skv) & d_ok[:, None], other=0.0)
            s = tl.dot(qi, ki, s, input_precision=DOT_PRECISION)
        # Strided keys wholly past the end get no probability.
        s = tl.where((cols * STRIDE < Skv)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.math.exp2(m_i - m_shift) + tl.reduce(tl.math.exp2(s - m_shift[:, None]), 1, _SUM)
        m_i = m_new

    # Strided query rows wholly past the end contribute nothing to the block sums.
    m_shift = tl.where(m_i == float("-inf"), 0.0, m_i)
    inv_l = tl.where((rows * STRIDE < Sq) & (l_i > 0.0), 1.0 / l_i, 0.0)

    # Pass 2: recompute, normalise, and sum probabilities per (query block, key block).
    QB: tl.constexpr = BLOCK_R // ROWS_PER_BLOCK
    KB: tl.constexpr = BLOCK_C // ROWS_PER_BLOCK
    out_q = pid_r * QB + tl.arange(0, QB)
    for c0 in range(0, n_cols, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        s = tl.full([BLOCK_R, BLOCK_C], 0.0, dtype=tl.float32)
        for i in range(STRIDE):  # a loop, not unrolled: keeps shared memory to one tile pair
            q_pos = rows * STRIDE + (STRIDE - 1 - i)
            k_pos = cols * STRIDE + i
            qi = tl.load(q_base + q_pos[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                         mask=(q_pos[:, None] < Sq) & d_ok[None, :], other=0.0)
            ki = tl.load(k_base + k_pos[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                         mask=(k_pos[None, :] < Skv) & d_ok[:, None], other=0.0)
            s = tl.dot(qi, ki, s, input_precision=DOT_PRECISION)
        s = tl.where((cols * STRIDE < Skv)[None, :], s * qk_scale, float("-inf"))
        p = tl.math.exp2(s - m_shift[:, None]) * inv_l[:, None]
        # [BLOCK_R, BLOCK_C] -> [QB, KB]: sum the ROWS_PER_BLOCK x ROWS_PER_BLOCK tiles.
        p = tl.reduce(tl.reshape(p, [BLOCK_R, KB, ROWS_PER_BLOCK]), 2, _SUM)
        p = tl.reduce(tl.reshape(p, [QB, ROWS_PER_BLOCK, KB]), 1, _SUM)
        out_k = c0 // ROWS_PER_BLOCK + tl.arange(0, KB)
        tl.store(Out + (pid_bh.to(tl.int64) * NQ + out_q[:, None]) * NK + out_k[None, :], p,
                 mask=(out_q[:, None] < NQ) & (out_k[None, :] < NK))


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
        diag = torch.arange(min(nq, nk), device=scores.device)
        keep[:, :, diag, diag] = True
    keep_cols = _check_always_keep(always_keep_kv_blocks, scores.device)
    if keep_cols is not None and keep_cols.numel():
        cols = torch.zeros(nk, dtype=torch.bool, device=scores.device).index_fill_(0, keep_cols, True)
        keep |= cols
    kv_num_blocks = keep.sum(-1, dtype=torch.int32)
    # Stable sort of "not kept": kept block indices first, ascending, then the others ascending.
    kv_indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return kv_num_blocks, kv_indices


def _use_triton(q: torch.Tensor) -> bool:
    return q.is_cuda or interpreting()


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
        counts[-1] = S - (n - 1) * block_size
        return x.view(B, H, n, block_size, D).sum(3) / counts[:, None]

    logits = torch.einsum("bhqd,bhkd->bhqk", pool(q), pool(k)) * scale
    return torch.softmax(logits, dim=-1)


def mean_pool_block_scores(q, k, block_size: int, *, scale: float | None = None) -> torch.Tensor:
    """Triton twin of ``mean_pool_block_scores_reference`` (reference where Triton cannot run)."""
    _validate_qk(q, k, block_size)
    if not _use_triton(q):
        return mean_pool_block_scores_reference(q, k, block_size, scale=scale)
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    d_pad = max(16, triton.next_power_of_2(D))
    interpret = interpreting()

    pooled = []
    for x in (q, k):
        n = -(-x.shape[2] // block_size)
        out = torch.empty(B, H, n, d_pad, dtype=torch.float32, device=x.device)
        launchable(_mean_pool_kernel, interpret)[(n, B * H)](
            x, out, *x.stride(), H, x.shape[2], n,
            HEAD_DIM=D, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=block_size,
        )
        pooled.append(out)
    pq, pk = pooled
    nq, nk = pq.shape[2], pk.shape[2]
    probs = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    block_q, block_k = 16, 64
    launchable(_pooled_softmax_kernel, interpret)[(triton.cdiv(nq, block_q), B * H)](
        pq, pk, probs, nq, nk, scale * math.log2(math.e),
        HEAD_DIM_PAD=d_pad, BLOCK_Q=block_q, BLOCK_K=block_k,
    )
    return probs


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
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    scale = D**-0.5 if scale is None else float(scale)
    interpret = interpreting()
    if interpret and q.dtype == torch.bfloat16:  # the interpreter's tl.dot is wrong on bf16
        q, k = q.float(), k.float()
    rpb = block_size // stride
    nq, nk = -(-Sq // block_size), -(-Skv // block_size)
    d_pad = max(16, triton.next_power_of_2(D))
    block_r = max(64, rpb)
    sums = torch.empty(B, H, nq, nk, dtype=torch.float32, device=q.device)
    launchable(_antidiagonal_kernel, interpret)[(triton.cdiv(nq * rpb, block_r), B * H)](
        q, k, sums, *q.stride(), *k.stride(),
        H, Sq, Skv, nq, nk, scale / stride * math.log2(math.e),
        HEAD_DIM=D, HEAD_DIM_PAD=d_pad, STRIDE=stride, ROWS_PER_BLOCK=rpb, BLOCK_R=block_r, BLOCK_C=block_r,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return sums / sums.sum(-1, keepdim=True)


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
