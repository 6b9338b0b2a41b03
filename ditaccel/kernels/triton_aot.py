"""Compile the attention kernel ahead of time for a GPU target with no GPU present, specialised exactly
as the JIT would specialise a real launch, and report the compiler's resource figures.

A launch specialises on its argument *values*: integer arguments equal to 1 become constants, ints
and pointers divisible by 16 are marked aligned, and that changes the code (vectorised loads,
pipelining) and its shared memory. Compiling an unspecialised signature therefore reports the wrong
figures. Here the argument values go through Triton's own binder (``create_function_from_signature``,
what ``JITFunction.run`` uses), then ``triton.compile`` runs for the target with Triton's bundled
ptxas, whose ``-v`` log gives registers and spills. Used by ``tests/test_triton_aot.py`` and the GPU
check; it needs triton's private compiler API (tested against triton 3.9).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import time

import torch


def compile_like_jit(kernel, args: list, kwargs: dict, capability: int = 90) -> dict:
    """``triton.compile`` of ``kernel`` for ``sm_<capability>`` with the JIT's specialisation of
    ``args``/``kwargs``; returns shared bytes, registers, spill bytes, compile seconds."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from .triton_attention import _compiled, _python_fn

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    fn = _compiled(_python_fn(kernel))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    # ptxas -v output on stdout (registers and spills), and no cache hit: a cached kernel has no log.
    env = {"TRITON_DUMP_PTXAS_LOG": "1", "TRITON_ALWAYS_COMPILE": "1"}
    previous = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(
        shared=int(compiled.metadata.shared),
        regs=int(regs.group(1)) if regs else None,
        spill_stores=int(spills.group(1)) if spills else None,
        spill_loads=int(spills.group(2)) if spills else None,
        compile_s=round(time.perf_counter() - t0, 1),
    )


def attention_launch(dtype: torch.dtype, B: int, H: int, S: int, D: int, BQ: int, BK: int, *, tiles,
                     has_bits: bool, key_valid: bool = False, return_lse: bool = False, fp32_tf32: bool = False):
    """(args, kwargs) the launcher passes for q, k, v = a [B, S, H, D] buffer viewed as [B, H, S, D]
    (the runtime's layout), ``S`` queries and keys, BlockMask lists broadcast over batch and heads.

    Pointers are small stand-ins (only their dtype and 16-byte alignment matter to the binder); the
    integers are the real ones, so the specialisation is the launch's."""
    from .triton_attention import _block_sparse_attn_fwd  # noqa: F401  (argument order lives there)

    block_m, block_n, warps, stages = tiles
    ptr = lambda dt: torch.empty(64, dtype=dt)  # noqa: E731
    bshd = (S * H * D, D, H * D, 1)
    nq, nk = -(-S // BQ), -(-S // BK)
    lse_strides = (H * S, S) if return_lse else (0, 0)
    valid_strides = (S, 0) if key_valid else (0, 0)
    args = [
        ptr(dtype), ptr(dtype), ptr(dtype), ptr(dtype), ptr(torch.float32), ptr(torch.int8),
        *bshd, *bshd, *bshd, *bshd, *lse_strides, *valid_strides,
        ptr(torch.int32), ptr(torch.int32), ptr(torch.int32), ptr(torch.int32), ptr(torch.int64),
        1, 1, nq, nk, nk, 0, 0,
        H, S, S, D**-0.5 * math.log2(math.e),
    ]
    kwargs = dict(
        HEAD_DIM=D, HEAD_DIM_PAD=1 << (D - 1).bit_length(), BQ=BQ, BK=BK, BLOCK_M=block_m, BLOCK_N=block_n,
        EVEN_KV=S % BK == 0, HAS_BITS=has_bits, HAS_KEY_VALID=key_valid, RETURN_LSE=return_lse,
        DOT_PRECISION="tf32", num_warps=warps, num_stages=stages,
    )
    return args, kwargs


__all__ = ["attention_launch", "compile_like_jit"]
