"""``python -m ditaccel.bench``: the bench without the ``ditaccel`` front end (same flags, same exit codes)."""

import sys

from .cli import build_parser, main


def run(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (2) and --help (0)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return main(args)
    except (ValueError, OSError) as exc:
        if args.debug:
            raise
        print(f"ditaccel bench: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditaccel bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
