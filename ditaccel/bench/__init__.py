"""``ditaccel bench``: the quality/speed regression matrix (dense vs accelerated on the same seeds).

- :mod:`.matrix` — what runs: model x method x size x seed, from flags or a YAML/JSON file;
- :mod:`.runner` — running it: per-cell timings, density, quality, attention error; results.json
  written atomically after every cell, a failing cell recorded and the matrix going on;
- :mod:`.baseline` — comparing with a committed baseline under per-metric tolerances;
- :mod:`.plots`, :mod:`.report` — figures, results.csv, a self-contained report.html;
- :mod:`.cli` — ``add_parser(subparsers)`` and ``main(args)`` for ``ditaccel/cli.py``
  (also ``python -m ditaccel.bench``).
"""

from .cli import add_parser, main

__all__ = ["add_parser", "main"]
