"""CPU sanity check (not a speed claim): the time of a denoising step of the embedded (Wan) pipeline in
2 processes under diffusers' Ulysses context parallelism (gloo) vs the same step in 1 process, for
the dense pipeline and for ditaccel's method (the embedded preset by default) on top of it; with
``--cp ring`` under ring context parallelism instead (ditaccel's LSE ring: diffusers' native attention
returns no LSE, so the dense 2-process side is ditaccel's ``dense`` method, whose attention is the
exact dense ring).

    python benchmarks/cp_step_time.py                      # 144x192x17 (2,160 tokens), 3 steps, 3 repeats
    python benchmarks/cp_step_time.py --size 256x256x17 --repeats 2 --json cp.json
    python benchmarks/cp_step_time.py --cp ring

One command: it spawns the 2 ranks itself. Rank 0 holds a plain copy of the pipeline and a
context-parallel one; repeats interleave: a 1-process run on rank 0 (``--single-threads`` threads,
default 2, while rank 1 waits in a barrier), then a 2-process run (1 thread per rank), so the two
sides use the same cores and share the same machine load. A step's time is the median of a run's
per-step times (callback to callback; under Ulysses, rank 0's wall time of the collective step);
the table shows the median over repeats and every repeat. The final latents of the two sides are
compared too (relative L2), so the figure is of the same computation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, args, results) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        import warnings

        warnings.simplefilter("ignore")
        import logging

        logging.getLogger("diffusers").setLevel(logging.ERROR)
        import ditaccel
        from ditaccel.bench.distributed import enable_context_parallel
        from ditaccel.bench.matrix import parse_size
        from ditaccel.eval.runs import call_arguments, load_pipeline, timed_run, warm_up
        from ditaccel.pipelines.embedded import DEFAULT_PROMPT

        device, dtype = torch.device("cpu"), torch.float32
        size = parse_size(args.size)
        pipe_cp, defaults = load_pipeline(None, device, dtype)
        enable_context_parallel(pipe_cp, {args.cp: WORLD})
        pipe_one = load_pipeline(None, device, dtype)[0] if rank == 0 else None
        call = call_arguments(pipe_cp, defaults, DEFAULT_PROMPT, steps=args.steps, height=size.height,
                              width=size.width, frames=size.frames, guidance=None)

        def accelerated(pipe, method):
            return ditaccel.accelerate(pipe, None if method == "preset" else method, dense_steps=args.dense_steps)

        def plain(pipe, method):  # the pipeline's own attention (ring: none runs on CPU, see the module doc)
            return method == "dense" and not (pipe is pipe_cp and args.cp == "ring")

        def step_ms(pipe, method):
            if plain(pipe, method):
                run = timed_run(pipe, call, seed=0, device=device, label="dense", progress=False)
            else:
                with accelerated(pipe, method) as handle:
                    if pipe is pipe_one:  # the whole sequence (a ring rank sees its rows only)
                        handle.observe(lambda info, q, k, v: out.__setitem__("tokens", q.shape[1]))
                    run = timed_run(pipe, call, seed=0, device=device, label=method, progress=False)
                    if rank == 0:
                        out["methods"][method] = handle.config.method
                        out["density"][method] = handle.stats()["mean_density"]
            return 1e3 * statistics.median(run.step_s), run.latents

        out = {"one": {}, "two": {}, "rel_l2": {}, "methods": {}, "density": {},
               "size": f"{size.height}x{size.width}x{size.frames}"}
        for method in args.methods:
            # warm-up, untimed: both sides once
            if rank == 0:
                torch.set_num_threads(max(args.single_threads))
                with accelerated(pipe_one, method) if not plain(pipe_one, method) else _nothing():
                    warm_up(pipe_one, call, seed=0, steps=2)
            dist.barrier()
            torch.set_num_threads(1)
            with accelerated(pipe_cp, method) if not plain(pipe_cp, method) else _nothing():
                warm_up(pipe_cp, call, seed=0, steps=2)
            dist.barrier()
            one, two = {t: [] for t in args.single_threads}, []
            for _ in range(args.repeats):
                if rank == 0:
                    for threads in args.single_threads:
                        torch.set_num_threads(threads)
                        ms, latents_one = step_ms(pipe_one, method)
                        one[threads].append(ms)
                dist.barrier()
                torch.set_num_threads(1)
                ms, latents_two = step_ms(pipe_cp, method)
                two.append(ms)
                dist.barrier()
            if rank == 0:
                out["one"][method], out["two"][method] = one, two
                a, b = latents_two.double(), latents_one.double()
                out["rel_l2"][method] = float((a - b).norm() / b.norm())
        results[rank] = out
    except BaseException:  # noqa: BLE001 - the parent reports it
        results[rank] = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", choices=("ulysses", "ring"), default="ulysses", help="context parallelism (default ulysses)")
    p.add_argument("--size", default="144x192x17", help="HxWxF (default: the embedded pipeline's trained size)")
    p.add_argument("--steps", type=int, default=3, help="denoising steps per run (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved 1-process / 2-process runs (default 3)")
    p.add_argument("--methods", nargs="+", default=["dense", "preset"],
                   help="'dense' (no ditaccel), 'preset' (the embedded preset) or method names")
    p.add_argument("--single-threads", type=int, nargs="+", default=[1, WORLD],
                   help=f"intra-op threads of the 1-process side, each timed (default 1 {WORLD}: {WORLD} = the "
                        "cores the 2 ranks use together)")
    p.add_argument("--dense-steps", type=int, default=0,
                   help="dense_steps of the ditaccel methods (default 0: every timed step runs the method)")
    p.add_argument("--timeout", type=float, default=1500, help="seconds before the ranks are killed")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    started = time.time()
    port = _free_port()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, port, args, results)) for r in range(WORLD)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=max(1.0, args.timeout - (time.time() - started)))
        alive = [proc for proc in procs if proc.is_alive()]
        for proc in alive:
            proc.kill()
        results = dict(results)
    if alive:
        print(f"cp_step_time: a rank did not finish within {args.timeout:.0f} s", file=sys.stderr)
        return 1
    for rank in range(WORLD):
        if "error" in results.get(rank, {"error": "no result"}):
            print(f"rank {rank} failed:\n{results.get(rank, {}).get('error')}", file=sys.stderr)
            return 1
    out = results[0]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"embedded pipeline {out['size']} ({out.get('tokens')} video tokens), {args.steps} steps, {args.repeats} "
          f"interleaved repeats, CPU ({os.cpu_count()} cores, load average at the end {load[0]:.1f}); "
          f"1 process x N threads vs 2 processes x 1 thread under {args.cp} (gloo)")
    print(f"{'method':<8} {'density':>7} {'threads':>7} {'1-proc step ms':>14} {'2-proc step ms':>14} {'2p/1p':>6}  "
          f"{'latent rel-L2':>13}  repeats (1p | 2p)")
    for method in args.methods:
        two = statistics.median(out["two"][method])
        name = out["methods"].get(method, "dense")
        density = out["density"].get(method)
        for threads, runs in out["one"][method].items():
            one = statistics.median(runs)
            print(f"{name:<8} {density if density is not None else 1.0:>7.3f} {threads:>7} {one:>14.1f} {two:>14.1f} "
                  f"{two / one:>6.2f}  {out['rel_l2'][method]:>13.2e}  "
                  f"{' '.join(f'{x:.0f}' for x in runs)} | {' '.join(f'{x:.0f}' for x in out['two'][method])}")
    print("density: the 2-process run's rank 0 (Ulysses: its heads; ring: its rows); latent rel-L2: 2-process vs the "
          "last 1-process run")
    print("a sanity check on a shared CPU, not a speed claim: context parallelism pays off across devices, "
          "which one machine's cores are not")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(out, args=vars(args), load_average=load), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
