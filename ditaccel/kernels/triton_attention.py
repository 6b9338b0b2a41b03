"""Forward block-sparse attention in Triton, driven by a FlexAttention ``BlockMask``.

Semantics are those of ``flex_attention`` (and of ``reference.block_sparse_attention_reference``):

- ``full_kv_num_blocks / full_kv_indices`` list, per (batch, head, query block), the key blocks
  attended with no mask: the kernel runs them without any mask code;
- ``kv_num_blocks / kv_indices`` list the *partial* key blocks, where ``mask_mod(b, h, q, kv)``
  decides token by token. ``triton_tables`` evaluates ``mask_mod`` once per BlockMask on the partial
  blocks only and packs the verdicts into one int64 word per query row and 64 keys;
- ``key_valid`` (optional, [B, Skv] or [B, H|1, Skv] bool) removes keys from every block, full or
  partial: key-only conditions (padding slots, padded text keys) cost one int8 load per key sub-block
  instead of a per-pair bitmap;
- a query row with no allowed key returns zeros, never NaN; with ``return_lse=True`` its LSE is -inf.

The kernel reads like Triton's fused-attention tutorial: one program owns ``BLOCK_M`` query rows of
one (batch, head), keeps them in registers, and streams the key blocks its BlockMask row lists in
one flat loop over ``BLOCK_N``-key sub-blocks (a ``BK`` block is ``BK // BLOCK_N`` iterations, as in
FlexAttention; the software pipeline then holds one sub-block per stage), first the full blocks,
then the partial ones. The online softmax keeps its running max on raw scores and spends one FMA
per score (softmax scale and log2(e) folded into one multiplier, then exp2), accumulating in fp32.

q, k, v are [B, H, S, D] with any strides (a [B, S, H, D] tensor's ``.transpose(1, 2)`` view works
without a copy); fp16 or bf16 (fp32: see below); head dim 64, 96 or 128 (96 runs in a 128-wide
tile with masked loads). ``BLOCK_M`` divides the BlockMask's query block size, ``BLOCK_N`` its key
block size.

fp32 inputs: on CUDA they warn once and run with **tf32** dot products (fp32 loads and
accumulation, ~1e-3 relative error) in one fixed small config; pass fp16/bf16 for the autotuned
fast path, or use ``backend="reference"`` for exact fp32. Under ``TRITON_INTERPRET=1`` (CPU) fp32
runs exact ("ieee") dots, and bf16 is computed in fp32 (the interpreter's ``tl.dot`` is wrong on
bf16 operands).
"""

from __future__ import annotations

import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch.nn.attention.flex_attention import BlockMask

from . import triton_configs
from .reference import block_sizes, normalize_key_valid
from .triton_tables import TABLES as _TABLES  # noqa: F401  (tests inspect the cache)
from .triton_tables import kernel_tables
from .triton_tables import kernel_tables as _kernel_tables  # noqa: F401  (older name)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (64, 96, 128)
SUPPORTED_BLOCK_SIZES = (64, 128)

