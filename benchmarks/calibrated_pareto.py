"""Pareto table of the calibrated embedded preset against every single-method preset, on held-out prompts.

    PYTHONPATH=. python benchmarks/calibrated_pareto.py --out /tmp/pareto.json [--seeds 0 1] [--methods all]

For every held-out prompt (``embedded.HELDOUT_PROMPTS``, none used for calibration) and seed: one
dense run, then one accelerated run per method through the evaluation engine with that dense run as
its reference (``evaluate(..., dense_runs=[...])``): PSNR and SSIM against dense, the attention
density the run computed (``stats()["mean_density"]``: reused outputs count 0) and the denoising
loop's speed ratio (dense loop time / accelerated; not interleaved, so on a loaded machine the
ratios drift). Prints a markdown table (mean +- std over prompts x seeds) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="pareto.json")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--prompts", type=int, default=None, help="only the first N held-out prompts")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help="'all' (calibrated, the hand preset and every method with its defaults) or names")
    args = p.parse_args(argv)

    import ditaccel
    from ditaccel.eval.engine import evaluate
    from ditaccel.eval.runs import timed_run
    from ditaccel.pipelines import embedded

    torch.set_num_threads(2)
    pipe = embedded.load()
    methods = {"calibrated": embedded.PRESET, "hand preset (xattn 0.95, 2 dense)": embedded.HAND_PRESET}
    methods.update({name: name for name in ditaccel.METHODS if name != "dense"})
    if args.methods != ["all"]:
        methods = {k: v for k, v in methods.items() if k in args.methods or k.split(" ")[0] in args.methods}
    prompts = embedded.HELDOUT_PROMPTS[: args.prompts] if args.prompts else embedded.HELDOUT_PROMPTS
    rows: dict[str, list[dict]] = {name: [] for name in methods}
    t0 = time.perf_counter()
    for prompt in prompts:
        for seed in args.seeds:
            call = dict(embedded.DEFAULTS, prompt=prompt)
            dense = timed_run(pipe, call, seed=seed, device=torch.device("cpu"), label="dense", progress=False)
            for name, method in methods.items():
                rec = evaluate(pipe, method, call=call, seed=seed, repeats=1, dense_runs=[dense], progress=False)
                rows[name].append({"prompt": prompt, "seed": seed, "psnr": rec.quality.get("psnr"),
                                   "ssim": rec.quality.get("ssim"), "density": rec.stats.get("mean_density"),
                                   "speedup": dense.loop_s / rec.accelerated.loop_s})
                print(f"{name:<36} {prompt[:40]:<40} seed {seed}: psnr {rows[name][-1]['psnr']:.2f} "
                      f"density {rows[name][-1]['density']:.3f} speed {rows[name][-1]['speedup']:.2f}x",
                      file=sys.stderr, flush=True)
    summary = {}
    for name, rs in rows.items():
        def ms(key):
            vals = [r[key] for r in rs if r[key] is not None]
            if not vals:
                return None, None
            return statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0
        summary[name] = {k: ms(k) for k in ("psnr", "ssim", "density", "speedup")}
    print("| method | density (mean) | speed (loop, x) | PSNR dB (mean +- std) | SSIM |")
    print("|---|---|---|---|---|")
    for name, s in sorted(summary.items(), key=lambda kv: -(kv[1]["psnr"][0] or 0)):
        d, sp, ps, ss = s["density"], s["speedup"], s["psnr"], s["ssim"]
        print(f"| {name} | {d[0]:.3f} | {sp[0]:.2f} +- {sp[1]:.2f} | {ps[0]:.2f} +- {ps[1]:.2f} | {ss[0]:.3f} |")
    json.dump({"rows": rows, "summary": summary, "prompts": list(prompts), "seeds": args.seeds,
               "wall_s": time.perf_counter() - t0}, open(args.out, "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
