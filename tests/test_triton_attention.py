"""The Triton block-sparse attention kernel against a float64 dense-masked attention.

Without a GPU the kernel runs in Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set per
test with monkeypatch; the kernel module picks interpreted vs compiled at launch, so it does not
matter when triton was imported). With a GPU the same tests run on CUDA, plus the ``gpu`` ones.

The property test draws seeded random cases from ``block_mask_cases.py`` (shapes, head dims, block
sizes, ragged lengths, text spans, broadcast or per-(b, h) lists, full/partial/empty patterns,
mask_mod families, input layouts, fp16 and fp32).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import warnings

import pytest
import torch
from block_mask_cases import (
    DEVICE,
    check_output,
    dense_reference,
    dense_token_mask,
    random_case,
)
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ditaccel.kernels import dispatch
from ditaccel.kernels.reference import block_sparse_attention_reference
from ditaccel.kernels.triton_attention import _TABLES, triton_block_sparse_attention

N_CASES = 208
N_CHUNKS = 8


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    """CPU: run Triton kernels in the interpreter (only for this test)."""
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", range(N_CHUNKS))
def test_random_cases_match_dense_float64(chunk):
    """>= 200 seeded random cases (N_CASES over N_CHUNKS tests); output poisoned with NaN first."""
    per = N_CASES // N_CHUNKS
    for i in range(chunk * per, (chunk + 1) * per):
        q, k, v, block_mask, allowed, tiles, desc = random_case(1000 + i)
        B, H, Sq, D = q.shape
        out = torch.full((B, H, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
        result = triton_block_sparse_attention(q, k, v, block_mask, out=out, **tiles)
        assert result is out
        check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, desc)


def test_case_generator_covers_the_space():
    """The property test is only as good as its cases: check they span what the kernel must handle."""
    seen = {"ragged_q": 0, "even_kv": 0, "bshd": 0, "partial_empty_rows": 0, "sub_rows": 0, "sub_cols": 0,
            "d96": 0, "nonsquare_bs": 0, "broadcast": 0, "per_head": 0, "fp16": 0, "fp32": 0}
    for i in range(N_CASES):
        q, k, v, bm, allowed, tiles, desc = random_case(1000 + i, device="cpu")
        BQ, BK = bm.BLOCK_SIZE
        seen["ragged_q"] += q.shape[2] % BQ != 0
        seen["even_kv"] += k.shape[2] % BK == 0
        seen["bshd"] += q.stride(1) < q.stride(2)
        seen["partial_empty_rows"] += bool((~allowed.any(-1)).any())
        seen["sub_rows"] += tiles["block_m"] < BQ
        seen["sub_cols"] += tiles["block_n"] < BK
        seen["d96"] += q.shape[3] == 96
        seen["nonsquare_bs"] += BQ != BK
        seen["broadcast"] += bm.kv_num_blocks.shape[1] == 1 and q.shape[1] > 1
        seen["per_head"] += bm.kv_num_blocks.shape[1] > 1
        seen["fp16"] += q.dtype == torch.float16
        seen["fp32"] += q.dtype == torch.float32
    missing = [name for name, n in seen.items() if n == 0]
    assert not missing, f"the random cases never exercise: {missing} ({seen})"


def test_transposed_bshd_view_needs_no_copy_and_output_follows_layout():
    torch.manual_seed(0)
    B, S, H, D = 2, 150, 3, 64
    qs, ks, vs = (torch.randn(B, S, H, D, dtype=torch.float16, device=DEVICE) for _ in range(3))
    q, k, v = qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2)
    assert not q.is_contiguous()

    def mask_mod(b, h, qi, ki):
        return (qi - ki).abs() < 50

    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(mask_mod, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=64)
    out = triton_block_sparse_attention(q, k, v, bm)
    # The result is a [B, S, H, D] buffer seen as [B, H, S, D], like q.
    assert out.shape == (B, H, S, D)
    assert out.transpose(1, 2).is_contiguous()
    allowed = dense_token_mask(mask_mod, B, H, S, S, DEVICE)
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, "bshd view")
    # Same numbers as from contiguous copies.
    out_c = triton_block_sparse_attention(q.contiguous(), k.contiguous(), v.contiguous(), bm)
    torch.testing.assert_close(out, out_c, rtol=0, atol=0)


def test_rows_with_no_allowed_key_are_zero_not_nan():
    torch.manual_seed(1)
    B, H, S, D = 1, 2, 200, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float16, device=DEVICE) for _ in range(3))
    nq = -(-S // 64)
    # Query block 0: one partial block whose mask allows nothing for rows < 40; block 1: no
    # blocks at all; blocks 2-3: one full block.
    part_num = torch.tensor([[[1, 0, 0, 0]]], dtype=torch.int32)
    part_idx = torch.zeros(1, 1, nq, nq, dtype=torch.int32)
    full_num = torch.tensor([[[0, 0, 1, 1]]], dtype=torch.int32)
    full_idx = torch.zeros(1, 1, nq, nq, dtype=torch.int32)
    full_idx[0, 0, 2, 0] = 3
    full_idx[0, 0, 3, 0] = 1

    def mask_mod(b, h, qi, ki):
        return qi >= 40

    bm = BlockMask.from_kv_blocks(part_num.to(DEVICE), part_idx.to(DEVICE), full_num.to(DEVICE),
                                  full_idx.to(DEVICE), BLOCK_SIZE=64, mask_mod=mask_mod, seq_lengths=(S, S))
    out = torch.full_like(q, float("nan"))
    triton_block_sparse_attention(q, k, v, bm, out=out)
    assert not torch.isnan(out).any()
    assert (out[:, :, :40] == 0).all() and (out[:, :, 64:128] == 0).all()
    assert (out[:, :, 40:64] != 0).any() and (out[:, :, 128:] != 0).any()
    ref = block_sparse_attention_reference(q.double(), k.double(), v.double(), bm)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


def test_mask_mod_reading_batch_and_head_with_broadcast_lists():
    """A [1, 1] BlockMask whose mask_mod reads b and h (key padding per batch, window per head)."""
    torch.manual_seed(2)
    B, H, S, D = 2, 3, 140, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float32, device=DEVICE) for _ in range(3))
    lens = torch.tensor([90, 140], device=DEVICE)
    widths = torch.tensor([5, 30, 200], device=DEVICE)

    def mask_mod(b, h, qi, ki):
        return (ki < lens[b]) & ((qi - ki).abs() <= widths[h])

    nq = -(-S // 64)
    part_num = torch.full((1, 1, nq), nq, dtype=torch.int32)
    part_idx = torch.arange(nq, dtype=torch.int32).expand(1, 1, nq, nq).contiguous()
    bm = BlockMask.from_kv_blocks(part_num.to(DEVICE), part_idx.to(DEVICE), BLOCK_SIZE=64, mask_mod=mask_mod,
                                  seq_lengths=(S, S))
    out = triton_block_sparse_attention(q, k, v, bm)
    allowed = dense_token_mask(mask_mod, B, H, S, S, DEVICE)
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, "b/h-dependent mask_mod")


def test_tables_are_cached_per_block_mask():
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 1, 100, 64, dtype=torch.float16, device=DEVICE) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    calls = []

    def mask_mod(b, h, qi, ki):
        calls.append(1)
        return qi >= ki

    bm = create_block_mask(mask_mod, 1, 1, 100, 100, device=DEVICE, BLOCK_SIZE=64)
    calls.clear()
    first = triton_block_sparse_attention(q, k, v, bm)
    n_calls = len(calls)
    assert n_calls > 0  # evaluated once (plus a shape probe)
    second = triton_block_sparse_attention(q, k, v, bm)
    assert len(calls) == n_calls, "mask_mod was evaluated again for the same BlockMask"
    assert len(_TABLES[bm]) == 1
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_explicit_scale_and_longest_first_off_agree():
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 190, 96, dtype=torch.float32, device=DEVICE) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return (qi // 7 + ki // 5) % 3 != 0

    bm = create_block_mask(mask_mod, 1, 1, 190, 190, device=DEVICE, BLOCK_SIZE=(128, 64))
    a = triton_block_sparse_attention(q, k, v, bm, 0.3, longest_first=True)
    b = triton_block_sparse_attention(q, k, v, bm, 0.3, longest_first=False, block_m=64, block_n=32)
    allowed = dense_token_mask(mask_mod, 1, 2, 190, 190, DEVICE)
    ref = dense_reference(q, k, v, allowed, scale=0.3)
    check_output(a, ref, allowed, q.dtype, "scale 0.3")
    check_output(b, ref, allowed, q.dtype, "scale 0.3, no reordering, sub-tiles")


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_agrees_with_flex_attention(seed):
    """Same BlockMask through torch's FlexAttention (eager) and through our kernel."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    B, H, D = 1, 2, rng.choice([64, 128])
    S = rng.choice([128, 192, 256])
    bs = rng.choice([64, 128])
    window = rng.randint(10, 100)
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() <= window) | (ki < 16)

    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float32, device=DEVICE) for _ in range(3))
    bm = create_block_mask(mask_mod, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = flex_attention(q, k, v, block_mask=bm)
    out = triton_block_sparse_attention(q, k, v, bm)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# --- validation ---------------------------------------------------------------------------------


def _small(dtype=torch.float16, D=64, S=70, B=1, H=2):
    return tuple(torch.randn(B, H, S, D, dtype=dtype, device=DEVICE) for _ in range(3))


def _mask(S=70, bs=64, B=1, H=1):
    n = -(-S // bs)
    num = torch.full((B, H, n), n, dtype=torch.int32, device=DEVICE)
    idx = torch.arange(n, dtype=torch.int32, device=DEVICE).expand(B, H, n, n).contiguous()
    return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, seq_lengths=(S, S))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: (_small()[0][0],) + _small()[1:] + (_mask(),), r"q must be \[B, H, S, D\] \(rank 4\)"),
        (lambda: _small(dtype=torch.float64) + (_mask(),), r"dtype torch.float64"),
        (lambda: _small(D=80) + (_mask(),), r"head dim 80"),
        (lambda: _small(D=256) + (_mask(),), r"head dim 256"),
        (lambda: _small() + (_mask(bs=32),), r"BLOCK_SIZE \(32, 32\)"),
        (lambda: (_small(B=1)[0], _small(B=2)[1], _small(B=2)[2], _mask()), r"batch sizes differ: q 1, k 2"),
        (lambda: (_small(H=1)[0],) + _small(H=2)[1:] + (_mask(),), r"head counts differ: q 1, k 2"),
        (lambda: (_small()[0], _small()[1].half(), _small(dtype=torch.float32)[2], _mask()), r"dtypes differ"),
        (lambda: _small() + (_mask(B=3),), r"block_mask.kv_num_blocks has batch size 3"),
        (lambda: _small(S=200) + (_mask(S=70),), r"covers 2 query blocks .* q has 200 tokens"),
        (lambda: _small(S=70) + (_mask(S=200),), r"addresses 4 key blocks .* k has 70 tokens"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(make, match):
    q, k, v, bm = make()
    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(q, k, v, bm)


@pytest.mark.parametrize("kw, match", [
    (dict(block_m=48), r"block_m=48 is not allowed"),
    (dict(block_m=128), r"block_m=128 is not allowed: .* query block size 64"),
    (dict(block_n=8), r"block_n=8 is not allowed"),
])
def test_bad_tile_sizes_raise(kw, match):
    q, k, v = _small()
    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(q, k, v, _mask(), **kw)


def test_bad_out_raises():
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"out must be a torch.float16 tensor of shape \(1, 2, 70, 64\)"):
        triton_block_sparse_attention(q, k, v, _mask(), out=torch.empty(1, 2, 70, 32, dtype=torch.float16))


