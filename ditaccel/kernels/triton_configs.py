"""Tile configurations of the Triton block-sparse attention kernel, per GPU generation.

Every config a set lists was compiled ahead of time with the JIT's own specialisation (a
``[1, 75600, 40, D]`` bf16 BSHD view, bitmap variant with key validity; ``tests/test_triton_aot.py``,
figures in ``benchmarks/RESULTS.md``) and fits its generation's shared memory: sm_90 (Hopper) allows
227 KiB per block, sm_80 (A100) 163 KiB. The pruning function picks the set by the device's compute
capability, then keeps the tiles that divide the BlockMask's block sizes.

Measured (triton 3.9, ptxas of its bundle): with the flat sub-block loop the largest sm_90 config
uses 166 KB (BLOCK_N=128), the defaults 99 KB (D=128) and 50 KB (D=64), with no register spills;
every sm_80 config stays under 67 KB (so they also fit sm_86/89's 99 KiB). Configs that spilled
(e.g. 128x64 tiles on 4 warps at D=128: 255 registers, ~500 B of spills) were dropped.
"""

from __future__ import annotations

import functools

import triton

# Shared memory a block may use (bytes), per compute-capability major version.
SHARED_LIMIT = {9: 232448, 8: 166912}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim. The first entry of each list is the
# default (used when a caller fixes some tile sizes and not others, and checked for zero spills).
SM90_CONFIGS = {
    64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 3), (128, 32, 4, 4)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 4), (128, 32, 8, 3), (64, 128, 8, 2)],
}
SM80_CONFIGS = {
    64: [(64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 4, 3), (64, 128, 4, 2)],
    128: [(64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3), (128, 64, 8, 2)],
}

# fp32 inputs on CUDA: tf32 dot products in one fixed config (fp32 tiles are twice the bytes).
FP32_CONFIG = (64, 32, 4, 2)


def config_set(capability: tuple[int, int] | None) -> dict[int, list[tuple[int, int, int, int]]]:
    """The config table for a device of compute ``capability`` ((major, minor); None: the smallest set)."""
    if capability is not None and capability[0] >= 9:
        return SM90_CONFIGS
    return SM80_CONFIGS


def configs_for(capability, head_dim_pad: int, bq: int, bk: int) -> list[tuple[int, int, int, int]]:
    """Tiles the dispatcher may pick for this device and BlockMask: the generation's set, restricted to
    tiles dividing the block sizes (BLOCK_N <= 128 always: bitmaps are read as <= 2 words per row)."""
    table = config_set(capability)[head_dim_pad]
    return [c for c in table if bq % c[0] == 0 and bk % c[1] == 0]


def default_config(capability, head_dim_pad: int) -> tuple[int, int, int, int]:
    return config_set(capability)[head_dim_pad][0]


def _device_capability():
    import torch

    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def prune_configs(configs, named_args, **kwargs):
    """Autotuner hook: keep the configs of this device's generation that divide the block sizes.

    The autotuner passes positional kernel args in ``named_args`` and keyword ones in ``kwargs``.
    """
    args = {**named_args, **kwargs}
    allowed = set(configs_for(_device_capability(), args["HEAD_DIM_PAD"], args["BQ"], args["BK"]))
    kept = [c for c in configs if _as_tuple(c) in allowed]
    if not kept:  # blocks of 64 with a set whose tiles are all 128 wide: the smallest safe tile
        kept = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)]
    return kept


def _as_tuple(c) -> tuple[int, int, int, int]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


AUTOTUNE_KEY = ["HEAD_DIM", "BQ", "BK", "EVEN_KV", "HAS_BITS", "HAS_KEY_VALID", "RETURN_LSE"]


@functools.lru_cache(maxsize=None)
def autotuned(kernel, head_dim_pad: int):
    """``kernel`` (a JITFunction) autotuned over the union of the generations' configs for this head
    dim; :func:`prune_configs` narrows it to the running device's set at launch."""
    union = list(dict.fromkeys(SM90_CONFIGS[head_dim_pad] + SM80_CONFIGS[head_dim_pad]))
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in union]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune_configs})(kernel)


__all__ = ["FP32_CONFIG", "SHARED_LIMIT", "SM80_CONFIGS", "SM90_CONFIGS", "autotuned",
           "config_set", "configs_for", "default_config", "prune_configs"]
