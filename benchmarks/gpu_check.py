"""GPU checks and timings of ditaccel's Triton attention kernel in one command (see gpu_check.sh).

    python benchmarks/gpu_check.py correct --out DIR [--deadline S]   # correctness, resources, host syncs
    python benchmarks/gpu_check.py bench   --out DIR [--deadline S]   # timings: synthetic densities, real plans
    python benchmarks/gpu_check.py summary --out DIR
    python benchmarks/gpu_check.py correct --dry-run                  # CPU, TRITON_INTERPRET=1, tiny shapes

Each stage appends JSON rows to DIR/<stage>.json as it goes (a killed stage keeps what it finished),
checks its wall-clock deadline before each item, and records an item's error instead of stopping.
ditaccel is imported normally (run from the repository root, or with the package installed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
T0 = time.time()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ARGS = None
ROWS: list = []
DEV = "cuda"


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def record(row: dict):
    ROWS.append(dict(row, t=round(time.time() - T0, 1)))
    with open(os.path.join(ARGS.out, f"{ARGS.stage}.json"), "w") as f:
        json.dump(ROWS, f, indent=1, default=str)


def time_left() -> float:
    return ARGS.deadline - (time.time() - T0)


def item(name, fn, need=10.0):
    """Run one check if ``need`` seconds are left; record its outcome (errors do not stop the stage)."""
    if time_left() < need:
        record(dict(item=name, status="skipped (deadline)"))
        log(f"SKIP  {name} (deadline)")
        return None
    t = time.time()
    try:
        res = fn() or {}
        status = res.pop("status", "ok")
        record(dict(item=name, status=status, secs=round(time.time() - t, 1), **res))
        log(f"{status.upper():5} {name} ({time.time() - t:.1f}s) {json.dumps(res, default=str)[:400]}")
        return res
    except Exception as e:  # keep going: the report needs every item's verdict
        record(dict(item=name, status="error", error=f"{type(e).__name__}: {str(e)[:800]}",
                    tb=traceback.format_exc()[-3000:]))
        log(f"ERROR {name}: {type(e).__name__}: {str(e)[:300]}")
        if DEV == "cuda":
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # the context is broken: later CUDA items would all fail
                log(f"CUDA context broken after {name}: {e2}; stopping this stage")
                raise SystemExit(3)
        return None


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def float_reference(q, k, v, allowed, scale=None):
    """fp32 attention under a dense mask, and its natural-log LSE; rows with nothing allowed -> 0, -inf."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    return p @ v.float(), lse


# ---------------------------------------------------------------------------------------------
# Stage 1: correctness
# ---------------------------------------------------------------------------------------------


