"""What ``ditaccel bench`` runs: a matrix of model x method x size x seed, from flags or a YAML/JSON file.

A matrix file holds any of these keys (every one optional; flags override them)::

    models:  [embedded]              # "embedded" = the embedded default pipeline, else a path or hub id
    methods: all                     # "all" = every name in ditaccel.METHODS at run time, each with the
                                     # family's defaults (accelerate(pipe, name)), plus "calibrated" (the
                                     # embedded pipeline's calibrated table) when models has "embedded";
                                     # or a list of names,
                                     # "preset" (the model's preset), or {name, set: {field: value}, label}
    sizes:   [{height: 256, width: 256, frames: 9, steps: 4}]   # or "256x256x9" (HxWxF) / "256x256"
    seeds:   [0, 1]
    device: cpu                      # null = cuda if available, else cpu
    dtype: null                      # float32 / float16 / bfloat16; null = float32 on CPU, bfloat16 on CUDA
    prompt: null                     # null = the embedded pipeline's default prompt
    guidance: null                   # null = the pipeline's default guidance scale
    warmup: 0                        # untimed full calls before each timed one
    paired_timing: true              # a dense run right before each accelerated one (false: one per
                                     # (model, size, seed), shared by its methods: cheaper, drift-prone)
    error_steps: null                # steps whose attention error is measured; null = 2 spread over the run
    mask_layer: null                 # layer whose block mask is drawn; null = the first sparse layer
    mask_head: 0

The default matrix (:func:`default_matrix`) sets its size explicitly instead of reading
``embedded.DEFAULTS``, so a committed baseline keeps meaning the same cells when those defaults
change: 128 x 256 px, 9 frames, 4 steps, a (3, 16, 32) token grid (1,536 tokens). It is the
smallest call on which the built-in methods' defaults are still sparse (9 frames = 3 latent frames,
which the window method's 3-frame kernel needs; 256 px = 4 tiles of 8 latent pixels, so a 3-tile
window skips some), so the CPU matrix stays within a few minutes on 2 cores.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

EMBEDDED = "embedded"
PRESET = "preset"
CALIBRATED = "calibrated"  # the embedded pipeline's shipped calibrated table (ditaccel calibrate)
ALL = "all"
DTYPES = ("float32", "float16", "bfloat16")
_SIZE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+))?\s*$")
_LABEL = re.compile(r"^[A-Za-z0-9_.=,()+-]+$")


def _positive(where: str, value: Any, *, allow_none: bool = True, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class MethodSpec:
    """One method column: ``name`` (a ``ditaccel.METHODS`` name or "preset"), field overrides, a label."""

    name: str
    overrides: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"methods[].name must be a method name or {PRESET!r}, got {self.name!r}")
        if not isinstance(self.overrides, dict) or not all(isinstance(k, str) for k in self.overrides):
            raise ValueError(f"methods[{self.name!r}].set must be a mapping of field names to values, "
                             f"got {self.overrides!r}")
        label = self.label or self.name + "".join(f",{k}={_compact(v)}" for k, v in sorted(self.overrides.items()))
        if not _LABEL.match(label):
            raise ValueError(f"methods[{self.name!r}].label {label!r} may only use letters, digits and _.=,()+-")
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "overrides", {k: _as_tuple(v) for k, v in self.overrides.items()})

    @property
    def method(self) -> str | None:
        """What ``ditaccel.accelerate`` takes: None for the model's preset; for ``calibrated`` the
        embedded pipeline's calibrated ``TableConfig`` (its preset file)."""
        if self.name == CALIBRATED:
            from ..pipelines import embedded

            return embedded.PRESET  # read from its preset file (embedded.PRESET_FILE)
        return None if self.name == PRESET else self.name

    def to_dict(self) -> dict:
        return {"name": self.name, "set": dict(self.overrides), "label": self.label}


