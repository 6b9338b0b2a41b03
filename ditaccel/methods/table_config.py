"""``TableConfig``: per-(layer, head, step range) knob tables, as an ordered list of rules.

A rule says *where* (``layers``, ``heads``, ``steps``; None = all) and *what*: ``use`` is a method
name with its own knobs (``knobs``), ``"dense"``, ``"share"`` (reuse this layer's output of its last
computed step: output share per (layer, step), all heads), or ``"cfg_share"`` (the unconditional
branch reuses the conditional branch's output of the same layer and step, all heads; the
conditional branch reads on to the next rule). For every (layer, head, step) the **first** rule that
matches decides; none matching: dense.

A method rule may carry ``residual`` [DiTFastAttn, window attention with residual sharing], per
head: ``"refresh"`` runs the model's dense attention *and* the rule's method, stores ``dense -
method`` for the head and returns dense; ``"reuse"`` returns the method's output plus the residual
the last ``"refresh"`` step of a rule with the same ``use`` and ``knobs`` stored for that layer,
head and CFG branch (none stored -- a new call, a cache budget refusal -- : the step refreshes).

``steps`` is a half-open range ``(start, end)``: two ints (step indices) or two floats in [0, 1]
(fractions of the call's steps: step s is in it when ``start <= s / total < end``, so ``(0.5, 1.0)``
of 20 steps is steps 10..19). The shared knobs of :class:`AttentionConfig` (dense_steps,
dense_layers, the caches' own step lists, block_size, backend) stay table-wide; a rule's ``knobs``
may only set the method's own knobs, and its sub-config inherits the table's block_size and backend.

Heads that differ within one call are stacked into one per-head BlockMask, which needs one token
layout: rules whose layers and steps can meet in one call must agree on their method's token
order and tile (or be dense / share); the config refuses anything else when it is built.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any

from ..config import MAX_INT, AttentionConfig, check_index_set, knob

SPECIAL_USES = ("dense", "share", "cfg_share")
RESIDUAL_MODES = ("refresh", "reuse")


@dataclass(frozen=True)
class TableRule:
    """One row of a :class:`TableConfig` (see the module doc); ``config`` is derived."""

    use: str
    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    steps: tuple | None = None
    knobs: tuple = ()  # sorted (name, value) pairs of the method's own knobs
    config: AttentionConfig | None = dataclasses.field(default=None, compare=False, repr=False)
    residual: str | None = None  # None, "refresh" or "reuse" (module doc)

    def matches(self, layer: int, head: int | None, step: int, total_steps: int | None) -> bool:
        if self.layers is not None and layer not in self.layers:
            return False
        if head is not None and self.heads is not None and head not in self.heads:
            return False
        return step_in_range(self.steps, step, total_steps)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"use": self.use}
        for name in ("layers", "heads", "steps"):
            value = getattr(self, name)
            if value is not None:
                out[name] = list(value)
        if self.knobs:
            out["knobs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs}
        if self.residual is not None:
            out["residual"] = self.residual
        return out

    @property
    def residual_key(self) -> str:
        """What a ``refresh`` rule stores its residual under and a ``reuse`` rule reads: its method and knobs."""
        return f"{self.use}{self.knobs!r}"


def step_in_range(steps, step: int, total_steps: int | None) -> bool:
    if steps is None:
        return True
    start, end = steps
    if isinstance(start, int):
        return start <= step < end
    if total_steps is None:  # a fraction without a step count: the range cannot be placed
        return False
    return start * total_steps - 1e-9 <= step < end * total_steps - 1e-9


def _ranges_meet(a, b) -> bool:
    """Can two step ranges contain the same step? (Mixed kinds: assume they can.)"""
    if a is None or b is None or type(a[0]) is not type(b[0]):
        return True
    return a[0] < b[1] and b[0] < a[1]


def _sets_meet(a, b) -> bool:
    return a is None or b is None or bool(set(a) & set(b))


def _where(i: int, name: str = "") -> str:
    return f"TableConfig.rules[{i}]" + (f".{name}" if name else "")


def _check_steps(i: int, value) -> tuple | None:
    where = _where(i, "steps")
    what = "(start, end): two ints 0 <= start < end, or two floats 0 <= start < end <= 1 (fractions of the call's steps)"
    if value is None:
        return None
    if isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, tuple) or len(value) != 2:
        raise ValueError(f"{where} must be {what}, got {value!r}")
    start, end = value
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if not 0 <= start < end <= MAX_INT:
            raise ValueError(f"{where} must be {what}, got {value!r}")
        return (start, end)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        start, end = float(start), float(end)
        if not (math.isfinite(start) and math.isfinite(end) and 0.0 <= start < end <= 1.0):
            raise ValueError(f"{where} must be {what}, got {value!r}")
        return (start, end)
    raise ValueError(f"{where} must be {what}, got {value!r}")


def make_rule(i: int, raw, block_size: int, backend: str) -> TableRule:
    """A validated rule from a ``TableRule`` or a dict (the JSON form)."""
    from . import config_class

    if isinstance(raw, TableRule):
        raw = raw.to_json()
    if not isinstance(raw, dict):
        raise ValueError(f"{_where(i)} must be a dict with 'use' (and optional layers, heads, steps, knobs, "
                         f"residual) or a TableRule, got {raw!r}")
    unknown = sorted(set(raw) - {"use", "layers", "heads", "steps", "knobs", "residual"})
    if unknown:
        raise ValueError(f"{_where(i)} has unknown key(s) {unknown}; allowed: use, layers, heads, steps, knobs, "
                         f"residual")
    use = raw.get("use")
    from . import REGISTRY

    methods = [m for m in REGISTRY if m != "table"]
    if use not in SPECIAL_USES and use not in methods:
        raise ValueError(f"{_where(i, 'use')} must be one of {list(SPECIAL_USES) + methods}, got {use!r}")
    layers = raw.get("layers")
    heads = raw.get("heads")
    owner = type("TableConfig.rules[%d]" % i, (), {})  # names the rule in check_index_set's messages
    layers = None if layers is None else check_index_set(owner, "layers", layers, allow_count=False)
    heads = None if heads is None else check_index_set(owner, "heads", heads, allow_count=False)
    if use in ("share", "cfg_share") and heads is not None:
        raise ValueError(f"{_where(i, 'heads')}={heads}: use={use!r} reuses a whole layer's output, so it applies "
                         f"to every head; drop 'heads' (None)")
    steps = _check_steps(i, raw.get("steps"))
    residual = raw.get("residual")
    if residual is not None and residual not in RESIDUAL_MODES:
        raise ValueError(f"{_where(i, 'residual')} must be one of {list(RESIDUAL_MODES)} or omitted (no residual), "
                         f"got {residual!r}")
    if residual is not None and use in SPECIAL_USES:
        raise ValueError(f"{_where(i, 'residual')}={residual!r}: use={use!r} runs no method whose error a residual "
                         f"could correct; a residual needs a method rule (use one of {methods})")
    knobs = raw.get("knobs") or {}
    if isinstance(knobs, (tuple, list)):
        knobs = dict(knobs)
    if not isinstance(knobs, dict):
        raise ValueError(f"{_where(i, 'knobs')} must be a dict of the method's own knobs, got {knobs!r}")
    config = None
    if use in SPECIAL_USES:
        if knobs:
            raise ValueError(f"{_where(i, 'knobs')}={knobs}: use={use!r} takes no knobs")
    else:
        cls = config_class(use)
        shared = {f.name for f in dataclasses.fields(AttentionConfig)}
        own = [f.name for f in dataclasses.fields(cls) if f.name not in shared]
        bad = sorted(k for k in knobs if k not in own)
        if bad:
            raise ValueError(f"{_where(i, 'knobs')} sets {bad}, which {use!r} does not own; a rule may set "
                             f"{own} (shared knobs such as dense_steps or block_size are table-wide)")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
        try:
            config = cls(block_size=block_size, backend=backend, **values)
        except ValueError as e:
            raise ValueError(f"{_where(i, 'knobs')}: {e}") from None
        knobs = {k: getattr(config, k) for k in values}
    return TableRule(use=use, layers=layers, heads=heads, steps=steps, knobs=tuple(sorted(knobs.items())),
                     config=config, residual=residual)


def layout_key(config: AttentionConfig | None):
    """What a rule's plans share a token layout on: None for dense (any layout fits)."""
    if config is None:
        return None
    from . import make_method

    method = make_method(config)
    tile = getattr(config, "tile", None)
    per_head = config.method == "heads"  # temporal heads get their own per-head order
    return (method.order(), tile, per_head)


