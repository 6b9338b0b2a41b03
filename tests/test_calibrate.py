"""The calibrator's search: per-cell choice against an exhaustive search, budget tuning, resuming."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

import ditaccel
from ditaccel.calibration import make_candidates, parse_target
from ditaccel.calibration.profile import DROP_ABOVE, Profile, Profiler, step_ranges
from ditaccel.calibration.search import Selection, cheapest_meeting, select, to_rules, tune
from ditaccel.methods import CallShape, TableConfig, make_method

from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

TOY = ["window:kernel_size=(1,3,3)", "window:kernel_size=(3,3,5)", "tile:window=(1,1,1)", "radial"]
STEPS = 3


def _prompt(pipe, seed):
    kw = call_kwargs("wan", pipe, steps=STEPS, seed=seed, **SPARSE_SIZE["wan"])
    return {k: kw[k] for k in ("prompt_embeds", "negative_prompt_embeds")}


def _call(pipe):
    kw = call_kwargs("wan", pipe, steps=STEPS, **SPARSE_SIZE["wan"])
    return {k: v for k, v in kw.items() if k not in ("generator", "prompt_embeds", "negative_prompt_embeds",
                                                       "output_type")}


def _exact_error(plan, q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: (sum ||o_plan - o||^2, sum ||o||^2) over every row, float64, token mask from the plan."""
    B, S, H, D = q.shape
    lay = plan.layout
    n, bs = lay.num_slots, lay.block_size
    full, anyb = plan.full_blocks, plan.any_blocks
    while full.dim() < 4:
        full, anyb = full[None], anyb[None]
    up = lambda x: x.expand(B, H, -1, -1).repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :n, :n]  # noqa: E731
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)  # these toy plans' token rules ignore batch and head
    mm = torch.as_tensor(plan.block_mask.mask_mod(zero, zero, torch.arange(n)[None, None, :, None],
                                                  torch.arange(n)[None, None, None, :])).expand(B, H, n, n)
    slots = up(full) | (up(anyb) & mm)
    mask = torch.zeros(B, H, S, S, dtype=torch.bool)
    src = lay.src
    mask[:, :, src[:, None], src[None, :]] = slots
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    logits = qd @ kd.transpose(-1, -2) / D ** 0.5
    dense = torch.softmax(logits, -1) @ vd
    sparse = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ vd
    return (sparse - dense).pow(2).sum(dim=(0, 2, 3)), dense.pow(2).sum(dim=(0, 2, 3))


def test_per_cell_search_picks_the_cheapest_candidate_under_the_budget_like_an_exhaustive_search():
    pipe = pipe_for("wan")
    cands = make_candidates(TOY, block_size=64)
    profile = Profile(steps=STEPS, layers=2, heads=2, ranges=step_ranges(STEPS, 1), candidates=[c.name for c in cands])
    profiler = Profiler(profile, cands, sample_rows=10_000, block_size=64)  # every row: the estimate is exact
    calls = []
    with ditaccel.accelerate(pipe, "dense") as handle:
        handle.observe(lambda info, q, k, v: (profiler(info, q, k, v), calls.append((info, q.clone(), k.clone(),
                                                                                     v.clone()))))
        pipe(**dict(_call(pipe), **_prompt(pipe, 1)), output_type="latent")
    assert calls
    # exhaustive twin: exact errors over every row of every call, float64
    num, den, dens = {}, {}, {}
    for c in cands[1:]:
        method = make_method(c.config)
        for info, q, k, v in calls:
            plan = method.plan(CallShape(tuple(info["grid"]), info["text_len"], info["text_position"]), q.device)
            e, d = _exact_error(plan, q, k, v)
            for h in range(2):
                key = (c.name, info["layer"], h)
                num[key] = num.get(key, 0.0) + float(e[h])
                den[(info["layer"], h)] = den.get((info["layer"], h), 0.0) + float(d[h]) / (len(cands) - 1)
                dens[key] = float(plan.any_blocks.float().mean())
    exact = {key: (num[key] / den[key[1:]]) ** 0.5 for key in num}
    for key, e in exact.items():
        assert profile.error(key[0], key[1], key[2], 0) == pytest.approx(e, rel=1e-3, abs=1e-6)
    values = sorted(set(round(e, 6) for e in exact.values()) - {0.0})
    assert len(values) >= 3
    for budget in ((values[0] + values[1]) / 2, (values[-2] + values[-1]) / 2, values[0] / 2):
        sel = select(profile, cands, budget, cost="blocks", min_dense_steps=0)
        cells = [(l, h) for l in range(2) for h in range(2)]
        best, best_cost = None, None
        options = ["dense"] + [c.name for c in cands[1:]]
        for assignment in itertools.product(options, repeat=len(cells)):
            if any(a != "dense" and exact[(a, *cell)] > budget for a, cell in zip(assignment, cells)):
                continue
            cost = sum(1.0 if a == "dense" else dens[(a, *cell)] for a, cell in zip(assignment, cells))
            if best_cost is None or cost < best_cost - 1e-12:
                best, best_cost = assignment, cost
        picked = tuple(sel.attention[(l, h, 0)] for l, h in cells)
        picked_cost = sum(1.0 if a == "dense" else dens[(a, *cell)] for a, cell in zip(picked, cells))
        assert picked_cost == pytest.approx(best_cost), (budget, picked, best)
        assert all(a == "dense" or exact[(a, *cell)] <= budget for a, cell in zip(picked, cells))
    # the tightest budget leaves every cell dense; the selection becomes rules that build
    assert set(select(profile, cands, 0.0, cost="blocks", min_dense_steps=0).attention.values()) == {"dense"}
    TableConfig(block_size=64, rules=to_rules(sel, profile, cands))


