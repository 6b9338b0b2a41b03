"""The Triton kernels of :mod:`.scoring` (imported only where they run: triton is optional).

Signatures and results are those of the torch twins in :mod:`.scoring`.
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


def mean_pool_block_scores_triton(q, k, block_size: int, scale) -> torch.Tensor:
    B, H, Sq, D = q.shape
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


def antidiagonal_block_scores_triton(q, k, block_size: int, stride: int, scale) -> torch.Tensor:
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