# --- dispatch -----------------------------------------------------------------------------------


def test_dispatch_uses_triton_under_interpreter_and_falls_back_with_one_warning(monkeypatch):
    q, k, v = _small(dtype=torch.float32)
    bm = _mask()
    ref = block_sparse_attention_reference(q, k, v, bm)
    monkeypatch.setattr(dispatch, "_warned", set())
    # Covered: Triton, no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = dispatch.block_sparse_attention(q, k, v, bm)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # Not covered (head dim 256): reference, with a warning naming the reason, once.
    q2, k2, v2 = _small(dtype=torch.float32, D=256)
    with pytest.warns(UserWarning, match=r"head dim 256"):
        got = dispatch.block_sparse_attention(q2, k2, v2, bm)
    torch.testing.assert_close(got, block_sparse_attention_reference(q2, k2, v2, bm))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.block_sparse_attention(q2, k2, v2, bm)  # same reason: no second warning
    # Invalid input: ValueError, not a fallback.
    with pytest.raises(ValueError, match=r"head counts differ"):
        dispatch.block_sparse_attention(q[:, :1], k, v, bm)


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU fallback without the interpreter")
def test_dispatch_on_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_warned", set())
    q, k, v = _small(dtype=torch.float16)
    bm = _mask()
    with pytest.warns(UserWarning, match=r"device cpu .*TRITON_INTERPRET=1"):
        got = dispatch.block_sparse_attention(q, k, v, bm)
    torch.testing.assert_close(got, block_sparse_attention_reference(q, k, v, bm))


