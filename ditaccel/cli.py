"""``ditaccel`` command line: ``compare``, ``bench``, ``demo``, ``methods`` (also ``python -m ditaccel ...``).

Bad input (an unknown ``--set`` field, a bad value, a missing ``--model`` directory, a config that
does not fit the latent grid) is reported as one line on stderr with exit status 2; ``--debug``
(before or after the command) shows the traceback instead. Building the parser imports nothing
heavy (no torch), so ``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import ast
import logging
import re
import sys

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The built-in methods, named here so --help needs no import of the methods (tests keep it equal
# to ditaccel.METHODS).
METHOD_NAMES = ("dense", "window", "tile", "radial", "heads", "cluster", "topk", "xattn")
VERSION = "0.1.0"
SET_HELP = ("config field override, repeatable: --set kernel_size=3,9,9 --set dense_steps=2 "
            "(values are Python literals; a tuple needs no parentheses; `ditaccel methods` lists every field)")


class CLIError(ValueError):
    pass


class OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line ("ditaccel compare: error: ..."), like every other bad input; the
    usage stays one ``--help`` away."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def parse_set(items: list[str] | None) -> dict:
    """``["window=3,3,3", "backend=flex"]`` -> ``{"window": (3, 3, 3), "backend": "flex"}``.

    Values are Python literals (``ast.literal_eval``: ``3,3,3`` and ``(3,3,3)`` are both tuples);
    anything else is taken as a string.
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


def _common(p: argparse.ArgumentParser, top: bool = False) -> argparse.ArgumentParser:
    """Flags every command takes, before or after its name (the sub-parser's copy must not reset
    what was given before the command, hence SUPPRESS)."""
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show tracebacks instead of one-line errors")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="ditaccel", description="Sparse attention for diffusers DiT pipelines.")
    _common(parser, top=True)
    parser.add_argument("--version", action="version", version=f"ditaccel {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("compare", help="dense vs accelerated on the same seed: timings, density, quality, media",
                       description="Run the same pipeline, seed and inputs dense and accelerated (interleaved "
                                   "repeats); print step timings, the speedup (dense time / accelerated time: >1 "
                                   "= faster) or 'inconclusive' when the machine is too noisy, density, "
                                   "PSNR/SSIM/LPIPS with a quality verdict, and write both outputs, a labelled "
                                   "side-by-side and a JSON of every figure.",
                       epilog="examples:\n"
                              "  ditaccel compare\n"
                              "  ditaccel compare --method xattn --set block_size=64 --set threshold=0.93\n"
                              "  ditaccel compare --method heads --set dense_steps=4 --set block_size=64\n"
                              "  ditaccel compare --steps 4 --repeats 1 --json -",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--model", help="local pipeline directory or hub id (default: the embedded Wan pipeline)")
    p.add_argument("--method", choices=METHOD_NAMES, metavar="{" + ",".join(METHOD_NAMES) + "}",
                   help="attention method (default: the preset: the model family's, or the embedded pipeline's own)")
    p.add_argument("--set", dest="sets", action="append", metavar="FIELD=VALUE", default=[], help=SET_HELP)
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
    p.add_argument("--repeats", type=int, default=2, metavar="N",
                   help="interleaved timed runs per side (dense, accelerated, dense, ...; default 2): the "
                        "speedup is the ratio of medians, and is 'inconclusive' when they spread > 20%%")
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="extra untimed full calls per side before timing (a short call per side always runs)")
    p.add_argument("--fps", type=int, default=8, help="frame rate of the written videos")
    p.add_argument("--out", default="ditaccel-compare", help="output directory (default: ./ditaccel-compare/)")
    p.add_argument("--json", dest="json_path", metavar="PATH",
                   help="also write the JSON record here; '-' writes it to stdout (the table then goes to stderr)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("methods", help="every attention method with its knobs, ranges, defaults and help",
                       description="List the attention methods and every knob: kind, allowed values, default, help.")
    _common(p)
    p.add_argument("name", nargs="?", choices=METHOD_NAMES, metavar="METHOD", help="only this method")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("calibrate", help="search a per-(layer, head, step) table for this pipeline against a quality "
                                         "target; write it as a preset file",
                       description="Run the pipeline dense on a few prompts, profile every candidate per (layer, "
                                   "head, step range) on sampled query rows, pick per cell the cheapest candidate "
                                   "under an error budget, tune the budget with full runs until the target holds, "
                                   "and write a preset (ditaccel.accelerate(pipe, preset=PATH)).",
                       epilog="examples:\n  ditaccel calibrate\n  ditaccel calibrate --target psnr=34 --budget-minutes 5"
                              "\n  ditaccel calibrate --candidates share,cfg_share,xattn:threshold=0.9"
                              "\n  ditaccel calibrate --candidates extended",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(p)
    p.add_argument("--model", help="local pipeline directory or hub id (default: the embedded Wan pipeline)")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="calibration prompt, repeatable (default: the embedded pipeline's calibration prompts)")
    p.add_argument("--target", default="psnr=32", help="psnr=DB or lpips=VALUE against dense (default psnr=32)")
    p.add_argument("--over-prompts", choices=("worst", "mean"), default="worst",
                   help="the target holds for every calibration prompt (worst, default) or on their mean")
    p.add_argument("--budget-minutes", type=float, default=10.0, help="wall-time budget (default 10)")
    p.add_argument("--candidates", help="comma-separated candidates (method:knob=value;knob=value, residual:method:..., "
                                        "an axis 'all'), or the sets 'default' (ditaccel.calibration.DEFAULT_CANDIDATES) "
                                        "and 'extended' (with head patterns and residual reuse); default: 'default'")
    p.add_argument("--margin", type=float, default=3.0, help="dB above the target the worst calibration prompt must reach (default 3: prompts spread by several dB)")
    p.add_argument("--cost", choices=("time", "blocks"), default="time",
                   help="what 'cheapest' means: measured per-call time (default) or blocks computed")
    p.add_argument("--steps", type=int, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--state", default="ditaccel-calibrate.state.pt", help="resumable state file")
    p.add_argument("--out", default="ditaccel-preset.json", help="the preset file to write")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_calibrate)

    from .bench import add_parser as add_bench_parser
    from .demo import add_parser as add_demo_parser

    _common(add_bench_parser(sub))
    _common(add_demo_parser(sub))
    from .pipelines.coverage import add_parser as add_presets_parser
    _common(add_presets_parser(sub))
    return parser


