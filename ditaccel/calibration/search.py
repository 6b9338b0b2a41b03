"""The calibrator's search: per cell the cheapest candidate under an error budget, then the budget.

:func:`select` turns a :class:`~.profile.Profile` and one error budget into a choice per cell:

- per (layer, step), in step order: **output share** when reusing the layer's last computed output
  (a chain of shares reuses the same one) stays within the budget; else the step computes, and the
  unconditional branch takes **cfg share** when the conditional branch's output is within budget;
- per (layer, head, step range): the cheapest attention candidate whose profiled error is within
  the budget (dense, error 0, always qualifies; ties go to the earlier candidate). A residual
  candidate ``residual:X`` refreshes at the range's first step where the layer computes in both
  branches (no output share, no cfg share) and reuses at its later computed steps; its error is
  that of ``X_s + (D_r - X_r)`` over the reusing steps, its cost per call dense + X at the refresh
  step, X at a reusing one, dense at the range's steps before the refresh, averaged over the calls
  the range computes.

Costs are per head per call relative to dense attention: measured wall time of each candidate's
call (``cost="time"``, the profiler's timings: what a CPU pays, scoring included) or the fraction
of blocks it computes (``cost="blocks"``: attention FLOPs). A share costs nothing. A refresh runs
the model's dense attention for every head of the call once, whichever of its heads refresh.

:func:`tune` then searches the budget over a log grid, by bisection, for the largest budget whose
full runs (a callable: the engine's PSNR against dense on the calibration prompts) still meet the
target: the lowest-cost selection that meets it, when quality falls as the budget grows.
"""

from __future__ import annotations

import dataclasses

from .candidates import RESIDUAL, Candidate
from .profile import Profile

SHARE_COST = 0.0
SHARE_UNITS = ("layer", "step")


@dataclasses.dataclass
class Selection:
    budget: float
    share: dict  # layer -> sorted steps that reuse the layer's last computed output
    cfg_share: dict  # layer -> sorted steps whose unconditional branch reuses the conditional output
    attention: dict  # (layer, head, range index) -> candidate name
    cost: float  # estimated attention cost of a pipeline call, relative to dense (1.0)
    density: float  # fraction of dense attention FLOPs computed (shares count 0)
    dense_steps: tuple = (0, 0)  # (leading, trailing) steps left dense
    residual_refresh: dict = dataclasses.field(default_factory=dict)  # (layer, range) -> refresh step

    def key(self) -> tuple:
        return (tuple(sorted((k, tuple(v)) for k, v in self.share.items())),
                tuple(sorted((k, tuple(v)) for k, v in self.cfg_share.items())),
                tuple(sorted(self.attention.items())), tuple(self.dense_steps),
                tuple(sorted(self.residual_refresh.items())))


def unit_costs(profile: Profile, candidates: list[Candidate], cost: str) -> dict:
    """candidate name -> cost per call relative to dense (``time``) or None (``blocks``: per cell)."""
    if cost not in ("time", "blocks"):
        raise ValueError(f"cost must be 'time' or 'blocks', got {cost!r}")
    out = {}
    for c in candidates:
        if c.config is None:
            continue
        if cost == "time":  # a residual candidate runs its method's call (the refresh is priced apart)
            dense_ms = profile.cost_ms.get("dense")
            ms = profile.cost_ms.get(c.base)
            out[c.name] = ms / dense_ms if dense_ms and ms is not None else 1.0
        else:
            out[c.name] = None
    return out


def _base(name: str) -> str:
    return name.removeprefix(RESIDUAL)


def cell_cost(profile: Profile, name: str, units: dict, l: int, h: int, r: int) -> float:
    """Cost of one call of the cell's method (for ``residual:X``: of X), relative to dense."""
    if name == "dense":
        return 1.0
    unit = units[name]
    return profile.mean_density(_base(name), l, h, r) if unit is None else unit


@dataclasses.dataclass(frozen=True)
class ResidualPlan:
    """Where a residual candidate runs in one (layer, step range): its refresh step, the later steps
    that reuse, and the weight (calls) of every step the range computes."""

    refresh: int
    reuse: tuple
    before: tuple  # computed steps of the range before the refresh (they run dense)
    calls: dict  # step -> calls computed there (2 with CFG, 1 where the unconditional branch shares)

    def mean_cost(self, method_cost: float) -> float:
        """Per call of the range: dense before, dense + X at the refresh, X at every reuse."""
        total = sum(self.calls[s] for s in self.before) + self.calls[self.refresh] * (1.0 + method_cost) + \
            sum(self.calls[s] * method_cost for s in self.reuse)
        return total / sum(self.calls.values())


def residual_plan(start: int, end: int, shared: set, cfg: set, branches: int) -> ResidualPlan | None:
    """The residual schedule of steps [start, end) of a layer whose ``shared`` steps reuse a whole
    output and whose ``cfg`` steps give the unconditional branch the conditional one's (None: no
    step computes in both branches with a computed step after it)."""
    computed = [s for s in range(start, end) if s not in shared]
    refresh = next((s for s in computed if s not in cfg), None)
    if refresh is None or computed[-1] == refresh:
        return None
    return ResidualPlan(refresh=refresh, reuse=tuple(s for s in computed if s > refresh),
                        before=tuple(s for s in computed if s < refresh),
                        calls={s: 1 if s in cfg else branches for s in computed})