def test_bf16_in_interpreter_is_computed_correctly():
    """The interpreter's bf16 tl.dot is wrong; the launcher must not return its garbage."""
    q, k, v = _small(dtype=torch.bfloat16, S=130)
    bm = _mask(S=130)
    allowed = torch.ones(1, 2, 130, 130, dtype=torch.bool, device=DEVICE)
    check_output(triton_block_sparse_attention(q, k, v, bm), dense_reference(q, k, v, allowed), allowed,
           torch.bfloat16, "bf16")


@pytest.mark.skipif(DEVICE != "cpu", reason="interpreter start-up behaviour")
def test_interpreter_works_when_set_before_triton_import():
    """TRITON_INTERPRET=1 from process start (triton's own helpers interpreted) works too."""
    code = (
        "import torch\n"
        "from torch.nn.attention.flex_attention import create_block_mask\n"
        "from ditaccel.kernels.triton_attention import triton_block_sparse_attention as f\n"
        "from ditaccel.kernels.reference import block_sparse_attention_reference as r\n"
        "q, k, v = (torch.randn(1, 1, 100, 64) for _ in range(3))\n"
        "bm = create_block_mask(lambda b, h, i, j: i >= j, 1, 1, 100, 100, device='cpu', BLOCK_SIZE=64)\n"
        "torch.testing.assert_close(f(q, k, v, bm), r(q, k, v, bm), rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# --- GPU only -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("D", [64, 96, 128])
@pytest.mark.parametrize("bs", [64, 128])
def test_gpu_autotuned_bf16_matches_dense(D, bs):
    torch.manual_seed(D + bs)
    B, H, S = 1, 4, 1000
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16, device="cuda").transpose(1, 2) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, qi, ki):
        return ((qi - ki).abs() < 300) | (ki < 40)

    bm = create_block_mask(mask_mod, 1, 1, S, S, device="cuda", BLOCK_SIZE=bs)
    out = triton_block_sparse_attention(q, k, v, bm)  # autotuned path
    allowed = dense_token_mask(mask_mod, B, H, S, S, "cuda")
    check_output(out, dense_reference(q, k, v, allowed), allowed, torch.bfloat16, f"gpu D={D} bs={bs}")


