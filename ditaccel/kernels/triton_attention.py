"""Forward block-sparse attention in Triton, driven by a FlexAttention ``BlockMask``.

Semantics are those of ``flex_attention`` (and of ``reference.block_sparse_attention_reference``):

- ``full_kv_num_blocks / full_kv_indices`` list, per (batch, head, query block), the key blocks
  attended with no mask: the kernel runs them without any mask code;
- ``kv_num_blocks / kv_indices`` list the *partial* key blocks, where ``mask_mod(b, h, q, kv)``
  decides token by token. The launcher evaluates ``mask_mod`` once per BlockMask on the partial
  blocks only, packs the verdicts into bits (one int32 word per 32 keys of a query row) and caches
  them on the BlockMask; the kernel reads one bit per score;
- a query row with no allowed key returns zeros, never NaN.

The kernel follows the structure of Triton's fused-attention tutorial: one program owns
``BLOCK_M`` query rows of one (batch, head), keeps them in registers, and streams the key blocks
its BlockMask row lists through an online softmax (exp2, scale folded into log2(e), fp32
accumulation): first the full blocks, then the partial ones. ``BLOCK_M`` divides the BlockMask's
query block size (a program may own a sub-row range of a query block) and ``BLOCK_N`` divides its
key block size (a key block is walked in sub-blocks).

q, k, v are [B, H, S, D] with any strides (a [B, S, H, D] tensor's ``.transpose(1, 2)`` view works
without a copy); fp16, bf16, or fp32; head dim 64, 96 or 128 (96 runs in a 128-wide tile with
masked loads). Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors (bf16 is computed in
fp32 there, because the interpreter's ``tl.dot`` is wrong on bf16 operands).
"""

from __future__ import annotations

import functools
import math
import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import BlockMask, noop_mask
from .reference import block_sizes, mask_mod_varies

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)

_WORD_BITS = 32  # keys per packed mask word

