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
KINDS = ("int", "float", "optional_float", "choice", "bool", "axes", "optional_axes", "layers", "steps",
         "count_or_fraction", "schedule")
MAX_INT = 2**31 - 1  # no knob counts past this: larger ints only overflow index arithmetic downstream
MAX_SCHEDULE_LEN = 10_000


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
    if abs(value) > MAX_INT:
        raise ValueError(f"{where} must be at most {MAX_INT} in magnitude, got {value}")
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
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{where} must be a finite number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    bad_low = value <= lo if low_open else value < lo
    if bad_low or value > hi:
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
        if v > MAX_INT:
            raise ValueError(f"{where}[{axis}] must be <= {MAX_INT}, got {v} in {value}")
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
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i <= MAX_INT:
            raise ValueError(f"{where} must be {what} (each <= {MAX_INT}), got {value!r}")
    return tuple(sorted(set(value)))


def check_count_or_fraction(owner, field_name: str, value: Any) -> int | float:
    """A step count: an int N >= 0 (the first N steps), or a float in (0, 1) (that fraction of the
    call's steps, rounded up: see :func:`resolve_count`)."""
    where = f"{_name(owner)}.{field_name}"
    if isinstance(value, float):
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise ValueError(f"{where} must be an int count >= 0 or a float fraction of the call's steps in "
                             f"(0, 1), got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an int count >= 0 or a float fraction of the call's steps in (0, 1), "
                         f"got {value!r} ({type(value).__name__})")
    return check_int(owner, field_name, value, minimum=0)


def resolve_count(value: int | float, total_steps: int | None) -> int | None:
    """A :func:`check_count_or_fraction` value as a count of steps of a call of ``total_steps``.

    Fractions round up (12 of 50 for 0.24, 11 of 40 for 0.275: the 1e-9 absorbs float error), so a
    fraction never gives fewer dense steps than it says; None when a fraction meets an unknown total."""
    if isinstance(value, int):
        return value
    if total_steps is None:
        return None
    return math.ceil(value * total_steps - 1e-9)


# Knobs a per-step schedule may change: the method's own numeric knobs. The shared ones (steps,
# layers, caches, block size, backend) shape the call plan and the cross-step state, so they stay fixed.
SCHEDULABLE_KINDS = ("int", "float", "optional_float", "axes")


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
    if k == "count_or_fraction":
        return check_count_or_fraction(owner, spec.name, value)
    if k == "schedule":
        return _normalise_schedule(owner, spec.name, value)
    raise AssertionError(k)


def _normalise_schedule(owner, field_name: str, value: Any) -> tuple:
    """``{knob: [v0, v1, ...]}`` (or its items) -> a sorted tuple of (knob, (v0, v1, ...)); each
    value is checked later against the knob's own rules (``AttentionConfig._check_schedule``)."""
    where = f"{_name(owner)}.{field_name}"
    what = "a dict {knob name: list of values over the call's steps}"
    if isinstance(value, dict):
        value = tuple(value.items())
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"{where} must be {what}, got {value!r} ({type(value).__name__})")
    items = []
    for item in value:
        if not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[0], str):
            raise ValueError(f"{where} must be {what}, got the entry {item!r}")
        name, values = item
        if isinstance(values, list):
            values = tuple(values)
        if not isinstance(values, tuple) or not 1 <= len(values) <= MAX_SCHEDULE_LEN:
            raise ValueError(f"{where}[{name!r}] must be a list of 1 to {MAX_SCHEDULE_LEN} values, got {values!r}")
        items.append((name, values))
    names = [n for n, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"{where} names a knob twice: {names}")
    return tuple(sorted(items))


