"""Comparing a bench run with a committed baseline, metric by metric, with per-metric tolerances.

Quality may not get worse by more than its tolerance; speed is compared as the ratio measured in
the same cell (dense step time / accelerated step time), never as seconds, and its tolerance is a
fraction of the baseline's ratio (CPU timings on shared cores are noisy: keep it generous). A cell
that ran in the baseline but fails now is a regression; a cell the baseline does not have is
"new" (reported, not a failure); a baseline cell not in this run is "not run".

Tolerances come from :data:`DEFAULT_TOLERANCES`, then the baseline file's ``tolerances``, then the
command line's ``--tolerance METRIC=VALUE``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ..eval.files import write_json_atomic
from .matrix import now_utc as _now

BASELINE_FORMAT = "ditaccel-bench-baseline/1"


@dataclass(frozen=True)
class Rule:
    """How one metric may move. ``relative``: the tolerance is a fraction of the baseline value (plus
    ``floor``, an absolute slack for values at rounding level); else it is in the metric's units.
    ``ceiling``: values above it count as equal to it (PSNR of outputs identical up to rounding)."""

    higher_is_better: bool
    relative: bool
    floor: float = 0.0
    ceiling: float | None = None
    unit: str = ""

    def bound(self, base: float, tolerance: float) -> float:
        if self.relative:
            return base * (1 - tolerance) - self.floor if self.higher_is_better else base * (1 + tolerance) + self.floor
        return base - tolerance if self.higher_is_better else base + tolerance

    def describe(self, tolerance: float) -> str:
        verb = "drop" if self.higher_is_better else "rise"
        amount = f"{tolerance:.0%}" if self.relative else f"{tolerance:g}{self.unit}"
        floor = f" (+ {self.floor:g})" if self.relative and self.floor else ""
        return f"may {verb} by at most {amount}{floor}"


RULES: dict[str, Rule] = {
    "psnr": Rule(higher_is_better=True, relative=False, ceiling=100.0, unit=" dB"),
    "ssim": Rule(higher_is_better=True, relative=False),
    "lpips": Rule(higher_is_better=False, relative=False),
    "latent_rel_l2": Rule(higher_is_better=False, relative=True, floor=1e-4),
    "attention_error": Rule(higher_is_better=False, relative=True, floor=1e-4),
    "density": Rule(higher_is_better=False, relative=False),
    "speedup": Rule(higher_is_better=True, relative=True),
}
DEFAULT_TOLERANCES: dict[str, float] = {
    "psnr": 0.5,  # dB
    "ssim": 0.005,
    "lpips": 0.01,
    "latent_rel_l2": 0.10,  # 10 % of the baseline value
    "attention_error": 0.10,
    "density": 0.01,  # a denser plan is slower; a sparser one shows in the quality metrics
    "speedup": 0.5,  # the ratio may fall to half the baseline's: CPU timings are noisy
}


def check_tolerances(tolerances: dict, where: str) -> dict[str, float]:
    out = {}
    for name, value in tolerances.items():
        if name not in RULES:
            raise ValueError(f"{where}: unknown metric {name!r}; tolerances exist for {list(RULES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
            raise ValueError(f"{where}: tolerance {name}={value!r} must be a finite number >= 0")
        if RULES[name].relative and RULES[name].higher_is_better and value > 1:
            raise ValueError(f"{where}: tolerance {name}={value!r} is a fraction of the baseline and must be <= 1")
        out[name] = float(value)
    return out


def parse_tolerance_flags(items: list[str] | None) -> dict[str, float]:
    """``["psnr=1", "speedup=0.3"]`` -> ``{"psnr": 1.0, "speedup": 0.3}``."""
    parsed = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        try:
            parsed[name.strip()] = float(raw)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--tolerance expects METRIC=NUMBER (metrics: {', '.join(RULES)}), got {item!r}")
    return check_tolerances(parsed, "--tolerance")


# --- files -----------------------------------------------------------------------------------------

def load_baseline(path: str | Path) -> dict:
    """A baseline file (or a results.json) as ``{"cells": {key: {status, error, metrics}}, "tolerances", ...}``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--baseline {str(path)!r}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--baseline {str(path)!r}: not valid JSON: {exc}") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if isinstance(cells, list):  # a results.json
        cells = {c["key"]: {"status": c["status"], "error": c.get("error"), "metrics": c.get("metrics") or {}}
                 for c in cells if isinstance(c, dict) and "key" in c}
    if not isinstance(cells, dict):
        raise ValueError(f"--baseline {str(path)!r}: expected a bench baseline or results.json with 'cells'")
    for key, cell in cells.items():
        if not isinstance(cell, dict) or cell.get("status") not in ("ok", "failed"):
            raise ValueError(f"--baseline {str(path)!r}: cell {key!r} needs status 'ok' or 'failed', got {cell!r}")
    tolerances = check_tolerances(data.get("tolerances") or {}, f"--baseline {str(path)!r} tolerances")
    return {"path": str(path), "cells": cells, "tolerances": tolerances, "device": data.get("device"),
            "versions": data.get("versions")}


def baseline_from_results(results: dict, tolerances: dict | None = None) -> dict:
    """What ``--save-baseline`` writes: the matrix, where it ran, tolerances, and each cell's metrics."""
    return {
        "format": BASELINE_FORMAT, "created": _now(), "device": results.get("device"), "dtype": results.get("dtype"),
        "versions": results.get("versions"), "matrix": results.get("matrix"),
        "tolerances": {**DEFAULT_TOLERANCES, **(tolerances or {})},
        "cells": {c["key"]: {"status": c["status"], "error": c.get("error"), "metrics": c.get("metrics") or {}}
                  for c in results["cells"]},
    }


