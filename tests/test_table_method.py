"""table: per-(layer, head, step range) rules; stacked per-head plans equal per-head brute force."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

import ditaccel
from ditaccel.methods import CallShape, TableConfig, make_method
from ditaccel.runtime import PlanExecutor
from ditaccel.state import CallContext, StateStore

from tiny_pipelines import call_kwargs, pipe_for

GRID = (2, 8, 16)  # 256 tokens: 4 blocks of 64
SHAPE = CallShape(GRID, 0, "none")


def ctx_for(store, heads, step=5, layer=0, branch="cond", total=10):
    return CallContext("transformer", layer, step, branch, SHAPE, 1, heads,
                       state=store.state("transformer", layer, branch, (SHAPE, 1, heads)), store=store,
                       counters=defaultdict(int), total_steps=total)


def token_mask(plan, B, H, n):
    """[B, H, n, n] bool in slot order: what a plan lets each query see (full | partial & mask_mod)."""
    bs = plan.layout.block_size
    full, anyb = plan.full_blocks, plan.any_blocks
    while full.dim() < 4:
        full, anyb = full[None], anyb[None]
    full = full.expand(B, H, -1, -1).repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :n, :n]
    anyb = anyb.expand(B, H, -1, -1).repeat_interleave(bs, 2).repeat_interleave(bs, 3)[..., :n, :n]
    b = torch.arange(B)[:, None, None, None]
    h = torch.arange(H)[None, :, None, None]
    qi = torch.arange(n)[None, None, :, None]
    ki = torch.arange(n)[None, None, None, :]
    mm = torch.as_tensor(plan.block_mask.mask_mod(b, h, qi, ki)).expand(B, H, n, n)
    return full | (anyb & mm)


def brute_force(q, k, v, plan_of_head):
    """float64 attention, head by head, under each head's own standalone (plan, head index in that
    plan) (None: dense)."""
    B, S, H, D = q.shape
    out = torch.empty(B, S, H, D, dtype=torch.float64)
    for h in range(H):
        qh, kh, vh = (x[:, :, h].double() for x in (q, k, v))  # [B, S, D]
        logits = qh @ kh.transpose(1, 2) / D ** 0.5
        if plan_of_head[h] is not None:
            plan, local = plan_of_head[h]
            lay = plan.layout
            n = lay.num_slots
            m_slots = token_mask(plan, B, 1 if plan.full_blocks.dim() < 4 else plan.full_blocks.shape[1], n)
            m_slots = m_slots[:, min(local, m_slots.shape[1] - 1)]
            src = lay.src  # slot -> original index
            m = torch.zeros(B, S, S, dtype=torch.bool)
            m[:, src[:, None], src[None, :]] = m_slots
            logits = logits.masked_fill(~m, float("-inf"))
        out[:, :, h] = torch.softmax(logits, -1) @ vh
    return out


def rand_qkv(seed, H=4, D=16):
    g = torch.Generator().manual_seed(seed)
    S = GRID[0] * GRID[1] * GRID[2]
    return [torch.randn(1, S, H, D, generator=g) * 2 for _ in range(3)]


@pytest.mark.parametrize("seed", [0, 1])
def test_per_head_static_table_equals_per_head_brute_force(seed):
    rules = [
        {"use": "window", "heads": [0], "knobs": {"kernel_size": [1, 3, 5]}},
        {"use": "tile", "heads": [1, 3], "knobs": {"window": [1, 1, 1]}},
        {"use": "dense", "heads": [2]},
    ]
    cfg = TableConfig(block_size=64, backend="reference", rules=rules)
    method = make_method(cfg)
    q, k, v = rand_qkv(seed)
    plan = method.decide(ctx_for(StateStore(64), 4), q, k)
    assert plan is not None and plan.any_blocks.shape[-3] == 4  # one stacked per-head mask
    window, tile = (make_method(rule.config).plan(SHAPE, q.device) for rule in cfg.rules[:2])
    per_head = [(window, 0), (tile, 0), None, (tile, 0)]
    out = PlanExecutor(q, k, v, None, None, "reference").run(plan)
    ref = brute_force(q, k, v, per_head)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # the window head really is sparse, the dense head really is dense
    assert 0 < float(plan.density) < 1


def test_per_head_dynamic_and_static_share_one_plan():
    cfg = TableConfig(block_size=64, backend="reference", rules=[
        {"use": "xattn", "heads": [0, 2], "knobs": {"threshold": 0.5, "refresh": 2}},
        {"use": "window", "heads": [1], "knobs": {"kernel_size": [1, 3, 3]}},
    ])
    method = make_method(cfg)
    q, k, v = rand_qkv(3)
    store = StateStore(64)
    plan = method.decide(ctx_for(store, 4), q, k)
    # brute force: xattn alone on heads (0, 2), window alone, head 3 dense
    xm = make_method(cfg.rules[0].config)
    idx = torch.tensor([0, 2])
    xctx = ctx_for(StateStore(64), 2)
    xplan = xm.plan_for(xctx, q.index_select(2, idx), k.index_select(2, idx))
    wplan = make_method(cfg.rules[1].config).plan(SHAPE, q.device)
    out = PlanExecutor(q, k, v, None, None, "reference").run(plan)
    ref = brute_force(q, k, v, [(xplan, 0), (wplan, 0), (xplan, 1), None])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # the xattn rule keeps its selection under its own name in the layer's state
    assert any(name.startswith("table.0.") for name in store.state("transformer", 0, "cond", (SHAPE, 1, 4))._values)


def test_rules_follow_layers_steps_and_first_match():
    cfg = TableConfig(rules=[
        {"use": "share", "layers": [1], "steps": [0.5, 1.0]},
        {"use": "cfg_share", "steps": [2, 4]},
        {"use": "xattn", "layers": [0], "heads": [1]},
    ])
    assert cfg.shares_output_at(1, 10, 20) and cfg.shares_output_at(1, 19, 20)
    assert not cfg.shares_output_at(1, 9, 20) and not cfg.shares_output_at(0, 10, 20)
    assert cfg.keeps_output_at(1, 3, 20) and not cfg.keeps_output_at(0, 3, 20)
    assert cfg.shares_cfg_at(0, 2, 20) and not cfg.shares_cfg_at(0, 4, 20)
    assert cfg.rule_for(0, 1, 3, 20, "cond").use == "xattn"  # cond branch reads past cfg_share
    assert cfg.rule_for(0, 1, 3, 20, "uncond").use == "cfg_share"
    assert cfg.rule_for(0, 0, 7, 20, "cond") is None
    assert cfg.follows_call


@pytest.mark.parametrize("rules, match", [
    ([{"use": "share", "heads": [0]}], r"rules\[0\]\.heads"),
    ([{"use": "xattn", "knobs": {"dense_steps": 2}}], r"rules\[0\]\.knobs.*dense_steps"),
    ([{"use": "xattn", "knobs": {"threshold": 2.0}}], r"rules\[0\]\.knobs.*threshold"),
    ([{"use": "nope"}], r"rules\[0\]\.use must be one of"),
    ([{"use": "dense", "steps": [5, 2]}], r"rules\[0\]\.steps"),
    ([{"use": "dense", "steps": [0.5, 1.5]}], r"rules\[0\]\.steps"),
    ([{"use": "dense", "where": 1}], r"unknown key"),
    ([{"use": "radial", "heads": [0]}, {"use": "window", "heads": [1]}], r"different token layouts"),
])
def test_bad_rules_are_refused_with_the_field(rules, match):
    with pytest.raises(ValueError, match=match):
        TableConfig(rules=rules)


def test_disjoint_layers_may_use_different_layouts():
    TableConfig(rules=[{"use": "radial", "layers": [0]}, {"use": "window", "layers": [1]}])


def test_share_rules_reuse_per_layer_and_step_on_a_pipeline():
    pipe = pipe_for("wan")
    steps = 4
    cfg = TableConfig(rules=[{"use": "share", "layers": [1], "steps": [2, 4]}])
    with ditaccel.accelerate(pipe, cfg) as handle:
        pipe(**call_kwargs("wan", pipe, steps=steps, output_type="latent"))
        stats = handle.stats()
    reused = {(c["layer"], c["step"]) for c in stats["per_layer_step"] if c["reuse_calls"]}
    assert reused == {(1, 2), (1, 3)}
    assert stats["reuse_calls"] == 4  # two steps x two CFG branches
    assert stats["dense_calls"] == stats["calls"] - 4


@pytest.mark.parametrize("steps", [1, 4, 7, 20, 50])
def test_a_tables_fractions_at_a_step_count_cover_the_same_steps(steps):
    from ditaccel.methods import TableConfig

    table = TableConfig(block_size=64, rules=[
        {"use": "share", "layers": [0, 1], "steps": [0.2, 0.35]},
        {"use": "cfg_share", "layers": [0], "steps": [0.0, 0.2]},
        {"use": "share", "layers": [1], "steps": [0.95, 1.0]},
        {"use": "cfg_share", "layers": [1], "steps": [2, 3]},
    ])
    fixed = table.at_step_count(steps)
    assert not fixed.follows_call and all(r.steps is None or isinstance(r.steps[0], int) for r in fixed.rules)
    for layer in (0, 1):
        for s in range(steps):
            assert fixed.shares_output_at(layer, s, None) == table.shares_output_at(layer, s, steps)
            assert fixed.shares_cfg_at(layer, s, None) == table.shares_cfg_at(layer, s, steps)


def test_heads_whose_rules_choose_packed_and_padded_layouts_stack_on_one():
    """On 5 x 18 x 24 (18 is no multiple of the 8-token tile) the whole-frame tile window keeps the packed
    layout and the same-tile-every-frame one the tile-padded layout; mixed per head in one call they must
    still run each head's own token mask (float64 brute force), with a dense head beside them."""
    grid = (5, 18, 24)
    shape = CallShape(grid, 0, "none")
    spatial, temporal = {"window": [1, 3, 3]}, {"window": [5, 1, 1]}
    cfg = TableConfig(block_size=64, backend="reference", rules=[
        {"use": "tile", "heads": [0], "steps": [0, 6], "knobs": spatial},
        {"use": "tile", "heads": [1, 3], "knobs": temporal}])
    alone = [make_method(rule.config).plan(shape, "cpu") for rule in cfg.rules]
    assert [p.layout_choice for p in alone] == ["packed", "padded"]  # the case this test is about
    method, store = make_method(cfg), StateStore(64)
    masks = [p.slot_allowed(p.layout.inverse[:, None], p.layout.inverse[None, :]) for p in alone]
    g = torch.Generator().manual_seed(4)
    # step 5: both rules and a dense head (all on the packed layout); step 7: the padded rule and two
    # dense heads (the dense heads' plan must then be the padded layout's, not the one cached at step 5)
    for step, per_head in ((5, [masks[0], masks[1], None, masks[1]]), (7, [None, masks[1], None, masks[1]])):
        ctx = CallContext("transformer", 0, step, "cond", shape, 1, 4,
                          state=store.state("transformer", 0, "cond", (shape, 1, 4)), store=store, total_steps=10)
        q, k, v = (torch.randn(1, 2160, 4, 16, generator=g) * 2 for _ in range(3))
        plan = method.decide(ctx, q, k)
        out = PlanExecutor(q, k, v, None, None, "reference").run(plan)
        qd, kd, vd = (x[0].double().transpose(0, 1) for x in (q, k, v))  # [H, S, D]
        logits = qd @ kd.transpose(1, 2) / 4.0
        ref = torch.stack([torch.softmax(logits[h] if m is None else logits[h].masked_fill(~m, float("-inf")), -1)
                           @ vd[h] for h, m in enumerate(per_head)], 1)[None]
        assert torch.isfinite(out).all() and 0 < float(plan.density) < 1
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