# Kernels here use only Triton builtins plus ``tl.reduce`` with triton.language's own combine
# functions. ``tl.max`` / ``tl.sum`` / ``tl.zeros`` are themselves ``@triton.jit`` functions, built
# compiled or interpreted depending on TRITON_INTERPRET *when triton was imported*; avoiding them
# lets ``launchable`` switch a kernel to the interpreter at launch time (tests, CPU), and the
# interpreter runs these two reductions in numpy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    Meta, Order, FullIdx, PartIdx, Bits,
    MASK_B, MASK_H, NQ, NK_FULL, NK_PART,
    stride_bits_b, stride_bits_h,
    H, Sq, Skv, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_KV: tl.constexpr, HAS_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid axis 0 walks query tiles in the launcher's order (longest rows first), axis 1 is (b, h).
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    # BlockMask tensors may broadcast over batch and heads: pick the row that describes (b, h).
    mask_row = (b % MASK_B) * MASK_H + (h % MASK_H)
    SUB_M: tl.constexpr = BQ // BLOCK_M
    q_block = tl.load(Order + mask_row * NQ + pid_t // SUB_M)
    row0 = (pid_t % SUB_M) * BLOCK_M  # first row of this program inside its query block

    # Per query block: (number of full blocks, number of partial blocks, first bitmap entry).
    meta = Meta + (mask_row * NQ + q_block) * 3
    n_full = tl.load(meta)
    n_part = tl.load(meta + 1)
    part_entry0 = tl.load(meta + 2)

    # 64-bit base offsets: B * H * S * D overflows int32 on long videos.
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    q_base = Q + b64 * stride_qb + h64 * stride_qh
    k_base = K + b64 * stride_kb + h64 * stride_kh
    v_base = V + b64 * stride_vb + h64 * stride_vh
    o_base = Out + b64 * stride_ob + h64 * stride_oh

    offs_m = q_block * BQ + row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM  # head dim 96 runs in a 128-wide tile

    # The query tile stays in registers for the whole key loop; rows past Sq load zeros.
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=(offs_m[:, None] < Sq) & d_ok[None, :], other=0.0,
    )

    # Online-softmax state in the log2 domain: running max, running denominator, accumulator.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_PAD], 0.0, dtype=tl.float32)

    # Bitmap rows of this program inside a partial entry, and the bits' row stride (words per row).
    WORDS: tl.constexpr = BK // 32
    bit_rows = row0 + tl.arange(0, BLOCK_M)
    bits_base = Bits + b64 * stride_bits_b + h64 * stride_bits_h

    # Two passes, unrolled at compile time: full blocks (no mask code), then partial blocks.
    for PARTIAL in tl.static_range(2):
        if PARTIAL == 0:
            n_blocks = n_full
            idx_row = FullIdx + (mask_row * NQ + q_block) * NK_FULL
        else:
            n_blocks = n_part
            idx_row = PartIdx + (mask_row * NQ + q_block) * NK_PART
        for j in range(0, n_blocks):
            kv_block = tl.load(idx_row + j)
            # A key block is walked in BK // BLOCK_N sub-blocks (unrolled).
            for s in tl.static_range(BK // BLOCK_N):
                cols = s * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions inside the block
                offs_n = kv_block * BK + cols
                kv_ok = offs_n < Skv

                # K^T tile [HEAD_DIM_PAD, BLOCK_N]; keys past Skv load zeros.
                k = tl.load(
                    k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=kv_ok[None, :] & d_ok[:, None], other=0.0,
                )
                # Scores in the log2 domain: softmax scale and log2(e) are folded into qk_scale.
                qk = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale

                # Ragged tail (last key block only): keys past the end never get probability.
                if not EVEN_KV:
                    if (kv_block + 1) * BK > Skv:
                        qk = tl.where(kv_ok[None, :], qk, float("-inf"))

                # Partial blocks only: one bit of the cached mask_mod bitmap per score (no bitmap
                # when mask_mod is FlexAttention's no-op mask: partial blocks are then unmasked).
                if PARTIAL == 1 and HAS_BITS:
                    words = tl.load(
                        bits_base + (part_entry0 + j).to(tl.int64) * (BQ * WORDS)
                        + bit_rows[:, None] * WORDS + (cols // 32)[None, :]
                    )
                    allowed = ((words >> (cols % 32)[None, :]) & 1) != 0
                    qk = tl.where(allowed, qk, float("-inf"))

                # New running max; a row that has seen only masked keys keeps -inf, so shift by 0
                # instead (exp2(-inf - 0) = 0) to avoid the NaN of -inf - (-inf).
                m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX))
                m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.math.exp2(qk - m_shift[:, None])
                alpha = tl.math.exp2(m_i - m_shift)
                l_i = l_i * alpha + tl.reduce(p, 1, _SUM)

                # V tile [BLOCK_N, HEAD_DIM_PAD]; rescale the accumulator and add p @ V.
                v = tl.load(
                    v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_ok[:, None] & d_ok[None, :], other=0.0,
                )
                acc = acc * alpha[:, None]
                acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
                m_i = m_new

    # Normalise; rows with no allowed key have l_i == 0 and acc == 0, and return zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < Sq) & d_ok[None, :],
    )


# ----------------------------------------------------------------------------------------------
# Compiled vs interpreted kernels, and autotuning on CUDA
# ----------------------------------------------------------------------------------------------


