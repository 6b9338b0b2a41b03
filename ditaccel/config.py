"""Config dataclasses shared by every method, and the validation helpers they use.

Every knob is a dataclass field with a default; ``__post_init__`` validates and normalises it, and a
bad value raises ``ValueError`` naming the field, the value and what is allowed. Configs are frozen
values: ``dataclasses.replace(cfg, window=(3, 3, 3))`` is how an override is applied, so a config
that fails validation never reaches a pipeline.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

BLOCK_SIZES = (64, 128)
BACKENDS = ("auto", "triton", "flex", "reference")
ORDERS = ("raster", "tile")


def _name(cls_or_obj) -> str:
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    return cls.__name__


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


def check_float(owner, field_name: str, value: Any, *, low: float, high: float,
                low_open: bool = False) -> float:
    where = f"{_name(owner)}.{field_name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    bad_low = value <= low if low_open else value < low
    if bad_low or value > high or value != value:
        bracket = "(" if low_open else "["
        raise ValueError(f"{where} must be in {bracket}{low}, {high}], got {value}")
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


def check_block_tile(owner, value: Any, block_size: int) -> tuple[int, int, int]:
    """A token tile that fills exactly one kernel block (product == block_size)."""
    import math

    tile = check_axes(owner, "tile", value)
    if math.prod(tile) != block_size:
        raise ValueError(
            f"{_name(owner)}.tile={tile} has {math.prod(tile)} tokens; a tile must fill one kernel block: "
            f"product == block_size ({block_size})"
        )
    return tile


@dataclass(frozen=True)
class AttentionConfig:
    """Knobs shared by every method.

    dense_steps: the first N denoising steps run dense attention (they set the layout of the image).
    dense_layers: layer indices that always run dense, or an int N for "the first N layers".
    block_size: kernel tile in tokens (64 or 128): the granularity of every plan.
    backend: "auto" (Triton on CUDA, the torch reference elsewhere), "triton", "flex" or "reference".
    """

    method: ClassVar[str] = ""
    dense_steps: int = 0
    dense_layers: int | tuple[int, ...] = ()
    block_size: int = 128
    backend: str = "auto"

    def __post_init__(self) -> None:
        check_int(self, "dense_steps", self.dense_steps, minimum=0)
        dl = self.dense_layers
        if isinstance(dl, list):
            dl = tuple(dl)
        if isinstance(dl, int) and not isinstance(dl, bool):
            check_int(self, "dense_layers", dl, minimum=0)
        elif isinstance(dl, tuple):
            for i in dl:
                if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                    raise ValueError(
                        f"{_name(self)}.dense_layers must be an int N (first N layers) or a tuple of layer "
                        f"indices >= 0, got {self.dense_layers!r}"
                    )
            dl = tuple(sorted(set(dl)))
        else:
            raise ValueError(
                f"{_name(self)}.dense_layers must be an int N (first N layers) or a tuple of layer indices, "
                f"got {self.dense_layers!r} ({type(self.dense_layers).__name__})"
            )
        object.__setattr__(self, "dense_layers", dl)
        check_int(self, "block_size", self.block_size, choices=BLOCK_SIZES)
        check_choice(self, "backend", self.backend, BACKENDS)

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


__all__ = ["AttentionConfig", "with_overrides", "check_block_tile", "BLOCK_SIZES", "BACKENDS", "ORDERS"]
