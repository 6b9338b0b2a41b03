"""Residual reuse as a calibrator candidate: the table's residual rules against brute force, the
profile's residual errors against exact ones, and the search picking it where it is cheapest."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

import ditaccel
from ditaccel.caches import CrossStepCaches
from ditaccel.calibration import make_candidates
from ditaccel.calibration.profile import Profile, Profiler, step_ranges
from ditaccel.calibration.search import residual_plan, select, to_rules
from ditaccel.methods import CallShape, TableConfig, make_method
from ditaccel.runtime import AttentionSite, PlanExecutor
from ditaccel.state import CallContext, StateStore

WINDOW = {"kernel_size": [1, 3, 3]}


def attention64(q, k, v, allowed=None):
    """[B, S, H, D] float64 attention; ``allowed`` [S, S] bool (None: dense)."""
    qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
    logits = qd @ kd.transpose(-1, -2) / q.shape[-1] ** 0.5
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(logits, -1) @ vd).transpose(1, 2)


def token_allowed(plan) -> torch.Tensor:
    """[S, S] bool in model order: what the (static, head-free) plan lets each query see."""
    slot = plan.layout.inverse
    return plan.slot_allowed(slot[:, None], slot[None, :])


def test_residual_rules_on_a_pipeline_equal_brute_force(monkeypatch):
    """Layer 0 head 1: refresh at step 1 (dense returned, dense - window stored), window + that residual
    at steps 2-3; layer 1, every head: the same with a tile window. Per call and branch the output must
    be X_s + (D_1 - X_1) on those heads and dense elsewhere."""
    pipe = pipe_for("wan")
    tile = {"window": [1, 1, 1]}
    rules = [
        {"use": "window", "layers": [0], "heads": [1], "steps": [1, 2], "knobs": WINDOW, "residual": "refresh"},
        {"use": "window", "layers": [0], "heads": [1], "steps": [2, 4], "knobs": WINDOW, "residual": "reuse"},
        {"use": "tile", "layers": [1], "steps": [1, 2], "knobs": tile, "residual": "refresh"},
        {"use": "tile", "layers": [1], "steps": [2, 4], "knobs": tile, "residual": "reuse"},
    ]
    cfg = TableConfig(block_size=64, backend="reference", rules=rules)
    calls = []
    original = AttentionSite.attend

    def recording(self, q, k, v, attn_mask, scale, dense, head_offset=0):
        at = (self.layer, self.runtime.current.step, self.runtime.current.branch)
        out = original(self, q, k, v, attn_mask, scale, dense, head_offset)
        calls.append((at, q.clone(), k.clone(), v.clone(), out.clone()))
        return out

    monkeypatch.setattr(AttentionSite, "attend", recording)
    with ditaccel.accelerate(pipe, cfg) as handle:
        pipe(**call_kwargs("wan", pipe, steps=4, output_type="latent", **SPARSE_SIZE["wan"]))
        stats = handle.stats()
    assert len(calls) == 2 * 4 * 2  # layers x steps x CFG branches
    grid = (3, 8, 16)
    allowed = {l: token_allowed(make_method(cfg.rules[2 * l].config).plan(CallShape(grid, 0, "none"), "cpu"))
               for l in (0, 1)}
    assert all(0 < float(a.float().mean()) < 1 for a in allowed.values())
    residual_heads = {0: [1], 1: [0, 1]}
    stored = {}
    for (layer, step, branch), q, k, v, out in calls:
        dense = attention64(q, k, v)
        window = attention64(q, k, v, allowed[layer])
        expected = dense.clone()
        for h in residual_heads[layer]:
            if step == 1:
                stored[(layer, branch, h)] = dense[:, :, h] - window[:, :, h]
            elif step > 1:
                expected[:, :, h] = window[:, :, h] + stored[(layer, branch, h)]
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)
        if step > 1:  # the residual heads really differ from dense there (the rule did something)
            assert float((expected - dense)[:, :, residual_heads[layer]].abs().max()) > 1e-3
    assert stats["counters"]["residual_refresh"] == {1: 4}  # per step: 2 layers x 2 branches, at step 1 only
    assert "residual_missing" not in stats["counters"]


def _call(step, store, counters, layer=0, total=4):
    shape = CallShape((2, 8, 16), 0, "none")
    return CallContext("transformer", layer, step, "cond", shape, 1, 2,
                       state=store.state("transformer", layer, "cond", (shape, 1, 2)), store=store,
                       counters=counters, total_steps=total)


def test_a_reuse_without_a_stored_residual_refreshes():
    """Nothing stored (the cache budget refuses it): the reuse step computes dense and stores it instead
    of returning the bare window output."""
    cfg = TableConfig(block_size=64, backend="reference", cache_budget_mb=1e-4, rules=[
        {"use": "window", "heads": [0], "steps": [0, 1], "knobs": WINDOW, "residual": "refresh"},
        {"use": "window", "heads": [0], "steps": [1, 3], "knobs": WINDOW, "residual": "reuse"}])
    method = make_method(cfg)
    caches, store = CrossStepCaches(cfg, method), StateStore(cfg.cache_budget_mb)
    g = torch.Generator().manual_seed(0)
    counters = defaultdict(int)
    for step in range(3):
        q, k, v = (torch.randn(1, 256, 2, 16, generator=g) for _ in range(3))
        ctx = _call(step, store, counters)
        out, outcome, _ = caches.run(ctx, q, k, PlanExecutor(q, k, v, None, None, "reference"),
                                     lambda q=q, k=k, v=v: attention64(q, k, v).float())
        torch.testing.assert_close(out.double(), attention64(q, k, v), atol=2e-5, rtol=1e-4)
        assert outcome == "dense"
    assert store.refused == 3  # every head-0 residual was over budget
    missing = {step: n for (name, _, step), n in counters.items() if name == "residual_missing"}
    assert missing == {1: 1, 2: 1}


@pytest.mark.parametrize("rules, match", [
    ([{"use": "window", "residual": "always"}], r"rules\[0\]\.residual must be one of \['refresh', 'reuse'\]"),
    ([{"use": "share", "residual": "refresh"}], r"rules\[0\]\.residual='refresh': use='share'"),
    ([{"use": "window", "steps": [2, 4], "residual": "reuse"}],
     r"rules\[0\]\.residual='reuse'.*no rule with residual='refresh'"),
    ([{"use": "window", "steps": [0, 1], "knobs": WINDOW, "residual": "refresh"},
      {"use": "window", "steps": [1, 4], "residual": "reuse"}], r"rules\[1\]\.residual='reuse'"),
    ([{"use": "window", "layers": [0], "steps": [0, 1], "residual": "refresh"},
      {"use": "window", "layers": [1], "steps": [1, 4], "residual": "reuse"}], r"rules\[1\]\.residual='reuse'"),
])
def test_bad_residual_rules_are_refused_with_the_field(rules, match):
    with pytest.raises(ValueError, match=match):
        TableConfig(rules=rules)


def test_rule_residuals_exclude_the_table_wide_residual_cache_and_round_trip():
    rules = [{"use": "window", "heads": [1], "steps": [0, 1], "knobs": WINDOW, "residual": "refresh"},
             {"use": "window", "heads": [1], "steps": [1, 4], "knobs": WINDOW, "residual": "reuse"}]
    with pytest.raises(ValueError, match=r"residual_refresh=2.*rules\[0\]\.residual"):
        TableConfig(rules=rules, residual_refresh=2)
    table = TableConfig(rules=rules)
    assert TableConfig.from_json(table.to_json()).rules == table.rules
    assert [r["residual"] for r in table.to_json()["rules"]] == ["refresh", "reuse"]


def test_the_profile_keeps_candidate_rows_for_exact_residual_errors():
    """Every row sampled: ``residual_errors`` equals the float64 error of X_s + D_r - X_r over every row."""
    pipe = pipe_for("wan")
    cands = make_candidates(["residual:window:kernel_size=(1,3,3)"], block_size=64)
    steps = 4
    profile = Profile(steps=steps, layers=2, heads=2, ranges=step_ranges(steps, 2), candidates=[c.name for c in cands])
    profiler = Profiler(profile, cands, sample_rows=10_000, block_size=64, steps_per_range=1)
    calls = []
    with ditaccel.accelerate(pipe, "dense") as handle:
        handle.observe(lambda info, q, k, v: (profiler(info, q, k, v), calls.append(
            (info["layer"], info["step"], info["branch"], q.clone(), k.clone(), v.clone()))))
        pipe(**call_kwargs("wan", pipe, steps=steps, output_type="latent", **SPARSE_SIZE["wan"]))
    base = cands[1].base
    kept = {(l, s) for (b, run, branch, l, s) in profile.candidate_outputs if b == base}
    assert kept == {(l, s) for l in range(2) for s in range(steps)}  # every step, not only the measured ones
    allowed = token_allowed(make_method(cands[1].config).plan(CallShape((3, 8, 16), 0, "none"), "cpu"))
    exact = {}
    for l, s, branch, q, k, v in calls:
        if branch == "cond":
            exact[(l, s)] = (attention64(q, k, v), attention64(q, k, v, allowed))
    for l in range(2):
        for refresh, reuse in ((0, (1, 2, 3)), (1, (3,)), (2, (3,))):
            d_r, x_r = exact[(l, refresh)]
            num = sum((exact[(l, s)][1] + d_r - x_r - exact[(l, s)][0]).pow(2).sum(dim=(0, 1, 3)) for s in reuse)
            den = sum(exact[(l, s)][0].pow(2).sum(dim=(0, 1, 3)) for s in reuse)
            want = (num / den).sqrt()
            got = profile.residual_errors(base, l, refresh, reuse)
            assert got == pytest.approx(want.tolist(), rel=1e-4, abs=1e-7)
            assert all(e > 0 for e in got)
    assert profile.residual_errors("window:kernel_size=(9, 9, 9)", 0, 0, (1,)) is None  # never profiled


def test_residual_schedule_skips_shared_and_cfg_shared_steps():
    plan = residual_plan(1, 8, shared={1, 5}, cfg={2}, branches=2)
    assert (plan.refresh, plan.reuse, plan.before) == (3, (4, 6, 7), (2,))
    assert plan.calls == {2: 1, 3: 2, 4: 2, 6: 2, 7: 2}
    # dense before the refresh (1 call), dense + X at it, X after: per call of the range
    assert plan.mean_cost(0.25) == pytest.approx((1 + 2 * 1.25 + 6 * 0.25) / 9)
    assert residual_plan(1, 3, shared={2}, cfg=set(), branches=1) is None  # nothing after the refresh
    assert residual_plan(0, 3, shared=set(), cfg={0, 1, 2}, branches=2) is None  # no step computes both branches


def _toy_profile():
    """One layer, 3 heads, 8 steps, one branch. Method A ("tile") errs on head 0 by a fixed offset (a
    residual cancels it) plus a little fresh noise, on head 1 by fresh noise only (a residual does not
    help); method B ("window") errs by 0.05 and costs more; head 2's A is accurate enough plain."""
    g = torch.Generator().manual_seed(7)
    S, H = 8, 3
    cands = make_candidates(["tile:window=(1,1,1)", "residual:tile:window=(1,1,1)", "window:kernel_size=(1,3,3)"])
    a, ra, b = (c.name for c in cands[1:])
    p = Profile(steps=S, layers=1, heads=H, ranges=step_ranges(S, 1), candidates=[c.name for c in cands], runs=1)
    offset = torch.randn(1, 16, H, 4, generator=g)
    d = torch.randn(1, 16, H, 4, generator=g)
    for s in range(S):
        d = d + 0.3 * torch.randn(d.shape, generator=g)
        x = d + offset * torch.tensor([1.0, 0.0, 0.0]).view(1, 1, H, 1)
        x[:, :, 0] += 0.06 * torch.randn(1, 16, 4, generator=g)
        x[:, :, 1] += 0.8 * torch.randn(1, 16, 4, generator=g)  # head 1: a fresh error every step
        x[:, :, 2] += 0.02 * torch.randn(1, 16, 4, generator=g)
        p.outputs[(0, "cond", 0, s)] = d.clone()
        p.candidate_outputs[(a, 0, "cond", 0, s)] = x
    for h in range(H):  # plain errors over the range, as the profiler sums them
        p.err_den[(0, h, 0)] = sum(float(p.outputs[(0, "cond", 0, s)][:, :, h].pow(2).sum()) for s in range(S))
        p.err_num[(a, 0, h, 0)] = sum(float((p.candidate_outputs[(a, 0, "cond", 0, s)] - p.outputs[(0, "cond", 0, s)])
                                            [:, :, h].pow(2).sum()) for s in range(S))
        p.err_num[(b, 0, h, 0)] = (0.05 ** 2) * p.err_den[(0, h, 0)]  # B: error 0.05 everywhere
        p.count[(0, h, 0)] = S
    p.cost_ms = {"dense": 10.0, a: 2.0, b: 6.0}
    return p, cands, (a, ra, b)


