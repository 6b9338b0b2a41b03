"""Speed, measured so that the number means something: one definition, repeats, spread, load, drift.

**Speedup** is dense time ÷ accelerated time over the denoising loop (> 1 means faster), the
median of interleaved repeats (dense, accelerated, dense, accelerated, ...: both sides see the
same machine load); per sparse step it is the same ratio over the steps the accelerated run ran
sparse. It is printed as "1.8× faster" or "1.3× slower".

The ratio is **inconclusive** — and printed as such, not as a number — when the repeats of either
side spread by more than :data:`MAX_SPREAD` ((max - min) / median), when dense runs drift against
each other by more than :data:`MAX_DRIFT` (the dense-vs-dense control: first against last dense
repeat), or when other processes kept the cores busy while we timed (CPU only; from
``/proc/stat`` against our own CPU time, else the load average).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

MAX_SPREAD = 0.20
MAX_DRIFT = 0.20
MAX_OTHER_LOAD = 0.5  # cores' worth of other processes' work while we timed
SAME = 0.03  # ratios within 3 % of 1 read "no measurable difference"


def describe_ratio(ratio: float | None) -> str:
    """``2.0`` -> "2.00× faster", ``0.5`` -> "2.00× slower"; None -> "n/a"."""
    if ratio is None or ratio <= 0:
        return "n/a"
    if abs(ratio - 1) < SAME:
        return f"{ratio:.2f}× (no measurable difference)"
    return f"{ratio:.2f}× faster" if ratio > 1 else f"{1 / ratio:.2f}× slower"


def spread(values: list[float]) -> float | None:
    """(max - min) / median, None for fewer than two values."""
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid > 0 else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


class LoadMonitor:
    """How much CPU other processes used while a block ran, in cores (Linux ``/proc/stat`` minus our
    own CPU time; elsewhere the 1-minute load average, which includes us)."""

    def __init__(self):
        self.cores = os.cpu_count() or 1
        self.other_cores: float | None = None
        self.source = "none"

    @staticmethod
    def _busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                parts = f.readline().split()
        except OSError:
            return None
        ticks = [int(x) for x in parts[1:]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._t0, self._busy0, self._own0 = time.perf_counter(), self._busy_s(), sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._t0
        busy = self._busy_s()
        if busy is not None and self._busy0 is not None and wall > 0:
            own = sum(os.times()[:2]) - self._own0
            self.other_cores, self.source = max(0.0, (busy - self._busy0 - own) / wall), "/proc/stat"
        elif hasattr(os, "getloadavg"):
            self.other_cores, self.source = max(0.0, os.getloadavg()[0] - 1.0), "loadavg"
        return False


@dataclass
class TimingSummary:
    """Every timed repeat of both sides and what they support saying."""

    dense_loop_ms: list[float]
    accel_loop_ms: list[float]
    dense_step_ms: list[float]  # per step, median over repeats
    accel_step_ms: list[float]
    sparse_steps: list[int]  # steps the accelerated run ran sparse (density < 1 somewhere)
    timed_steps: list[int]  # steps that count (bench leaves out steps that also ran an error probe)
    device: str = "cpu"
    interleaved: bool = True
    warmup_runs: int = 0
    other_load_cores: float | None = None
    load_source: str = "none"
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    # --- the figures ---------------------------------------------------------------------------
    def _loop(self, per_step: list[list[float]]) -> list[float]:
        return [sum(run[i] for i in self.timed_steps if i < len(run)) for run in per_step]

    @property
    def dense_median_ms(self) -> float | None:
        return statistics.median(self.dense_loop_ms) if self.dense_loop_ms else None

    @property
    def accel_median_ms(self) -> float | None:
        return statistics.median(self.accel_loop_ms) if self.accel_loop_ms else None

    @property
    def speedup(self) -> float | None:
        """Dense ÷ accelerated over the denoising loop (medians of the repeats); > 1 means faster."""
        return ratio(self.dense_median_ms, self.accel_median_ms)

    @property
    def speedup_range(self) -> tuple[float, float] | None:
        """(worst, best) pairing of repeats: min dense ÷ max accel, max dense ÷ min accel."""
        if not self.dense_loop_ms or not self.accel_loop_ms or min(self.accel_loop_ms) <= 0:
            return None
        return (min(self.dense_loop_ms) / max(self.accel_loop_ms), max(self.dense_loop_ms) / min(self.accel_loop_ms))

    @property
    def speedup_sparse_steps(self) -> float | None:
        """The same ratio over the steps that ran sparse only (None when none did)."""
        steps = [i for i in self.sparse_steps if i in self.timed_steps]
        if not steps:
            return None
        return ratio(sum(self.dense_step_ms[i] for i in steps), sum(self.accel_step_ms[i] for i in steps))

    @property
    def dense_spread(self) -> float | None:
        return spread(self.dense_loop_ms)

    @property
    def accel_spread(self) -> float | None:
        return spread(self.accel_loop_ms)

    @property
    def drift(self) -> float | None:
        """Dense vs dense: last dense repeat ÷ first - 1 (identical work; anything else is the machine)."""
        if len(self.dense_loop_ms) < 2 or self.dense_loop_ms[0] <= 0:
            return None
        return self.dense_loop_ms[-1] / self.dense_loop_ms[0] - 1.0

    # --- what they support ---------------------------------------------------------------------
    def warnings(self) -> list[str]:
        out = []
        if len(self.dense_loop_ms) < 2 or len(self.accel_loop_ms) < 2:
            out.append("one timed run per side: no spread to judge the noise by (use --repeats 2 or more)")
        for side, value in (("dense", self.dense_spread), ("accelerated", self.accel_spread)):
            if value is not None and value > MAX_SPREAD:
                out.append(f"{side} repeats spread by {value:.0%} (> {MAX_SPREAD:.0%})")
        if self.drift is not None and abs(self.drift) > MAX_DRIFT:
            out.append(f"dense runs drifted by {self.drift:+.0%} between the first and last repeat "
                       f"(> {MAX_DRIFT:.0%}: the machine's speed changed)")
        if self.device == "cpu" and self.other_load_cores is not None and self.other_load_cores > MAX_OTHER_LOAD:
            out.append(f"other processes used {self.other_load_cores:.1f} of {self.cores} cores while timing "
                       f"({self.load_source})")
        if not self.interleaved:
            out.append("dense was timed earlier, not interleaved with the accelerated runs")
        return out

    @property
    def conclusive(self) -> bool:
        one_each = len(self.dense_loop_ms) < 2 or len(self.accel_loop_ms) < 2
        return self.speedup is not None and not one_each and not [
            w for w in self.warnings() if not w.startswith("dense was timed earlier")]

    def verdict(self) -> str:
        if self.speedup is None:
            return "no timing"
        if not self.conclusive:
            return "inconclusive"
        low, high = self.speedup_range or (self.speedup, self.speedup)
        if low <= 1.0 <= high and abs(self.speedup - 1) >= SAME:
            # Some pairing of the repeats says faster, another slower: the difference is within the noise.
            return f"{self.speedup:.2f}× (no measurable difference: the repeats range {low:.2f}-{high:.2f})"
        return describe_ratio(self.speedup)

    def to_dict(self) -> dict:
        return {
            "definition": "speedup = dense time / accelerated time over the denoising loop (median of interleaved "
                          "repeats); > 1 means faster",
            "speedup": self.speedup, "speedup_range": list(self.speedup_range) if self.speedup_range else None,
            "speedup_sparse_steps": self.speedup_sparse_steps, "verdict": self.verdict(),
            "conclusive": self.conclusive, "warnings": self.warnings(),
            "dense_loop_ms": self.dense_loop_ms, "accel_loop_ms": self.accel_loop_ms,
            "dense_median_ms": self.dense_median_ms, "accel_median_ms": self.accel_median_ms,
            "dense_spread": self.dense_spread, "accel_spread": self.accel_spread, "drift": self.drift,
            "dense_step_ms": self.dense_step_ms, "accel_step_ms": self.accel_step_ms,
            "sparse_steps": self.sparse_steps, "timed_steps": self.timed_steps, "repeats": len(self.accel_loop_ms),
            "interleaved": self.interleaved, "warmup_runs": self.warmup_runs, "device": self.device,
            "other_load_cores": self.other_load_cores, "load_source": self.load_source, "cores": self.cores,
        }


def summarise_runs(dense_runs, accel_runs, *, sparse_steps: list[int], excluded_steps=(), device: str = "cpu",
                   interleaved: bool = True, warmup_runs: int = 0, load: LoadMonitor | None = None) -> TimingSummary:
    """A :class:`TimingSummary` from the RunResults of both sides (``excluded_steps`` do not count)."""
    n = min([len(r.step_s) for r in list(dense_runs) + list(accel_runs)] or [0])
    timed = [i for i in range(n) if i not in set(excluded_steps)] or list(range(n))
    d_steps = [[s * 1e3 for s in r.step_s] for r in dense_runs]
    a_steps = [[s * 1e3 for s in r.step_s] for r in accel_runs]

    def median_steps(runs):
        return [statistics.median(run[i] for run in runs) for i in range(n)] if runs else []

    summary = TimingSummary([], [], median_steps(d_steps), median_steps(a_steps), sorted(sparse_steps), timed,
                            device=device, interleaved=interleaved, warmup_runs=warmup_runs)
    summary.dense_loop_ms, summary.accel_loop_ms = summary._loop(d_steps), summary._loop(a_steps)
    if load is not None:
        summary.other_load_cores, summary.load_source = load.other_cores, load.source
    return summary


__all__ = ["LoadMonitor", "MAX_DRIFT", "MAX_SPREAD", "TimingSummary", "describe_ratio", "ratio", "spread",
           "summarise_runs"]
