"""Config dataclasses shared by every method, and the knob declarations they are made of.

Every knob is a dataclass field declared with :func:`knob`: its kind (int, float, choice, axes, ...),
default and validated range live in the field's metadata, so one declaration drives validation and
normalisation (``__post_init__``), the CLI's ``--set`` and the demo's widgets (:func:`describe_fields`).
A bad value raises ``ValueError`` naming the config class, the field, the value and what is allowed.
Configs are frozen values: ``dataclasses.replace(cfg, window=(3, 3, 3))`` applies an override, so a
config that fails validation never reaches a pipeline.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

BLOCK_SIZES = (64, 128)
BACKENDS = ("auto", "triton", "grouped", "flex", "reference")
ORDERS = ("raster", "tile", "hilbert", "transpose")
KINDS = ("int", "float", "optional_float", "choice", "bool", "axes", "optional_axes", "layers", "steps")


def _name(cls_or_obj) -> str:
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return cls.__name__


def knob(default, kind: str, *, low=None, high=None, low_open: bool = False, choices: tuple | None = None,
         odd: bool = False, help: str = ""):
    """A config field whose kind, range and help text are its metadata (see :func:`describe_fields`)."""
    if kind not in KINDS:
        raise ValueError(f"knob kind must be one of {KINDS}, got {kind!r}")
    meta = dict(kind=kind, low=low, high=high, low_open=low_open, choices=choices, odd=odd, help=help)
    return dataclasses.field(default=default, metadata={"ditaccel": meta})


@dataclass(frozen=True)
class FieldSpec:
    """What a knob accepts, for building widgets and docs: ``low``/``high`` are inclusive bounds
    (``low_open``: the low bound itself is excluded), None where unbounded."""

    name: str
    kind: str
    default: Any
    low: float | int | None
    high: float | int | None
    low_open: bool
    choices: tuple | None
    odd: bool
    help: str


def describe_fields(config_cls) -> list[FieldSpec]:
    """The knobs of a config class (or instance), in declaration order."""
    cls = config_cls if isinstance(config_cls, type) else type(config_cls)
    specs = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("ditaccel")
        if meta is not None:
            specs.append(FieldSpec(name=f.name, default=f.default, **meta))
    return specs


# --- validation of one value ------------------------------------------------------------------

def check_int(owner, field_name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None,
              choices: tuple[int, ...] | None = None, odd: bool = False) -> int:
    where = f"{_name(owner)}.{field_name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an int, got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        raise ValueError(f"{where} must be one of {choices}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{where} must be <= {maximum}, got {value}")
    if odd and value % 2 == 0:
        raise ValueError(f"{where} must be odd (a window centred on its query), got {value}")
    return value


def check_float(owner, field_name: str, value: Any, *, low: float | None, high: float | None,
                low_open: bool = False) -> float:
    where = f"{_name(owner)}.{field_name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    bad_low = value <= lo if low_open else value < lo
    if bad_low or value > hi or value != value:
        bracket = "(" if low_open or low is None else "["
        raise ValueError(f"{where} must be in {bracket}{lo}, {hi}], got {value}")
    return value


def check_choice(owner, field_name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{_name(owner)}.{field_name} must be one of {choices}, got {value!r}")
    return value


def check_axes(owner, field_name: str, value: Any, *, minimum: int = 1, odd: bool = False) -> tuple[int, int, int]:
    """Normalise a per-axis size to (t, h, w).

    An int applies to every axis; a 2-tuple (h, w) is spatial only (t = 1, a per-frame window on
    video, the only choice on image models); a 3-tuple is (t, h, w).
    """
    where = f"{_name(owner)}.{field_name}"
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value, value)
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or len(value) not in (2, 3):
        raise ValueError(f"{where} must be an int, (h, w) or (t, h, w) of ints, got {value!r}")
    if len(value) == 2:
        value = (1, *value)
    for axis, v in zip("thw", value):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{where}[{axis}] must be an int, got {v!r} ({type(v).__name__})")
        if v < minimum:
            raise ValueError(f"{where}[{axis}] must be >= {minimum}, got {v} in {value}")
        if odd and v % 2 == 0:
            raise ValueError(f"{where}[{axis}] must be odd (a window centred on its query), got {v} in {value}")
    return tuple(value)  # type: ignore[return-value]


def check_index_set(owner, field_name: str, value: Any, *, allow_count: bool) -> int | tuple[int, ...]:
    """Layer or step indices: a tuple of ints >= 0 (sorted, deduplicated), or with ``allow_count`` an
    int N meaning "the first N"."""
    where = f"{_name(owner)}.{field_name}"
    what = "an int N (the first N) or a tuple of indices >= 0" if allow_count else "a tuple of indices >= 0"
    if isinstance(value, list):
        value = tuple(value)
    if allow_count and isinstance(value, int) and not isinstance(value, bool):
        return check_int(owner, field_name, value, minimum=0)
    if not isinstance(value, tuple):
        raise ValueError(f"{where} must be {what}, got {value!r} ({type(value).__name__})")
    for i in value:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise ValueError(f"{where} must be {what}, got {value!r}")
    return tuple(sorted(set(value)))


def check_block_tile(owner, value: Any, block_size: int) -> tuple[int, int, int]:
    """A token tile that fills exactly one kernel block (product == block_size)."""
    tile = check_axes(owner, "tile", value)
    if math.prod(tile) != block_size:
        raise ValueError(
            f"{_name(owner)}.tile={tile} has {math.prod(tile)} tokens; a tile must fill one kernel block: "
            f"product == block_size ({block_size})"
        )
    return tile


def _validate(owner, spec: FieldSpec, value: Any) -> Any:
    k = spec.kind
    if k == "int":
        return check_int(owner, spec.name, value, minimum=spec.low, maximum=spec.high, odd=spec.odd,
                         choices=spec.choices)
    if k == "float":
        return check_float(owner, spec.name, value, low=spec.low, high=spec.high, low_open=spec.low_open)
    if k == "optional_float":
        return None if value is None else check_float(owner, spec.name, value, low=spec.low, high=spec.high,
                                                      low_open=spec.low_open)
    if k == "choice":
        return check_choice(owner, spec.name, value, spec.choices)
    if k == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{_name(owner)}.{spec.name} must be True or False, got {value!r}")
        return value
    if k in ("axes", "optional_axes"):
        if value is None and k == "optional_axes":
            return None
        return check_axes(owner, spec.name, value, minimum=1 if spec.low is None else spec.low, odd=spec.odd)
    if k in ("layers", "steps"):
        return check_index_set(owner, spec.name, value, allow_count=k == "layers")
    raise AssertionError(k)


@dataclass(frozen=True)
class AttentionConfig:
    """Knobs shared by every method (see METHODS.md, "Shared by every method" and the caches)."""

    method: ClassVar[str] = ""
    dense_steps: int = knob(0, "int", low=0, help="the first N denoising steps run dense attention")
    dense_layers: int | tuple[int, ...] = knob(
        (), "layers", help="layers that always run dense: an int N (the first N) or a tuple of indices")
    block_size: int = knob(128, "int", choices=BLOCK_SIZES, help="kernel tile in tokens: the granularity of plans")
    backend: str = knob("auto", "choice", choices=BACKENDS,
                        help="auto: Triton on CUDA, grouped torch SDPA elsewhere; or triton, grouped, flex, reference")
    # --- across denoising steps (ditaccel/caches.py) -------------------------------------------
    residual_refresh: int = knob(
        0, "int", low=0, help="residual cache: every N-th sparse step runs dense and stores dense - sparse; "
                              "the steps between add it to their sparse output (0: off)")
    output_share_steps: tuple[int, ...] = knob(
        (), "steps", help="steps that reuse the previous step's attention output outright")
    output_share_layers: tuple[int, ...] = knob(
        (), "steps", help="layers output sharing applies to (empty: all)")
    cfg_share_steps: tuple[int, ...] = knob(
        (), "steps", help="steps at which the unconditional branch reuses the conditional branch's output")
    cfg_share_layers: tuple[int, ...] = knob((), "steps", help="layers cfg sharing applies to (empty: all)")
    renormalise: bool = knob(False, "bool", help="Re-ttention: rescale sparse outputs by the attention mass "
                                                 "their plan kept at the last dense step")
    cache_budget_mb: float = knob(1024.0, "float", low=0.0, help="memory the cross-step caches may hold")

    def __post_init__(self) -> None:
        for spec in describe_fields(self):
            object.__setattr__(self, spec.name, _validate(self, spec, getattr(self, spec.name)))

    def layer_is_dense(self, layer: int) -> bool:
        dl = self.dense_layers
        return layer < dl if isinstance(dl, int) else layer in dl

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **dataclasses.asdict(self)}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


def with_overrides(config: AttentionConfig, overrides: dict[str, Any]) -> AttentionConfig:
    """Apply field overrides, rejecting unknown fields with the list of known ones."""
    known = type(config).field_names()
    unknown = [k for k in overrides if k not in known]
    if unknown:
        raise ValueError(
            f"unknown field(s) {unknown} for method {config.method!r} ({_name(config)}); allowed: {list(known)}"
        )
    return dataclasses.replace(config, **overrides)


__all__ = [
    "AttentionConfig", "FieldSpec", "describe_fields", "knob", "with_overrides", "check_block_tile",
    "BLOCK_SIZES", "BACKENDS", "ORDERS",
]
