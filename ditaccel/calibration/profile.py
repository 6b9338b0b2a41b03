"""Profiling for the calibrator: what each candidate would do to each (layer, head, step range).

During a dense pipeline run (``handle.observe`` on a ``dense`` handle sees every self-attention
call's q, k, v) every call is measured on ``sample_rows`` video query rows, seeded, the same rows
at every step: their exact dense attention output, and for every attention candidate the output
under the candidate's plan (token by token: full blocks, partial blocks through the plan's own
``mask_mod``), its kept attention mass and the fraction of blocks it keeps, per head. The sampled
dense outputs of every step are kept, so the error of reusing an earlier step's output (output
share) or the conditional branch's (cfg share) is known for any choice the search makes.

With classifier-free guidance (``guidance`` > 1) the cache errors are measured on what the
pipeline actually uses, the guided combination ``g = u + s (c - u)`` of the two branches'
outputs: a cfg share sets ``u = c``, so ``g`` becomes ``c`` and the error is ``(s - 1) |c - u|``,
(s - 1) times the raw branch difference (at s = 5, a branch difference of 2% is an 8% error of the
guided output; judged raw, cfg shares looked four times cheaper in quality than they were).

A method some candidate uses with a residual (``residual:X``) is also run at *every* step (on the
measured branch and prompts), and its sampled output rows kept (``candidate_outputs``), so the
error of ``X_s + (D_r - X_r)`` against ``D_s`` -- refresh at step r, reuse at s -- is known for
whichever refresh step the search settles on (:meth:`Profile.residual_errors`). Its plain error,
density and mass stay those of the usual measured steps.

Candidates that are not clearly cheaper per call than dense attention (``DROP_ABOVE``, measured at the
first profiled call) are dropped from the rest of the profile when the search prices by time: dense,
error 0, beats them or nearly.

Errors are relative L2 over the sampled rows, accumulated over calls, batches, branches and
prompts as ``sum ||o_c - o||^2 / sum ||o||^2`` per cell.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict

import torch

from ..methods import CallShape, make_method
from ..state import CallContext, StateStore
from .candidates import Candidate


DROP_ABOVE = 0.85
"""Pricing by time, a candidate costing this fraction of dense or more at the first profiled call is
dropped: a first-call timing on a shared CPU swings by that much (topk 0.5 measured 1.19x and 0.89x
of dense in two calibrations of the embedded pipeline), and a candidate barely cheaper than dense
buys little for the error budget it takes from the cross-step caches."""


def step_ranges(steps: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(steps)`` (the last ones one step shorter)."""
    parts = max(1, min(parts, steps))
    edges = [round(i * steps / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1]) for i in range(parts)]