def choose_cell(profile: Profile, candidates: list[Candidate], units: dict, l: int, h: int, r: int,
                budget: float, residual: ResidualPlan | None = None, residual_errors=None) -> str:
    """The cheapest attention candidate of the cell whose error is within ``budget`` (dense otherwise).
    ``residual``: the range's residual schedule (None: no residual candidate fits the range);
    ``residual_errors(method)``: that schedule's per-head errors of a method (or None)."""
    best, best_cost = "dense", 1.0
    for c in candidates:
        if c.config is None or c.name in profile.dropped:
            continue
        cost = cell_cost(profile, c.name, units, l, h, r)
        if c.residual:
            errors = residual_errors(c.base) if residual is not None else None
            if errors is None:
                continue
            cost, error = residual.mean_cost(cost), errors[h]
        else:
            error = profile.error(c.name, l, h, r)
        if cost < best_cost and error <= budget:
            best, best_cost = c.name, cost
    return best


def select(profile: Profile, candidates: list[Candidate], budget: float, cost: str = "time",
           min_dense_steps: int = 1, final_dense_steps: int = 0, share_unit: str = "layer") -> Selection:
    """One :class:`Selection` for ``budget`` (module doc). ``min_dense_steps`` leading and
    ``final_dense_steps`` trailing steps neither share nor run sparse: the image's layout is set in
    the first steps, and an error there is carried through every later one; the last steps' errors
    go straight to the output. A cfg share whose error is exactly 0 (a layer the text has not
    reached yet) is taken at those steps too: it changes nothing. ``share_unit``: ``"layer"``
    decides output shares per (layer, step); ``"step"`` per step for every layer at once, on the
    error of all layers' outputs together (the whole network one step stale, never a mix of stale
    and fresh layers)."""
    if share_unit not in SHARE_UNITS:
        raise ValueError(f"share_unit must be one of {SHARE_UNITS}, got {share_unit!r}")
    names = {c.name for c in candidates}
    units = unit_costs(profile, candidates, cost)
    L, H, S = profile.layers, profile.heads, profile.steps
    lo, hi = min_dense_steps, S - final_dense_steps  # steps [lo, hi) may be approximated
    branches = 2 if profile.has_uncond() else 1

    def shared_steps(layer: int | None) -> set:
        """In step order, the steps that reuse the last computed output of ``layer`` (None: every layer
        together) within the budget; a chain of shares reuses the same computed step."""
        out, last = set(), None
        for s in range(S):
            if "share" in names and lo <= s < hi and last is not None and profile.reuse_error(layer, last, s) <= budget:
                out.add(s)
            else:
                last = s
        return out

    # the caches first: they depend on the profiled outputs only, and a residual's refresh step on them
    every_layer = shared_steps(None) if share_unit == "step" else None  # decided once for all layers
    shared = {l: every_layer if every_layer is not None else shared_steps(l) for l in range(L)}
    cfg_steps = {}
    for l in range(L):
        cfg_steps[l] = set()
        for s in range(S):
            if s in shared[l] or "cfg_share" not in names or branches != 2:
                continue
            cfg_error = profile.cfg_error(l, s)
            if cfg_error <= budget and (lo <= s < hi or cfg_error == 0.0):
                cfg_steps[l].add(s)
    attention, plans, refresh = {}, {}, {}
    with_residual = any(c.residual for c in candidates)
    for l in range(L):
        for r, (a, b) in enumerate(profile.ranges):
            a, b = max(a, lo), min(b, hi)
            if b <= a:
                attention.update({(l, h, r): "dense" for h in range(H)})
                continue
            plan = residual_plan(a, b, shared[l], cfg_steps[l], branches) if with_residual else None
            errors = {}

            def residual_errors(base, l=l, plan=plan, errors=errors):
                if base not in errors:
                    errors[base] = profile.residual_errors(base, l, plan.refresh, plan.reuse)
                return errors[base]

            for h in range(H):
                attention[(l, h, r)] = choose_cell(profile, candidates, units, l, h, r, budget, plan, residual_errors)
            if any(attention[(l, h, r)].startswith(RESIDUAL) for h in range(H)):
                plans[(l, r)], refresh[(l, r)] = plan, plan.refresh

    share, cfg = {}, {}
    total = flops = 0.0
    for l in range(L):
        for s in range(S):
            r = profile.range_of(s)
            free = lo <= s < hi
            if s in shared[l]:
                share.setdefault(l, []).append(s)
                total += SHARE_COST * branches
                continue
            if not free:
                per_call = 1.0
                dens = 1.0
            else:
                plan = plans.get((l, r))
                per_call = dens = 0.0
                for h in range(H):
                    name = attention[(l, h, r)]
                    if name.startswith(RESIDUAL) and s in plan.before:  # the range's steps before its refresh
                        per_call, dens = per_call + 1.0, dens + 1.0
                        continue
                    per_call += cell_cost(profile, name, units, l, h, r)
                    dens += 1.0 if name == "dense" else profile.mean_density(_base(name), l, h, r)
                per_call, dens = per_call / H, dens / H
                if plan is not None and s == plan.refresh:  # dense for the whole call, once
                    per_call, dens = per_call + 1.0, dens + 1.0
            if s in cfg_steps[l]:
                cfg.setdefault(l, []).append(s)
                total += per_call
                flops += dens
            else:
                total += per_call * branches
                flops += dens * branches
    calls = L * S * branches
    return Selection(budget=budget, share=share, cfg_share=cfg, attention=attention, cost=total / calls,
                     density=flops / calls, dense_steps=(lo, final_dense_steps), residual_refresh=refresh)