@dataclass(frozen=True)
class SizeSpec:
    """One size column; None = the pipeline's own default for that argument."""

    height: int | None = None
    width: int | None = None
    frames: int | None = None
    steps: int | None = None

    def __post_init__(self):
        for f in fields(self):
            _positive(f"sizes[].{f.name}", getattr(self, f.name))

    @property
    def label(self) -> str:
        hw = f"{self.height or 'default'}x{self.width or 'default'}"
        frames = f"x{self.frames}" if self.frames is not None else ""
        return f"{hw}{frames},steps={self.steps or 'default'}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Cell:
    """One (model, method, size, seed) run: the unit that passes, fails and is compared to a baseline."""

    model: str
    method: MethodSpec
    size: SizeSpec
    seed: int

    @property
    def key(self) -> str:
        return f"{self.model}|{self.method.label}|{self.size.label}|seed={self.seed}"


@dataclass(frozen=True)
class BenchMatrix:
    models: tuple[str, ...] = (EMBEDDED,)
    methods: tuple[MethodSpec, ...] | str = ALL
    sizes: tuple[SizeSpec, ...] = (SizeSpec(),)
    seeds: tuple[int, ...] = (0, 1)
    device: str | None = None
    dtype: str | None = None
    prompt: str | None = None
    guidance: float | None = None
    warmup: int = 0
    repeats: int = 1
    paired_timing: bool = True
    error_steps: tuple[int, ...] | None = None
    mask_layer: int | None = None
    mask_head: int = 0

    def __post_init__(self):
        models = _as_list("models", self.models)
        if not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"models must be a non-empty list of {EMBEDDED!r}, paths or hub ids, got {self.models!r}")
        object.__setattr__(self, "models", tuple(models))
        if isinstance(self.methods, str) and self.methods == ALL:
            pass
        else:
            methods = tuple(parse_method(m) for m in _as_list("methods", self.methods))
            if not methods:
                raise ValueError(f"methods must be {ALL!r} or a non-empty list, got {self.methods!r}")
            _unique("methods", [m.label for m in methods])
            object.__setattr__(self, "methods", methods)
        sizes = tuple(parse_size(s) for s in _as_list("sizes", self.sizes))
        if not sizes:
            raise ValueError("sizes must be a non-empty list")
        _unique("sizes", [s.label for s in sizes])
        object.__setattr__(self, "sizes", sizes)
        seeds = _as_list("seeds", self.seeds)
        if not seeds:
            raise ValueError("seeds must be a non-empty list of ints >= 0")
        for s in seeds:
            _positive("seeds[]", s, allow_none=False, minimum=0)
        _unique("seeds", seeds)
        object.__setattr__(self, "seeds", tuple(seeds))
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(f"device must be a torch device string such as 'cpu' or 'cuda', got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or null, got {self.dtype!r}")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be a string or null, got {self.prompt!r}")
        if self.guidance is not None and (isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float))):
            raise ValueError(f"guidance must be a number or null, got {self.guidance!r}")
        _positive("warmup", self.warmup, allow_none=False, minimum=0)
        _positive("repeats", self.repeats, allow_none=False, minimum=1)
        if not isinstance(self.paired_timing, bool):
            raise ValueError(f"paired_timing must be true or false, got {self.paired_timing!r}")
        if self.error_steps is not None:
            steps = _as_list("error_steps", self.error_steps)
            for s in steps:
                _positive("error_steps[]", s, allow_none=False, minimum=0)
            object.__setattr__(self, "error_steps", tuple(sorted(set(steps))))
        _positive("mask_layer", self.mask_layer, minimum=0)
        _positive("mask_head", self.mask_head, allow_none=False, minimum=0)

    def method_specs(self) -> tuple[MethodSpec, ...]:
        """The method columns; "all" is expanded from ``ditaccel.METHODS`` now, so new methods join,
        plus the ``calibrated`` table on the embedded model."""
        if isinstance(self.methods, str):
            import ditaccel

            extra = (MethodSpec(CALIBRATED),) if EMBEDDED in self.models else ()
            return tuple(MethodSpec(name) for name in ditaccel.METHODS) + extra
        return self.methods

    def cells(self) -> list[Cell]:
        """Every cell, grouped so one dense reference run serves every method of a (model, size, seed)."""
        methods = self.method_specs()
        return [Cell(model, method, size, seed)
                for model in self.models for size in self.sizes for seed in self.seeds for method in methods]

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["methods"] = self.methods if isinstance(self.methods, str) else [m.to_dict() for m in self.methods]
        d["sizes"] = [s.to_dict() for s in self.sizes]
        return d