def attention_case(D, bs, S, dtype, *, key_valid_kind=None, lse=True, mask="band", per_head_lists=False):
    """Autotuned (CUDA) kernel on a BSHD view vs fp32 under the equivalent dense mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    def run():
        B, H = 2, 4 if not ARGS.dry_run else 2
        g = torch.Generator(device=DEV).manual_seed(D + S)
        q, k, v = (torch.randn(B, S, H, D, generator=g, device=DEV, dtype=dtype).transpose(1, 2) for _ in range(3))
        # A band per head only with per-head lists: broadcast lists are built from head 0's mask, so a
        # mask reading h must not reach past them (create_block_mask evaluates it for the lists' heads).
        widths = torch.arange(H, device=DEV) * 40 + 100 if per_head_lists else torch.full((H,), 150, device=DEV)

        def mask_mod(b, h, qi, ki):
            if mask == "none":
                return qi >= 0
            return ((qi - ki).abs() < widths[h]) | (ki < 16)

        bm = create_block_mask(mask_mod, 1, H if per_head_lists else 1, S, S, device=DEV, BLOCK_SIZE=bs)
        kv = None
        if key_valid_kind == "batch":
            kv = torch.rand(B, S, device=DEV) < 0.7
        elif key_valid_kind == "head":
            kv = torch.rand(B, H, S, device=DEV) < 0.7
            kv[1, 0] = False  # (b=1, h=0) sees nothing
        out = torch.full((B, H, S, D), float("nan"), dtype=dtype, device=DEV)
        res = triton_block_sparse_attention(q, k, v, bm, key_valid=kv, return_lse=lse, out=out)
        sync()
        b_ = torch.arange(B, device=DEV).view(B, 1, 1, 1)
        h_ = torch.arange(H, device=DEV).view(1, H, 1, 1)
        i_ = torch.arange(S, device=DEV)
        allowed = torch.as_tensor(mask_mod(b_, h_, i_.view(1, 1, S, 1), i_.view(1, 1, 1, S))).expand(B, H, S, S)
        if kv is not None:
            allowed = allowed & (kv[:, None, None, :] if kv.dim() == 2 else kv[:, :, None, :])
        ref, ref_lse = float_reference(q, k, v, allowed)
        err = float((out.float() - ref).norm() / ref.norm())
        tol = {torch.bfloat16: 1.6e-2, torch.float16: 3e-3, torch.float32: 5e-3}[dtype]
        r = dict(rel_l2=f"{err:.2e}", nonfinite=int((~torch.isfinite(out)).sum()))
        ok = err <= tol and r["nonfinite"] == 0
        if lse:
            fin = torch.isfinite(ref_lse)
            lse_err = float((res[1][fin] - ref_lse[fin]).abs().max())
            r.update(lse_max_abs=f"{lse_err:.2e}", lse_inf_pattern_ok=bool(torch.equal(torch.isfinite(res[1]), fin)))
            ok = ok and lse_err < 5e-2 and r["lse_inf_pattern_ok"]
        r["status"] = "ok" if ok else "FAIL"
        if DEV == "cuda" and dtype != torch.float32:
            r.update(autotune_report(D))
        return r

    return run


def autotune_report(D):
    from ditaccel.kernels.triton_attention import _autotuned

    tuner = _autotuned(1 << (D - 1).bit_length())
    timings = getattr(tuner, "configs_timings", None) or {}
    rows = [f"BM{c.kwargs['BLOCK_M']} BN{c.kwargs['BLOCK_N']} w{c.num_warps} s{c.num_stages}: "
            f"{(t[0] if isinstance(t, (list, tuple)) else t):.3f} ms" for c, t in timings.items()]
    return dict(autotune=rows, chosen=str(tuner.best_config))


def jit_resources():
    """Registers / spills / shared memory of every attention kernel the JIT compiled in this process."""
    from ditaccel.kernels.triton_attention import _block_sparse_attn_fwd, _compiled, _python_fn

    fn = _compiled(_python_fn(_block_sparse_attn_fwd))
    out = []
    for dev_cache in getattr(fn, "device_caches", {}).values():
        cache = dev_cache[0] if isinstance(dev_cache, tuple) else dev_cache
        for kern in list(cache.values()):
            kern = kern.result() if hasattr(kern, "result") else kern
            try:
                kern._init_handles()
                consts = {fn.arg_names[k[0]]: v for k, v in getattr(kern.src, "constants", {}).items()}
                out.append(dict(tiles=f"{consts.get('BLOCK_M')}x{consts.get('BLOCK_N')} w{kern.metadata.num_warps} "
                                      f"s{kern.metadata.num_stages} D{consts.get('HEAD_DIM')} bits{int(bool(consts.get('HAS_BITS')))}",
                                n_regs=kern.n_regs, n_spills=kern.n_spills, shared=kern.metadata.shared))
            except Exception as e:
                out.append(dict(error=f"{type(e).__name__}: {str(e)[:120]}"))
    worst = max((r.get("shared", 0) for r in out), default=0)
    return dict(kernels=out, n=len(out), max_shared=worst, spilling=sum(1 for r in out if r.get("n_spills")),
                status="ok" if worst <= 232448 else "FAIL")


def second_call_syncs():
    """Host syncs of the second call of a BlockMask with key_valid and a bitmap (must be 0)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    S = 4000
    q, k, v = (torch.randn(1, S, 8, 128, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    bm = create_block_mask(lambda b, h, i, j: (i - j).abs() < 700, 1, 1, S, S, device=DEV, BLOCK_SIZE=128)
    kv = torch.rand(1, S, device=DEV) < 0.9
    triton_block_sparse_attention(q, k, v, bm, key_valid=kv, return_lse=True)
    sync()
    torch.cuda.set_sync_debug_mode("error")
    try:
        triton_block_sparse_attention(q, k, v, bm, key_valid=kv, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return dict(syncs=0)


def merge_check():
    """Ring attention in miniature on the device: 4 KV chunks by key_valid, merged by LSE == one call."""
    from torch.nn.attention.flex_attention import create_block_mask

    from ditaccel.kernels import merge_by_lse
    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    S = 256 if ARGS.dry_run else 6000
    q, k, v = (torch.randn(1, 4, S, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    bm = create_block_mask(lambda b, h, i, j: (i - j).abs() < S // 3, 1, 1, S, S, device=DEV, BLOCK_SIZE=128)
    chunk = torch.arange(S, device=DEV)[None] * 4 // S
    parts = [triton_block_sparse_attention(q, k, v, bm, key_valid=chunk == c, return_lse=True) for c in range(4)]
    merged, lse = merge_by_lse([p[0] for p in parts], [p[1] for p in parts])
    whole, whole_lse = triton_block_sparse_attention(q, k, v, bm, return_lse=True)
    err = float((merged.float() - whole.float()).norm() / whole.float().norm())
    return dict(rel_l2=f"{err:.2e}", lse_max_abs=f"{float((lse - whole_lse).abs().max()):.2e}",
                status="ok" if err < 1e-2 else "FAIL")


def stage_correct():
    dry = ARGS.dry_run
    S_r, S_e = (300, 256) if dry else (3000, 4096)
    bf16 = torch.float16 if dry else torch.bfloat16  # the interpreter computes bf16 in fp32 anyway
    item("attn bf16 D128 bs128 ragged, band, key_valid per batch, lse", attention_case(
        128, 128, S_r, bf16, key_valid_kind="batch"), need=60)
    item("attn bf16 D64 bs128 even, per-head lists, key_valid per head", attention_case(
        64, 128, S_e, bf16, key_valid_kind="head", per_head_lists=True), need=60)
    item("attn bf16 D96 bs64 ragged", attention_case(96, 64, S_r, bf16), need=40)
    item("attn fp16 D128 bs128 ragged, no mask (noop partials)", attention_case(128, 128, S_r, torch.float16,
                                                                               mask="none", lse=False), need=40)
    item("attn fp32 D128 (tf32 path, warns once)", attention_case(128, 128, S_r, torch.float32), need=30)
    item("merge_by_lse over 4 KV chunks == one call", merge_check, need=20)
    if DEV == "cuda":
        item("second call of a mask: zero host syncs (set_sync_debug_mode=error)", second_call_syncs, need=20)
        item("JIT-compiled kernels: registers / spills / shared", jit_resources, need=10)


# ---------------------------------------------------------------------------------------------
# Stage 2: timings
# ---------------------------------------------------------------------------------------------


def stage_bench():
    import kernel_bench as kb
    from kernel_bench_plans import run_plans
    from torch.nn.attention.flex_attention import flex_attention

    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    dry = ARGS.dry_run
    shapes = dict(kb.SHAPES)
    if dry:  # tiny shapes, wall-clock timing, no flex
        shapes = {n: kb.Shape(n, 2, (2, 8, 16), s.text // 16, s.text_where, head_dim=64) for n, s in shapes.items()}

        def bench(f):
            f()
            t = time.perf_counter()
            f()
            return (time.perf_counter() - t) * 1e3
    else:
        import triton.testing

        def bench(f):
            return triton.testing.do_bench(f, warmup=10, rep=40, return_mode="median")
    flex = None if dry else torch.compile(flex_attention, dynamic=False)
    order = ["wan14b-720p", "hunyuan-720p", "flux-1024", "wan1.3b-480p"]
    densities = (1.0, 0.5, 0.25, 0.1, 0.05)
    if dry:  # the interpreter: enough to run every code path once
        order, densities = ["wan14b-720p", "flux-1024"], (1.0, 0.25)

    # 1. Synthetic tile-shaped masks at 100/50/25/10/5 % (kernel alone), ours vs SDPA vs flex.
    for name in order:
        shape = shapes[name]
        B, H, S, D = shape.batch, shape.heads, shape.seq, shape.head_dim
        if time_left() < 60:
            break
        q, k, v = (torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        flops = 4.0 * B * H * S * S * D
        sdpa = item(f"bench {name} sdpa", lambda: dict(ms=round(bench(lambda: F.scaled_dot_product_attention(q, k, v)), 3),
                                                      backend=kb.sdpa_backend_name(q, k, v)), need=15)
        for dens in densities:
            def run(dens=dens):
                blocks, actual = kb.tile_pattern(shape, 128, dens)
                bm = kb.block_mask_from(blocks, 128, S, DEV, 0.0, 0)
                t = time.time()
                triton_block_sparse_attention(q, k, v, bm)
                sync()
                ours = bench(lambda: triton_block_sparse_attention(q, k, v, bm))
                res = dict(density=round(actual, 3), first_call_s=round(time.time() - t, 1), ours_ms=round(ours, 3),
                           ours_eff_tflops=round(flops / ours / 1e9, 1))
                if sdpa:
                    res["sdpa_over_ours"] = round(sdpa["ms"] / ours, 2)
                if flex is not None and name != "wan1.3b-480p" and time_left() > 90:
                    flex(q, k, v, block_mask=bm)
                    fm = bench(lambda: flex(q, k, v, block_mask=bm))
                    res.update(flex_ms=round(fm, 3), flex_over_ours=round(fm / ours, 2))
                return res
            item(f"bench {name} synthetic density {dens:.2f}", run, need=30)
        if name == "wan14b-720p":
            def partial_cost():
                blocks, _ = kb.tile_pattern(shape, 128, 0.25)
                res = {}
                for pf in (0.0, 0.25, 1.0):
                    bm = kb.block_mask_from(blocks, 128, S, DEV, pf, 0)
                    triton_block_sparse_attention(q, k, v, bm)
                    res[f"partial{pf}_ms"] = round(bench(lambda: triton_block_sparse_attention(q, k, v, bm)), 3)
                kv = torch.rand(B, S, device=DEV) < 0.95
                bm = kb.block_mask_from(blocks, 128, S, DEV, 0.0, 0)
                triton_block_sparse_attention(q, k, v, bm, key_valid=kv)
                res["key_valid_ms"] = round(bench(lambda: triton_block_sparse_attention(q, k, v, bm, key_valid=kv)), 3)
                triton_block_sparse_attention(q, k, v, bm, return_lse=True)
                res["lse_ms"] = round(bench(lambda: triton_block_sparse_attention(q, k, v, bm, return_lse=True)), 3)
                return res
            item("bench wan14b density 0.25: partial blocks 0/25/100 %, key_valid, lse", partial_cost, need=60)
        del q, k, v
        if not dry:
            torch.cuda.empty_cache()

    # 2. Real plans (the methods' own) at the real grids, kernel and whole path, topk at each density;
    #    smallest shapes first (plan building at 75k+ tokens may be slow), one record per plan.
    def plans(name):
        def rec(row):
            record(dict(item=f"real plan {name} {row['plan']}", status="ok", **row))
            log("plan", json.dumps(row))
        rows = run_plans([shapes[name]], list(densities), bench, use_flex=not dry, device=DEV, time_left=time_left,
                         log=rec)
        return dict(plans=len(rows))
    for name in ("wan1.3b-480p", "flux-1024", "wan14b-720p", "hunyuan-720p")[: 1 if dry else 4]:
        item(f"real plans {name}", lambda name=name: plans(name), need=60)


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def stage_summary():
    for st in ("correct", "bench"):
        p = os.path.join(ARGS.out, f"{st}.json")
        if not os.path.exists(p):
            print(f"== {st}: no results")
            continue
        rows = json.load(open(p))
        print(f"== {st}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok")
        for r in rows:
            extra = {k: v for k, v in r.items() if k not in ("item", "status", "t", "tb", "secs", "rows", "kernels",
                                                            "autotune")}
            print(f"  {r['status']:<10} {r['item'][:70]:<70} {json.dumps(extra, default=str)[:300]}")
            for kern in r.get("kernels", []):
                print(f"  {'':<10}   {kern}")


def main():
    global ARGS, DEV
    p = argparse.ArgumentParser()
    p.add_argument("stage", choices=["correct", "bench", "summary"])
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_check"))
    p.add_argument("--deadline", type=float, default=200.0, help="seconds this stage may use")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    ARGS = p.parse_args()
    os.makedirs(ARGS.out, exist_ok=True)
    if ARGS.stage == "summary":
        return stage_summary()
    if ARGS.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
        DEV = "cpu"
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device (use --dry-run on CPU)")
    import triton

    import ditaccel

    device = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    log(f"stage {ARGS.stage}: ditaccel {ditaccel.__file__} torch {torch.__version__} triton {triton.__version__} "
        f"device {device} deadline {ARGS.deadline:.0f}s")
    record(dict(item="env", status="ok", torch=torch.__version__, triton=triton.__version__, device=device,
                dry_run=ARGS.dry_run))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        stage_correct() if ARGS.stage == "correct" else stage_bench()
    log("done")


if __name__ == "__main__":
    main()
