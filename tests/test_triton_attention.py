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


def _case_extras(i, q, k):
    """Every third case also drops random keys through ``key_valid`` (sometimes all of a batch's keys,
    sometimes per head), every other case asks for the LSE: both paths get ~70-100 cases."""
    B, H = q.shape[:2]
    key_valid = None
    if i % 3 == 0:
        g = torch.Generator().manual_seed(i)
        key_valid = torch.rand(B, H if i % 2 else 1, k.shape[2], generator=g) < 0.6
        if i % 9 == 0:
            key_valid[0] = False  # rows that see nothing because of key validity alone
        key_valid = key_valid.to(q.device)
    return key_valid, i % 2 == 0


def float64_lse(q, k, allowed, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    return torch.logsumexp(s.masked_fill(~allowed, float("-inf")), -1)


def check_lse(lse, q, k, allowed, desc):
    ref = float64_lse(q, k, allowed)
    seen = torch.isfinite(ref)
    assert lse.dtype == torch.float32 and lse.shape == ref.shape, desc
    assert torch.equal(torch.isfinite(lse), seen), f"LSE finite where the reference is not (or vice versa): {desc}"
    assert (lse[~seen] == float("-inf")).all(), f"rows with no key must have LSE -inf: {desc}"
    tol = 2e-2 if q.dtype == torch.float16 else 1e-4
    if seen.any():
        err = (lse.double()[seen] - ref[seen]).abs().max()
        assert err <= tol, f"LSE error {err:.2e} > {tol}: {desc}"


@pytest.mark.parametrize("chunk", range(N_CHUNKS))
def test_random_cases_match_dense_float64(chunk):
    """>= 200 seeded random cases (N_CASES over N_CHUNKS tests); output poisoned with NaN first; a
    third also with key validity, half also returning the LSE (checked against a float64 LSE)."""
    per = N_CASES // N_CHUNKS
    for i in range(chunk * per, (chunk + 1) * per):
        q, k, v, block_mask, allowed, tiles, desc = random_case(1000 + i)
        key_valid, want_lse = _case_extras(i, q, k)
        if key_valid is not None:
            allowed = allowed & key_valid.expand(q.shape[0], -1, -1)[:, :, None, :]
            desc += f" key_valid={tuple(key_valid.shape)}"
        B, H, Sq, D = q.shape
        out = torch.full((B, H, Sq, D), float("nan"), dtype=q.dtype, device=q.device)
        result = triton_block_sparse_attention(q, k, v, block_mask, out=out, key_valid=key_valid,
                                               return_lse=want_lse, **tiles)
        if want_lse:
            result, lse = result
            check_lse(lse, q, k, allowed, desc)
        assert result is out
        check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, desc)


