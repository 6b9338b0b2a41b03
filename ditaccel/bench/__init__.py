"""``ditaccel bench``: the quality/speed regression matrix (dense vs accelerated on the same seeds).

- :mod:`.matrix` — what runs: model x method x size x seed, from flags or a YAML/JSON file;
- :mod:`.runner` — running it: per-cell timings, density, quality, attention error; results.json
  written atomically after every cell, a failing cell recorded and the matrix going on;
- :mod:`.baseline` — comparing with a committed baseline under per-metric tolerances;
- :mod:`.distributed` — under torchrun / accelerate launch: the cells split over the ranks, or every
  cell under diffusers' context parallelism (``--cp ulysses=N``), merged by rank 0 into one results.json;
- :mod:`.plots`, :mod:`.report` — figures, results.csv, a self-contained report.html;
- :mod:`.cli` — ``add_parser(subparsers)`` and ``main(args)`` for ``ditaccel/cli.py``
  (also ``python -m ditaccel.bench``).
"""

from .cli import add_parser, main

__all__ = ["add_parser", "main"]
