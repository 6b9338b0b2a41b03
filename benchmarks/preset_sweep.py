"""Sweep attention configs on one pipeline call: one dense run, then every config on the same seed.

    python benchmarks/preset_sweep.py --json benchmarks/preset_sweep.json     # the embedded default

Prints, per config: mean density, median step time and its ratio to dense, PSNR / SSIM / latent
error against the dense output. This is how the embedded pipeline's preset was chosen
(``ditaccel/pipelines/embedded.py``, ``PRESET``); add configs with ``--config 'method k=v ...'``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time

import torch

import ditaccel
from ditaccel.cli import parse_set
from ditaccel.compare import call_arguments, load_pipeline, timed_run, warm_up
from ditaccel.metrics import compare_media
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
    warm_up(pipe, dict(kwargs, num_inference_steps=1), seed=args.seed, runs=1)
    dense = timed_run(pipe, kwargs, seed=args.seed, device=device, label="dense", progress=False)
    dense_ms = dense.timing()["median_step_ms"]
    print(f"dense: median step {dense_ms:.0f} ms  ({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'prompt_embeds')})")
    print(f"{'config':58} {'density':>8} {'step ms':>8} {'speedup':>8} {'PSNR':>6} {'SSIM':>6} {'latent':>7}")
    rows = []
    for text in args.config or CONFIGS:
        method, overrides = parse_config(text)
        start = time.perf_counter()
        handle = ditaccel.accelerate(pipe, method, **overrides)
        try:
            run = timed_run(pipe, kwargs, seed=args.seed, device=device, label=method, progress=False)
            stats = handle.stats()
        finally:
            handle.remove()
        q = compare_media(dense.media, run.media, reference_latents=dense.latents, test_latents=run.latents,
                          with_lpips=False)
        step_ms = run.timing()["median_step_ms"]
        row = dict(config=text, density=stats["mean_density"], median_step_ms=step_ms,
                   speedup_median_step=dense_ms / step_ms, psnr=q["psnr"], ssim=q["ssim"],
                   latent_rel_l2=q.get("latent_rel_l2"), wall_s=time.perf_counter() - start)
        rows.append(row)
        print(f"{text:58} {row['density']:8.3f} {step_ms:8.0f} {row['speedup_median_step']:7.2f}x "
              f"{row['psnr']:6.1f} {row['ssim']:6.3f} {row['latent_rel_l2'] or float('nan'):7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(call={k: v for k, v in kwargs.items() if isinstance(v, (str, int, float))},
                           device=str(device), dense_median_step_ms=dense_ms, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