def test_case_generator_covers_the_space():
    """The property test is only as good as its cases: check they span what the kernel must handle."""
    seen = {"ragged_q": 0, "even_kv": 0, "bshd": 0, "partial_empty_rows": 0, "sub_rows": 0, "sub_cols": 0,
            "d96": 0, "nonsquare_bs": 0, "broadcast": 0, "per_head": 0, "fp16": 0, "fp32": 0,
            "key_valid": 0, "key_valid_per_head": 0, "key_valid_empty_rows": 0, "lse": 0, "lse_fp32": 0,
            "bits_128_sub_block": 0}
    for i in range(N_CASES):
        q, k, v, bm, allowed, tiles, desc = random_case(1000 + i, device="cpu")
        key_valid, want_lse = _case_extras(i, q, k)
        if key_valid is not None:
            seen["key_valid"] += 1
            seen["key_valid_per_head"] += key_valid.shape[1] > 1
            seen["key_valid_empty_rows"] += bool((~(allowed & key_valid[:, :, None, :]).any(-1)).any())
        seen["lse"] += want_lse
        seen["lse_fp32"] += want_lse and q.dtype == torch.float32
        seen["bits_128_sub_block"] += tiles["block_n"] == 128 and bm.mask_mod is not None
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
def test_autotune_configs_are_pruned_to_the_device_set_and_tiles_dividing_the_blocks(head_dim_pad, bq, bk,
                                                                                    monkeypatch):
    """The CUDA autotuner only tries the running generation's configs whose tiles divide the BlockMask's
    blocks (checked via its own prune step, called the way Autotuner.run calls it: constexprs arrive
    as keyword arguments)."""
    from ditaccel.kernels import triton_configs
    from ditaccel.kernels.triton_attention import _autotuned

    tuner = _autotuned(head_dim_pad)
    tuner.nargs = {}
    for capability, table in (((9, 0), triton_configs.SM90_CONFIGS), ((8, 0), triton_configs.SM80_CONFIGS)):
        monkeypatch.setattr(triton_configs, "_device_capability", lambda c=capability: c)
        configs = tuner.prune_configs(dict(HEAD_DIM=head_dim_pad, HEAD_DIM_PAD=head_dim_pad, BQ=bq, BK=bk,
                                           EVEN_KV=False, HAS_BITS=True, HAS_KEY_VALID=False, RETURN_LSE=False))
        assert configs
        for c in configs:
            tiles = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            assert bq % tiles[0] == 0 and bk % tiles[1] == 0, c
            assert tiles in table[head_dim_pad] or tiles == (64, 32, 4, 2), (capability, c)
    assert set(tuner.keys) == {"HEAD_DIM", "BQ", "BK", "EVEN_KV", "HAS_BITS", "HAS_KEY_VALID", "RETURN_LSE"}


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
    from ditaccel.kernels import triton_tables

    def fail(*a, **kw):
        raise AssertionError("a no-op mask_mod must not be materialised")

    monkeypatch.setattr(triton_tables, "_partial_bitmaps", fail)
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


# --- bitmaps, key validity, host path -------------------------------------------------------------


