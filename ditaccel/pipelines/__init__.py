"""Model adapters, one file per diffusers family (:mod:`.families` lists them), the registry that
picks one (:mod:`.registry`), the ``ModelSpec`` escape hatch (:mod:`.spec`) and the coverage table
(:mod:`.coverage`).

Names are imported on first use (PEP 562), so ``ditaccel.pipelines.coverage``'s command-line parser
can be built without importing torch or diffusers.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ADAPTERS": ".registry", "REFUSED": ".registry", "SUPPORTED_FAMILIES": ".registry", "find_adapter": ".registry",
    "CallFacts": ".base", "ModelAdapter": ".base", "ModelSpec": ".spec",
}


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = sorted(_EXPORTS)