@dataclasses.dataclass
class Profile:
    """What one or more profiled dense runs measured (JSON-able through ``to_json``)."""

    steps: int
    layers: int
    heads: int
    ranges: list[tuple[int, int]]
    candidates: list[str]  # candidates' names, in the search's order
    err_num: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # (cand, l, h, r) -> sum sq err
    err_den: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # (l, h, r) -> sum sq dense
    mass: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # (cand, l, h, r) -> kept mass sum
    density: dict = dataclasses.field(default_factory=lambda: defaultdict(float))  # (cand, l, h, r) -> sum
    count: dict = dataclasses.field(default_factory=lambda: defaultdict(int))  # (l, h, r) -> calls
    outputs: dict = dataclasses.field(default_factory=dict)  # (run, branch, l, s) -> [B, R, H, D] dense rows
    cost_ms: dict = dataclasses.field(default_factory=dict)  # candidate name -> ms per call ("dense" too)
    runs: int = 0
    grid: list | None = None  # the token grid (T, H, W) the runs had
    guidance: float = 1.0  # the call's guidance scale (> 1: the cache errors are on the guided output)
    dropped: dict = dataclasses.field(default_factory=dict)  # candidate -> why it was not profiled
    # (method, run, branch, l, s) -> [B, R, H, D] sampled rows of a method used with a residual
    candidate_outputs: dict = dataclasses.field(default_factory=dict)

    def range_of(self, step: int) -> int:
        return next(i for i, (a, b) in enumerate(self.ranges) if a <= step < b)

    def error(self, cand: str, l: int, h: int, r: int) -> float:
        den = self.err_den.get((l, h, r), 0.0)
        return (self.err_num.get((cand, l, h, r), 0.0) / den) ** 0.5 if den > 0 else 0.0

    def mean_density(self, cand: str, l: int, h: int, r: int) -> float:
        n = self.count.get((l, h, r), 0)
        return self.density.get((cand, l, h, r), 0.0) / n if n else 1.0

    def kept_mass(self, cand: str, l: int, h: int, r: int) -> float:
        n = self.count.get((l, h, r), 0)
        return self.mass.get((cand, l, h, r), 0.0) / n if n else 1.0

    def _output(self, run, branch, l, s):
        """The sampled output the pipeline uses: per branch, or guided (``u + g (c - u)``) when asked."""
        if branch != "guided":
            return self.outputs.get((run, branch, l, s))
        c, u = self.outputs.get((run, "cond", l, s)), self.outputs.get((run, "uncond", l, s))
        return None if c is None or u is None else u + self.guidance * (c - u)

    def _branches(self) -> tuple:
        return ("guided",) if self.guidance > 1 and self.has_uncond() else \
            tuple(sorted({k[1] for k in self.outputs}))

    def reuse_error(self, l: int | None, source: int, step: int) -> float:
        """Relative error, over every run (and branch, or the guided output), of returning step
        ``source``'s output at ``step``: of layer ``l``, or of every layer together (None)."""
        num = den = 0.0
        layers = range(self.layers) if l is None else (l,)
        for run in sorted({k[0] for k in self.outputs}):
            for branch in self._branches():
                for ll in layers:
                    o = self._output(run, branch, ll, step)
                    if o is None:
                        continue
                    src = self._output(run, branch, ll, source)
                    if src is None:
                        return float("inf")
                    num += float((src - o).pow(2).sum())
                    den += float(o.pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else float("inf")

    def cfg_error(self, l: int, step: int) -> float:
        """Relative error of giving the unconditional branch the conditional branch's output: of the
        guided output (``(g - 1) |c - u| / |u + g (c - u)|``) with guidance, else of the branch."""
        num = den = 0.0
        for (run, branch, ll, s), u in self.outputs.items():
            if branch != "uncond" or ll != l or s != step:
                continue
            c = self.outputs.get((run, "cond", l, step))
            if c is None:
                return float("inf")
            if self.guidance > 1:  # the guided output u + g (c - u) becomes c
                num += float(((self.guidance - 1.0) * (c - u)).pow(2).sum())
                den += float(self._output(run, "guided", l, step).pow(2).sum())
            else:
                num += float((c - u).pow(2).sum())
                den += float(u.pow(2).sum())
        return (num / den) ** 0.5 if den > 0 else float("inf")

    def residual_errors(self, base: str, l: int, refresh: int, steps) -> list[float] | None:
        """Per head: relative error, over ``steps`` (and every profiled run and branch), of the method
        ``base`` plus the residual stored at ``refresh``, ``X_s + (D_r - X_r)``, against ``D_s``; None
        when the method's rows were not kept at one of those steps."""
        steps = list(steps)
        pairs = {(run, branch) for (b, run, branch, ll, s) in self.candidate_outputs if b == base and ll == l
                 and s == refresh}
        if not pairs or not steps:
            return None
        num = den = 0.0
        for run, branch in sorted(pairs):
            x_r = self.candidate_outputs[(base, run, branch, l, refresh)]
            residual = self.outputs[(run, branch, l, refresh)] - x_r
            for s in steps:
                x_s, d_s = self.candidate_outputs.get((base, run, branch, l, s)), self.outputs.get((run, branch, l, s))
                if x_s is None or d_s is None:
                    return None
                num = num + (x_s + residual - d_s).double().pow(2).sum(dim=(0, 1, 3))
                den = den + d_s.double().pow(2).sum(dim=(0, 1, 3))
        return [float((n / d) ** 0.5) if d > 0 else 0.0 for n, d in zip(num, den)]

    def has_uncond(self) -> bool:
        return any(k[1] == "uncond" for k in self.outputs)


def _sampled_rows(layout, rows: int, seed: int, device) -> torch.Tensor:
    """Model-order indices of ``rows`` video tokens (seeded; all of them when fewer)."""
    n_video = layout.num_video
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n_video, generator=g)[: min(rows, n_video)]
    offset = layout.text_len if layout.text_position == "prefix" else 0
    return (picked + offset).sort().values.to(device)