def test_bitmap_variant_only_when_partial_entries_need_one():
    """A mask_mod whose plan lists only full blocks compiles without bitmaps; partial entries get one
    int64 word per query row and 64 keys, evaluated once per BlockMask."""
    from ditaccel.kernels.triton_tables import kernel_tables

    S, bs = 200, 64
    n = -(-S // bs)
    idx = torch.arange(n, dtype=torch.int32).expand(1, 1, n, n).contiguous()
    zero = torch.zeros(1, 1, n, dtype=torch.int32)
    full_only = BlockMask.from_kv_blocks(zero, idx, torch.full((1, 1, n), n, dtype=torch.int32), idx,
                                         BLOCK_SIZE=bs, mask_mod=lambda b, h, qi, ki: qi >= ki, seq_lengths=(S, S))
    t = kernel_tables(full_only, 1, 2, S, S, torch.device("cpu"), True)
    assert not t.has_bits
    idx128 = torch.arange(2, dtype=torch.int32).expand(1, 1, n, 2).contiguous()  # 2 key blocks of 128
    partial = BlockMask.from_kv_blocks(torch.full((1, 1, n), 2, dtype=torch.int32), idx128, BLOCK_SIZE=(bs, 128),
                                       mask_mod=lambda b, h, qi, ki: (qi + ki) % 3 == 0, seq_lengths=(S, S))
    t = kernel_tables(partial, 1, 2, S, S, torch.device("cpu"), True)
    assert t.has_bits and t.bits.dtype == torch.int64 and t.bits.shape == (1, 1, 2 * n, bs, 2)
    # Entry 0 is query block 0 x key block idx[0, 0, 0, 0] = 0: bit j of word w is key w * 64 + j.
    row, key = 5, 70
    assert bool((t.bits[0, 0, 0, row, key // 64] >> (key % 64)) & 1) == ((row + key) % 3 == 0)


def test_key_valid_removes_keys_from_full_and_partial_blocks():
    torch.manual_seed(11)
    B, H, S, D = 2, 2, 150, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float32, device=DEVICE) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() < 90, 1, 1, S, S, device=DEVICE, BLOCK_SIZE=64)
    key_valid = torch.rand(B, S, device=DEVICE) < 0.5
    key_valid[1] = False  # batch 1 sees nothing: zeros, LSE -inf
    out, lse = triton_block_sparse_attention(q, k, v, bm, key_valid=key_valid, return_lse=True)
    allowed = dense_token_mask(lambda b, h, qi, ki: (qi - ki).abs() < 90, B, H, S, S, DEVICE) & key_valid[:, None, None]
    check_output(out, dense_reference(q, k, v, allowed), allowed, q.dtype, "key_valid")
    assert (lse[1] == float("-inf")).all() and (out[1] == 0).all()
    check_lse(lse, q, k, allowed, "key_valid")


@pytest.mark.parametrize("bad, match", [
    (lambda B, S: torch.ones(B, S), r"key_valid must be a bool tensor; got dtype torch.float32"),
    (lambda B, S: torch.ones(B, S + 1, dtype=torch.bool), r"key_valid has shape \(1, 71\); allowed: \[B, Skv\]"),
    (lambda B, S: torch.ones(B, 5, S, dtype=torch.bool), r"key_valid has shape \(1, 5, 70\)"),
    (lambda B, S: [True] * S, r"key_valid must be a bool tensor of shape"),
])
def test_bad_key_valid_raises_naming_it(bad, match):
    q, k, v = _small()
    with pytest.raises(ValueError, match=match):
        triton_block_sparse_attention(q, k, v, _mask(), key_valid=bad(1, 70))


@pytest.mark.parametrize("scale", [0.0, -0.1, float("inf")])
def test_non_positive_or_infinite_scale_raises(scale):
    q, k, v = _small()
    with pytest.raises(ValueError, match=r"scale=.* is not allowed: it must be a positive finite float"):
        triton_block_sparse_attention(q, k, v, _mask(), scale)


class _SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that make the host wait for the device (or copy host data to it)."""

    SYNCS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero", "_to_copy", "copy_")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCS:
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_second_call_of_a_mask_makes_no_sync_class_op(monkeypatch):
    """After the first call of a BlockMask (which builds its tables, bitmap and all), a call is table
    lookups and a launch: no .item(), no nonzero, no copies (the launch is stubbed out: the
    interpreter itself converts tensors to numpy)."""
    from ditaccel.kernels import triton_attention

    launches = []

    class _Stub:
        def __getitem__(self, grid):
            return lambda *a, **kw: launches.append(kw)

    monkeypatch.setattr(triton_attention, "launchable", lambda kernel, interpret: _Stub())
    q, k, v = (torch.randn(1, 2, 200, 64, dtype=torch.float16, device=DEVICE) for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() < 70, 1, 1, 200, 200, device=DEVICE, BLOCK_SIZE=64)
    key_valid = torch.rand(1, 200, device=DEVICE) < 0.8
    triton_block_sparse_attention(q, k, v, bm, key_valid=key_valid, return_lse=True)  # builds the tables
    counter = _SyncCounter()
    with counter:
        triton_block_sparse_attention(q, k, v, bm, key_valid=key_valid, return_lse=True)
    # The per-call int8 view of key_valid is one on-device cast, not a host copy.
    assert [op for op in counter.ops if not op.startswith("_to_copy")] == [], counter.ops
    assert len(launches) == 2 and launches[1]["HAS_BITS"] and launches[1]["HAS_KEY_VALID"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_fp32_warns_once_and_runs_tf32(monkeypatch):
    from ditaccel.kernels import triton_attention

    monkeypatch.setattr(triton_attention, "_fp32_warned", False)
    q, k, v = (torch.randn(1, 2, 300, 128, device="cuda") for _ in range(3))
    from torch.nn.attention.flex_attention import create_block_mask

    bm = create_block_mask(lambda b, h, qi, ki: (qi - ki).abs() < 100, 1, 1, 300, 300, device="cuda", BLOCK_SIZE=128)
    with pytest.warns(UserWarning, match=r"tf32"):
        out = triton_block_sparse_attention(q, k, v, bm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_block_sparse_attention(q, k, v, bm)
    allowed = dense_token_mask(lambda b, h, qi, ki: (qi - ki).abs() < 100, 1, 2, 300, 300, "cuda")
    err = (out.double() - dense_reference(q, k, v, allowed)).norm() / dense_reference(q, k, v, allowed).norm()
    assert err < 5e-3
