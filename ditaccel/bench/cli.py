"""``ditaccel bench`` on the command line: ``add_parser(subparsers)`` for ``ditaccel/cli.py``, ``main(args)``.

Exit status: 0 when every compared cell is within tolerance (or no ``--baseline`` was given; failing
cells are listed either way), 1 on a regression against ``--baseline``, 2 on bad input (raised as
ValueError, reported by the caller as one line), 130 when interrupted (results.json then holds the
cells done so far).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from .matrix import BenchMatrix, default_matrix, load_matrix, parse_method, parse_size

DESCRIPTION = (
    "Run a matrix of model x method x size x seed dense and accelerated on the same seeds; write "
    "results.json, results.csv, figures (speedup vs PSNR, density over layers x steps, block maps) and a "
    "self-contained report.html; with --baseline, exit 1 and name the metric on a regression. Default: the "
    "embedded pipeline, every method with its defaults, 128x256 px, 9 frames, 4 steps, seeds 0 and 1, CPU."
)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--matrix", metavar="FILE", help="matrix file (.yaml/.yml or .json); flags below override it")
    p.add_argument("--model", dest="models", action="append", metavar="M",
                   help="'embedded' (the default), a local pipeline directory or a hub id; repeatable")
    p.add_argument("--method", dest="methods", action="append", metavar="NAME",
                   help="a method name, 'preset' (the model's preset) or 'all' (every method); repeatable")
    p.add_argument("--size", dest="sizes", action="append", metavar="HxW[xF]",
                   help="resolution and frames, e.g. 256x256x9; repeatable (steps from --steps)")
    p.add_argument("--steps", type=int, help="denoising steps for every size (default: the matrix's)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED", help="seeds (default: 0 1)")
    p.add_argument("--device", help="torch device (default: cpu for the default matrix)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--prompt")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--warmup", type=int, metavar="N", help="extra untimed full calls per side before timing")
    p.add_argument("--repeats", type=int, metavar="N",
                   help="interleaved timed runs per side per cell (default 1; 2+ lets the verdict judge noise)")
    p.add_argument("--shared-dense", action="store_true",
                   help="time one dense run per (model, size, seed) for all its methods instead of one right "
                        "before each accelerated run (cheaper; ratios drift when the machine is busy)")
    p.add_argument("--error-steps", type=int, nargs="+", metavar="STEP",
                   help="steps at which attention error against dense is measured (default: middle and last)")
    p.add_argument("--mask-layer", type=int, help="layer whose block map is drawn (default: the first sparse one)")
    p.add_argument("--mask-head", type=int, help="head whose block map is drawn (default: 0)")
    p.add_argument("--out", default="ditaccel-bench", help="output directory (default: ./ditaccel-bench/)")
    p.add_argument("--baseline", metavar="FILE", help="compare with this baseline (or results.json); exit 1 on regression")
    p.add_argument("--tolerance", action="append", metavar="METRIC=VALUE", default=[],
                   help="override a baseline tolerance, e.g. --tolerance psnr=1.0 --tolerance speedup=0.3")
    p.add_argument("--save-baseline", metavar="FILE", help="write this run's metrics as a baseline file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cp", metavar="MODE=N",
                   help="under torchrun / accelerate launch: run every cell with diffusers' context parallelism over "
                        "all ranks (ulysses=N or ring=N, N = the world size) instead of splitting the cells "
                        "across ranks (the default of a distributed launch)")
    return p


def add_parser(subparsers) -> argparse.ArgumentParser:
    """``ditaccel bench``: add the sub-command to ``ditaccel/cli.py``'s sub-parsers."""
    p = subparsers.add_parser("bench", help="quality/speed regression matrix against a baseline",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def matrix_from_args(args) -> BenchMatrix:
    matrix = load_matrix(args.matrix) if args.matrix else default_matrix()
    changes = {}
    if args.models:
        changes["models"] = tuple(args.models)
    if args.methods:
        changes["methods"] = "all" if args.methods == ["all"] else tuple(parse_method(m) for m in args.methods)
    if args.sizes:
        changes["sizes"] = tuple(dataclasses.replace(parse_size(s), steps=args.steps) for s in args.sizes)
    elif args.steps is not None:
        changes["sizes"] = tuple(dataclasses.replace(s, steps=args.steps) for s in matrix.sizes)
    if args.shared_dense:
        changes["paired_timing"] = False
    for name in ("seeds", "error_steps"):
        if getattr(args, name) is not None:
            changes[name] = tuple(getattr(args, name))
    for name in ("device", "dtype", "prompt", "guidance", "warmup", "repeats", "mask_layer", "mask_head"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    try:
        return dataclasses.replace(matrix, **changes) if changes else matrix
    except ValueError as exc:
        raise ValueError(f"bench flags: {exc}") from None


def main(args) -> int:
    """Run the bench described by parsed ``args``; returns the exit status (see the module doc).

    The run's files go to a staging directory beside ``--out`` and replace the previous run's as one
    set at the end (also after a first Ctrl-C, then marked incomplete); a second interrupt while
    they are written leaves ``--out`` as it was. Under torchrun / accelerate launch the cells are
    split over the ranks, or run with context parallelism under ``--cp`` (:mod:`.distributed`);
    rank 0 writes the files, checks the baseline and prints the table; the other ranks return 0."""
    from . import distributed
    from .baseline import load_baseline, parse_tolerance_flags
    from .runner import BenchRun

    matrix = matrix_from_args(args)
    launch = distributed.detect_launch()
    cp = distributed.check_cp(distributed.parse_cp(args.cp), launch) if getattr(args, "cp", None) else None
    tolerances = parse_tolerance_flags(args.tolerance)
    baseline = load_baseline(args.baseline) if args.baseline else None  # fail before the long run
    if launch is None:
        return _run(BenchRun(matrix, Path(args.out), progress=not args.no_progress), args, tolerances, baseline)
    device = distributed.rank_device(matrix, launch)
    with distributed.process_group(launch, device) as backend:
        run = distributed.DistributedBenchRun(matrix, Path(args.out), launch, device, cp=cp, backend=backend,
                                              progress=not args.no_progress)
        return _run(run, args, tolerances, baseline)


def _run(run, args, tolerances, baseline) -> int:
    from .baseline import compare_results, format_diff, save_baseline
    from .report import format_table, write_outputs

    # The table reports LPIPS availability; keep the metrics module's one-line note off stderr.
    metrics_log = logging.getLogger("ditaccel.metrics")
    level = metrics_log.level
    metrics_log.setLevel(logging.ERROR)
    try:
        run.run()
    except KeyboardInterrupt:
        if run.files is not None:  # a distributed run: rank 0's own cells only
            run.results["interrupted"] = True
            _finish(run, write_outputs(run))
        raise
    except BaseException:
        if run.files is not None:
            run.files.discard()  # --out keeps the previous run's files
        raise
    finally:
        metrics_log.setLevel(level)
    if run.files is None:  # another rank of a distributed run: rank 0 writes and reports
        return 0
    diff = compare_results(run.results, baseline, tolerances) if baseline is not None else None
    diff_text = format_diff(diff) if diff is not None else None
    run.results["baseline"] = diff
    _finish(run, write_outputs(run, diff, diff_text))
    print(format_table(run.results, _rows(run)))
    print("\nwrote " + ", ".join(sorted(set(run.results["files"].values()))))
    if args.save_baseline:
        print(f"baseline written to {save_baseline(run.results, args.save_baseline, tolerances)}")
    if diff_text:
        print("\n" + diff_text)
    return 1 if diff is not None and diff["regressions"] else 0


def _finish(run, files: dict) -> None:
    """results.json with the files' final paths, then the whole set swapped into ``--out``."""
    run.results["files"] = {k: run.files.final(v) for k, v in files.items()}
    run.save()
    run.commit()


def _rows(run):
    from .runner import aggregate

    return aggregate(run.results["cells"])


def build_parser() -> argparse.ArgumentParser:
    """The stand-alone parser of ``python -m ditaccel.bench``."""
    p = argparse.ArgumentParser(prog="python -m ditaccel.bench", description=DESCRIPTION)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return add_arguments(p)


__all__ = ["add_arguments", "add_parser", "build_parser", "main", "matrix_from_args"]
