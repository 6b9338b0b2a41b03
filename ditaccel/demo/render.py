"""The demo's summary text, from a generation's JSON report, for every outcome a generation can have.

The report is read defensively: a figure may be a number, ``None`` (not measured), a non-finite
float, the string ``"inf"``/``"nan"`` (``compare.jsonable``'s spelling of them) or missing
altogether; a quality record may flag ``identical`` instead of giving an infinite PSNR. None of
these may turn a finished generation into an error, so nothing here raises on a report's values.
"""

from __future__ import annotations

import math
from typing import Any

NOTHING_SPARSE = ("Nothing ran sparse: every attention call of `{method}` was dense here (latent grid {grid}), "
                  "so the accelerated output is the dense one and the speedup is only noise. A larger size, "
                  "fewer dense steps or layers, or a smaller window makes it sparse.")


def number(x: Any) -> float | None:
    """``x`` as a float (infinities and NaN included), or None when it is not a number."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x.strip())  # "inf", "-inf", "nan", "Infinity", "12.5"
        except ValueError:
            return None
    try:  # numpy / torch scalars
        return float(x.item())
    except (AttributeError, TypeError, ValueError, RuntimeError):
        return None


def fmt(x: Any, spec: str, none: str = "n/a") -> str:
    value = number(x)
    if value is None or math.isnan(value):
        return none
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return format(value, spec)


def _get(record: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(record, dict):
            return None
        record = record.get(key)
    return record


def nothing_ran_sparse(report: dict) -> bool:
    """True when the accelerated run computed every attention call densely (or none was seen)."""
    ran_sparse = _get(report, "sparsity", "ran_sparse")
    if isinstance(ran_sparse, bool):  # the evaluation engine's own finding
        return not ran_sparse
    mean = number(_get(report, "density", "mean"))
    return mean is None or mean >= 1.0


def identical(report: dict) -> bool:
    quality = _get(report, "quality") or {}
    if isinstance(quality, dict) and quality.get("identical") is True:
        return True
    psnr = number(_get(quality, "psnr"))
    return psnr is not None and math.isinf(psnr) and psnr > 0


def _psnr(report: dict) -> str:
    if identical(report):
        return "PSNR ∞ (identical to dense)"
    return f"PSNR {fmt(_get(report, 'quality', 'psnr'), '.2f')} dB"


def _lpips(quality: dict) -> str:
    value = quality.get("lpips") if isinstance(quality, dict) else None
    if number(value) is not None:
        return fmt(value, ".4f")
    note = quality.get("lpips_note") if isinstance(quality, dict) else None
    return f"n/a ({note})" if isinstance(note, str) and note else "n/a (weights not present locally)"


def _ms(x) -> str:
    return fmt(x, ".0f") + " ms" if number(x) is not None else "n/a"


def _first(record, *paths: tuple[str, ...]):
    for path in paths:
        value = _get(record, *path)
        if value is not None:
            return value
    return None


def _speed(timing: dict) -> str:
    speedup = fmt(_get(timing, "speedup"), ".2f")
    verdict = _get(timing, "verdict")
    if isinstance(verdict, str) and verdict:  # the evaluation engine's record
        return f"**speed: {verdict}** (speedup {speedup}× = dense time ÷ accelerated time over the denoising loop)"
    return (f"**speedup {speedup}×** over the denoising loop "
            f"({fmt(_get(timing, 'speedup_median_sparse_step'), '.2f')}× median sparse step)")


def summary_markdown(report: dict, dense_cached: bool | None = None) -> str:
    """The figures a user compares first — times, speedup, density, PSNR/SSIM, the verdicts — as
    Markdown, from the evaluation engine's record (``timing.dense_median_ms``, ``verdicts``) or the
    older report (``timing.dense.denoise_ms``)."""
    report = report if isinstance(report, dict) else {}
    timing, quality = _get(report, "timing") or {}, _get(report, "quality") or {}
    method = str(report.get("method") or "accelerated")
    cached = report.get("dense_cached") if dense_cached is None else dense_cached
    config = report.get("config") if isinstance(report.get("config"), dict) else {}
    settings = ", ".join(f"{k}={v}" for k, v in config.items() if k != "method")
    grid = report.get("grid")
    grid_text = "x".join(str(g) for g in grid) if isinstance(grid, (list, tuple)) and grid else "unknown"
    note = " (cached: same model, prompt, seed, steps and size)" if cached else ""
    dense_ms = _first(timing, ("dense_median_ms",), ("dense", "denoise_ms"))
    accel_ms = _first(timing, ("accel_median_ms",), ("accelerated", "denoise_ms"))
    lines = [
        (f"**{report.get('pipeline') or '?'}** ({report.get('model') or '?'}) on {report.get('device') or '?'}, "
         f"{report.get('dtype') or '?'}; latent grid {grid_text}"),
        "",
        f"| | dense | {method} |",
        "|---|---|---|",
        f"| denoising loop | {_ms(dense_ms)}{note} | {_ms(accel_ms)} |",
    ]
    if _get(timing, "dense", "total_ms") is not None:
        lines.append(f"| whole call | {_ms(_get(timing, 'dense', 'total_ms'))} | "
                     f"{_ms(_get(timing, 'accelerated', 'total_ms'))} |")
    lines += [
        "",
        (f"{_speed(timing)} · **density {fmt(_get(report, 'density', 'mean'), '.3f')}** · **{_psnr(report)}** · "
         f"**SSIM {fmt(_get(quality, 'ssim'), '.4f')}** · LPIPS {_lpips(quality)} · "
         f"latent rel-L2 {fmt(_get(quality, 'latent_rel_l2'), '.3g')}"),
    ]
    verdicts = [str(v) for v in report.get("verdicts") or [] if isinstance(v, str)]
    if verdicts:
        lines += ["", *[f"- {v}" for v in verdicts]]
    lines += ["", f"method `{method}`: {settings or 'defaults'}"]
    if nothing_ran_sparse(report):
        lines += ["", NOTHING_SPARSE.format(method=method, grid=grid_text)]
    return "\n".join(lines)


def json_safe(x: Any) -> Any:
    """A copy Gradio's JSON output can always send: non-finite floats become "inf"/"-inf"/"nan"
    strings (what ``compare.jsonable`` writes), tuples lists, unknown objects their ``str``."""
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    if x is None or isinstance(x, (bool, int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    value = number(x)
    return str(x) if value is None else json_safe(value)


__all__ = ["NOTHING_SPARSE", "fmt", "identical", "json_safe", "nothing_ran_sparse", "number", "summary_markdown"]