def save_baseline(results: dict, path: str | Path, tolerances: dict | None = None) -> Path:
    return write_json_atomic(baseline_from_results(results, tolerances), Path(path))


# --- comparing -------------------------------------------------------------------------------------

def _number(x) -> float | None:
    """JSON values back to floats ("inf"/"nan" were written as strings)."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def metric_value(metrics: dict, name: str):
    """A cell's metric as a number: an output identical to dense has ``psnr`` null and
    ``identical`` true (infinite PSNR); older files wrote the string "inf"."""
    if name == "psnr" and metrics.get("identical") and metrics.get("psnr") is None:
        return math.inf
    return metrics.get(name)


def compare_metric(name: str, base, now, tolerance: float) -> dict:
    """``{"metric", "baseline", "now", "bound", "verdict": "ok"|"regression"|"not measured", "rule"}``."""
    rule = RULES[name]
    b, n = _number(base), _number(now)
    entry = {"metric": name, "baseline": b, "now": n, "bound": None, "tolerance": tolerance,
             "rule": rule.describe(tolerance), "verdict": "ok"}
    if b is None or math.isnan(b):
        entry["verdict"] = "not measured"  # nothing to hold this run to
        return entry
    if n is None:
        entry["verdict"] = "not measured"  # e.g. LPIPS weights absent here, present where the baseline ran
        return entry
    if math.isnan(n):
        entry["verdict"] = "regression"
        return entry
    if rule.ceiling is not None:
        b, n = min(b, rule.ceiling), min(n, rule.ceiling)
    bound = rule.bound(b, tolerance)
    entry["bound"] = bound
    if (n < bound) if rule.higher_is_better else (n > bound):
        entry["verdict"] = "regression"
    return entry


def compare_results(results: dict, baseline: dict, tolerances: dict | None = None) -> dict:
    """Every cell of ``results`` against ``baseline``; ``{"regressions": int, "cells": [...], ...}``."""
    tol = {**DEFAULT_TOLERANCES, **baseline.get("tolerances", {}), **(tolerances or {})}
    now_cells = {c["key"]: c for c in results["cells"]}
    rows = []
    for key, cell in now_cells.items():
        base = baseline["cells"].get(key)
        row = {"key": key, "status": None, "metrics": [], "error": cell.get("error")}
        if base is None:
            row["status"] = "new"
        elif base["status"] != "ok":
            row["status"] = "still failing" if cell["status"] != "ok" else "fixed"
        elif cell["status"] != "ok":
            row["status"] = "regression"
        else:
            row["metrics"] = [compare_metric(name, metric_value(base["metrics"], name),
                                             metric_value(cell["metrics"], name), tol[name])
                              for name in RULES]
            row["status"] = "regression" if any(m["verdict"] == "regression" for m in row["metrics"]) else "ok"
        rows.append(row)
    for key in baseline["cells"]:
        if key not in now_cells:
            rows.append({"key": key, "status": "not run", "metrics": [], "error": None})
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "regression", "new", "not run", "fixed",
                                                                "still failing")}
    device_note = None
    if baseline.get("device") and results.get("device") and baseline["device"] != results["device"]:
        device_note = (f"the baseline ran on {baseline['device']}, this run on {results['device']}: "
                       "speed ratios are not comparable across devices")
    return {"baseline": baseline.get("path"), "tolerances": tol, "regressions": counts["regression"],
            "counts": counts, "cells": rows, "device_note": device_note}


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if math.isinf(x) or math.isnan(x):
        return str(x)
    return f"{x:.4g}"


def format_diff(diff: dict) -> str:
    """Readable lines: a summary, then each regression with the metric, both values and the rule."""
    c = diff["counts"]
    summary = (f"baseline {diff['baseline']}: {c['ok']} cell(s) within tolerance, {c['regression']} regression(s), "
               f"{c['new']} new, {c['not run']} not run, {c['fixed']} fixed, {c['still failing']} still failing")
    lines = [summary]
    if diff.get("device_note"):
        lines.append(f"note: {diff['device_note']}")
    for row in diff["cells"]:
        if row["status"] == "regression" and not row["metrics"]:
            lines.append(f"REGRESSION {row['key']}: the cell failed (it ran in the baseline): {row['error']}")
        for m in row["metrics"]:
            if m["verdict"] == "regression":
                unit = RULES[m["metric"]].unit
                lines.append(f"REGRESSION {row['key']}: {m['metric']} {_fmt(m['baseline'])}{unit} -> "
                             f"{_fmt(m['now'])}{unit} (limit {_fmt(m['bound'])}{unit}; {m['rule']})")
        if row["status"] == "new":
            lines.append(f"new        {row['key']} (not in the baseline)")
        elif row["status"] == "not run":
            lines.append(f"not run    {row['key']} (in the baseline, not in this matrix)")
        elif row["status"] == "fixed":
            lines.append(f"fixed      {row['key']} (failed in the baseline, runs now)")
    return "\n".join(lines)


__all__ = ["BASELINE_FORMAT", "DEFAULT_TOLERANCES", "RULES", "Rule", "baseline_from_results", "compare_metric",
           "compare_results", "format_diff", "load_baseline", "parse_tolerance_flags", "save_baseline"]
