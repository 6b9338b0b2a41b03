"""``ditaccel.calibrate``: profile a pipeline dense, pick per cell, tune the budget with full runs.

1. **dense runs** on the calibration prompts (seed ``seed``), each observed by the
   :class:`~.profile.Profiler` (sampled-row errors of every candidate per (layer, head, step
   range), the sampled outputs of every step for the caches, the candidates' per-call time);
2. **selection** per error budget on a log grid (:func:`.search.select`);
3. **tuning**: bisection over the grid, each probe a full accelerated run per prompt through the
   evaluation engine (``evaluate(..., dense_runs=...)``: the dense runs of step 1 are the
   reference), for the most aggressive selection whose mean quality meets ``target`` + ``margin``;
4. the **preset file** (:mod:`.preset`).

Resumable: with ``state_path`` every finished stage (dense runs + profile, every probe) is saved
there, and a rerun with the same pipeline, prompts, call, candidates and profiling knobs picks up
after it (another target, margin or selection knob reuses every stored probe).
``budget_minutes`` is honoured between probes: when it runs out, the best selection that met the
target so far is kept (the result says ``budget_exhausted``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch

from .candidates import DEFAULT_CANDIDATES, make_candidates
from .profile import Profile, Profiler, step_ranges
from .search import SHARE_UNITS, budget_grid, select, to_rules, tune

TARGET_KINDS = ("psnr", "lpips")
OVER_PROMPTS = ("worst", "mean")


def parse_target(target) -> tuple[str, float]:
    """``"psnr=32"`` / ``"lpips=0.1"`` / ``("psnr", 32)`` -> (kind, value)."""
    if isinstance(target, str):
        kind, sep, raw = target.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = None
        if not sep or value is None:
            raise ValueError(f"target must be 'psnr=DB' or 'lpips=VALUE', got {target!r}")
        target = (kind.strip(), value)
    if not (isinstance(target, tuple) and len(target) == 2 and target[0] in TARGET_KINDS):
        raise ValueError(f"target must be 'psnr=DB' or 'lpips=VALUE' ({TARGET_KINDS}), got {target!r}")
    kind, value = target
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"target {kind} must be a positive number, got {value!r}")
    return kind, float(value)


def _step_count(name: str, value, steps: int) -> int:
    """A step count, or a fraction of ``steps`` (a float in [0, 1)), as a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
            isinstance(value, float) and value >= 1):
        raise ValueError(f"{name} must be a step count (int >= 0) or a fraction of the steps (float in [0, 1)), "
                         f"got {value!r}")
    return int(value) if isinstance(value, int) else int(round(value * steps))


def call_for(call: dict, prompt) -> dict:
    """The pipeline call for one calibration prompt: a string is ``prompt=``, a dict adds its arguments."""
    return dict(call, **prompt) if isinstance(prompt, dict) else dict(call, prompt=prompt)


def prompt_label(prompt) -> str:
    return repr(prompt) if isinstance(prompt, str) else "{" + ", ".join(sorted(prompt)) + "}"


def prompt_identity(prompt):
    """JSON-able identity of a prompt (tensors by their bytes' hash)."""
    if isinstance(prompt, str):
        return prompt
    out = {}
    for k, v in sorted(prompt.items()):
        if isinstance(v, torch.Tensor):
            v = "sha256:" + hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        out[k] = v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
    return out