def check_layouts(rules: tuple[TableRule, ...]) -> None:
    """Refuse two method rules that can meet in one call but plan on different token layouts."""
    keyed = [(i, r, layout_key(r.config)) for i, r in enumerate(rules) if r.config is not None]
    for a in range(len(keyed)):
        for b in range(a + 1, len(keyed)):
            (i, ri, ki), (j, rj, kj) = keyed[a], keyed[b]
            if ki == kj and not ki[2]:
                continue
            if ki == kj and ri.config == rj.config:
                continue
            if _sets_meet(ri.layers, rj.layers) and _ranges_meet(ri.steps, rj.steps):
                raise ValueError(
                    f"{_where(i)} ({ri.use}: order/tile {ki[:2]}) and {_where(j)} ({rj.use}: order/tile {kj[:2]}) "
                    f"can apply to heads of the same call (their layers and steps overlap) but plan on different "
                    f"token layouts, which one per-head BlockMask cannot hold; give them the same 'order' and "
                    f"'tile' knobs, or disjoint layers/steps" + (" ('heads' plans its own per-head layout)"
                                                                 if ki[2] or kj[2] else ""))


def check_residuals(rules: tuple[TableRule, ...], residual_refresh: int) -> None:
    """A ``reuse`` rule needs a ``refresh`` rule of the same method and knobs that can reach its layers
    and heads; rule residuals and the table-wide ``residual_refresh`` cache exclude each other."""
    for i, rule in enumerate(rules):
        if rule.residual is None:
            continue
        if residual_refresh:
            raise ValueError(f"TableConfig.residual_refresh={residual_refresh} (a residual for every head of every "
                             f"call) and {_where(i, 'residual')}={rule.residual!r} (per rule) would both add a "
                             f"residual; use one of them (residual_refresh=0 with rule residuals)")
        if rule.residual == "reuse" and not any(
                r.residual == "refresh" and r.residual_key == rule.residual_key and _sets_meet(r.layers, rule.layers)
                and _sets_meet(r.heads, rule.heads) for r in rules):
            raise ValueError(f"{_where(i, 'residual')}='reuse' ({rule.use}, knobs {dict(rule.knobs)}): no rule with "
                             f"residual='refresh' and the same use and knobs covers its layers/heads, so nothing "
                             f"stores the residual it adds; add one at an earlier step")