def now_utc() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def default_matrix() -> BenchMatrix:
    """The embedded default pipeline, every method with its defaults, 2 seeds, CPU (see the module doc)."""
    return BenchMatrix(models=(EMBEDDED,), methods=ALL, sizes=(SizeSpec(128, 256, 9, 4),), seeds=(0, 1),
                       device="cpu")


# --- parsing -------------------------------------------------------------------------------------

def parse_size(value) -> SizeSpec:
    """``"256x320x9"`` / ``"256x320"`` / a mapping with height, width, frames, steps / a SizeSpec."""
    if isinstance(value, SizeSpec):
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"size must look like HEIGHTxWIDTH or HEIGHTxWIDTHxFRAMES (e.g. 256x256x9), got {value!r}")
        h, w, f = m.groups()
        return SizeSpec(int(h), int(w), int(f) if f else None)
    if isinstance(value, dict):
        unknown = set(value) - {f.name for f in fields(SizeSpec)}
        if unknown:
            raise ValueError(f"sizes[] has unknown key(s) {sorted(unknown)}; allowed: height, width, frames, steps")
        return SizeSpec(**value)
    raise ValueError(f"sizes[] must be 'HxW[xF]' or a mapping, got {value!r}")


def parse_method(value) -> MethodSpec:
    """A name, a mapping ``{name, set, label}`` or a MethodSpec."""
    if isinstance(value, MethodSpec):
        return value
    if isinstance(value, str):
        return MethodSpec(value.strip())
    if isinstance(value, dict):
        unknown = set(value) - {"name", "set", "label"}
        if unknown:
            raise ValueError(f"methods[] has unknown key(s) {sorted(unknown)}; allowed: name, set, label")
        if "name" not in value:
            raise ValueError(f"methods[] entry {value!r} needs a 'name'")
        return MethodSpec(value["name"], dict(value.get("set") or {}), value.get("label") or "")
    raise ValueError(f"methods[] must be a name or a mapping with name/set/label, got {value!r}")


def load_matrix(path: str | Path) -> BenchMatrix:
    """A matrix from a ``.json`` file, or a ``.yaml``/``.yml`` file (needs pyyaml)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--matrix {str(path)!r}: no such file")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--matrix {str(path)!r}: reading YAML needs pyyaml (pip install pyyaml); "
                             "or write the matrix as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"--matrix {str(path)!r}: not valid YAML: {exc}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--matrix {str(path)!r}: not valid JSON: {exc}") from None
    else:
        raise ValueError(f"--matrix {str(path)!r}: the file name must end in .json, .yaml or .yml")
    return matrix_from_dict(data or {}, where=str(path))


def matrix_from_dict(data: dict, where: str = "matrix") -> BenchMatrix:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: a matrix must be a mapping of keys to values, got {type(data).__name__}")
    known = [f.name for f in fields(BenchMatrix)]
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {known}")
    values = dict(data)
    if isinstance(values.get("models"), str):
        values["models"] = [values["models"]]
    if isinstance(values.get("sizes"), (str, dict)):
        values["sizes"] = [values["sizes"]]
    try:
        return BenchMatrix(**values)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _as_list(name: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{name} must be a list, got {value!r} ({type(value).__name__})")


def _as_tuple(value):
    """YAML/JSON lists become tuples, as config fields take them (``window: [3, 3, 3]``)."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _compact(value) -> str:
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_compact(v) for v in value) + ")"
    return str(value)


def _unique(name: str, items) -> None:
    seen = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{name} lists {item!r} twice")
        seen.add(item)


__all__ = ["ALL", "CALIBRATED", "BenchMatrix", "Cell", "EMBEDDED", "MethodSpec", "PRESET", "SizeSpec", "default_matrix",
           "load_matrix", "matrix_from_dict", "parse_method", "parse_size"]
