"""One comparison record: what ``compare``, ``bench``, the demo and the calibrator all report.

:class:`Comparison` holds the runs (media, latents), the accelerated run's ``stats()`` and every
figure; :meth:`Comparison.to_dict` is its JSON form, with numbers only — an infinite PSNR (outputs
identical to dense) is ``null`` with ``"identical": true`` beside it, never a string.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runs import RunResult
from .timing import TimingSummary


def jsonable(x):
    """JSON-safe copy: tuples -> lists, numpy/torch scalars -> Python, inf/nan -> None, paths/dtypes -> str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", 1) == 0:
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (bool, int, float, str)) or x is None:
        return x
    return str(x)


def write_json(data: dict, path) -> str:
    """Write ``data`` as JSON to ``path``; ``"-"`` writes it to stdout. Returns where it went."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return "-"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def clean_quality(quality: dict) -> dict:
    """``compare_media``'s dict with infinite PSNRs as None and an ``identical`` flag."""
    q = dict(quality)
    per_frame = q.get("psnr_per_frame") or []
    q["identical"] = bool(per_frame) and all(math.isinf(p) for p in per_frame)
    q["identical_frames"] = sum(1 for p in per_frame if math.isinf(p))
    for name in ("psnr", "psnr_min"):
        if q.get(name) is not None and not math.isfinite(q[name]):
            q[name] = None
    if per_frame:
        finite = [p for p in per_frame if math.isfinite(p)]
        q["psnr_per_frame"] = [p if math.isfinite(p) else None for p in per_frame]
        if finite and not q["identical"]:
            # Mean over the frames that differ; frames equal to dense are counted in identical_frames.
            q["psnr"] = float(np.mean(finite)) if q.get("psnr") is None else q["psnr"]
            q["psnr_min"] = float(min(finite))
    return q


@dataclass
class Comparison:
    """Dense vs accelerated on the same pipeline, call and seed."""

    model: str
    pipeline: str
    device: str
    dtype: str
    method: str
    config: dict
    call: dict
    dense: RunResult
    accelerated: RunResult
    timing: TimingSummary
    quality: dict
    quality_verdict: dict
    sparsity: dict
    stats: dict
    grid: list[int] | None = None
    dense_cached: bool = False
    files: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def speedup(self) -> float | None:
        return self.timing.speedup

    def density(self) -> dict:
        stats = self.stats
        per_step = stats.get("steps") or {}
        n = len(self.accelerated.step_s)
        return {"mean": stats.get("mean_density"), "calls": stats.get("calls"),
                "dense_calls": stats.get("dense_calls"), "reuse_calls": stats.get("reuse_calls"),
                "per_step": [per_step[i]["density"] if i in per_step else None for i in range(n)],
                "per_layer": {name: v.get("density") for name, v in (stats.get("layers") or {}).items()},
                "per_layer_step": [{k: e.get(k) for k in ("transformer", "layer", "step", "branch", "density",
                                                          "time_ms")} for e in stats.get("per_layer_step") or []]}

    def attention_error(self) -> dict:
        error = self.stats.get("attention_error") or {"mean": None, "per_layer": {}, "per_layer_step": []}
        if error.get("mean") is None:
            error = dict(error, note="no attention error was measured (no tracked step ran sparse)")
        return error

    def metrics(self) -> dict:
        """The headline numbers (what a bench baseline gates)."""
        q = self.quality
        return {"psnr": q.get("psnr"), "identical": q.get("identical"), "ssim": q.get("ssim"),
                "lpips": q.get("lpips"), "latent_rel_l2": q.get("latent_rel_l2"),
                "attention_error": self.attention_error().get("mean"), "density": self.stats.get("mean_density"),
                "speedup": self.timing.speedup}

    def verdicts(self) -> list[str]:
        """One line each: speed, sparsity, quality (+ warnings), for people."""
        from .timing import describe_ratio

        t = self.timing
        if t.conclusive and "no measurable" in t.verdict():
            speed = f"speed: {t.verdict()} against dense over the denoising loop"
        elif t.conclusive:
            speed = f"speed: {describe_ratio(t.speedup)} than dense over the denoising loop"
        elif t.speedup is None:
            speed = "speed: not timed"
        else:
            speed = (f"speed: inconclusive ({'; '.join(w for w in t.warnings())}); measured "
                     f"{describe_ratio(t.speedup)}, which this noise does not support")
        lines = [speed, f"sparsity: {self.sparsity['line']}", f"quality: {self.quality_verdict['line']}"]
        lines += [f"warning: {w}" for w in self.quality_verdict.get("warnings", [])]
        if not self.sparsity["ran_sparse"] and t.speedup is not None:
            lines.append("note: nothing ran sparse, so any speed difference is overhead or noise")
        return lines

    def to_dict(self) -> dict:
        return jsonable({
            "format": "ditaccel-comparison/1",
            "model": self.model, "pipeline": self.pipeline, "device": self.device, "dtype": self.dtype,
            "method": self.method, "config": self.config, "call": self.call, "grid": self.grid,
            "tokens": (self.grid[0] * self.grid[1] * self.grid[2]) if self.grid else None,
            "latent_shape": list(self.dense.latents.shape) if self.dense.latents is not None else None,
            "media_shape": list(self.dense.media.shape), "dense_cached": self.dense_cached,
            "timing": self.timing.to_dict(), "density": self.density(), "quality": self.quality,
            "quality_verdict": self.quality_verdict, "sparsity": self.sparsity,
            "attention_error": self.attention_error(), "metrics": self.metrics(), "verdicts": self.verdicts(),
            "attention_time_ms": self.stats.get("attention_time_ms"), "stats": self.stats,
            "files": self.files, "versions": self.versions, "wall_s": self.wall_s,
        })


__all__ = ["Comparison", "clean_quality", "jsonable", "write_json"]