def interpreting() -> bool:
    """True when Triton kernels should run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _python_fn(kernel):
    # Autotuner -> JITFunction/InterpretedFunction -> the plain Python function.
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def launchable(kernel, interpret: bool):
    """``kernel`` as the interpreter or the compiler needs it, whatever TRITON_INTERPRET was at import.

    ``@triton.jit`` decides between the two when the module is imported; tests and users switch
    ``TRITON_INTERPRET`` later, so every launch picks its flavour from the environment at launch.
    """
    fn = _python_fn(kernel)
    return _interpreted(fn) if interpret else _compiled(fn)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim; pruned to those dividing the
# BlockMask's block sizes. Larger head dims get fewer pipeline stages (shared memory).
_AUTOTUNE_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 64, 4, 2), (128, 128, 8, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 32, 4, 3)],
}


def _prune_configs(configs, named_args, **kwargs):
    # The autotuner passes positional kernel args in ``named_args`` and keyword ones in ``kwargs``.
    args = {**named_args, **kwargs}
    bq, bk = args["BQ"], args["BK"]
    kept = [c for c in configs if bq % c.kwargs["BLOCK_M"] == 0 and bk % c.kwargs["BLOCK_N"] == 0]
    return kept or [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]


@functools.lru_cache(maxsize=None)
def _autotuned(head_dim_pad: int):
    configs = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in _AUTOTUNE_CONFIGS[head_dim_pad]
    ]
    return triton.autotune(
        configs=configs,
        key=["HEAD_DIM", "BQ", "BK", "EVEN_KV", "HAS_BITS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(_compiled(_python_fn(_block_sparse_attn_fwd)))


# ----------------------------------------------------------------------------------------------
# BlockMask -> kernel tables (cached per BlockMask)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tables:
    """What the kernel reads besides q, k, v. Rows are indexed by (b % mask_b) * mask_h + h % mask_h."""

    meta: torch.Tensor  # [mask_b, mask_h, nq, 3] int32: n_full, n_partial, first bitmap entry
    order: torch.Tensor  # [mask_b, mask_h, nq] int32: query blocks, heaviest first (or 0..nq-1)
    full_idx: torch.Tensor  # [mask_b, mask_h, nq, nk_full] int32
    part_idx: torch.Tensor  # [mask_b, mask_h, nq, nk_part] int32
    bits: torch.Tensor  # [bits_b, bits_h, entries, BQ, BK // 32] int32 (at least one entry)
    has_bits: bool  # False when mask_mod is the no-op mask: partial blocks need no bitmap
    mask_b: int
    mask_h: int


# BlockMask -> {(device, B, H, Sq, Skv, longest_first): _Tables}. Weak keys: tables die with the mask.
_TABLES: "weakref.WeakKeyDictionary[BlockMask, dict]" = weakref.WeakKeyDictionary()


def _broadcast_dim(name: str, size: int, want: int, what: str) -> int:
    if size not in (1, want):
        raise ValueError(f"block_mask.{name} has {what} size {size}; allowed: 1 (broadcast) or {want} (from q)")
    return size


def _pack_bits(ok: torch.Tensor) -> torch.Tensor:
    """[..., BK] bool -> [..., BK // 32] int32; bit j of word w is key w * 32 + j."""
    words = ok.reshape(*ok.shape[:-1], ok.shape[-1] // _WORD_BITS, _WORD_BITS).to(torch.int64)
    shifts = torch.arange(_WORD_BITS, device=ok.device, dtype=torch.int64)
    packed = (words << shifts).sum(-1)
    # Reinterpret as signed int32 (two's complement) for the kernel.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def _partial_bitmaps(mask_mod, part_num, part_idx, BQ, BK, B, H, Sq, Skv, device):
    """Evaluate ``mask_mod`` on every partial block once; returns (bits, first entry per row)."""
    mask_b, mask_h, nq = part_num.shape
    counts = part_num.to(torch.int64).flatten()
    first = (torch.cumsum(counts, 0) - counts).view(mask_b, mask_h, nq)
    n_entries = int(counts.sum().item())
    words = BK // _WORD_BITS
    if n_entries == 0:
        return torch.zeros(1, 1, 1, BQ, words, dtype=torch.int32, device=device), first

    # Entries in (b, h, q block, slot) row-major order, matching ``first``.
    slots = torch.arange(part_idx.shape[-1], device=device)
    bm, hm, qb, j = torch.nonzero(slots < part_num[..., None].to(torch.int64), as_tuple=True)
    kvb = part_idx[bm, hm, qb, j].to(torch.int64)

    # A mask list shared by all batches (heads) still gets per-batch (per-head) bits when
    # mask_mod reads b (h): FlexAttention evaluates mask_mod with the real indices.
    vary_b, vary_h = mask_mod_varies(mask_mod, B, H, device)
    bits_b = B if (mask_b == 1 and vary_b) else 1
    bits_h = H if (mask_h == 1 and vary_h) else 1
    bits = torch.empty(bits_b, bits_h, n_entries, BQ, words, dtype=torch.int32, device=device)

    rows = torch.arange(BQ, device=device)
    keys = torch.arange(BK, device=device)
    chunk = max(1, (32 * 2**20) // (bits_b * bits_h * BQ * BK))
    for e0 in range(0, n_entries, chunk):
        e1 = min(n_entries, e0 + chunk)
        n = e1 - e0
        # Index tensors broadcast as [b, h, entry, q, kv]; positions past the end are clamped
        # (the kernel masks them anyway) so lookup-table mask_mods never index out of range.
        if bits_b > 1:
            b_t = torch.arange(B, device=device).view(B, 1, 1, 1, 1)
        else:
            b_t = bm[e0:e1].view(1, 1, n, 1, 1)
        if bits_h > 1:
            h_t = torch.arange(H, device=device).view(1, H, 1, 1, 1)
        else:
            h_t = hm[e0:e1].view(1, 1, n, 1, 1)
        q_t = (qb[e0:e1, None] * BQ + rows).clamp(max=Sq - 1).view(1, 1, n, BQ, 1)
        kv_t = (kvb[e0:e1, None] * BK + keys).clamp(max=Skv - 1).view(1, 1, n, 1, BK)
        ok = torch.as_tensor(mask_mod(b_t, h_t, q_t, kv_t), device=device).to(torch.bool)
        ok = ok.expand(bits_b, bits_h, n, BQ, BK)
        bits[:, :, e0:e1] = _pack_bits(ok)
    return bits, first


def _kernel_tables(block_mask: BlockMask, B: int, H: int, Sq: int, Skv: int, device, longest_first: bool) -> _Tables:
    per_mask = _TABLES.get(block_mask)
    if per_mask is None:
        per_mask = {}
        _TABLES[block_mask] = per_mask
    key = (str(device), B, H, Sq, Skv, bool(longest_first))
    if key in per_mask:
        return per_mask[key]

    BQ, BK = block_sizes(block_mask)
    nq = -(-Sq // BQ)
    nk = -(-Skv // BK)

    part_num, part_idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    if full_num is None:  # no full blocks: an empty list per row
        full_num = torch.zeros_like(part_num)
        full_idx = torch.zeros_like(part_idx[..., :1])

    for name, t, rank in (("kv_num_blocks", part_num, 3), ("kv_indices", part_idx, 4),
                          ("full_kv_num_blocks", full_num, 3), ("full_kv_indices", full_idx, 4)):
        if t.dim() != rank:
            raise ValueError(f"block_mask.{name} must have rank {rank}; got shape {tuple(t.shape)}")
        _broadcast_dim(name, t.shape[0], B, "batch")
        _broadcast_dim(name, t.shape[1], H, "head")
        if t.shape[2] < nq:
            raise ValueError(
                f"block_mask.{name} covers {t.shape[2]} query blocks of {BQ} tokens but q has "
                f"{Sq} tokens ({nq} blocks); build the BlockMask for this sequence length"
            )
    for name, t in (("kv_indices", part_idx), ("full_kv_indices", full_idx)):
        if t.shape[3] > nk:
            raise ValueError(
                f"block_mask.{name} addresses {t.shape[3]} key blocks of {BK} tokens but k has {Skv} "
                f"tokens ({nk} blocks); build the BlockMask for this sequence length"
            )

    # One broadcast shape for every table, so the kernel needs a single row index.
    mask_b = max(part_num.shape[0], full_num.shape[0])
    mask_h = max(part_num.shape[1], full_num.shape[1])

    def prep(t):
        t = t[:, :, :nq].to(device=device, dtype=torch.int32)
        return t.expand(mask_b, mask_h, *t.shape[2:]).contiguous()

    part_num, part_idx, full_num, full_idx = prep(part_num), prep(part_idx), prep(full_num), prep(full_idx)

    has_bits = block_mask.mask_mod is not noop_mask
    if has_bits:
        # mask_mod runs where the BlockMask lives (its closures hold tensors there); bits move to
        # q's device. Counting the partial entries is one host sync, once per BlockMask.
        mask_device = block_mask.kv_num_blocks.device
        bits, first = _partial_bitmaps(
            block_mask.mask_mod, part_num.to(mask_device), part_idx.to(mask_device), BQ, BK, B, H, Sq, Skv,
            mask_device,
        )
        bits, first = bits.to(device), first.to(device)
    else:
        # No-op mask (e.g. dynamic selections): no bitmap, and no host synchronisation at all.
        bits = torch.zeros(1, 1, 1, BQ, BK // _WORD_BITS, dtype=torch.int32, device=device)
        first = torch.zeros_like(part_num)
    meta = torch.stack([full_num, part_num, first.to(torch.int32)], dim=-1).contiguous()

    # Longest rows first: the last wave of programs is then made of short rows, not long ones.
    if longest_first:
        work = full_num.to(torch.int64) + part_num.to(torch.int64)
        order = torch.argsort(work, dim=-1, descending=True, stable=True).to(torch.int32)
    else:
        order = torch.arange(nq, device=device, dtype=torch.int32).expand(mask_b, mask_h, nq)
    tables = _Tables(meta, order.contiguous(), full_idx, part_idx, bits, has_bits, mask_b, mask_h)
    per_mask[key] = tables
    return tables


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def validate_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """ValueError for inputs no attention can run on (any backend): ranks, batch/head/length mismatches."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D] (rank 4); got shape {tuple(t.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[0] != v.shape[0]:
        raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}; they must be equal")
    if q.shape[1] != k.shape[1] or q.shape[1] != v.shape[1]:
        raise ValueError(
            f"head counts differ: q {q.shape[1]}, k {k.shape[1]}, v {v.shape[1]}; they must be equal "
            "(grouped-query attention is not supported: repeat k/v heads first)"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v sequence lengths differ: k {k.shape[2]}, v {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k head dims differ: q {q.shape[3]}, k {k.shape[3]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}; they must be equal")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> str | None:
    """Why the Triton kernel cannot run this call (None when it can). Shapes must be valid already."""
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the Triton kernel supports float16, bfloat16, float32)"
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        return f"head dim {q.shape[-1]} (the Triton kernel supports {SUPPORTED_HEAD_DIMS})"
    if v.shape[-1] != q.shape[-1]:
        return f"v head dim {v.shape[-1]} != q head dim {q.shape[-1]} (the Triton kernel needs them equal)"
    if not isinstance(block_mask, BlockMask):
        return f"block_mask of type {type(block_mask).__name__} (the Triton kernel needs a FlexAttention BlockMask)"
    bq, bk = block_sizes(block_mask)
    if bq not in SUPPORTED_BLOCK_SIZES or bk not in SUPPORTED_BLOCK_SIZES:
        return f"BlockMask BLOCK_SIZE {(bq, bk)} (the Triton kernel supports {SUPPORTED_BLOCK_SIZES})"
    if not q.is_cuda and not interpreting():
        return f"device {q.device} (the Triton kernel needs CUDA, or TRITON_INTERPRET=1 on CPU)"
    return None


def _check_tile(name: str, value, block: int, what: str) -> int:
    value = int(value)
    if value < 16 or value & (value - 1) or block % value:
        raise ValueError(
            f"{name}={value} is not allowed: it must be a power of two >= 16 dividing the BlockMask's "
            f"{what} block size {block}"
        )
    return value


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: BlockMask,
    scale: float | None = None,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    longest_first: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse attention of q, k, v ([B, H, S, D], any strides) on a FlexAttention ``BlockMask``.

    Returns [B, H, Sq, D] in q's dtype. The result's memory follows q's: a [B, S, H, D] buffer
    viewed as [B, H, S, D] when q is such a view, contiguous [B, H, S, D] otherwise; or ``out``
    when given (any strides, written in place).

    On CUDA the tile sizes of fp16/bf16 calls are autotuned per head dim and block size unless any
    of ``block_m``, ``block_n``, ``num_warps``, ``num_stages`` is given. ``block_m`` must divide the BlockMask's
    query block size, ``block_n`` its key block size. ``longest_first`` launches the query blocks
    with the most key blocks first (better tail balance).
    """
    validate_shapes(q, k, v)
    reason = unsupported_reason(q, k, v, block_mask)
    if reason is not None:
        raise ValueError(f"triton_block_sparse_attention cannot run on {reason}")
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    BQ, BK = block_sizes(block_mask)
    if scale is None:
        scale = D**-0.5
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale={scale} is not allowed: it must be a finite float")

    if out is None:
        if q.stride(1) < q.stride(2):  # q is a [B, S, H, D] buffer seen as [B, H, S, D]
            out = torch.empty(B, Sq, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
        else:
            out = torch.empty(B, H, Sq, D, dtype=q.dtype, device=q.device)
    elif out.shape != (B, H, Sq, D) or out.dtype != q.dtype or out.device != q.device:
        raise ValueError(
            f"out must be a {q.dtype} tensor of shape {(B, H, Sq, D)} on {q.device}; "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if B * H * Sq == 0 or D == 0:
        return out
    if Skv == 0:
        return out.zero_()

    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} is not allowed: the kernel's grid holds at most 65535 (batch, head) pairs")

    interpret = interpreting()
    tables = _kernel_tables(block_mask, B, H, Sq, Skv, q.device, longest_first)

    # The interpreter's tl.dot is wrong on bf16 operands: compute in fp32 there (still exact bf16 I/O).
    if interpret and q.dtype == torch.bfloat16:
        q32, k32, v32 = q.float(), k.float(), v.float()
        o32 = torch.empty(B, H, Sq, D, dtype=torch.float32, device=q.device)
        triton_block_sparse_attention(
            q32, k32, v32, block_mask, scale, block_m=block_m, block_n=block_n, num_warps=num_warps,
            num_stages=num_stages, longest_first=longest_first, out=o32,
        )
        out.copy_(o32)
        return out

    nq = -(-Sq // BQ)
    head_dim_pad = triton.next_power_of_2(D)
    args = (
        q, k, v, out,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        tables.meta, tables.order, tables.full_idx, tables.part_idx, tables.bits,
        tables.mask_b, tables.mask_h, tables.meta.shape[2], tables.full_idx.shape[3], tables.part_idx.shape[3],
        tables.bits.stride(0) if tables.bits.shape[0] > 1 else 0,
        tables.bits.stride(1) if tables.bits.shape[1] > 1 else 0,
        H, Sq, Skv, scale * math.log2(math.e),
    )
    consts = dict(
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BQ=BQ, BK=BK, EVEN_KV=(Skv % BK == 0), HAS_BITS=tables.has_bits,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )

    fp32 = q.dtype == torch.float32
    explicit = interpret or fp32 or any(x is not None for x in (block_m, block_n, num_warps, num_stages))
    if explicit:
        # Defaults. Interpreter: the largest tiles run fastest (fewer Python-level programs).
        # CUDA fp32 (exact "ieee" dots, a checking aid): small tiles, one stage, to fit shared memory.
        if interpret:
            bm, bn, warps, stages = BQ, BK, 4, 1
        elif fp32:
            bm, bn, warps, stages = 64, 32, 4, 1
        else:
            bm, bn, warps, stages = min(BQ, 128), 64, (4 if head_dim_pad <= 64 else 8), 2
        bm = _check_tile("block_m", block_m if block_m is not None else bm, BQ, "query")
        bn = _check_tile("block_n", block_n if block_n is not None else bn, BK, "key")
        warps = int(num_warps) if num_warps is not None else warps
        stages = int(num_stages) if num_stages is not None else stages
        grid = (nq * (BQ // bm), B * H)
        launchable(_block_sparse_attn_fwd, interpret)[grid](
            *args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    else:
        grid = lambda meta: (nq * (BQ // meta["BLOCK_M"]), B * H)  # noqa: E731
        _autotuned(head_dim_pad)[grid](*args, **consts)
    return out


__all__ = [
    "SUPPORTED_BLOCK_SIZES", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "interpreting", "launchable",
    "triton_block_sparse_attention", "unsupported_reason", "validate_shapes",
]
