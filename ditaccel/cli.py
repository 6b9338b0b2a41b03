"""``ditaccel`` command line: ``compare``, ``bench`` and ``demo`` (also ``python -m ditaccel ...``).

Bad input (an unknown ``--set`` field, a bad value, a missing ``--model`` directory, a config that
does not fit the latent grid) is reported as one line on stderr with exit status 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import ast
import logging
import re
import sys

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class CLIError(ValueError):
    pass


def parse_set(items: list[str] | None) -> dict:
    """``["window=(3,3,3)", "backend=flex"]`` -> ``{"window": (3, 3, 3), "backend": "flex"}``.

    Values are Python literals (``ast.literal_eval``); anything else is taken as a string.
    """
    overrides = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep or not _FIELD.match(name):
            raise CLIError(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            value = raw.strip()
        overrides[name] = value
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditaccel", description="Sparse attention for diffusers DiT pipelines.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("compare", help="dense vs accelerated on the same seed: timings, density, quality, media",
                       description="Run the same pipeline, seed and inputs dense and accelerated; print step "
                                   "timings, speedup, density, PSNR/SSIM/LPIPS and latent rel-L2; write both "
                                   "outputs, a side-by-side and a JSON of every figure.")
    p.add_argument("--model", help="local pipeline directory or hub id (default: the embedded Wan pipeline)")
    p.add_argument("--method", help="attention method name (default: the preset: the model family's, or the embedded pipeline's own)")
    p.add_argument("--set", dest="sets", action="append", metavar="FIELD=VALUE", default=[],
                   help="config field override, repeatable, e.g. --set window=(3,3,3) --set dense_steps=1")
    p.add_argument("--prompt", help="prompt (default: the embedded pipeline's DEFAULT_PROMPT)")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video frames")
    p.add_argument("--guidance", type=float, help="guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="model dtype (default: bfloat16 on cuda, float32 elsewhere)")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="extra untimed full calls before each side's timed run, for steady-state timings "
                        "(kernel compilation, plan building); a 1-step untimed call always runs first")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the written videos")
    p.add_argument("--out", default="ditaccel-compare", help="output directory (default: ./ditaccel-compare/)")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="also write the JSON report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    from .bench import add_parser as add_bench_parser
    from .demo import add_parser as add_demo_parser

    add_bench_parser(sub)
    add_demo_parser(sub)
    from .pipelines.coverage import add_parser as add_presets_parser
    add_presets_parser(sub)
    return parser


def cmd_compare(args) -> int:
    from .compare import format_report, run_compare

    for flag in ("steps", "height", "width", "frames", "warmup", "fps"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise CLIError(f"--{flag} must be {'>= 0' if flag == 'warmup' else 'positive'}, got {value}")
    # The table prints LPIPS's note itself; keep the library's one-line log note off stderr.
    metrics_log = logging.getLogger("ditaccel.metrics")
    level = metrics_log.level
    metrics_log.setLevel(logging.ERROR)
    try:
        report = run_compare(
            model=args.model, method=args.method, overrides=parse_set(args.sets), prompt=args.prompt,
            steps=args.steps, height=args.height, width=args.width, frames=args.frames, guidance=args.guidance,
            seed=args.seed, device=args.device, dtype=args.dtype, warmup=args.warmup,
            progress=not args.no_progress, out=args.out, json_path=args.json_path, fps=args.fps,
        )
    finally:
        metrics_log.setLevel(level)
    print(format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ditaccel {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ditaccel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
