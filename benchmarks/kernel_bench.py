"""GPU benchmark of ditaccel's Triton block-sparse attention kernel (a benchmark, not a test).

For each model shape and block density it times, with ``triton.testing.do_bench`` (median, warm-up
first, random bf16 inputs, head dim 128):

- ``ours``: ``triton_block_sparse_attention`` on a BlockMask of that density;
- ``sdpa``: dense ``F.scaled_dot_product_attention`` (its default backend is named in the output);
- ``flex``: ``torch.compile(flex_attention)`` on the very same BlockMask;

and prints a table of times, ratios (``sdpa/ours``, ``flex/ours``) and effective TFLOP/s (dense
FLOPs 4*B*H*Sq*Skv*D divided by the time, so sparsity shows up as a higher number). ``--json PATH``
writes every row with its metadata.

Masks are tile shaped: ``--pattern tile`` (default) places video blocks on the (T, H, W) grid of
3-D tiles the block size covers and keeps, per query tile, the tiles in a box window around it,
with the window chosen so the block density comes closest to the requested one; ``--pattern
random`` keeps the diagonal plus a random set of blocks per row. Text tokens (HunyuanVideo suffix,
Flux prefix) keep dense rows and columns. ``--partial-frac F`` turns a fraction of the kept
off-diagonal blocks into partial blocks with a token-level mask_mod (measures the masking cost).

``--check`` instead verifies bf16 correctness for every selected shape and density: the video is
cropped (whole frames) until the dense boolean mask fits (``--check-tokens``), and our kernel (and
FlexAttention, unless ``--no-flex``) is compared with SDPA under the equivalent dense boolean mask.

``--plans`` times the methods' *real* plans instead (tile, window, radial at their defaults, topk
at each density; see ``kernel_bench_plans.py``): kernel alone, whole path (permutation + kernel +
inverse), compiled flex on the same BlockMask, first-call seconds and host ms per call.

Examples (fit in a 10-minute GPU run):
    python benchmarks/kernel_bench.py --plans --shapes wan14b-720p,flux-1024 --json plans.json
    python benchmarks/kernel_bench.py --check
    python benchmarks/kernel_bench.py --shapes wan1.3b-480p,flux-1024 --densities 100,25,5 --json out.json
    python benchmarks/kernel_bench.py --shapes wan14b-720p --densities 10 --no-flex
On CPU only ``--help`` and ``--check --device cpu`` (with TRITON_INTERPRET=1, tiny crops) run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    grid: tuple[int, int, int]  # latent tokens (T, H, W) after patchify
    text: int  # text tokens in the same self-attention
    text_where: str  # "none" | "prefix" | "suffix"
    batch: int = 1
    head_dim: int = 128

    @property
    def video_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def seq(self) -> int:
        return self.video_tokens + self.text


SHAPES = {
    s.name: s
    for s in (
        Shape("wan1.3b-480p", 12, (21, 30, 52), 0, "none"),  # S = 32760
        Shape("wan14b-720p", 40, (21, 45, 80), 0, "none"),  # S = 75600
        Shape("hunyuan-720p", 24, (33, 45, 80), 256, "suffix"),  # S = 118800 + 256
        Shape("flux-1024", 24, (1, 64, 64), 512, "prefix"),  # S = 4096 + 512
    )
}

# Tokens per block as a 3-D tile (t, h, w) for the tile pattern.
TILES = {128: (4, 4, 8), 64: (2, 4, 8)}
IMAGE_TILES = {128: (1, 8, 16), 64: (1, 8, 8)}


# ----------------------------------------------------------------------------------------------
# Block patterns
# ----------------------------------------------------------------------------------------------


def _blocks(shape: Shape, bs: int):
    """(number of blocks, bool [nb] video-only blocks, index of the first video block)."""
    nb = -(-shape.seq // bs)
    tok_video = torch.zeros(nb * bs, dtype=torch.bool)
    v0 = shape.text if shape.text_where == "prefix" else 0
    tok_video[v0 : v0 + shape.video_tokens] = True
    pure_video = tok_video.view(nb, bs).all(1)
    return nb, pure_video


def tile_pattern(shape: Shape, bs: int, density: float) -> tuple[torch.Tensor, float]:
    """[nb, nb] bool block mask: box window over the tile grid, text rows/cols dense."""
    nb, pure_video = _blocks(shape, bs)
    if density >= 1.0:
        return torch.ones(nb, nb, dtype=torch.bool), 1.0
    tile = IMAGE_TILES[bs] if shape.grid[0] == 1 else TILES[bs]
    grid = tuple(-(-g // t) for g, t in zip(shape.grid, tile))
    vid = torch.nonzero(pure_video).flatten()
    # Video block i (in order) sits at raster position i of the tile grid.
    coords = torch.stack(torch.unravel_index(torch.arange(len(vid)), grid), dim=-1)  # [nv, 3]
    diff = (coords[:, None, :] - coords[None, :, :]).abs()  # [nv, nv, 3]
    text_rows = ~pure_video

    def build(radius):
        m = torch.zeros(nb, nb, dtype=torch.bool)
        m[vid[:, None], vid[None, :]] = (diff <= torch.tensor(radius)).all(-1)
        m[text_rows, :] = True
        m[:, text_rows] = True
        return m

    # Separable estimate for every box radius (cheap), exact density for the 24 closest.
    candidates = []
    for radius in itertools.product(*(range(g) for g in grid)):
        est = math.prod(sum(max(0, g - abs(d)) for d in range(-r, r + 1)) / g**2 for g, r in zip(grid, radius))
        candidates.append((abs(est - density), radius))
    candidates.sort()
    best = None
    for _, radius in candidates[:24]:
        mask = build(radius)
        actual = float(mask.float().mean())
        if best is None or abs(actual - density) < abs(best[1] - density):
            best = (mask, actual)
    return best


def random_pattern(shape: Shape, bs: int, density: float, seed: int) -> tuple[torch.Tensor, float]:
    """[nb, nb] bool: diagonal + random blocks per row at ``density``, text rows/cols dense."""
    nb, pure_video = _blocks(shape, bs)
    if density >= 1.0:
        return torch.ones(nb, nb, dtype=torch.bool), 1.0
    # The diagonal and text rows/cols are kept anyway: draw the rest so the total hits ``density``.
    forced = torch.eye(nb, dtype=torch.bool)
    forced[~pure_video, :] = True
    forced[:, ~pure_video] = True
    f = float(forced.float().mean())
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(nb, nb, generator=g) < max(0.0, (density - f) / max(1e-9, 1.0 - f))
    mask |= torch.eye(nb, dtype=torch.bool)
    mask[~pure_video, :] = True
    mask[:, ~pure_video] = True
    return mask, float(mask.float().mean())


def partial_mask_mod(b, h, q_idx, kv_idx):
    """Token-level rule for the partial blocks of --partial-frac: a checkerboard of 16x16 squares."""
    return ((q_idx // 16) + (kv_idx // 16)) % 2 == 0


def block_mask_from(blocks: torch.Tensor, bs: int, seq: int, device, partial_frac: float, seed: int):
    from torch.nn.attention.flex_attention import BlockMask

    nb = blocks.shape[0]
    partial = torch.zeros_like(blocks)
    if partial_frac > 0:
        g = torch.Generator().manual_seed(seed + 1)
        off_diag = blocks & ~torch.eye(nb, dtype=torch.bool)
        partial = off_diag & (torch.rand(nb, nb, generator=g) < partial_frac)
    full = blocks & ~partial

    def lists(m):
        num = m.sum(-1, dtype=torch.int32)[None, None]
        idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)[None, None]
        return num.to(device), idx.to(device)

    p_num, p_idx = lists(partial)
    f_num, f_idx = lists(full)
    # mask_mod states the whole token rule (full blocks, and partial blocks' checkerboard), as
    # create_block_mask's masks do: kernels skip it on full blocks, and eager FlexAttention (which
    # ignores the block lists and evaluates mask_mod everywhere) computes the same attention.
    full_d, part_d = full.to(device), partial.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        qb, kb = (q_idx // bs).clamp(max=nb - 1), (kv_idx // bs).clamp(max=nb - 1)
        return full_d[qb, kb] | (part_d[qb, kb] & partial_mask_mod(b, h, q_idx, kv_idx))

    return BlockMask.from_kv_blocks(p_num, p_idx, f_num, f_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(seq, seq))


def dense_token_mask(blocks: torch.Tensor, block_mask, bs: int, seq: int, device) -> torch.Tensor:
    """[seq, seq] bool equivalent of ``block_mask`` (full blocks, partial blocks & mask_mod)."""
    from ditaccel.kernels.reference import block_sizes

    assert block_sizes(block_mask) == (bs, bs)
    nb = blocks.shape[0]

    def block_matrix(num, idx):
        num, idx = num[0, 0].cpu(), idx[0, 0].cpu()
        m = torch.zeros(nb, nb, dtype=torch.bool)
        for i in range(nb):
            m[i, idx[i, : num[i]].long()] = True
        return m

    full = block_matrix(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    part = block_matrix(block_mask.kv_num_blocks, block_mask.kv_indices)
    expand = lambda m: m.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:seq, :seq].to(device)  # noqa: E731
    allowed = expand(full)
    if part.any():
        i = torch.arange(seq, device=device)
        allowed |= expand(part) & block_mask.mask_mod(0, 0, i[:, None], i[None, :])
    return allowed


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


def sdpa_backend_name(q, k, v) -> str:
    """The backend F.scaled_dot_product_attention picks for these inputs (no mask)."""
    try:
        from torch.nn.attention import SDPBackend

        choice = torch._fused_sdp_choice(q, k, v)
        return SDPBackend(choice).name
    except Exception as e:  # private API: report rather than fail
        return f"unknown ({type(e).__name__})"


def crop_for_check(shape: Shape, max_tokens: int) -> Shape:
    """Fewer frames (and, for images, fewer rows) until the sequence fits ``max_tokens``."""
    T, Hh, W = shape.grid
    while T > 1 and T * Hh * W + shape.text > max_tokens:
        T -= 1
    while T * Hh * W + shape.text > max_tokens and Hh > 1:
        Hh -= 1
    return Shape(shape.name + "-crop", shape.heads, (T, Hh, W), shape.text, shape.text_where, shape.batch,
                 shape.head_dim)


def make_pattern(args, shape, bs, density):
    if args.pattern == "tile":
        return tile_pattern(shape, bs, density)
    return random_pattern(shape, bs, density, args.seed)


def run_check(args) -> bool:
    from ditaccel.kernels.triton_attention import triton_block_sparse_attention
    from torch.nn.attention.flex_attention import flex_attention

    device = torch.device(args.device)
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    ok = True
    print(f"{'shape':<22} {'S':>7} {'dens':>6} {'ours rel-L2':>12} {'ours max':>10} {'flex rel-L2':>12}  verdict")
    for name in args.shapes:
        shape = crop_for_check(SHAPES[name], args.check_tokens)
        heads = min(shape.heads, args.check_heads)
        S, D = shape.seq, shape.head_dim
        g = torch.Generator(device=device).manual_seed(args.seed)
        q, k, v = (torch.randn(shape.batch, heads, S, D, generator=g, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        for density in args.densities:
            blocks, actual = make_pattern(args, shape, args.block_size, density)
            bm = block_mask_from(blocks, args.block_size, S, device, args.partial_frac, args.seed)
            allowed = dense_token_mask(blocks, bm, args.block_size, S, device)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
            out = triton_block_sparse_attention(q, k, v, bm)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            max_err = (out.float() - ref).abs().max().item()
            flex_err = float("nan")
            if not args.no_flex:
                with torch.no_grad():
                    fo = flex(q, k, v, block_mask=bm)
                flex_err = ((fo.float() - ref).norm() / ref.norm()).item()
            good = err <= args.check_tol and math.isfinite(max_err)
            ok &= good
            print(f"{shape.name:<22} {S:>7} {actual:>6.3f} {err:>12.2e} {max_err:>10.2e} {flex_err:>12.2e}  "
                  f"{'ok' if good else 'FAIL'}")
    print("check:", "all ok" if ok else "FAILURES")
    return ok


def run_bench(args) -> list[dict]:
    import triton.testing

    from ditaccel.kernels.triton_attention import triton_block_sparse_attention
    from torch.nn.attention.flex_attention import flex_attention

    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit("timing needs a CUDA GPU (use --check --device cpu with TRITON_INTERPRET=1 on CPU)")
    flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    header = (f"{'shape':<14} {'S':>7} {'H':>3} {'dens':>5} {'actual':>6} {'ours ms':>9} {'sdpa ms':>9} "
              f"{'flex ms':>9} {'sdpa/ours':>9} {'flex/ours':>9} {'ours TF/s':>9} {'sdpa TF/s':>9} {'flex TF/s':>9}")
    print(header)
    for name in args.shapes:
        shape = SHAPES[name]
        B, H, S, D = shape.batch, shape.heads, shape.seq, shape.head_dim
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4.0 * B * H * S * S * D
        backend = sdpa_backend_name(q, k, v)
        sdpa_ms = None
        if not args.no_sdpa:
            sdpa_ms = triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v),
                                              warmup=args.warmup, rep=args.rep, return_mode="median")
        for density in args.densities:
            t0 = time.time()
            blocks, actual = make_pattern(args, shape, args.block_size, density)
            bm = block_mask_from(blocks, args.block_size, S, "cuda", args.partial_frac, args.seed)
            triton_block_sparse_attention(q, k, v, bm)  # tables + autotuning
            torch.cuda.synchronize()
            ours_ms = triton.testing.do_bench(lambda: triton_block_sparse_attention(q, k, v, bm),
                                              warmup=args.warmup, rep=args.rep, return_mode="median")
            flex_ms = None
            if not args.no_flex:
                flex(q, k, v, block_mask=bm)  # compile
                flex_ms = triton.testing.do_bench(lambda: flex(q, k, v, block_mask=bm),
                                                  warmup=args.warmup, rep=args.rep, return_mode="median")
            tf = lambda ms: flops / (ms * 1e-3) / 1e12 if ms else None  # noqa: E731
            row = dict(
                shape=name, B=B, H=H, S=S, D=D, text=shape.text, block_size=args.block_size, pattern=args.pattern,
                partial_frac=args.partial_frac, density_requested=density, density_actual=actual,
                ours_ms=ours_ms, sdpa_ms=sdpa_ms, flex_ms=flex_ms, sdpa_backend=backend,
                sdpa_over_ours=(sdpa_ms / ours_ms) if sdpa_ms else None,
                flex_over_ours=(flex_ms / ours_ms) if flex_ms else None,
                ours_tflops=tf(ours_ms), sdpa_tflops=tf(sdpa_ms), flex_tflops=tf(flex_ms),
                setup_s=time.time() - t0,
            )
            rows.append(row)
            fmt = lambda x, f: (f"{x:{f}}" if x is not None else "-")  # noqa: E731
            print(f"{name:<14} {S:>7} {H:>3} {density:>5.2f} {actual:>6.3f} {fmt(ours_ms, '9.3f')} "
                  f"{fmt(sdpa_ms, '9.3f')} {fmt(flex_ms, '9.3f')} {fmt(row['sdpa_over_ours'], '9.2f')} "
                  f"{fmt(row['flex_over_ours'], '9.2f')} {fmt(row['ours_tflops'], '9.1f')} "
                  f"{fmt(row['sdpa_tflops'], '9.1f')} {fmt(row['flex_tflops'], '9.1f')}", flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    print(f"sdpa backend: {rows[0]['sdpa_backend'] if rows else '-'}; TF/s = dense FLOPs / time")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--densities", default="100,50,25,10,5", help="comma list of block densities in percent")
    p.add_argument("--pattern", choices=["tile", "random"], default="tile")
    p.add_argument("--block-size", type=int, choices=[64, 128], default=128)
    p.add_argument("--partial-frac", type=float, default=0.0,
                   help="fraction of kept off-diagonal blocks made partial (token mask_mod)")
    p.add_argument("--no-flex", action="store_true", help="skip torch.compile(flex_attention)")
    p.add_argument("--no-sdpa", action="store_true", help="skip dense SDPA")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--json", metavar="PATH", help="write rows and metadata as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plans", action="store_true", help="time the methods' real plans (kernel_bench_plans.py)")
    p.add_argument("--check", action="store_true", help="bf16 correctness vs SDPA with the dense mask, cropped")
    p.add_argument("--check-tokens", type=int, default=8192, help="crop length for --check")
    p.add_argument("--check-heads", type=int, default=4, help="heads used by --check")
    p.add_argument("--check-tol", type=float, default=1.6e-2, help="relative L2 error allowed by --check")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only for --check under TRITON_INTERPRET=1")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        if s not in SHAPES:
            p.error(f"--shapes: unknown shape {s!r}; allowed: {', '.join(SHAPES)}")
    try:
        args.densities = [float(d) / 100.0 for d in args.densities.split(",") if d.strip()]
    except ValueError:
        p.error(f"--densities must be a comma list of numbers in (0, 100]; got {args.densities!r}")
    if not args.densities or any(not 0.0 < d <= 1.0 for d in args.densities):
        p.error(f"--densities must be numbers in (0, 100]; got {args.densities}")
    if not 0.0 <= args.partial_frac <= 1.0:
        p.error(f"--partial-frac must be in [0, 1]; got {args.partial_frac}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.check:
        return 0 if run_check(args) else 1
    if args.plans:
        import triton.testing

        from kernel_bench_plans import run_plans

        bench = lambda f: triton.testing.do_bench(f, warmup=args.warmup, rep=args.rep, return_mode="median")  # noqa: E731
        rows = run_plans([SHAPES[n] for n in args.shapes], args.densities, bench, use_flex=not args.no_flex)
    else:
        rows = run_bench(args)
    if args.json:
        import triton

        meta = dict(
            torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
            gpu=torch.cuda.get_device_name(), argv=sys.argv[1:],
        )
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
