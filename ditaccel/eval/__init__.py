"""The evaluation engine: dense vs accelerated on the same pipeline, call and seed, as one record.

- :mod:`.engine` — :func:`evaluate`: warm-up, interleaved repeats, quality, stats -> :class:`Comparison`;
- :mod:`.runs` — loading pipelines, the call both sides share, one timed seeded call;
- :mod:`.timing` — the one definition of speedup, spread, drift and load, and when a figure is
  inconclusive;
- :mod:`.verdicts` — quality bands and "nothing ran sparse (why)";
- :mod:`.record` — the record and its JSON form (numbers only);
- :mod:`.media`, :mod:`.plots`, :mod:`.probe`, :mod:`.files`, :mod:`.text` — labelled side-by-sides,
  figures, block maps, atomic file sets, the terminal table.

``compare``, ``bench`` and the demo are thin layers over this package, side by side.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "engine", "resolve": "engine", "Comparison": "record", "jsonable": "record", "write_json": "record",
    "RunResult": "runs", "call_arguments": "runs", "load_pipeline": "runs", "resolve_device": "runs",
    "resolve_dtype": "runs", "timed_run": "runs", "warm_up": "runs", "TimingSummary": "timing",
    "describe_ratio": "timing", "quality_verdict": "verdicts", "sparsity_verdict": "verdicts",
}


def __getattr__(name):  # lazy: importing the package must not import torch's heavy friends
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