@dataclass(frozen=True)
class TableConfig(AttentionConfig):
    """Per-(layer, head, step range) methods and caches: an ordered list of rules (module doc)."""

    method = "table"
    rules: tuple = ()
    calibrated_grid: tuple[int, ...] | None = knob(
        None, "optional_axes", help="the token grid (T, H, W) the table was calibrated at: a call on another "
                                    "grid runs it anyway, with a note (None: no note)")

    def __post_init__(self) -> None:
        super().__post_init__()
        rules = self.rules
        if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
            raise ValueError(f"TableConfig.rules must be a list of rules (dicts or TableRule), got {rules!r}")
        checked = tuple(make_rule(i, r, self.block_size, self.backend) for i, r in enumerate(rules))
        check_layouts(checked)
        check_residuals(checked, self.residual_refresh)
        object.__setattr__(self, "rules", checked)

    # --- what the runtime asks -------------------------------------------------------------------
    @property
    def fractional_rules(self) -> bool:
        """Does a rule give its steps as fractions of the call's steps (placed only with a step count)?"""
        return any(r.steps is not None and isinstance(r.steps[0], float) for r in self.rules)

    @property
    def follows_call(self) -> bool:
        return super().follows_call or self.fractional_rules

    def rule_for(self, layer: int, head: int, step: int, total_steps: int | None, branch: str = "cond"):
        """The first rule matching (layer, head, step) for this branch, or None (dense)."""
        for rule in self.rules:
            if rule.use == "cfg_share" and branch != "uncond":
                continue
            if rule.matches(layer, head, step, total_steps):
                return rule
        return None

    def _whole_layer(self, use: str, layer: int, step: int, total_steps, branch: str) -> bool:
        """True when the first matching rule of every head is ``use`` (such rules cover every head)."""
        for rule in self.rules:
            if rule.use == "cfg_share" and branch != "uncond":
                continue
            if rule.matches(layer, None, step, total_steps):
                if rule.use == use:
                    return True
                if rule.heads is None:  # an earlier rule covering every head decides otherwise
                    return False
                return False  # a head-specific rule comes first: those heads compute
        return False

    def shares_output_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        return (super().shares_output_at(layer, step, total_steps)
                or self._whole_layer("share", layer, step, total_steps, "cond"))

    def keeps_output_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        if super().keeps_output_at(layer, step, total_steps):
            return True
        return any(r.use == "share" and (r.layers is None or layer in r.layers) for r in self.rules)

    def shares_cfg_at(self, layer: int, step: int, total_steps: int | None = None) -> bool:
        return (super().shares_cfg_at(layer, step, total_steps)
                or self._whole_layer("cfg_share", layer, step, total_steps, "uncond"))

    def at_step_count(self, steps: int) -> "TableConfig":
        """This table with every rule's fractional step range written as the steps it covers in a call of
        ``steps`` steps (what runs where no scheduler counts the steps: a bare transformer)."""
        def count(x: float) -> int:  # the first step s with s >= x * steps (step_in_range's rule)
            return max(0, math.ceil(x * steps - 1e-9))

        rules = []
        for rule in self.rules:
            data = rule.to_json()
            if rule.steps is not None and isinstance(rule.steps[0], float):
                start, end = count(rule.steps[0]), count(rule.steps[1])
                if end <= start:
                    continue  # covers no step at this count
                data["steps"] = [start, end]
            rules.append(data)
        return dataclasses.replace(self, rules=tuple(rules))

    # --- files -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["rules"] = [r.to_json() for r in self.rules]
        return out

    def to_json(self) -> dict[str, Any]:
        """The non-default shared knobs and the rules, as JSON values (``from_json`` reads it back)."""
        out: dict[str, Any] = {}
        defaults = TableConfig()
        for f in dataclasses.fields(self):
            if f.name in ("rules", "calibrated_grid"):  # the preset file keeps the grid in calibrated_at
                continue
            value = getattr(self, f.name)
            if value != getattr(defaults, f.name):
                out[f.name] = json.loads(json.dumps(value))
        out["rules"] = [r.to_json() for r in self.rules]
        return out

    @classmethod
    def from_json(cls, data: dict) -> "TableConfig":
        if not isinstance(data, dict):
            raise ValueError(f"a TableConfig must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TableConfig field(s) {unknown}; allowed: {sorted(known)}")
        values = {k: tuple(v) if isinstance(v, list) and k != "rules" else v for k, v in data.items()}
        if "schedule" in values:
            values["schedule"] = tuple((n, tuple(s)) for n, s in values["schedule"])
        return cls(**values)


__all__ = ["TableConfig", "TableRule", "SPECIAL_USES", "RESIDUAL_MODES", "step_in_range"]