def _synthetic(n, rng):
    costs = sorted((rng.random() for _ in range(n)), reverse=True)
    quality = sorted((30 + 10 * rng.random() for _ in range(n)), reverse=True)
    sels = [Selection(budget=i, share={}, cfg_share={}, attention={(0, 0, 0): str(i)}, cost=c, density=c)
            for i, c in enumerate(costs)]
    return sels, dict(enumerate(quality))


@pytest.mark.parametrize("seed", range(5))
def test_budget_bisection_finds_what_an_exhaustive_search_finds(seed):
    rng = random.Random(seed)
    sels, quality = _synthetic(rng.randint(1, 25), rng)
    target = rng.choice(list(quality.values()) + [25.0, 45.0])
    runs = []
    chosen, measured = tune(lambda s: runs.append(s) or quality[s.budget], sels, target)
    expected = cheapest_meeting(quality, sels, target)
    assert (chosen.budget if chosen else None) == expected
    assert len(runs) <= len(sels).bit_length() + 1  # bisection, not a sweep


def test_tuning_stops_when_out_of_time():
    sels, quality = _synthetic(16, random.Random(1))
    chosen, measured = tune(lambda s: quality[s.budget], sels, 0.0, out_of_time=lambda: True)
    assert chosen is None and measured == {}


@pytest.mark.parametrize("bad", ["psnr", "psnr=abc", "ssim=0.9", "psnr=-3", ("psnr", float("nan"))])
def test_bad_targets_are_refused(bad):
    with pytest.raises(ValueError, match="target"):
        parse_target(bad)


def test_bad_candidates_are_refused():
    with pytest.raises(ValueError, match=r"candidates\[1\].*threshold"):
        make_candidates(["xattn:threshold=3"])
    with pytest.raises(ValueError, match="heads"):
        make_candidates(["heads"])
    with pytest.raises(ValueError, match="different token layouts"):
        make_candidates(["radial:order='raster'", "window"])


@pytest.mark.slow
def test_calibrate_meets_its_target_and_resumes_from_its_state(tmp_path):
    pipe = pipe_for("wan")
    state = tmp_path / "state.pt"
    lines = []
    kw = dict(call=_call(pipe), target="psnr=30", budget_minutes=5, candidates=["share", "cfg_share",
              "window:kernel_size=(1,3,3)"], sample_rows=32, step_parts=1, progress=False, state_path=state,
              out=tmp_path / "p.json")
    first = ditaccel.calibrate(pipe, [_prompt(pipe, 1)], say=lines.append, **kw)
    assert first["quality"]["mean"] >= 30.5 and torch.isfinite(torch.tensor(first["quality"]["mean"]))
    assert any(line.startswith("dense run") for line in lines)
    lines.clear()
    second = ditaccel.calibrate(pipe, [_prompt(pipe, 1)], say=lines.append, **kw)
    assert any("resuming" in line for line in lines)
    assert first["dense_runs_run"] == 1 and first["probes_run"] >= 1
    assert second["dense_runs_run"] == 0 and second["probes_run"] == 0  # everything came from the state
    assert second["config"] == first["config"] and second["quality"] == first["quality"]
    # another prompt set does not resume from this state
    lines.clear()
    with pytest.raises(ValueError, match="prompts"):
        ditaccel.calibrate(pipe, [], say=lines.append, **kw)


