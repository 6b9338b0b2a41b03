"""Cross-step caches and per-call state: output share, cfg share, residual cache, renormalise,
the memory budget, resets per pipeline call and per shape; observe() and track_attention_error()."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

import ditaccel
from ditaccel.caches import CrossStepCaches
from ditaccel.methods import CallShape, make_method
from ditaccel.runtime import PlanExecutor
from ditaccel.state import CallContext, StateStore

TILE = dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64)





def latents(pipe, family, **kw):
    kw = {**SPARSE_SIZE[family], "output_type": "latent", "steps": 3, **kw}
    out = pipe(**call_kwargs(family, pipe, **kw))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


# --- unit level: the cache logic on a fake method and executor ------------------------------------

class FakeMethod:
    """Sparse from step 1 on; counts decisions."""

    def __init__(self, config):
        self.config = config
        self.decisions = 0

    def decide(self, ctx, q, k):
        self.decisions += 1
        return None if ctx.step < self.config.dense_steps else self.plan_for(ctx, q, k)

    def plan_for(self, ctx, q, k):
        return type("Plan", (), {"density": 0.5})()


class FakeExecutor:
    def __init__(self, sparse_out, rho=None):
        self.sparse_out, self.rho, self.runs = sparse_out, rho, 0

    def run(self, plan):
        self.runs += 1
        return self.sparse_out

    def kept_mass(self, plan):
        return self.rho


def make_ctx(store, step, branch="cond", layer=0, shape=CallShape((2, 8, 8), 0, "none")):
    return CallContext(transformer="transformer", layer=layer, step=step, branch=branch, shape=shape, batch=1,
                       heads=2, state=store.state("transformer", layer, branch, (shape, 1, 2)), store=store)


def test_output_share_returns_the_stored_tensor_and_computes_elsewhere():
    cfg = ditaccel.TileConfig(dense_steps=1, output_share_steps=(2, 3))
    method = FakeMethod(cfg)
    caches, store = CrossStepCaches(cfg, method), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 128, 2, 8)
    outs = []
    for step in range(5):
        out_s = torch.randn(1, 128, 2, 8)
        dense_out = torch.randn(1, 128, 2, 8)
        out, outcome, _ = caches.run(make_ctx(store, step), q, q, FakeExecutor(out_s), lambda: dense_out)
        outs.append((out, outcome, out_s, dense_out))
    assert [o[1] for o in outs] == ["dense", "sparse", "reuse", "reuse", "sparse"]
    assert outs[0][0] is outs[0][3] and outs[1][0] is outs[1][2] and outs[4][0] is outs[4][2]
    assert outs[2][0] is outs[1][0] and outs[3][0] is outs[1][0]  # the stored tensor itself
    assert method.decisions == 3  # shared steps never ask the method
    assert store.bytes == 0  # nothing needed after the last share step


def test_cfg_share_uses_the_cond_output_of_the_same_step_only():
    cfg = ditaccel.TileConfig(cfg_share_steps=(1,))
    caches, store = CrossStepCaches(cfg, FakeMethod(cfg)), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 128, 2, 8)
    for step in range(3):
        cond_out = torch.randn(1, 128, 2, 8)
        out_c, _, _ = caches.run(make_ctx(store, step, "cond"), q, q, FakeExecutor(cond_out), lambda: cond_out)
        unc = torch.randn(1, 128, 2, 8)
        out_u, outcome, _ = caches.run(make_ctx(store, step, "uncond"), q, q, FakeExecutor(unc), lambda: unc)
        if step == 1:
            assert outcome == "reuse" and out_u is out_c
        else:
            assert outcome != "reuse" and out_u is unc


def test_an_output_share_after_a_cfg_share_reuses_what_the_branch_returned_there():
    """The uncond branch's output at a cfg-shared step is the cond output; an output share at the next
    step must reuse that, not an older step's own output (which made every chain of cfg shares and
    output shares stale by many steps)."""
    cfg = ditaccel.TileConfig(dense_steps=5, cfg_share_steps=(1, 2), output_share_steps=(3,))
    caches, store = CrossStepCaches(cfg, FakeMethod(cfg)), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 128, 2, 8)
    got = {}
    for step in range(5):
        for branch in ("cond", "uncond"):
            own = torch.randn(1, 128, 2, 8)
            out, outcome, _ = caches.run(make_ctx(store, step, branch), q, q, FakeExecutor(own), lambda: own)
            got[(step, branch)] = (out, outcome, own)
    assert [got[(s, "uncond")][1] for s in range(5)] == ["dense", "reuse", "reuse", "reuse", "dense"]
    assert got[(2, "uncond")][0] is got[(2, "cond")][0]
    assert got[(3, "uncond")][0] is got[(2, "cond")][0]  # step 2's shared output, not step 0's own
    assert got[(3, "cond")][0] is got[(2, "cond")][0]


def test_residual_cache_refreshes_every_n_sparse_steps():
    cfg = ditaccel.TileConfig(dense_steps=1, residual_refresh=2)
    caches, store = CrossStepCaches(cfg, FakeMethod(cfg)), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 128, 2, 8)
    dense_out, sparse_out = torch.randn(1, 128, 2, 8), torch.randn(1, 128, 2, 8)
    outcomes = []
    for step in range(6):
        ex = FakeExecutor(sparse_out)
        out, outcome, _ = caches.run(make_ctx(store, step), q, q, ex, lambda: dense_out)
        outcomes.append(outcome)
        if step in (1, 3, 5):  # refresh: dense returned, sparse run to measure the residual
            assert out is dense_out and ex.runs == 1
        elif step in (2, 4):  # sparse + stored residual == dense when nothing changed
            torch.testing.assert_close(out, dense_out)
    assert outcomes == ["dense", "dense", "sparse", "dense", "sparse", "dense"]


def test_renormalise_scales_sparse_steps_by_the_last_measured_mass():
    cfg = ditaccel.TileConfig(dense_steps=2, renormalise=True)
    caches, store = CrossStepCaches(cfg, FakeMethod(cfg)), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 128, 2, 8)
    sparse_out = torch.randn(1, 128, 2, 8)
    rhos = [torch.rand(1, 128, 2, 1) for _ in range(2)]
    for step in range(2):  # dense steps measure
        caches.run(make_ctx(store, step), q, q, FakeExecutor(None, rhos[step]), lambda: sparse_out)
    out, outcome, _ = caches.run(make_ctx(store, 2), q, q, FakeExecutor(sparse_out), lambda: None)
    assert outcome == "sparse"
    torch.testing.assert_close(out, sparse_out * rhos[1])  # the last dense step's ratio


def test_budget_refuses_what_does_not_fit():
    cfg = ditaccel.TileConfig(dense_steps=1, output_share_steps=(2,), cache_budget_mb=0.01)  # 10 KiB
    caches, store = CrossStepCaches(cfg, FakeMethod(cfg)), StateStore(cfg.cache_budget_mb)
    q = torch.randn(1, 4096, 2, 8)  # a 256 KiB output does not fit
    outcomes = [caches.run(make_ctx(store, s), q, q, FakeExecutor(torch.randn_like(q)), lambda: q)[1]
                for s in range(3)]
    assert outcomes == ["dense", "sparse", "sparse"] and store.refused >= 1 and store.bytes == 0


def test_state_is_dropped_on_a_new_shape():
    store = StateStore(64)
    a = store.state("t", 0, "cond", ("shape-a",))
    assert a.put("x", torch.ones(10))
    assert store.bytes == 40
    b = store.state("t", 0, "cond", ("shape-b",))
    assert b.get("x") is None and store.bytes == 0
    assert store.peek("t", 0, "cond", ("shape-a",)) is None


# --- kept mass against a float64 brute force ------------------------------------------------------

@pytest.mark.parametrize("text_position,text_len", [("none", 0), ("prefix", 7), ("suffix", 5)])
def test_kept_mass_matches_brute_force(text_position, text_len):
    torch.manual_seed(0)
    grid = (2, 8, 8)
    method = make_method(ditaccel.WindowConfig(kernel_size=(1, 3, 5), block_size=64))
    plan = method.plan(CallShape(grid, text_len, text_position), "cpu")
    S, H, D = 128 + text_len, 2, 16
    q, k, v = (torch.randn(1, S, H, D) * 2 for _ in range(3))
    key_valid = torch.ones(1, S, dtype=torch.bool)
    if text_len:  # pad the last text token
        pad_at = text_len - 1 if text_position == "prefix" else S - 1
        key_valid[0, pad_at] = False
    rho = PlanExecutor(q, k, v, key_valid if text_len else None, None, "reference").kept_mass(plan)

    # brute force: token-level allowed matrix in model order from the plan's slot rule
    layout = plan.layout
    slot_of = layout.inverse
    allowed = plan.slot_allowed(slot_of[:, None], slot_of[None, :]) & key_valid[0][None, :]
    logits = torch.einsum("shd,thd->hst", q[0].double(), k[0].double()) * D**-0.5
    logits = logits.masked_fill(~key_valid[0][None, None, :], float("-inf"))
    p = torch.softmax(logits, -1)
    expected = (p * allowed[None]).sum(-1).T[None, :, :, None]  # [1, S, H, 1]
    assert not rho.isnan().any()
    torch.testing.assert_close(rho.double(), expected, atol=1e-5, rtol=1e-5)
    assert float(rho.min()) < 0.999  # the window drops something


# --- end to end on tiny pipelines -----------------------------------------------------------------

@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "flux"])
def test_cfg_share_is_exact_when_cond_and_uncond_inputs_are_identical(family):
    pipe = pipe_for(family)
    base = call_kwargs(family, pipe, **SPARSE_SIZE[family], steps=3, output_type="latent")
    # The positive inputs become copies of the negative ones: both branches see the same inputs.
    kw = {**base, **{k.replace("negative_", ""): v for k, v in base.items() if k.startswith("negative_")}}

    def run(**cfg):
        with ditaccel.accelerate(pipe, "tile", **TILE, **cfg) as h:
            out = pipe(**{**kw, "generator": torch.Generator().manual_seed(0)})
            stats = h.stats()
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images), stats

    ref, _ = run()
    shared, stats = run(cfg_share_steps=(0, 1, 2))
    assert torch.equal(shared, ref)
    reused = sum(c["reuse_calls"] for c in stats["per_layer_step"] if c["branch"] == "uncond")
    assert reused == sum(c["calls"] for c in stats["per_layer_step"] if c["branch"] == "uncond") > 0


@pytest.mark.parametrize("family", ["wan", "hunyuan_video", "cogvideox", "flux"])
def test_caches_reset_between_calls_and_on_new_resolution(family):
    pipe = pipe_for(family)
    cfg = dict(**TILE, dense_steps=1, residual_refresh=2, output_share_steps=(2,), renormalise=True)
    with ditaccel.accelerate(pipe, "tile", **cfg) as h:
        first = latents(pipe, family)
        second = latents(pipe, family)
        stats = h.stats()
        other = dict(height=SPARSE_SIZE[family]["height"], width=SPARSE_SIZE[family]["width"] // 2)
        after = latents(pipe, family, **other)
    assert torch.equal(first, second)
    assert stats["reuse_calls"] > 0 and stats["counters"]["residual_refresh"]
    assert stats["cache"]["peak_bytes"] > 0
    with ditaccel.accelerate(pipe, "tile", **cfg):
        fresh = latents(pipe, family, **other)
    assert torch.equal(after, fresh)


def test_observe_and_track_attention_error():
    family = "wan"
    pipe = pipe_for(family)
    seen = []
    with ditaccel.accelerate(pipe, "tile", **TILE, dense_steps=1) as h:
        h.observe(lambda info, q, k, v: seen.append((info["layer"], info["step"], info["branch"], tuple(q.shape))))
        h.track_attention_error(steps=[1])
        latents(pipe, family)
        stats = h.stats()
        with pytest.raises(ValueError, match="callable"):
            h.observe(3)
        with pytest.raises(ValueError, match="steps"):
            h.track_attention_error([-1])
    T, H, W = 3, 8, 16
    assert len(seen) == stats["calls"] and seen[0][3] == (1, T * H * W, 2, 16)
    err = stats["attention_error"]
    steps = {e["step"] for e in err["per_layer_step"]}
    assert steps == {1} and set(err["per_layer"]) == {"transformer.0", "transformer.1"}
    assert all(0 < e["rel_error"] < 1 for e in err["per_layer_step"])
    assert stats["attention_time_ms"] > 0 and all(c["time_ms"] > 0 for c in stats["per_layer_step"])
