"""The calibrator's candidate space: what a (layer, head, step range) may run.

A candidate is written like a table rule without its place: ``{"use": "xattn", "knobs":
{"threshold": 0.9}}``, or ``"dense"``, ``"share"`` (output share at a (layer, step)), ``"cfg_share"``.
``"window:kernel_size=3,9,9"`` is the same thing as a string (the CLI's ``--candidates``). Every
attention candidate plans on the tile layout (order ``tile``, the block-sized default tile) so any
mix of them per head stacks into one BlockMask.

Two forms only the calibrator has:

- ``"residual:METHOD:..."`` (or a dict with ``"residual": True``): the method plus a residual
  [DiTFastAttn]: in a step range the cell's first computed step refreshes (dense and the method,
  storing ``dense - method``), its later steps run the method plus that residual (the table's
  ``residual`` rules). The profile keeps the method's sampled output rows at every step so the
  error of ``X_s + (D_r - X_r)`` against ``D_s`` is known for any refresh step the search picks.
- ``"all"`` for an axis of a ``window`` ``kernel_size`` or a ``tile`` ``window``: the whole axis on
  the calibrated grid, whatever it is [Sparse VideoGen's head patterns: ``tile:window=(1,'all','all')``
  a spatial head sees its whole frame, ``tile:window=('all',1,1)`` a temporal head the same tile of
  every frame]. The candidate is resolved at the profiled grid (:meth:`Candidate.at_grid`): the
  smallest odd size that covers the axis (the axis's tokens, or tiles, or one more when that count
  is even), so the table written is a plain rule.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from ..methods.table_config import SPECIAL_USES, make_rule

RESIDUAL = "residual:"
WHOLE_AXIS = "all"
WHOLE_AXIS_KNOBS = {"window": "kernel_size", "tile": "window"}  # the knobs an axis of which may be "all"

DEFAULT_CANDIDATES = (
    "dense", "share", "cfg_share",
    "window:kernel_size=(3,9,9)", "tile:window=(3,3,3)", "radial:order='tile'",
    "topk:topk=0.5", "xattn:threshold=0.95", "xattn:threshold=0.9",
)
"""Dense, the cross-step caches, a window, a tile neighbourhood, radial, topk and xattn (two levels):
what the shipped embedded preset was calibrated with."""

HEAD_PATTERN_CANDIDATES = ("tile:window=(1,'all','all')", "tile:window=('all',1,1)")
"""Sparse VideoGen's head patterns: spatial heads (the whole frame), temporal heads (one tile, every frame)."""

RESIDUAL_CANDIDATES = ("residual:window:kernel_size=(3,9,9)", "residual:tile:window=(1,'all','all')",
                       "residual:tile:window=('all',1,1)")
"""Three attention candidates with a residual refreshed once per step range."""

EXTENDED_CANDIDATES = DEFAULT_CANDIDATES + HEAD_PATTERN_CANDIDATES + RESIDUAL_CANDIDATES
"""Every kind the calibrator has. Not the default: on the 2-core CPU the embedded pipeline's calibration
with it chose attention cells that a candidate 11% cheaper than dense left in (topk), whose errors
add to the shares' under the one error budget, and its preset cost 0.598 of dense against 0.425
(benchmarks/RESULTS.md, "Calibrator candidates"); on a GPU, where sparse cells are cheap, it is the
set to try."""

