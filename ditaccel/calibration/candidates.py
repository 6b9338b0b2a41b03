"""The calibrator's candidate space: what a (layer, head, step range) may run.

A candidate is written like a table rule without its place: ``{"use": "xattn", "knobs":
{"threshold": 0.9}}``, or ``"dense"``, ``"share"`` (output share at a (layer, step)), ``"cfg_share"``.
``"window:kernel_size=3,9,9"`` is the same thing as a string (the CLI's ``--candidates``). Every
attention candidate plans on the tile layout (order ``tile``, the block-sized default tile) so any
mix of them per head stacks into one BlockMask.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from ..methods.table_config import SPECIAL_USES, make_rule

DEFAULT_CANDIDATES = (
    "dense", "share", "cfg_share",
    "window:kernel_size=(3,9,9)", "tile:window=(3,3,3)", "radial:order='tile'",
    "topk:topk=0.5", "xattn:threshold=0.95", "xattn:threshold=0.9",
)
"""Dense, the cross-step caches, a window, a tile neighbourhood, radial, topk and xattn (two levels)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str  # a stable label: "xattn:threshold=0.9"
    use: str
    knobs: tuple = ()
    config: Any = None  # the method's validated config (None: dense / share / cfg_share)

    def rule(self, **where) -> dict:
        out = {"use": self.use, **where}
        if self.knobs:
            out["knobs"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.knobs}
        return out


def _parse(spec) -> dict:
    if isinstance(spec, dict):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"candidates: each must be a name, 'method:knob=value,...' or a dict, got {spec!r}")
    use, _, rest = spec.partition(":")
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
            try:
                knobs[name.strip()] = ast.literal_eval(raw.strip())
            except (ValueError, SyntaxError):
                knobs[name.strip()] = raw.strip()
    return {"use": use.strip(), "knobs": knobs}


def make_candidates(specs, block_size: int = 64, backend: str = "auto") -> list[Candidate]:
    """Validated candidates (bad ones: ValueError naming the candidate); dense is always included."""
    out: list[Candidate] = []
    seen = set()
    for i, spec in enumerate(["dense", *list(specs)]):
        raw = _parse(spec)
        if raw.get("use") not in SPECIAL_USES:
            knobs = dict(raw.get("knobs") or {})
            if raw.get("use") == "radial":  # radial plans in raster order by default: the tile layout mixes
                knobs.setdefault("order", "tile")
            raw = {"use": raw.get("use"), "knobs": knobs}
        try:
            rule = make_rule(i, raw, block_size, backend)
        except ValueError as e:
            raise ValueError(f"candidates[{i}] {spec!r}: {e}") from None
        if rule.use == "heads":
            raise ValueError(f"candidates[{i}] {spec!r}: 'heads' picks its own per-head patterns; the calibrator "
                             f"profiles the patterns per head itself (give window/tile/radial/topk/xattn candidates)")
        name = rule.use + (":" + ",".join(f"{k}={v!r}" for k, v in rule.knobs) if rule.knobs else "")
        if name in seen:
            continue
        seen.add(name)
        out.append(Candidate(name=name, use=rule.use, knobs=rule.knobs, config=rule.config))
    from ..methods.table_config import layout_key

    keys = {layout_key(c.config) for c in out if c.config is not None}
    if len(keys) > 1:
        raise ValueError(f"candidates plan on different token layouts {sorted(map(str, keys))}: give every "
                         f"attention candidate order='tile' and the default tile, so heads can mix them")
    return out


__all__ = ["Candidate", "DEFAULT_CANDIDATES", "make_candidates"]