def candidate_rows(plan, q, k, v, rows: torch.Tensor, scale: float):
    """Per-head (output [B, R, H, D], kept mass [H], density [H]) of ``plan`` on sampled ``rows``."""
    layout = plan.layout
    B, S, H, D = q.shape
    bs = layout.block_size
    slots_q = layout.inverse.to(q.device)[rows]  # slot of each sampled row
    src = layout.src.to(q.device)
    n = layout.num_slots
    full, anyb = plan.full_blocks, plan.any_blocks
    while full.dim() < 4:
        full, anyb = full[None], anyb[None]
    qb = slots_q // bs
    kv_slots = torch.arange(n, device=q.device)
    kb = kv_slots // bs
    fb = full[:, :, qb][..., kb].expand(B, H, -1, -1)  # [B, H, R, n]
    ab = anyb[:, :, qb][..., kb].expand(B, H, -1, -1)
    partial = ab & ~fb
    if bool(partial.any()):  # token-level rule inside partial blocks only; b/h only where it depends on them
        from ..kernels.reference import mask_mod_varies

        vary_b, vary_h = mask_mod_varies(plan.block_mask.mask_mod, B, H, q.device)
        b_idx = torch.arange(B if vary_b else 1, device=q.device)[:, None, None, None]
        h_idx = torch.arange(H if vary_h else 1, device=q.device)[None, :, None, None]
        mm = torch.as_tensor(plan.block_mask.mask_mod(b_idx, h_idx, slots_q[None, None, :, None],
                                                      kv_slots[None, None, None, :]), device=q.device)
        allowed_slots = fb | (partial & mm)  # [B, H, R, n] over key slots
    else:
        allowed_slots = fb
    real = src < S
    allowed = torch.zeros(B, H, rows.numel(), S, dtype=torch.bool, device=q.device)
    allowed[..., src[real]] = allowed_slots[..., real]
    qs = q[:, rows].transpose(1, 2).float()  # [B, H, R, D]
    logits = qs @ k.transpose(1, 2).float().transpose(-1, -2) * scale  # [B, H, R, S]
    probs = torch.softmax(logits, -1)
    mass = (probs * allowed).sum(-1).mean(dim=(0, 2))  # [H]
    masked = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    out = (masked @ v.transpose(1, 2).float()).transpose(1, 2)  # [B, R, H, D]
    density = anyb.float().mean(dim=(-1, -2)).expand(-1, H).mean(0) if anyb.shape[1] > 1 else \
        anyb.float().mean().expand(H)
    return out, mass, density


