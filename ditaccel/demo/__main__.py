"""``python -m ditaccel.demo``: the ``ditaccel demo`` server, until ``ditaccel/cli.py`` wires the subcommand."""

import sys

from . import build_parser, main

try:
    sys.exit(main(build_parser().parse_args()))
except ValueError as exc:
    print(f"ditaccel demo: error: {' '.join(str(exc).split())}", file=sys.stderr)
    sys.exit(2)
except KeyboardInterrupt:
    sys.exit(130)