def _fingerprint(pipe, prompts, call, candidates, knobs) -> str:
    from .preset import model_identity

    text = json.dumps({"model": model_identity(pipe), "prompts": [prompt_identity(p) for p in prompts], "call": call,
                       "candidates": [c.name for c in candidates], "knobs": knobs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _State:
    """The resumable state file (``torch.save`` of a dict: tensors and run results inside)."""

    def __init__(self, path, fingerprint: str, say):
        self.path = Path(path) if path else None
        self.data = {"fingerprint": fingerprint, "dense": {}, "profile": None, "probes": {}}
        if self.path is not None and self.path.is_file():
            saved = torch.load(self.path, weights_only=False)
            if saved.get("fingerprint") == fingerprint:
                self.data = saved
                say(f"resuming from {self.path} ({len(saved['dense'])} dense runs, {len(saved['probes'])} probes)")
            else:
                say(f"{self.path} was written for another calibration (pipeline, prompts or knobs): starting over")

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(self.path.suffix + ".tmp")
            torch.save(self.data, tmp)
            tmp.replace(self.path)


def calibrate(pipe=None, prompts=None, *, target="psnr=32", budget_minutes: float = 10.0, candidates=None,
              call: dict | None = None, seed: int = 0, step_parts: int = 4, sample_rows: int = 64,
              steps_per_range: int | None = 2, candidate_prompts: int | None = 1,
              cost: str = "time", margin: float = 3.0, min_dense_steps: int | float = 0.2,
              final_dense_steps: int | float = 1, share_unit: str = "step", over_prompts: str = "worst",
              block_size: int = 64,
              state_path=None, out=None, progress: bool = True, say=None) -> dict:
    """Calibrate a ``TableConfig`` for ``pipe`` (default: the embedded pipeline) on ``prompts``.

    ``target``: ``"psnr=32"`` (mean dB against dense, higher is better) or ``"lpips=0.1"`` (lower
    is better; needs LPIPS weights locally); tuned to ``target + margin`` (psnr) or ``target -
    margin / 100`` (lpips) so prompts not seen here keep the target. ``candidates``: names such as
    ``"xattn:threshold=0.9"`` or dicts (:mod:`.candidates`; default :data:`DEFAULT_CANDIDATES`).
    ``call``: pipeline call arguments (default: the embedded pipeline's). ``step_parts``: step
    ranges per (layer, head); ``steps_per_range``: steps of each range at which the attention
    candidates are measured (on the first CFG branch; None: every call), on the first
    ``candidate_prompts`` prompts (None: all; every prompt's dense outputs feed the caches' errors
    and every prompt is a reference of the tuning runs). ``cost``: ``"time"`` (measured per-call time) or ``"blocks"``.
    ``min_dense_steps`` / ``final_dense_steps``: leading / trailing steps left dense (a count, or a
    fraction of the steps; default the first 20%, the field's usual warm-up, and the last step):
    the profile's errors are local to a step and say nothing of how far an error made early is
    carried, nor do they see that the last step's goes straight to the output.
    ``share_unit``: ``"step"`` (default) shares a step's output in every layer at once, ``"layer"``
    per (layer, step) (:func:`.search.select`).
    ``over_prompts``: what of the calibration prompts' qualities must meet the target: ``"worst"``
    (default: every prompt; the quality of one share schedule spreads by several dB between prompts,
    so a mean met on three prompts was missed on prompts not seen here) or ``"mean"``.
    ``out``: the preset file to write. Returns a dict: ``config`` (the ``TableConfig``),
    ``preset`` (path or None), ``quality`` per prompt, ``cost``, ``density``, ``budget``, ``wall_s``,
    ``probes`` (tuning runs used), ``probes_run`` and ``dense_runs_run`` (those this call ran, the rest
    came from the state file), ``budget_exhausted``.
    """
    from tqdm.auto import tqdm

    import ditaccel

    from ..eval.engine import evaluate
    from ..eval.runs import timed_run
    from ..methods.table_config import TableConfig
    from .preset import write_preset

    say = say or (lambda line: None)
    t_start = time.perf_counter()
    kind, target_value = parse_target(target)
    if isinstance(budget_minutes, bool) or not isinstance(budget_minutes, (int, float)) or not budget_minutes > 0:
        raise ValueError(f"budget_minutes must be a positive number, got {budget_minutes!r}")
    if kind == "lpips":
        from ..metrics import lpips_unavailable_reason

        reason = lpips_unavailable_reason()
        if reason:
            raise ValueError(f"target lpips needs LPIPS: {reason}; use target='psnr=...'")
    if pipe is None or call is None or prompts is None:
        from ..pipelines import embedded

        pipe = embedded.load() if pipe is None else pipe
        call = dict(embedded.DEFAULTS) if call is None else call
        prompts = list(embedded.CALIBRATION_PROMPTS) if prompts is None else prompts
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all((isinstance(p, str) and p) or (isinstance(p, dict) and p) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of prompts (strings, or dicts of call arguments such "
                         f"as prompt_embeds), got {prompts!r}")
    cands = make_candidates(DEFAULT_CANDIDATES if candidates is None else candidates, block_size=block_size)
    steps = call.get("num_inference_steps")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"call['num_inference_steps'] must be an int >= 2 to calibrate over steps, got {steps!r}")
    lead = _step_count("min_dense_steps", min_dense_steps, steps)
    tail = _step_count("final_dense_steps", final_dense_steps, steps)
    if lead + tail >= steps:
        raise ValueError(f"min_dense_steps + final_dense_steps must leave a step to approximate: {lead} + {tail} of "
                         f"{steps} steps")
    if over_prompts not in OVER_PROMPTS:
        raise ValueError(f"over_prompts must be one of {OVER_PROMPTS}, got {over_prompts!r}")
    if share_unit not in SHARE_UNITS:
        raise ValueError(f"share_unit must be one of {SHARE_UNITS}, got {share_unit!r}")
    # What the stored dense runs, profile and probe results depend on; the target's value, the margin
    # and the selection knobs only change which stored probe wins (probes are keyed by their selection).
    knobs = dict(step_parts=step_parts, sample_rows=sample_rows, steps_per_range=steps_per_range,
                 candidate_prompts=candidate_prompts, cost=cost, seed=seed, block_size=block_size, quality=kind,
                 profile_format=3)  # 2: guided cache errors, slower-than-dense candidates dropped; 3: residual rows
    state = _State(state_path, _fingerprint(pipe, prompts, call, cands, knobs), say)
    deadline = t_start + budget_minutes * 60.0
    device = torch.device(pipe._execution_device)

    # 1. dense runs, profiled
    profile: Profile | None = state.data["profile"]
    dense_runs_run = 0
    if profile is None or len(state.data["dense"]) < len(prompts):
        from .preset import model_identity

        identity = model_identity(pipe)
        layers, heads = identity["layers"], identity["heads"]
        if not isinstance(heads, int):
            raise ValueError(f"{type(pipe).__name__}: the attention modules do not say their head count")
        profile = Profile(steps=steps, layers=layers, heads=heads, ranges=step_ranges(steps, step_parts),
                          candidates=[c.name for c in cands], guidance=float(call.get("guidance_scale") or 1.0))
        state.data["dense"] = {}
        calls_per_run = layers * steps * (2 if profile.guidance > 1 else 1)
        bar = tqdm(total=calls_per_run * len(prompts), desc="profiling", disable=not progress, leave=False)
        profiler = Profiler(profile, cands, sample_rows=sample_rows, seed=seed, block_size=block_size,
                            steps_per_range=steps_per_range, candidate_runs=candidate_prompts,
                            on_call=lambda: bar.update(1), drop_slower=cost == "time")
        try:
            for i, prompt in enumerate(prompts):
                profiler.run = i
                say(f"dense run {i + 1}/{len(prompts)} (profiled): {prompt_label(prompt)}")
                with ditaccel.accelerate(pipe, "dense") as handle:
                    handle.observe(profiler)
                    run = timed_run(pipe, call_for(call, prompt), seed=seed, device=device, label="dense",
                                    progress=False)
                state.data["dense"][i] = run
                dense_runs_run += 1
        finally:
            bar.close()
        profile.runs = len(prompts)
        for name, why in profile.dropped.items():
            say(f"not a candidate here: {name}: {why}")
        state.data["profile"] = profile
        state.save()
    dense_runs = state.data["dense"]

    # 2. selections on the budget grid, most conservative first
    selections, seen = [], set()
    for b in budget_grid():
        sel = select(profile, cands, b, cost=cost, min_dense_steps=lead, final_dense_steps=tail, share_unit=share_unit)
        if sel.key() not in seen:
            seen.add(sel.key())
            selections.append(sel)
    say(f"{len(selections)} distinct selections on the budget grid; estimated cost "
        f"{selections[0].cost:.3f} .. {selections[-1].cost:.3f} of dense attention")

    def config_of(sel):
        return TableConfig(block_size=block_size, rules=to_rules(sel, profile, cands))

    probe_bar = tqdm(total=math.ceil(math.log2(len(selections) + 1)), desc="tuning", disable=not progress,
                     leave=False)
    per_prompt: dict[tuple, list[float]] = {}
    probes_run = [0]

    def quality_of(sel) -> float:
        key = repr(sel.key())
        if key not in state.data["probes"]:
            probes_run[0] += 1
            values = []
            for i, prompt in enumerate(prompts):
                record = evaluate(pipe, config_of(sel), call=call_for(call, prompt), seed=seed, repeats=1,
                                  dense_runs=[dense_runs[i]], progress=False)
                values.append(float(record.quality.get(kind) if record.quality.get(kind) is not None else "nan"))
            state.data["probes"][key] = values
            state.save()
        probe_bar.update(1)
        values = state.data["probes"][key]
        per_prompt[sel.key()] = values
        if over_prompts == "mean":
            return sum(values) / len(values)
        return min(values) if kind == "psnr" else max(values)  # "worst": the prompt it suits least

    goal = target_value + margin if kind == "psnr" else target_value - margin / 100.0
    try:
        chosen, measured = tune(quality_of, selections, goal, higher_is_better=kind == "psnr",
                                out_of_time=lambda: time.perf_counter() > deadline, say=say)
    finally:
        probe_bar.close()
    exhausted = time.perf_counter() > deadline
    if chosen is None:
        chosen = selections[0]
        say(f"no selection met {kind} {goal:g} on the calibration prompts: keeping the most conservative one")
        quality_of(chosen)
    config = config_of(chosen)
    values = per_prompt[chosen.key()]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    wall = time.perf_counter() - t_start
    result = {
        "config": config, "selection": chosen, "budget": chosen.budget, "cost": chosen.cost,
        "density": chosen.density, "quality": {"kind": kind, "per_prompt": values, "mean": mean, "std": std},
        "probes": len(measured), "probes_run": probes_run[0], "dense_runs_run": dense_runs_run, "wall_s": wall,
        "budget_exhausted": exhausted, "profile": profile,
        "preset": None,
    }
    if out is not None:
        grid = profile.grid
        result["preset"] = write_preset(
            out, config=config, pipe=pipe, call=call, grid=grid, prompts=[prompt_identity(p) for p in prompts],
            target={kind: target_value}, budget={"minutes": budget_minutes, "error_budget": chosen.budget,
                                                 "margin": margin, "cost": cost, "step_parts": step_parts,
                                                 "over_prompts": over_prompts, "dense_steps": [lead, tail],
                                                 "share_unit": share_unit},
            measured={f"{kind}_mean": mean, f"{kind}_std": std, "per_prompt": values, "density": round(chosen.density, 4),
                      "cost": round(chosen.cost, 4), "calibration_wall_s": round(wall, 1),
                      "budget_exhausted": exhausted, "candidate_ms": profile.cost_ms})
        say(f"wrote {result['preset']}")
    return result


__all__ = ["calibrate", "parse_target"]