@dataclass(frozen=True)
class AttentionConfig:
    """Knobs shared by every method (see METHODS.md, "Shared by every method" and the caches)."""

    method: ClassVar[str] = ""
    dense_steps: int | float = knob(
        0, "count_or_fraction",
        help="the first denoising steps that run dense attention: an int N (the first N) or a float in "
             "(0, 1), that fraction of the call's steps (rounded up; follows the call's step count)")
    dense_above_noise: float | None = knob(
        None, "optional_float", low=0.0, high=1.0,
        help="also dense while the call's noise level (the scheduler's timestep / num_train_timesteps: "
             "sigma on flow-matching schedulers) is above this (None: off)")
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
    cache_budget_mb: float = knob(1024.0, "float", low=0.0, high=1e9, help="memory the cross-step caches may hold")
    schedule: tuple = knob(
        (), "schedule",
        help="per-step values of the method's own numeric knobs, e.g. {'topk': [0.4, 0.3, 0.2]}: k values "
             "split the call's steps into k equal parts, one value per part (k = steps: one per step)")

    def __post_init__(self) -> None:
        for spec in describe_fields(self):
            object.__setattr__(self, spec.name, _validate(self, spec, getattr(self, spec.name)))
        self._check_schedule()

    def _check_schedule(self) -> None:
        if not self.schedule:
            return
        shared = {f.name for f in dataclasses.fields(AttentionConfig)}
        specs = {s.name: s for s in describe_fields(self)}
        allowed = [n for n, s in specs.items() if n not in shared and s.kind in SCHEDULABLE_KINDS]
        normalised = []
        for name, values in self.schedule:
            if name not in allowed:
                raise ValueError(f"{_name(self)}.schedule names {name!r}; a schedule may change {allowed} "
                                 f"(the method's own numeric knobs)")
            checked = []
            for i, v in enumerate(values):
                try:
                    checked.append(getattr(self.at_part({name: v}), name))  # the knob's own rules
                except ValueError as e:
                    raise ValueError(f"{_name(self)}.schedule[{name!r}][{i}]={v!r}: {e}") from None
            normalised.append((name, tuple(checked)))
        object.__setattr__(self, "schedule", tuple(normalised))

    def at_part(self, values: dict[str, Any]) -> "AttentionConfig":
        """This config with ``values`` applied and no schedule (one part of the schedule)."""
        return dataclasses.replace(self, schedule=(), **values)

    def at_step(self, step: int, total_steps: int) -> "AttentionConfig":
        """The config in force at ``step`` of a call of ``total_steps`` steps: the schedule's part
        ``floor(step * k / total_steps)`` of its k values (the last part past the end)."""
        if not self.schedule:
            return self
        values = {}
        for name, seq in self.schedule:
            part = min(len(seq) - 1, step * len(seq) // max(total_steps, 1))
            values[name] = seq[part]
        return self.at_part(values)

    @property
    def follows_call(self) -> bool:
        """True when the schedule depends on the call's step count or noise levels (needs a scheduler)."""
        return isinstance(self.dense_steps, float) or self.dense_above_noise is not None or bool(self.schedule)

    def dense_step_count(self, total_steps: int | None, noise_levels=None) -> int:
        """How many leading steps of a call run dense: ``dense_steps`` resolved against the call's
        ``total_steps``, extended by the leading steps whose noise level is above
        ``dense_above_noise`` (``noise_levels``: the call's, one per step, decreasing)."""
        count = resolve_count(self.dense_steps, total_steps)
        count = 0 if count is None else count
        if self.dense_above_noise is not None and noise_levels is not None:
            above = 0
            for level in noise_levels:
                if level <= self.dense_above_noise:
                    break
                above += 1
            count = max(count, above)
        return count

    # --- where the cross-step caches apply (caches.py asks; TableConfig adds its per-layer rules) ---
    def shares_output_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        """Output share: does (layer, step) reuse this layer's output of its last computed step?"""
        return step in self.output_share_steps and (not self.output_share_layers or layer in self.output_share_layers)

    def keeps_output_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        """Must (layer, step) keep its output for a later output share?"""
        return step < max(self.output_share_steps, default=-1) and (
            not self.output_share_layers or layer in self.output_share_layers)

    def shares_cfg_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        """Cfg share: does the unconditional branch reuse the conditional branch's output here?"""
        return step in self.cfg_share_steps and (not self.cfg_share_layers or layer in self.cfg_share_layers)

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
    "resolve_count", "BLOCK_SIZES", "BACKENDS", "ORDERS", "MAX_INT",
]
