"""Sweep attention configs on one pipeline call: one dense run, then every config on the same seed.

    python benchmarks/preset_sweep.py --json benchmarks/preset_sweep.json     # the embedded default

Each config is one run of the evaluation engine (``ditaccel.eval.evaluate``) given the one dense
run (so its timing is not interleaved: for speed figures that mean something use
``ditaccel compare``'s interleaved repeats). Prints, per config: mean density, the speedup (dense
time / accelerated time over the denoising loop), PSNR / SSIM / latent error against dense and the
quality band. This is how the embedded pipeline's preset was chosen (``ditaccel/pipelines/embedded.py``,
``PRESET``); add configs with ``--config 'method k=v ...'``.
"""

from __future__ import annotations

import argparse
import json
import shlex

import torch

from ditaccel.cli import parse_set
from ditaccel.eval import call_arguments, evaluate, jsonable, load_pipeline, timed_run, warm_up
from ditaccel.pipelines.embedded import DEFAULT_PROMPT

CONFIGS = (
    "tile",
    "tile block_size=64",
    "tile block_size=64 window=(3,5,5)",
    "tile block_size=64 dense_steps=4",
    "window block_size=64 kernel_size=(3,11,11)",
    "window block_size=64 kernel_size=(5,13,13) dense_steps=4",
    "radial block_size=64",
    "radial block_size=64 dense_steps=4",
    "heads block_size=64",
    "heads block_size=64 dense_steps=4",
    "xattn block_size=64",
    "xattn block_size=64 threshold=0.95",
    "xattn block_size=64 threshold=0.95 dense_steps=4",
    "topk block_size=64 topk=0.5 dense_steps=4",
)


def parse_config(text: str) -> tuple[str, dict]:
    method, *fields = shlex.split(text)
    return method, parse_set(fields)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="pipeline path or hub id (default: the embedded pipeline)")
    p.add_argument("--config", action="append", help="'method field=value ...' (repeatable; default: a built-in list)")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pipe, defaults = load_pipeline(args.model, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    kwargs = call_arguments(pipe, defaults, DEFAULT_PROMPT, steps=args.steps)
    warm_up(pipe, kwargs, seed=args.seed, steps=1)
    dense = timed_run(pipe, kwargs, seed=args.seed, device=device, label="dense", progress=False)
    print(f"dense: loop {dense.loop_s * 1e3:.0f} ms  "
          f"({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'prompt_embeds')})")
    print(f"{'config':58} {'density':>8} {'loop ms':>8} {'speedup':>8} {'PSNR':>6} {'SSIM':>6} {'latent':>7}  quality")
    rows = []
    for text in args.config or CONFIGS:
        method, overrides = parse_config(text)
        r = evaluate(pipe, method, overrides=overrides, call=kwargs, seed=args.seed, repeats=1, dense_runs=[dense],
                     progress=False)
        q, t = r.quality, r.timing
        row = dict(config=text, density=r.stats["mean_density"], loop_ms=t.accel_median_ms, speedup=t.speedup,
                   speedup_sparse_steps=t.speedup_sparse_steps, psnr=q["psnr"], identical=q["identical"],
                   ssim=q["ssim"], latent_rel_l2=q.get("latent_rel_l2"), band=r.quality_verdict["band"],
                   wall_s=r.wall_s)
        rows.append(row)
        psnr = "   inf" if q["identical"] else f"{row['psnr']:6.1f}"
        print(f"{text:58} {row['density']:8.3f} {row['loop_ms']:8.0f} {row['speedup']:7.2f}x "
              f"{psnr} {row['ssim']:6.3f} {row['latent_rel_l2'] or float('nan'):7.3f}  {row['band']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(jsonable(dict(call={k: v for k, v in kwargs.items() if isinstance(v, (str, int, float))},
                                    device=str(device), dense_loop_ms=dense.loop_s * 1e3,
                                    speedup="dense time / accelerated time over the denoising loop (>1 = faster)",
                                    rows=rows)), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