def test_cache_errors_are_measured_on_the_guided_output():
    """With guidance g the pipeline uses u + g (c - u): a cfg share (u := c) errs by (g - 1)(c - u) of it,
    an output share by the change of the guided output; without guidance both are per branch."""
    torch.manual_seed(3)
    shape = (1, 5, 2, 4)
    outs = {(0, b, 0, s): torch.randn(shape, dtype=torch.float64) for b in ("cond", "uncond") for s in range(2)}
    for g in (1.0, 5.0):
        p = Profile(steps=2, layers=1, heads=2, ranges=step_ranges(2, 1), candidates=[], guidance=g, runs=1)
        p.outputs = dict(outs)
        c, u = outs[(0, "cond", 0, 1)], outs[(0, "uncond", 0, 1)]
        if g > 1:
            guided = lambda s: outs[(0, "uncond", 0, s)] + g * (outs[(0, "cond", 0, s)] - outs[(0, "uncond", 0, s)])  # noqa: E731
            cfg = float(((g - 1) * (c - u)).norm() / guided(1).norm())
            reuse = float((guided(0) - guided(1)).norm() / guided(1).norm())
        else:
            cfg = float((c - u).norm() / u.norm())
            num = sum(float((outs[(0, b, 0, 0)] - outs[(0, b, 0, 1)]).pow(2).sum()) for b in ("cond", "uncond"))
            den = sum(float(outs[(0, b, 0, 1)].pow(2).sum()) for b in ("cond", "uncond"))
            reuse = (num / den) ** 0.5
        assert p.cfg_error(0, 1) == pytest.approx(cfg, rel=1e-9)
        assert p.reuse_error(0, 0, 1) == pytest.approx(reuse, rel=1e-9)


def test_candidates_not_clearly_cheaper_than_dense_are_dropped_and_never_selected():
    pipe = pipe_for("wan")
    cands = make_candidates(TOY + ["residual:" + TOY[0]], block_size=64)  # X and residual:X: one method
    profile = Profile(steps=STEPS, layers=2, heads=2, ranges=step_ranges(STEPS, 1), candidates=[c.name for c in cands])
    profiler = Profiler(profile, cands, sample_rows=32, block_size=64, drop_slower=True)
    with ditaccel.accelerate(pipe, "dense") as handle:
        handle.observe(profiler)
        pipe(**dict(_call(pipe), **_prompt(pipe, 1)), output_type="latent")
    assert set(profile.cost_ms) == {"dense", *(c.name for c in cands[1:] if not c.residual)}
    slower = {n for n, ms in profile.cost_ms.items() if n != "dense" and ms >= DROP_ABOVE * profile.cost_ms["dense"]}
    assert set(profile.dropped) == {c.name for c in cands[1:] if c.base in slower}  # residual:X goes with X
    assert all("ms dense" in why for why in profile.dropped.values())
    assert {c.name for c in profiler.candidates} == {c.name for c in cands[1:] if not c.residual} - slower
    residual_base = cands[-1].base
    kept = {(k[0], k[3], k[4]) for k in profile.candidate_outputs}  # (method, layer, step)
    assert kept == (set() if residual_base in slower else {(residual_base, l, s) for l in range(2) for s in range(STEPS)})
    sel = select(profile, cands, 1e9, cost="time", min_dense_steps=0)  # any error allowed: only cost decides
    assert not set(profile.dropped) & set(sel.attention.values())


@pytest.mark.parametrize("unit", ["step", "layer"])
def test_share_selection_keeps_the_dense_steps_and_shares_only_within_budget(unit):
    torch.manual_seed(5)
    S, L = 12, 3
    p = Profile(steps=S, layers=L, heads=2, ranges=step_ranges(S, 2), candidates=[], guidance=4.0, runs=1)
    drift = torch.rand(S) * 0.3  # how far each step's output moves from the last one
    for l in range(L):
        o = {b: torch.randn(1, 6, 2, 4, dtype=torch.float64) for b in ("cond", "uncond")}
        for s in range(S):
            for b in ("cond", "uncond"):
                o[b] = o[b] + drift[s] * torch.randn_like(o[b])
                p.outputs[(0, b, l, s)] = o[b].clone()
    cands = make_candidates(["share", "cfg_share"])
    lead, tail, counts = 3, 2, []
    for budget in (0.05, 0.15, 0.4):
        sel = select(p, cands, budget, cost="time", min_dense_steps=lead, final_dense_steps=tail, share_unit=unit)
        for l in range(L):
            shared = sel.share.get(l, [])
            assert all(lead <= s < S - tail for s in shared)
            last = None
            for s in range(S):
                err = p.reuse_error(None if unit == "step" else l, last, s) if last is not None else float("inf")
                if s in shared:
                    assert err <= budget
                else:
                    assert not (lead <= s < S - tail) or err > budget  # greedy: a step within budget is shared
                    last = s
            for s in sel.cfg_share.get(l, []):  # cfg shares within budget, never where the share covers both
                assert s not in shared and p.cfg_error(l, s) <= budget and lead <= s < S - tail
        if unit == "step":
            assert len({tuple(sel.share.get(l, [])) for l in range(L)}) == 1
        counts.append(sum(map(len, sel.share.values())))
    assert counts[0] < counts[-1] and counts[-1] > 0  # a larger budget shares more
    with pytest.raises(ValueError, match="share_unit"):
        select(p, cands, 0.1, share_unit="head")