def cmd_compare(args) -> int:
    from .compare import format_report, run_compare

    for flag in ("steps", "height", "width", "frames", "warmup", "fps", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            raise CLIError(f"--{flag} must be {'>= 0' if flag == 'warmup' else 'positive'}, got {value}")
    to_stdout = args.json_path == "-"
    human = sys.stderr if to_stdout else sys.stdout

    def say(line: str) -> None:  # the header before the first run, then one line per run
        print(line, file=human, flush=True)

    # The table prints LPIPS's note itself; keep the library's one-line log note off stderr.
    metrics_log = logging.getLogger("ditaccel.metrics")
    level = metrics_log.level
    metrics_log.setLevel(logging.ERROR)
    try:
        report = run_compare(
            model=args.model, method=args.method, overrides=parse_set(args.sets), prompt=args.prompt,
            steps=args.steps, height=args.height, width=args.width, frames=args.frames, guidance=args.guidance,
            seed=args.seed, device=args.device, dtype=args.dtype, warmup=args.warmup, repeats=args.repeats,
            progress=not args.no_progress, out=args.out, json_path=args.json_path, fps=args.fps, say=say,
        )
    finally:
        metrics_log.setLevel(level)
    print(format_report(report), file=human)
    return 0


def cmd_calibrate(args) -> int:
    from .calibration import calibrate
    from .eval.runs import load_pipeline, resolve_device, resolve_dtype

    if args.budget_minutes <= 0:
        raise CLIError(f"--budget-minutes must be positive, got {args.budget_minutes}")
    device = resolve_device(args.device)
    pipe, defaults = load_pipeline(args.model, device, resolve_dtype(None, device))
    call = dict(defaults)
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    candidates = None
    if args.candidates:  # ';' separates a candidate's knobs on the command line, ',' the candidates
        candidates = [c.strip().replace(";", ",") for c in args.candidates.split(",") if c.strip()]
    result = calibrate(pipe, args.prompts, target=args.target, budget_minutes=args.budget_minutes,
                       candidates=candidates, call=call, seed=args.seed, margin=args.margin, cost=args.cost,
                       over_prompts=args.over_prompts, state_path=args.state, out=args.out, progress=not args.no_progress,
                       say=lambda line: print(line, flush=True))
    q = result["quality"]
    print(f"calibrated in {result['wall_s']:.0f} s ({result['probes']} probes"
          f"{', budget exhausted' if result['budget_exhausted'] else ''}): {q['kind']} {q['mean']:.2f} +- {q['std']:.2f} "
          f"on the calibration prompts, estimated attention cost {result['cost']:.3f} of dense, "
          f"density {result['density']:.3f}; preset {result['preset']}")
    return 0


def cmd_methods(args) -> int:
    from .methods_doc import methods_text

    print(methods_text(args.name))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors (2), --help and --version (0)
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
