"""Off-CUDA executors on the plans methods build: grouped vs the torch reference vs dense SDPA.

    python benchmarks/cpu_executor_bench.py            # the embedded pipeline's grid, B=1, H=4, D=32
    python benchmarks/cpu_executor_bench.py --tokens 8192,16384 --heads 1 --head-dim 128 --repeat 2
                                                       # the CPU proxy: grids of (T, 32, 32), T = tokens / 1024

Times one attention call (median of ``--repeat`` after a warm call) of each executor on the same
q, k, v and plan, in one run, and prints the ratios to dense SDPA (< 1: faster than dense).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # run from a checkout

from ditaccel.kernels import block_sparse_attention_reference, grouped_block_sparse_attention
from ditaccel.methods import RadialConfig, TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape

CONFIGS = {
    "tile (block 128)": TileConfig(),
    "tile (block 64)": TileConfig(block_size=64),
    "tile (1,3,3) (block 64)": TileConfig(block_size=64, window=(1, 3, 3)),
    "radial (block 64)": RadialConfig(block_size=64),
    "window 3x11x11 (block 64)": WindowConfig(block_size=64, kernel_size=(3, 11, 11)),
    "window 1x7x7 (block 64)": WindowConfig(block_size=64, kernel_size=(1, 7, 7)),
}


def median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", default="5,18,24", help="T,H,W token grid (default: the embedded pipeline's)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--tokens", default=None,
                   help="comma list of token counts (multiples of 1024): grids (T, 32, 32) instead of --grid")
    p.add_argument("--no-reference", action="store_true", help="skip the torch reference (slow at long sequences)")
    args = p.parse_args(argv)
    if args.tokens:
        rc = 0
        for n in (int(x) for x in args.tokens.split(",")):
            if n % 1024 or n <= 0:
                p.error(f"--tokens: {n} is not allowed; allowed: positive multiples of 1024")
            rc |= run_grid(args, (n // 1024, 32, 32))
        return rc
    return run_grid(args, tuple(int(x) for x in args.grid.split(",")))


def run_grid(args, grid) -> int:
    shape = CallShape(grid, 0, "none")
    print(f"grid {grid} ({grid[0] * grid[1] * grid[2]} tokens), B={args.batch} H={args.heads} D={args.head_dim}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'plan':28} {'density':>8} {'dense ms':>9} {'grouped ms':>11} {'reference ms':>13} "
          f"{'grouped/dense':>14} {'grouped vs ref':>15}")
    gen = torch.Generator().manual_seed(0)
    for name, config in CONFIGS.items():
        plan = make_method(config).plan(shape, torch.device("cpu"))
        n = plan.layout.num_slots
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, generator=gen) for _ in range(3))
        bm = plan.block_mask
        dense = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeat)
        grouped = median_ms(lambda: grouped_block_sparse_attention(q, k, v, bm), args.repeat)
        reference = float("nan")
        if not args.no_reference:
            reference = median_ms(lambda: block_sparse_attention_reference(q, k, v, bm), args.repeat)
        print(f"{name:28} {float(plan.density):8.3f} {dense:9.1f} {grouped:11.1f} {reference:13.1f} "
              f"{grouped / dense:13.2f}x {reference / grouped:14.1f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
