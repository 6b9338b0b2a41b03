"""Method knobs as Gradio widgets, generated from the config dataclasses (``describe_fields``).

Every registered method (``ditaccel.METHODS``) gets one group of widgets, one per knob of its config
class, each with the knob's validated range: bounded ints and floats become sliders, choices
dropdowns, flags checkboxes, ``(t, h, w)`` axes three integer boxes; index sets and optional values
(``None`` = the method's automatic choice) are short text fields. A knob's widgets are named for
the Gradio API as ``<method>__<field>`` (``_t``/``_h``/``_w`` appended for axes), so a client can
set any knob by name. The parsing half (:func:`parse_knob`, :func:`widget_values`) needs no Gradio,
so it is tested on its own; only :func:`make_widgets` builds components.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any

from ..config import AttentionConfig, FieldSpec, describe_fields
from ..methods import METHODS, config_class

AXES = ("t", "h", "w")
AXES_KINDS = ("axes",)
TEXT_KINDS = ("layers", "steps", "optional_axes", "optional_float")
FLOAT_SLIDER_STEPS = 100


@dataclass(frozen=True)
class Knob:
    """One config field of one method and the API names of its widgets."""

    method: str
    spec: FieldSpec
    shared: bool  # declared by AttentionConfig (and not redefined by the method): shown under "shared knobs"

    @property
    def params(self) -> tuple[str, ...]:
        base = f"{self.method}__{self.spec.name}"
        return tuple(f"{base}_{a}" for a in AXES) if self.spec.kind in AXES_KINDS else (base,)

    @property
    def where(self) -> str:
        return f"{config_class(self.method).__name__}.{self.spec.name}"


def method_knobs(method: str) -> list[Knob]:
    """The knobs of ``method``, its own first, then those every method shares."""
    shared = set(describe_fields(AttentionConfig))
    knobs = [Knob(method, s, s in shared) for s in describe_fields(config_class(method))]
    return [k for k in knobs if not k.shared] + [k for k in knobs if k.shared]


def all_knobs(methods: tuple[str, ...] = METHODS) -> dict[str, list[Knob]]:
    """``{method: knobs}`` for every registered method; API names are checked to be unique."""
    knobs = {m: method_knobs(m) for m in methods}
    names = [p for ks in knobs.values() for k in ks for p in k.params]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"knob widget names collide: {duplicates}; rename the config fields")
    return knobs


# --- values <-> widgets (no Gradio) ----------------------------------------------------------------

def _format_index_set(value) -> str:
    if isinstance(value, int):
        return str(value)
    return ", ".join(str(i) for i in value)


def widget_values(knob: Knob, value: Any) -> list:
    """The raw widget values that show ``value`` (a config field's value) in ``knob``'s widgets."""
    kind = knob.spec.kind
    if kind in AXES_KINDS:
        axes = (value,) * 3 if isinstance(value, int) else tuple(value)
        return list((1, *axes) if len(axes) == 2 else axes)
    if kind in ("layers", "steps"):
        return [_format_index_set(value)]
    if kind == "optional_axes":
        return ["" if value is None else _format_index_set(value)]
    if kind == "optional_float":
        return ["" if value is None else repr(float(value))]
    return [value]


def _as_int(where: str, raw) -> int:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError(f"{where} must be an integer, got {raw!r}")
    return int(raw)


def _literal(where: str, text, what: str):
    if not isinstance(text, str):
        raise ValueError(f"{where} must be text ({what}), got {text!r}")
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"{where} must be {what}, got {text!r}") from None


def _finite(where: str, value: float) -> float:
    # A JSON client can send Infinity/NaN (and "1e999" parses to inf): no knob means anything by them,
    # and an infinite budget or threshold would fail deep inside a run (or in the JSON report).
    if not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value}")
    return value


def parse_knob(knob: Knob, raw: list) -> Any:
    """Widget values -> the config field's value. Malformed text raises ValueError naming the field;
    the value's range is left to the config's own validation, which names the field too."""
    spec, where = knob.spec, knob.where
    kind = spec.kind
    if len(raw) != len(knob.params):
        raise ValueError(f"{where}: expected {len(knob.params)} widget values, got {len(raw)}")
    if kind in AXES_KINDS:
        return tuple(_as_int(f"{where}[{a}]", v) for a, v in zip(AXES, raw))
    value = raw[0]
    if kind == "int":
        return _as_int(where, value)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number, got {value!r}")
        return _finite(where, float(value))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "choice":
        return value  # the config checks membership
    blank = isinstance(value, str) and not value.strip()
    if kind in ("layers", "steps"):
        if blank:
            return ()
        what = "an int N (the first N) or indices like 0, 2, 5" if kind == "layers" else "indices like 0, 2, 5"
        parsed = _literal(where, value, what)
        if isinstance(parsed, list):
            parsed = tuple(parsed)
        if kind == "steps" and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = (parsed,)  # "3" in a steps box means step 3
        return parsed
    if kind == "optional_axes":
        if blank:
            return None
        parsed = _literal(where, value, "empty (automatic) or t, h, w integers")
        return tuple(parsed) if isinstance(parsed, list) else parsed
    if kind == "optional_float":
        if blank:
            return None
        parsed = _literal(where, value, "empty (automatic) or a number")
        if isinstance(parsed, bool) or not isinstance(parsed, (int, float)):
            raise ValueError(f"{where} must be empty (automatic) or a number, got {value!r}")
        return _finite(where, float(parsed))
    # A kind this module does not know yet: the text box holds a Python literal.
    return _literal(where, value, "a Python literal") if isinstance(value, str) else value


def overrides_from_values(method: str, knobs: list[Knob], values: dict[str, Any]) -> dict[str, Any]:
    """``{api name: raw}`` (what the generate endpoint receives) -> the method's field overrides."""
    missing = [p for k in knobs for p in k.params if p not in values]
    if missing:
        raise ValueError(f"method {method!r}: no value for knob widget(s) {missing}")
    return {k.spec.name: parse_knob(k, [values[p] for p in k.params]) for k in knobs}


# --- components (Gradio) ---------------------------------------------------------------------------

def _label(knob: Knob) -> str:
    return knob.spec.name.replace("_", " ")


def _int_widget(gr, knob: Knob, value, label: str, info: str | None):
    spec = knob.spec
    step = 2 if spec.odd else 1
    if spec.choices:
        return gr.Dropdown(choices=list(spec.choices), value=value, label=label, info=info)
    if spec.low is not None and spec.high is not None:
        low = spec.low + 1 if spec.odd and spec.low % 2 == 0 else spec.low
        return gr.Slider(minimum=low, maximum=spec.high, step=step, value=value, label=label, info=info)
    return gr.Number(value=value, precision=0, minimum=spec.low, maximum=spec.high, step=step, label=label,
                     info=info)


def _float_widget(gr, knob: Knob, value, label: str, info: str | None):
    spec = knob.spec
    if spec.low is not None and spec.high is not None and math.isfinite(spec.high - spec.low):
        step = (spec.high - spec.low) / FLOAT_SLIDER_STEPS
        low = spec.low + step if spec.low_open else spec.low
        return gr.Slider(minimum=low, maximum=spec.high, step=step, value=value, label=label, info=info)
    return gr.Number(value=value, minimum=spec.low, maximum=spec.high, label=label, info=info)


def _text_hint(kind: str) -> str:
    return {"layers": "N (first N layers) or indices, e.g. 0, 3", "steps": "indices, e.g. 2, 4 (empty: none)",
            "optional_axes": "t, h, w — empty: automatic", "optional_float": "a number — empty: automatic"
            }.get(kind, "a Python literal")


def make_widgets(gr, knob: Knob, value) -> list:
    """The Gradio components of one knob showing ``value``, in the order of ``knob.params``."""
    spec = knob.spec
    raw = widget_values(knob, value)
    label, info = _label(knob), spec.help or None
    if spec.kind in AXES_KINDS:
        low = 1 if spec.low is None else spec.low
        with gr.Row():
            return [gr.Number(value=v, precision=0, minimum=low, maximum=spec.high, step=2 if spec.odd else 1,
                              label=f"{label} {a}", info=info if a == "t" else None, min_width=80)
                    for a, v in zip(AXES, raw)]
    if spec.kind == "int":
        return [_int_widget(gr, knob, raw[0], label, info)]
    if spec.kind == "float":
        return [_float_widget(gr, knob, raw[0], label, info)]
    if spec.kind == "choice":
        return [gr.Dropdown(choices=list(spec.choices), value=raw[0], label=label, info=info)]
    if spec.kind == "bool":
        return [gr.Checkbox(value=raw[0], label=label, info=info)]
    text = raw[0] if spec.kind in TEXT_KINDS else repr(raw[0])
    return [gr.Textbox(value=text, label=label, info=info, placeholder=_text_hint(spec.kind))]


__all__ = ["AXES", "Knob", "all_knobs", "make_widgets", "method_knobs", "overrides_from_values", "parse_knob",
           "widget_values"]
