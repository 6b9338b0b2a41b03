"""Ahead-of-time compiles of the attention kernel for sm_90 / sm_80, no GPU needed, specialised exactly as
a real launch would be (Triton's own binder on a ``[1, 75600, 40, D]`` bf16 BSHD view's strides, the
runtime's layout at Wan2.1-14B 720p), with Triton's bundled ptxas.

Every config the dispatcher can pick must compile and fit its generation's shared memory; the default
config per head dim must not spill registers. Registers / spills / shared bytes per config are printed
(``pytest -s`` shows them). The default run compiles the default configs; the full sweep (every config,
with and without bitmaps, both generations) is ``slow``.
"""

from __future__ import annotations

import pytest
import torch

from ditaccel.kernels import triton_configs
from ditaccel.kernels.triton_aot import attention_launch, compile_like_jit
from ditaccel.kernels.triton_attention import _block_sparse_attn_fwd

pytest.importorskip("triton.backends.nvidia")

WAN14B = dict(B=1, H=40, S=75600)  # ragged: 75600 % 128 = 80


def _compile(capability, D, tiles, has_bits, key_valid=True, return_lse=False, bs=128):
    args, kwargs = attention_launch(torch.bfloat16, WAN14B["B"], WAN14B["H"], WAN14B["S"], D, bs, bs, tiles=tiles,
                                    has_bits=has_bits, key_valid=key_valid, return_lse=return_lse)
    res = compile_like_jit(_block_sparse_attn_fwd, args, kwargs, capability)
    print(f"sm_{capability} D={D} bs={bs} tiles(BM,BN,warps,stages)={tiles} bits={int(has_bits)} "
          f"key_valid={int(key_valid)} lse={int(return_lse)}: shared={res['shared']} B regs={res['regs']} "
          f"spills={res['spill_stores']}/{res['spill_loads']} B ({res['compile_s']} s)")
    return res


def test_launch_arguments_match_the_kernel_signature():
    """attention_launch builds the launcher's argument list: it must follow the kernel's parameters."""
    from ditaccel.kernels.triton_attention import _compiled, _python_fn

    fn = _compiled(_python_fn(_block_sparse_attn_fwd))
    args, kwargs = attention_launch(torch.bfloat16, 1, 2, 1000, 128, 128, 128, tiles=(128, 64, 8, 3), has_bits=True)
    constexprs = [p.name for p in fn.params if p.is_constexpr]
    assert len(args) + len([k for k in kwargs if k in constexprs]) == len(fn.params)
    assert set(constexprs) <= set(kwargs)


@pytest.mark.parametrize("D", [64, 128])
def test_default_config_compiles_for_sm90_fits_and_does_not_spill(D):
    """The default config per head dim (also the first autotune candidate), bitmap variant with key
    validity and LSE (the heaviest variant of that config)."""
    tiles = triton_configs.default_config((9, 0), D)
    res = _compile(90, D, tiles, has_bits=True, return_lse=True)
    assert 0 < res["shared"] <= triton_configs.SHARED_LIMIT[9]
    assert res["regs"] is not None, "no ptxas log: registers unknown"
    assert res["spill_stores"] == 0 and res["spill_loads"] == 0, res


@pytest.mark.slow
@pytest.mark.parametrize("capability", [90, 80])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("has_bits", [False, True])
def test_every_config_the_dispatcher_can_pick_fits(capability, D, has_bits):
    """Every config of the generation's set (bitmaps or not; blocks of 128 and the 64-wide ones for
    blocks of 64) compiles and fits in shared memory; the set's default does not spill."""
    cap = (capability // 10, 0)
    limit = triton_configs.SHARED_LIMIT[capability // 10]
    for bs in (128, 64):
        for tiles in triton_configs.configs_for(cap, D, bs, bs):
            res = _compile(capability, D, tiles, has_bits, bs=bs)
            assert 0 < res["shared"] <= limit, (tiles, res)
            if tiles == triton_configs.default_config(cap, D):
                assert res["spill_stores"] == 0, (tiles, res)


@pytest.mark.slow
def test_fp32_tf32_config_and_head_dim_96_compile_for_sm90():
    args, kwargs = attention_launch(torch.float32, 1, 24, 4000, 128, 128, 128, tiles=triton_configs.FP32_CONFIG,
                                    has_bits=True)
    res = compile_like_jit(_block_sparse_attn_fwd, args, kwargs, 90)
    print("fp32 tf32 D=128", res)
    assert res["shared"] <= triton_configs.SHARED_LIMIT[9]
    res = _compile(90, 96, triton_configs.default_config((9, 0), 128), has_bits=True)
    assert res["shared"] <= triton_configs.SHARED_LIMIT[9]