class Profiler:
    """An observer (``handle.observe``) that fills a :class:`Profile`."""

    def __init__(self, profile: Profile, candidates: list[Candidate], *, sample_rows: int = 64, seed: int = 0,
                 block_size: int = 64, steps_per_range: int | None = None,
                 candidate_runs: int | None = None, on_call=None, drop_slower: bool = False):
        self.profile = profile
        # one entry per method the candidates use (``X`` and ``residual:X`` share their measurements)
        self.candidates = list({c.base: c for c in candidates if c.config is not None}.values())
        self.residual_bases = {c.base for c in candidates if c.residual}
        self._names = {}  # method -> every candidate name using it (what dropping it drops)
        for c in candidates:
            self._names.setdefault(c.base, []).append(c.name)
        self._methods = {}  # (method, grid) -> AttentionMethod: "all" axes resolve at the call's grid
        self.sample_rows, self.seed, self.block_size = sample_rows, seed, block_size
        self.drop_slower = drop_slower  # cost "time": candidates slower than dense are not profiled further
        # Candidates are measured at a few steps of each range and on one CFG branch (their errors
        # barely differ between neighbouring steps and between branches; the dense outputs the caches'
        # errors need are kept at every step and branch): None measures every call.
        self.measured_steps = None
        if steps_per_range is not None:
            self.measured_steps = set()
            for a, b in profile.ranges:
                n = min(steps_per_range, b - a)
                self.measured_steps |= {a + (i * (b - a)) // n for i in range(n)}
        self._branch = None
        self.candidate_runs = candidate_runs  # runs (prompts) on which candidates are measured (None: all)
        self.run = 0
        self.on_call = on_call  # fn(): one call profiled (progress bars)
        self._rows = {}
        self._stores = defaultdict(lambda: StateStore(256))

    def __call__(self, info, q, k, v) -> None:
        p = self.profile
        l, s, branch = info["layer"], info["step"], info["branch"]
        if s >= p.steps:
            return
        B, S, H, D = q.shape
        scale = D ** -0.5
        shape = CallShape(tuple(info["grid"]), info["text_len"], info["text_position"])
        if p.grid is None:
            p.grid = list(shape.grid)
        r = p.range_of(s)
        with torch.no_grad():
            rows = self._rows.get(shape)
            if rows is None:
                layout = self._any_layout(shape)
                rows = self._rows[shape] = _sampled_rows(layout, self.sample_rows, self.seed, q.device)
            qs = q[:, rows].transpose(1, 2).float()
            logits = qs @ k.transpose(1, 2).float().transpose(-1, -2) * scale
            dense = (torch.softmax(logits, -1) @ v.transpose(1, 2).float()).transpose(1, 2)  # [B, R, H, D]
            p.outputs[(self.run, branch, l, s)] = dense.cpu()
            dense_sq = dense.pow(2).sum(dim=(0, 1, 3))
            if self._branch is None:
                self._branch = branch
            measure = self.measured_steps is None or (s in self.measured_steps and branch == self._branch)
            measure = measure and (self.candidate_runs is None or self.run < self.candidate_runs)
            for h in range(H):
                if measure:
                    p.err_den[(l, h, r)] += float(dense_sq[h])
                    p.count[(l, h, r)] += 1
            timing = measure and self.run == 0 and l == 0 and "dense" not in p.cost_ms
            if timing:  # the first measured call prices every candidate against dense attention
                p.cost_ms["dense"] = _time_call(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)))
            # methods used with a residual: at every step of the measured branch and prompts
            every_step = branch == self._branch and (self.candidate_runs is None or self.run < self.candidate_runs)
            for cand in self.candidates:
                keep_rows = every_step and cand.base in self.residual_bases
                if not (measure or keep_rows):
                    continue
                method = self._method(cand, shape.grid)
                store = self._stores[(self.run, cand.base)]
                ctx = CallContext("transformer", l, s, branch, shape, B, H,
                                  state=store.state("transformer", l, branch, (shape, B, H)), store=store,
                                  values=v, total_steps=p.steps)
                plan = method.plan_for(ctx, q, k)
                if timing:
                    p.cost_ms[cand.base] = _time_call(lambda: _run_plan(method, ctx, plan, q, k, v))
                out, mass, density = candidate_rows(plan, q, k, v, rows, scale)
                if keep_rows:
                    p.candidate_outputs[(cand.base, self.run, branch, l, s)] = out.cpu()
                if not measure:
                    continue
                err_sq = (out - dense).pow(2).sum(dim=(0, 1, 3))
                for h in range(H):
                    key = (cand.base, l, h, r)
                    p.err_num[key] += float(err_sq[h])
                    p.mass[key] += float(mass[h])
                    p.density[key] += float(density[h])
            if timing and self.drop_slower:
                for cand in list(self.candidates):
                    ms = p.cost_ms[cand.base]
                    if ms >= DROP_ABOVE * p.cost_ms["dense"]:
                        for name in self._names[cand.base]:
                            p.dropped[name] = (f"{ms:.1f} ms per call against {p.cost_ms['dense']:.1f} ms dense: not "
                                               f"clearly cheaper than dense (under {DROP_ABOVE:g} of it), which has "
                                               f"no error")
                        self.candidates.remove(cand)
                        for key in [k for k in p.candidate_outputs if k[0] == cand.base]:
                            del p.candidate_outputs[key]
        if self.on_call is not None:
            self.on_call()

    def _method(self, cand: Candidate, grid):
        key = (cand.base, tuple(grid))
        if key not in self._methods:
            self._methods[key] = make_method(cand.at_grid(grid).config)
        return self._methods[key]

    def _any_layout(self, shape):
        from ..layout import build_layout
        from ..methods.base import auto_tile

        tile = tuple(min(t, g) for t, g in zip(auto_tile(shape.grid, self.block_size), shape.grid))
        return build_layout(shape.grid, shape.text_len, shape.text_position, "tile", tile, self.block_size)


def _run_plan(method, ctx, plan, q, k, v):
    """One call as the runtime would run it: the method's plan (dynamic: scored again) and the kernel."""
    from ..runtime import PlanExecutor

    plan = method.plan_for(ctx, q, k)
    return PlanExecutor(q, k, v, None, None, method.config.backend).run(plan)


def _time_call(fn, repeats: int = 3) -> float:
    fn()  # warm-up: one-time builds stay out
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


__all__ = ["Profile", "Profiler", "candidate_rows", "step_ranges"]