@pytest.mark.parametrize("head_dim_pad", [64, 128])
@pytest.mark.parametrize("bq, bk", [(64, 64), (64, 128), (128, 64), (128, 128)])
def test_autotune_configs_are_pruned_to_tiles_dividing_the_blocks(head_dim_pad, bq, bk):
    """The CUDA autotuner only tries tiles that divide the BlockMask's blocks (checked via its own
    prune step, called the way Autotuner.run calls it: constexprs arrive as keyword arguments)."""
    from ditaccel.kernels.triton_attention import _autotuned

    tuner = _autotuned(head_dim_pad)
    tuner.nargs = {}
    configs = tuner.prune_configs(dict(HEAD_DIM=head_dim_pad, HEAD_DIM_PAD=head_dim_pad, BQ=bq, BK=bk, EVEN_KV=False,
                                       HAS_BITS=True))
    assert configs
    for c in configs:
        assert bq % c.kwargs["BLOCK_M"] == 0 and bk % c.kwargs["BLOCK_N"] == 0, c
    assert set(tuner.keys) == {"HEAD_DIM", "BQ", "BK", "EVEN_KV", "HAS_BITS"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_noop_mask_launch_has_no_host_sync():
    """A fresh no-op-mask BlockMask per call (what dynamic methods build) launches without syncing."""
    q, k, v = (torch.randn(1, 8, 4000, 128, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    nb = -(-4000 // 128)

    def fresh_mask():
        keep = torch.rand(1, 8, nb, nb, device="cuda") < 0.3
        keep |= torch.eye(nb, dtype=torch.bool, device="cuda")
        num = keep.sum(-1, dtype=torch.int32)
        idx = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=128,
                                        seq_lengths=(4000, 4000), compute_q_blocks=False)

    triton_block_sparse_attention(q, k, v, fresh_mask())  # autotune outside the check
    torch.cuda.synchronize()
    bm = fresh_mask()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_block_sparse_attention(q, k, v, bm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- compiled (not interpreted) code path, without a GPU --------------------------------------

H100_SHARED_BYTES = 232448


def _compile_for_sm90(kernel, types: dict, constexprs: dict, num_warps=4, num_stages=2):
    """Compile ``kernel`` ahead of time for an H100 (sm_90) with Triton's bundled ptxas: no GPU needed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ditaccel.kernels.triton_attention import _compiled, _python_fn

    fn = _compiled(_python_fn(kernel))
    signature = {n: ("constexpr" if n in constexprs else types.get(n, "i32")) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


@pytest.mark.parametrize("dtype, D, bq, bk, tiles, even_kv, has_bits", [
    ("fp16", 96, 128, 128, (128, 64, 8, 2), False, True),  # the launcher's CUDA default for fp16/bf16
    ("bf16", 128, 64, 128, (64, 64, 8, 2), True, False),
    # The launcher's CUDA default for fp32 ("ieee" dots compile to FMA loops: ~50 s cold).
    pytest.param("fp32", 128, 128, 128, (64, 32, 4, 1), False, True, marks=pytest.mark.slow),
])
def test_attention_kernel_compiles_for_h100(dtype, D, bq, bk, tiles, even_kv, has_bits):
    from ditaccel.kernels.triton_attention import _block_sparse_attn_fwd

    bm, bn, warps, stages = tiles
    types = {n: "*" + dtype for n in ("Q", "K", "V", "Out")}
    types.update({n: "*i32" for n in ("Meta", "Order", "FullIdx", "PartIdx", "Bits")}, qk_scale="fp32")
    consts = dict(HEAD_DIM=D, HEAD_DIM_PAD=128, BQ=bq, BK=bk, BLOCK_M=bm, BLOCK_N=bn, EVEN_KV=even_kv,
                  HAS_BITS=has_bits,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    compiled = _compile_for_sm90(_block_sparse_attn_fwd, types, consts, warps, stages)
    assert 0 < compiled.metadata.shared <= H100_SHARED_BYTES


def test_scoring_kernels_compile_for_h100():
    from ditaccel.kernels import scoring_triton

    k = _compile_for_sm90(scoring_triton._mean_pool_kernel, {"X": "*bf16", "Out": "*fp32"},
                          dict(HEAD_DIM=96, HEAD_DIM_PAD=128, BLOCK_SIZE=128))
    assert k.metadata.shared <= H100_SHARED_BYTES
    k = _compile_for_sm90(scoring_triton._pooled_softmax_kernel, {"PQ": "*fp32", "PK": "*fp32", "Out": "*fp32",
                                                           "qk_scale": "fp32"},
                          dict(HEAD_DIM_PAD=128, BLOCK_Q=16, BLOCK_K=64))
    assert k.metadata.shared <= H100_SHARED_BYTES
    for stride in (8, 16):  # the launcher's tiles: 64 strided rows x 64 strided keys
        k = _compile_for_sm90(scoring_triton._antidiagonal_kernel, {"Q": "*bf16", "K": "*bf16", "Out": "*fp32",
                                                             "qk_scale": "fp32"},
                              dict(HEAD_DIM=128, HEAD_DIM_PAD=128, STRIDE=stride, ROWS_PER_BLOCK=128 // stride,
                                   BLOCK_R=64, BLOCK_C=64, DOT_PRECISION="tf32"), 4, 3)
        assert k.metadata.shared <= H100_SHARED_BYTES


def test_noop_mask_block_masks_need_no_bitmap(monkeypatch):
    """Dynamic selections (mask_mod=None): partial lists run unmasked, no mask evaluation or host sync."""
    from ditaccel.kernels import triton_attention

    def fail(*a, **kw):
        raise AssertionError("a no-op mask_mod must not be materialised")

    monkeypatch.setattr(triton_attention, "_partial_bitmaps", fail)
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 150, 64, dtype=torch.float16, device=DEVICE) for _ in range(3))
    num = torch.tensor([[[1, 2, 1]]], dtype=torch.int32, device=DEVICE)
    idx = torch.tensor([[[[0, 1, 2], [2, 0, 1], [2, 0, 1]]]], dtype=torch.int32, device=DEVICE)
    bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=64, seq_lengths=(150, 150))
    out = triton_block_sparse_attention(q, k, v, bm)
    blocks = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1]], dtype=torch.bool, device=DEVICE)
    allowed = blocks.repeat_interleave(64, 0).repeat_interleave(64, 1)[:150, :150].expand(1, 2, 150, 150)
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, "noop mask")


def test_longest_rows_are_launched_first():
    """The launch order is a permutation of the query blocks, heaviest (most key blocks) first."""
    from ditaccel.kernels.triton_attention import _kernel_tables

    full_num = torch.tensor([[[1, 3, 0, 2], [2, 2, 1, 0]]], dtype=torch.int32)  # [1, H=2, nq=4]
    part_num = torch.tensor([[[0, 1, 4, 0], [0, 1, 0, 0]]], dtype=torch.int32)
    idx = torch.arange(4, dtype=torch.int32).expand(1, 2, 4, 4).contiguous()
    bm = BlockMask.from_kv_blocks(part_num, idx, full_num, idx, BLOCK_SIZE=64, seq_lengths=(256, 256))
    t = _kernel_tables(bm, 1, 2, 256, 256, torch.device("cpu"), longest_first=True)
    work = (full_num + part_num)[0]
    for h in range(2):
        order = t.order[0, h].long()
        assert sorted(order.tolist()) == [0, 1, 2, 3]
        assert (work[h][order].diff() <= 0).all(), (order, work[h])
    plain = _kernel_tables(bm, 1, 2, 256, 256, torch.device("cpu"), longest_first=False)
    assert (plain.order == torch.arange(4, dtype=torch.int32)).all()