CANDIDATE_SETS = {"default": DEFAULT_CANDIDATES, "extended": EXTENDED_CANDIDATES}
"""Names a candidate list may hold in place of candidates (``--candidates extended``)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # a stable label: "xattn:threshold=0.9", "residual:tile:window=(1, 'all', 'all')"
    use: str
    knobs: tuple = ()  # as given; an axis may be "all" (``whole``)
    config: Any = None  # the method's validated config (None: dense / share / cfg_share); "all" axes as 1
    residual: bool = False
    whole: tuple = ()  # axis indices of WHOLE_AXIS_KNOBS[use] that are "all" (resolved by at_grid)

    @property
    def base(self) -> str:
        """The method part of the name: what the profile measures (``X`` of ``residual:X``)."""
        return self.name.removeprefix(RESIDUAL) if self.residual else self.name

    def at_grid(self, grid) -> "Candidate":
        """This candidate with its "all" axes sized to cover ``grid`` (itself when it has none)."""
        if not self.whole:
            return self
        if grid is None:
            raise ValueError(f"candidate {self.name!r}: its 'all' axes need the calibrated grid (T, H, W)")
        from ..methods import make_method
        from ..methods.base import num_tiles

        knob = WHOLE_AXIS_KNOBS[self.use]
        counts = tuple(grid) if self.use == "window" else num_tiles(grid, make_method(self.config).tile_for(grid))
        sizes = list(getattr(self.config, knob))
        for a in self.whole:
            sizes[a] = counts[a] if counts[a] % 2 else counts[a] + 1
        config = dataclasses.replace(self.config, **{knob: tuple(sizes)})
        knobs = tuple((k, tuple(sizes) if k == knob else v) for k, v in self.knobs)
        return dataclasses.replace(self, knobs=knobs, config=config, whole=())

    def rule(self, **where) -> dict:
        if self.whole:
            raise ValueError(f"candidate {self.name!r}: resolve its 'all' axes with at_grid(grid) before writing a rule")
        out = {"use": self.use, **where}
        if self.knobs:
            out["knobs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs}
        return out


def _parse(spec) -> dict:
    if isinstance(spec, dict):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"candidates: each must be a name, 'method:knob=value,...', 'residual:method:...' or a "
                         f"dict, got {spec!r}")
    residual = spec.startswith(RESIDUAL)
    use, _, rest = spec[len(RESIDUAL):].partition(":") if residual else spec.partition(":")
    knobs = {}
    if rest:
        # knob=value pairs split at top-level commas (a tuple value keeps its own commas inside parentheses)
        depth, cur, parts = 0, "", []
        for ch in rest:
            if ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(cur)
                cur = ""
            else:
                cur += ch
        parts.append(cur)
        for part in parts:
            name, sep, raw = part.partition("=")
            if not sep:
                raise ValueError(f"candidates: {spec!r}: expected knob=value after ':', got {part!r}")
            raw = re.sub(r"(?<!['\"\w])all(?!['\"\w])", repr(WHOLE_AXIS), raw.strip())  # a bare all is "all"
            try:
                knobs[name.strip()] = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                knobs[name.strip()] = raw
    return {"use": use.strip(), "knobs": knobs, **({"residual": True} if residual else {})}


def _whole_axes(where: str, use: str, knobs: dict) -> tuple[dict, tuple]:
    """``knobs`` with every "all" axis as 1 (what the method validates), and those axes."""
    knob = WHOLE_AXIS_KNOBS.get(use)
    for name, value in knobs.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        if WHOLE_AXIS in values and name != knob:
            allowed = ", ".join(f"{m}.{k}" for m, k in WHOLE_AXIS_KNOBS.items())
            raise ValueError(f"{where}: {use}.{name}={value!r}: {WHOLE_AXIS!r} (the whole axis) is allowed only in "
                             f"an axis of {allowed}")
    value = knobs.get(knob)
    if not isinstance(value, (tuple, list)) or WHOLE_AXIS not in value:
        if value == WHOLE_AXIS:
            raise ValueError(f"{where}: {use}.{knob}={value!r}: give (t, h, w) with {WHOLE_AXIS!r} on the axes to "
                             f"cover whole (all three whole is dense attention)")
        return knobs, ()
    if len(value) != 3 or all(v == WHOLE_AXIS for v in value):
        raise ValueError(f"{where}: {use}.{knob}={value!r}: give (t, h, w) with {WHOLE_AXIS!r} on one or two axes "
                         f"(all three whole is dense attention)")
    whole = tuple(a for a, v in enumerate(value) if v == WHOLE_AXIS)
    dilation = knobs.get("dilation")
    if dilation is not None:
        dil = tuple(dilation) if isinstance(dilation, (tuple, list)) else (dilation,) * 3
        if any(dil[a] != 1 for a in whole):
            raise ValueError(f"{where}: {use}.dilation={dilation!r}: an axis the window covers whole ({knob}="
                             f"{value!r}) takes dilation 1 there")
    return dict(knobs, **{knob: tuple(1 if v == WHOLE_AXIS else v for v in value)}), whole


def make_candidates(specs, block_size: int = 64, backend: str = "auto") -> list[Candidate]:
    """Validated candidates (bad ones: ValueError naming the candidate); dense is always included."""
    out: list[Candidate] = []
    seen = set()
    specs = [x for spec in specs for x in (CANDIDATE_SETS[spec] if isinstance(spec, str) and spec in CANDIDATE_SETS
                                            else (spec,))]
    for i, spec in enumerate(["dense", *specs]):
        raw = dict(_parse(spec))
        residual = raw.pop("residual", False)
        if residual not in (True, False):
            raise ValueError(f"candidates[{i}] {spec!r}: 'residual' must be true or false, got {residual!r}")
        if residual and raw.get("use") in SPECIAL_USES:
            raise ValueError(f"candidates[{i}] {spec!r}: a residual corrects a method's output; "
                             f"{raw.get('use')!r} computes none (give residual:window:..., residual:tile:..., ...)")
        whole = ()
        given = {}
        if raw.get("use") not in SPECIAL_USES:
            knobs = dict(raw.get("knobs") or {})
            if raw.get("use") == "radial":  # radial plans in raster order by default: the tile layout mixes
                knobs.setdefault("order", "tile")
            given = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
            knobs, whole = _whole_axes(f"candidates[{i}] {spec!r}", raw.get("use"), given)
            raw = {"use": raw.get("use"), "knobs": knobs}
        try:
            rule = make_rule(i, raw, block_size, backend)
        except ValueError as e:
            raise ValueError(f"candidates[{i}] {spec!r}: {e}") from None
        if rule.use == "heads":
            raise ValueError(f"candidates[{i}] {spec!r}: 'heads' picks its own per-head patterns; the calibrator "
                             f"profiles the patterns per head itself (give window/tile/radial/topk/xattn candidates)")
        if whole:  # the name and knobs keep "all" on the axes at_grid sizes
            knob = WHOLE_AXIS_KNOBS[rule.use]
            knobs = tuple((k, tuple(WHOLE_AXIS if a in whole else x for a, x in enumerate(v)) if k == knob else v)
                          for k, v in rule.knobs)
        else:
            knobs = rule.knobs
        name = (RESIDUAL if residual else "") + rule.use + (
            ":" + ",".join(f"{k}={v!r}" for k, v in knobs) if knobs else "")
        if name in seen:
            continue
        seen.add(name)
        out.append(Candidate(name=name, use=rule.use, knobs=knobs, config=rule.config, residual=residual,
                             whole=whole))
    from ..methods.table_config import layout_key

    keys = {layout_key(c.config) for c in out if c.config is not None}
    if len(keys) > 1:
        raise ValueError(f"candidates plan on different token layouts {sorted(map(str, keys))}: give every "
                         f"attention candidate order='tile' and the default tile, so heads can mix them")
    return out


__all__ = ["CANDIDATE_SETS", "Candidate", "DEFAULT_CANDIDATES", "EXTENDED_CANDIDATES", "HEAD_PATTERN_CANDIDATES",
           "RESIDUAL_CANDIDATES", "RESIDUAL", "WHOLE_AXIS", "make_candidates"]
