"""ditaccel: sparse, windowed and cached attention for diffusers DiT pipelines, measured against dense.

    handle = ditaccel.accelerate(pipe)                 # the preset (the family's; the embedded pipeline has its own)
    handle = ditaccel.accelerate(pipe, "tile", window=(3, 3, 3), dense_steps=2)
    handle = ditaccel.accelerate(pipe, "topk", cdf=0.9, order="hilbert", refresh=5, dense_steps=10)
    handle.stats(); handle.remove()

Everything here is imported on first use (PEP 562), so ``import ditaccel`` costs next to nothing and
does not need triton, diffusers or torchmetrics until a name that needs them is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "accelerate": ".handle", "AccelerationHandle": ".handle", "AttentionConfig": ".config",
    "METHODS": ".methods", "DenseConfig": ".methods", "WindowConfig": ".methods", "TileConfig": ".methods",
    "RadialConfig": ".methods", "TopKConfig": ".methods", "XAttnConfig": ".methods", "HeadsConfig": ".methods",
    "ClusterConfig": ".methods", "SUPPORTED_FAMILIES": ".pipelines", "ModelSpec": ".pipelines", "evaluate": ".eval",
    "register_method": ".methods", "unregister_method": ".methods",
    "StrictModeError": ".runtime", "CompositionError": ".composition",
    "TableConfig": ".methods", "calibrate": ".calibration",
}
_MODULES = ("metrics", "eval", "methods", "pipelines", "kernels")


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))


__all__ = sorted(_EXPORTS) + ["metrics", "__version__"]