def _runs(steps: list[int]) -> list[tuple[int, int]]:
    """Sorted steps -> half-open runs of consecutive steps."""
    out = []
    for s in steps:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def to_rules(selection: Selection, profile: Profile, candidates: list[Candidate]) -> list[dict]:
    """The selection as ``TableConfig`` rules: shares first (they cover every head), then per-head
    attention rules; dense cells need no rule (the table's default). Step ranges are written as
    fractions of the calibrated step count (exact there), so the table follows a call of another
    step count. A residual cell becomes a ``refresh`` rule at its refresh step and a ``reuse`` rule
    after it; candidates with "all" axes are written as sized at the profiled grid."""
    by_name = {c.name: c.at_grid(profile.grid) if c.whole else c for c in candidates}
    S = profile.steps

    def frac(a, b):
        return [a / S, b / S]

    rules = []
    for use, table in (("share", selection.share), ("cfg_share", selection.cfg_share)):
        grouped: dict[tuple, list[int]] = {}
        for l, steps in sorted(table.items()):
            grouped.setdefault(tuple(_runs(steps)), []).append(l)
        for runs, layers in grouped.items():
            for a, b in runs:
                rules.append({"use": use, "layers": layers, "steps": frac(a, b)})
    lo, hi = selection.dense_steps[0], S - selection.dense_steps[1]
    for l in range(profile.layers):
        for r, (a, b) in enumerate(profile.ranges):
            a, b = max(a, lo), min(b, hi)  # attention candidates run only where the selection may approximate
            if b <= a:
                continue
            heads_by: dict[str, list[int]] = {}
            for h in range(profile.heads):
                name = selection.attention[(l, h, r)]
                if name != "dense":
                    heads_by.setdefault(name, []).append(h)
            for name, heads in heads_by.items():
                where = {"layers": [l]}
                if len(heads) < profile.heads:
                    where["heads"] = heads
                cand = by_name[name]
                if not cand.residual:
                    rules.append(cand.rule(steps=frac(a, b), **where))
                    continue
                at = selection.residual_refresh[(l, r)]  # the steps before it (cfg-shared) stay dense
                rules.append(dict(cand.rule(steps=frac(at, at + 1), **where), residual="refresh"))
                rules.append(dict(cand.rule(steps=frac(at + 1, b), **where), residual="reuse"))
    return rules


def budget_grid(low: float = 1e-3, high: float = 1.0, points: int = 61) -> list[float]:
    return [low * (high / low) ** (i / (points - 1)) for i in range(points)]


def tune(quality_of, selections: list[Selection], target: float, *, higher_is_better: bool = True,
         out_of_time=lambda: False, say=lambda line: None):
    """Bisection over ``selections`` (ordered from the most conservative budget to the most
    aggressive) for the last one whose ``quality_of(selection)`` meets ``target``.

    Returns (chosen selection or None when none met it, {selection index: quality} measured).
    Selections equal to an already measured one are not run again."""
    measured: dict[int, float] = {}
    by_key: dict[tuple, float] = {}

    def ok(i: int) -> bool:
        if i not in measured:
            key = selections[i].key()
            if key not in by_key:
                by_key[key] = quality_of(selections[i])
                say(f"budget {selections[i].budget:.4g}: cost {selections[i].cost:.3f}, quality {by_key[key]:.3f}")
            measured[i] = by_key[key]
        q = measured[i]
        return (q >= target) if higher_is_better else (q <= target)

    lo, hi = -1, len(selections)  # invariant: lo meets (or is the sentinel), hi fails (or is the sentinel)
    while hi - lo > 1 and not out_of_time():
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return None, measured
    return selections[lo], measured


def cheapest_meeting(quality: dict[int, float], selections: list[Selection], target: float,
                     higher_is_better: bool = True):
    """Exhaustive twin of :func:`tune` (tests): the cheapest selection whose quality meets ``target``."""
    ok = [i for i, q in quality.items() if (q >= target if higher_is_better else q <= target)]
    return min(ok, key=lambda i: (selections[i].cost, i)) if ok else None


__all__ = ["Selection", "ResidualPlan", "select", "to_rules", "tune", "budget_grid", "cheapest_meeting", "choose_cell",
           "residual_plan"]