# Kernels here use only Triton builtins plus ``tl.reduce`` with triton.language's own combine
# functions. ``tl.max`` / ``tl.sum`` / ``tl.zeros`` are themselves ``@triton.jit`` functions, built
# compiled or interpreted depending on TRITON_INTERPRET *when triton was imported*; avoiding them
# lets ``launchable`` switch a kernel to the interpreter at launch time (tests, CPU), and the
# interpreter runs these two reductions in numpy.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# The kernel
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out, Lse, KeyValid,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lse_b, stride_lse_h, stride_valid_b, stride_valid_h,
    Meta, Order, FullIdx, PartIdx, Bits,
    MASK_B, MASK_H, NQ, NK_FULL, NK_PART,
    stride_bits_b, stride_bits_h,
    H, Sq, Skv, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BQ: tl.constexpr, BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    EVEN_KV: tl.constexpr, HAS_BITS: tl.constexpr, HAS_KEY_VALID: tl.constexpr, RETURN_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Grid axis 0 walks query tiles in the launcher's order (longest rows first), axis 1 is (b, h).
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    # BlockMask tensors may broadcast over batch and heads: pick the row that describes (b, h).
    mask_row = (b % MASK_B) * MASK_H + (h % MASK_H)
    SUB_M: tl.constexpr = BQ // BLOCK_M
    SUBS: tl.constexpr = BK // BLOCK_N  # loop iterations per key block
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
    valid_base = KeyValid + b64 * stride_valid_b + h64 * stride_valid_h

    offs_m = q_block * BQ + row0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_ok = offs_d < HEAD_DIM  # head dim 96 runs in a 128-wide tile
    lane = tl.arange(0, BLOCK_N)

    # The query tile stays in registers for the whole key loop; rows past Sq load zeros.
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Sq) & d_ok[None, :], other=0.0)

    # Online-softmax state in the log2 domain: running max (of scaled scores), denominator, accumulator.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, dtype=tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM_PAD], 0.0, dtype=tl.float32)

    # Bitmap rows of this program: entry e, row r, word w sits at ((e * BQ) + r) * WORDS + w.
    WORDS: tl.constexpr = (BK + 63) // 64
    bits_base = Bits + b64 * stride_bits_b + h64 * stride_bits_h + (row0 + tl.arange(0, BLOCK_M)) * WORDS

    # Two passes, unrolled at compile time: full blocks (no pattern mask), then partial blocks.
    for PARTIAL in tl.static_range(2):
        if PARTIAL == 0:
            n_blocks = n_full
            idx_row = FullIdx + (mask_row * NQ + q_block) * NK_FULL
        else:
            n_blocks = n_part
            idx_row = PartIdx + (mask_row * NQ + q_block) * NK_PART
        # One flat loop over sub-blocks: iteration t is sub-block t % SUBS of listed block t // SUBS.
        for t in range(0, n_blocks * SUBS):
            j = t // SUBS
            col0 = (t % SUBS) * BLOCK_N  # first key of this sub-block inside its block
            kv_block = tl.load(idx_row + j)
            offs_n = kv_block * BK + col0 + lane
            kv_ok = offs_n < Skv

            # K^T tile [HEAD_DIM_PAD, BLOCK_N]; keys past Skv load zeros. Raw scores, no scaling yet.
            k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                        mask=kv_ok[None, :] & d_ok[:, None], other=0.0)
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)

            # Key-only conditions: per-key validity (one int8 per key), else the ragged tail only.
            if HAS_KEY_VALID:
                valid = tl.load(valid_base + offs_n, mask=kv_ok, other=0) != 0
                qk = tl.where(valid[None, :], qk, float("-inf"))
            elif not EVEN_KV:
                if (kv_block + 1) * BK > Skv:
                    qk = tl.where(kv_ok[None, :], qk, float("-inf"))

            # Partial blocks with a pattern mask: one word of bits per query row for these keys.
            if PARTIAL == 1 and HAS_BITS:
                word_ptr = bits_base + (part_entry0 + j).to(tl.int64) * (BQ * WORDS) + col0 // 64
                word = tl.load(word_ptr)[:, None]
                if BLOCK_N > 64:  # a 128-key sub-block spans two words: lanes 64.. read the second
                    word = tl.where((lane // 64)[None, :] == 1, tl.load(word_ptr + 1)[:, None], word)
                shift = ((col0 % 64 + lane) % 64).to(tl.int64)
                qk = tl.where(((word >> shift[None, :]) & 1) != 0, qk, float("-inf"))

            # Running max on raw scores (scale > 0 keeps the argmax); a row that has seen only
            # masked keys keeps -inf, so shift by 0 instead (exp2(-inf - 0) = 0, never -inf - -inf).
            m_new = tl.maximum(m_i, tl.reduce(qk, 1, _MAX) * qk_scale)
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            # One explicit FMA per score (not left to the compiler's fp-fusion default).
            p = tl.math.exp2(tl.math.fma(qk, qk_scale, -m_shift[:, None]))
            alpha = tl.math.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.reduce(p, 1, _SUM)

            # V tile [BLOCK_N, HEAD_DIM_PAD]; rescale the accumulator and add p @ V.
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=kv_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
            m_i = m_new

    # Normalise; rows with no allowed key have l_i == 0 and acc == 0, and return zeros.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    row_ok = offs_m < Sq
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])

    # Natural-log LSE of the scaled scores (as flex_attention returns it); -inf for rows that saw nothing.
    if RETURN_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
        tl.store(Lse + b64 * stride_lse_b + h64 * stride_lse_h + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Compiled vs interpreted kernels
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


def _autotuned(head_dim_pad: int):
    """The kernel autotuned over ``triton_configs``' sets for this padded head dim (CUDA only)."""
    return triton_configs.autotuned(_compiled(_python_fn(_block_sparse_attn_fwd)), head_dim_pad)


_prune_configs = triton_configs.prune_configs


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


_fp32_warned = False


def _warn_fp32_once() -> None:
    global _fp32_warned
    if not _fp32_warned:
        _fp32_warned = True
        warnings.warn(
            "ditaccel: float32 inputs on CUDA run the Triton kernel with tf32 dot products (fp32 loads and "
            "accumulation, ~1e-3 relative error) in one fixed config; pass float16/bfloat16 for the autotuned "
            "fast path, or backend='reference' for exact float32",
            stacklevel=3,
        )


@functools.lru_cache(maxsize=None)
def _placeholder(device: str, dtype: torch.dtype) -> torch.Tensor:
    # Stands for Lse / KeyValid when the kernel is compiled without them (never read or written).
    return torch.zeros(16, dtype=dtype, device=device)


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
    key_valid: torch.Tensor | None = None,
    return_lse: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    longest_first: bool = True,
    out: torch.Tensor | None = None,
):
    """Block-sparse attention of q, k, v ([B, H, S, D], any strides) on a FlexAttention ``BlockMask``.

    Returns [B, H, Sq, D] in q's dtype, or ``(out, lse)`` with ``return_lse=True`` (``lse``: [B, H, Sq]
    float32, natural log of the sum of exp(scaled scores) over the allowed keys; -inf for rows that
    see no key). The output's memory follows q's: a [B, S, H, D] buffer viewed as [B, H, S, D] when q
    is such a view, contiguous [B, H, S, D] otherwise; or ``out`` when given (written in place).

    ``key_valid``: optional [B, Skv] or [B, H|1, Skv] bool; keys where it is False are never attended.

    On CUDA the tile sizes of fp16/bf16 calls are autotuned over the device generation's config set
    (``triton_configs``) unless any of ``block_m``, ``block_n``, ``num_warps``, ``num_stages`` is given.
    ``block_m`` must divide the BlockMask's query block size, ``block_n`` its key block size.
    ``longest_first`` launches the query blocks with the most key blocks first (better tail balance).
    """
    validate_shapes(q, k, v)
    reason = unsupported_reason(q, k, v, block_mask)
    if reason is not None:
        raise ValueError(f"triton_block_sparse_attention cannot run on {reason}")
    B, H, Sq, D = q.shape
    Skv = k.shape[2]
    BQ, BK = block_sizes(block_mask)
    scale = D**-0.5 if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale} is not allowed: it must be a positive finite float")
    valid = normalize_key_valid(key_valid, B, H, Skv, q.device)

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
    if B * H > 65535:
        raise ValueError(f"B * H = {B * H} is not allowed: the kernel's grid holds at most 65535 (batch, head) pairs")
    lse = torch.empty(B, H, Sq, dtype=torch.float32, device=q.device) if return_lse else None
    result = (out, lse) if return_lse else out
    if B * H * Sq == 0 or D == 0:
        return result
    if Skv == 0:
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return result

    interpret = interpreting()
    tables = kernel_tables(block_mask, B, H, Sq, Skv, q.device, longest_first)

    # The interpreter's tl.dot is wrong on bf16 operands: compute in fp32 there (still exact bf16 I/O).
    if interpret and q.dtype == torch.bfloat16:
        o32 = torch.empty(B, H, Sq, D, dtype=torch.float32, device=q.device)
        res32 = triton_block_sparse_attention(
            q.float(), k.float(), v.float(), block_mask, scale, key_valid=valid, return_lse=return_lse,
            block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
            longest_first=longest_first, out=o32,
        )
        out.copy_(o32)
        if lse is not None:
            lse.copy_(res32[1])
        return result

    fp32 = q.dtype == torch.float32
    if fp32 and not interpret:
        _warn_fp32_once()
    valid_t = valid.to(torch.int8) if valid is not None else _placeholder(str(q.device), torch.int8)
    lse_t = lse if lse is not None else _placeholder(str(q.device), torch.float32)
    nq = -(-Sq // BQ)
    head_dim_pad = triton.next_power_of_2(D)
    args = (
        q, k, v, out, lse_t, valid_t,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        valid_t.stride(0) if valid is not None and valid.shape[0] > 1 else 0,
        valid_t.stride(1) if valid is not None and valid.shape[1] > 1 else 0,
        tables.meta, tables.order, tables.full_idx, tables.part_idx, tables.bits,
        tables.mask_b, tables.mask_h, tables.meta.shape[2], tables.full_idx.shape[3], tables.part_idx.shape[3],
        tables.bits.stride(0) if tables.bits.shape[0] > 1 else 0,
        tables.bits.stride(1) if tables.bits.shape[1] > 1 else 0,
        H, Sq, Skv, scale * math.log2(math.e),
    )
    consts = dict(
        HEAD_DIM=D, HEAD_DIM_PAD=head_dim_pad, BQ=BQ, BK=BK, EVEN_KV=(Skv % BK == 0), HAS_BITS=tables.has_bits,
        HAS_KEY_VALID=valid is not None, RETURN_LSE=return_lse,
        DOT_PRECISION="ieee" if (fp32 and interpret) else "tf32",
    )

    explicit = interpret or fp32 or any(x is not None for x in (block_m, block_n, num_warps, num_stages))
    if explicit:
        # Defaults. Interpreter: the largest tiles run fastest (fewer Python-level programs).
        # CUDA fp32: one small tf32 config (fp32 tiles take twice the shared memory).
        # CUDA fp16/bf16 with some tile sizes fixed: the generation's default config fills the rest.
        if interpret:
            bm, bn, warps, stages = BQ, BK, 4, 1
        elif fp32:
            bm, bn, warps, stages = triton_configs.FP32_CONFIG
        else:
            cap = torch.cuda.get_device_capability(q.device)
            bm, bn, warps, stages = triton_configs.default_config(cap, head_dim_pad)
            bm, bn = min(bm, BQ), min(bn, BK)
        bm = _check_tile("block_m", block_m if block_m is not None else bm, BQ, "query")
        bn = _check_tile("block_n", block_n if block_n is not None else bn, BK, "key")
        if bn > 128:
            raise ValueError(f"block_n={bn} is not allowed: at most 128 (a bitmap row is read as <= 2 words)")
        warps = int(num_warps) if num_warps is not None else warps
        stages = int(num_stages) if num_stages is not None else stages
        grid = (nq * (BQ // bm), B * H)
        launchable(_block_sparse_attn_fwd, interpret)[grid](
            *args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages
        )
    else:
        grid = lambda meta: (nq * (BQ // meta["BLOCK_M"]), B * H)  # noqa: E731
        _autotuned(head_dim_pad)[grid](*args, **consts)
    return result


__all__ = [
    "SUPPORTED_BLOCK_SIZES", "SUPPORTED_DTYPES", "SUPPORTED_HEAD_DIMS", "interpreting", "launchable",
    "triton_block_sparse_attention", "unsupported_reason", "validate_shapes",
]