def test_search_picks_residual_reuse_where_it_is_the_cheapest_under_the_budget():
    p, cands, (a, ra, b) = _toy_profile()
    lead = 2
    refresh, reuse = lead, list(range(lead + 1, 8))
    cost_of = {"dense": 1.0, a: 0.2, b: 0.6, ra: ((1 + 0.2) + 0.2 * len(reuse)) / (1 + len(reuse))}

    def error_of(name, h):  # recomputed here from the stored rows
        if name == "dense":
            return 0.0
        if name == ra:
            d_r, x_r = p.outputs[(0, "cond", 0, refresh)], p.candidate_outputs[(a, 0, "cond", 0, refresh)]
            num = sum(float((p.candidate_outputs[(a, 0, "cond", 0, s)] + d_r - x_r - p.outputs[(0, "cond", 0, s)])
                            [:, :, h].pow(2).sum()) for s in reuse)
            den = sum(float(p.outputs[(0, "cond", 0, s)][:, :, h].pow(2).sum()) for s in reuse)
            return (num / den) ** 0.5
        return p.error(name, 0, h, 0)

    e_res = error_of(ra, 0)
    assert 0.05 < e_res < 0.5 * error_of(a, 0)  # the toy: the residual cuts A's error, B beats both
    options = ["dense", a, ra, b]
    for budget in (0.5 * (0.05 + e_res), 1.05 * e_res, 0.5 * (e_res + error_of(a, 0)), 10.0):
        sel = select(p, cands, budget, cost="time", min_dense_steps=lead)
        for h in range(3):  # exhaustive twin per head
            ok = [o for o in options if error_of(o, h) <= budget]
            best = min(ok, key=lambda o: (cost_of[o], options.index(o)))
            assert sel.attention[(0, h, 0)] == best, (budget, h, {o: (cost_of[o], error_of(o, h)) for o in options})
    sel = select(p, cands, 1.05 * e_res, cost="time", min_dense_steps=lead)
    assert [sel.attention[(0, h, 0)] for h in range(3)] == [ra, b, a]  # the toy is built for this
    assert sel.residual_refresh == {(0, 0): lead}
    # the estimated cost: dense steps; at the refresh dense once for the call plus each head's method
    per_step = {s: (0.2 + 0.6 + 0.2) / 3 + (1.0 if s == refresh else 0.0) for s in range(lead, 8)}
    assert sel.cost == pytest.approx((lead * 1.0 + sum(per_step.values())) / 8)
    rules = to_rules(sel, p, cands)
    residual = [r for r in rules if r.get("residual")]
    assert residual == [
        {"use": "tile", "layers": [0], "heads": [0], "steps": [2 / 8, 3 / 8], "knobs": {"window": [1, 1, 1]},
         "residual": "refresh"},
        {"use": "tile", "layers": [0], "heads": [0], "steps": [3 / 8, 1.0], "knobs": {"window": [1, 1, 1]},
         "residual": "reuse"}]
    TableConfig(block_size=64, rules=rules)
    # dropped with its method (slower than dense), the residual candidate is never picked
    p.dropped = {a: "slow", ra: "slow"}
    assert ra not in select(p, cands, 1.05 * e_res, cost="time", min_dense_steps=lead).attention.values()


def test_residual_cells_move_their_refresh_past_shared_steps():
    p, cands, (_, ra, _) = _toy_profile()
    cands = cands + make_candidates(["share"])[1:]
    budget = 0.2
    assert select(p, cands, budget, cost="time", min_dense_steps=2).residual_refresh == {(0, 0): 2}
    p.outputs[(0, "cond", 0, 2)] = p.outputs[(0, "cond", 0, 1)].clone()  # step 2 repeats step 1: shared
    sel = select(p, cands, budget, cost="time", min_dense_steps=2)
    assert sel.share[0][0] == 2 and 3 not in sel.share[0]
    assert sel.attention[(0, 0, 0)] == ra and sel.residual_refresh == {(0, 0): 3}
    rules = [r for r in to_rules(sel, p, cands) if r.get("residual")]
    assert [(r["residual"], r["steps"]) for r in rules] == [("refresh", [3 / 8, 4 / 8]), ("reuse", [4 / 8, 1.0])]
