"""Dynamic block selection (topk, xattn) with mask reuse (refresh) and skip propagation (skip_threshold).

Selections are checked against brute-force selections computed here in float64 with explicit loops
over blocks (and, for the anti-diagonal scores, over strided rows and columns); the cross-step
machinery against hand-driven contexts and end to end on the tiny pipelines of every family.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_pipelines import SPARSE_SIZE, pipe_for, run_latents

import ditaccel
from ditaccel.layout import video_order
from ditaccel.methods import CallShape, make_method
from ditaccel.methods.dynamic import DynamicMethod, keep_from_lists, pack_blocks, skip_set, unpack_blocks
from ditaccel.methods.topk import DEFAULT_TOPK, TopKConfig
from ditaccel.methods.xattn import XAttnConfig
from ditaccel.state import CallContext, StateStore

BS = 64
TIE = 1e-6  # brute-force rows whose decision hinges on less than this are not compared


# --------------------------------------------------------------------------------------------
# brute force
# --------------------------------------------------------------------------------------------
def brute_video_order(grid, order, tile):
    """Raster indices of the video tokens in slot order: raster and tile order by explicit loops."""
    T, H, W = grid
    if order == "raster":
        return list(range(T * H * W))
    if order == "tile":
        tt, th, tw = tile
        out = []
        for t0 in range(0, T, tt):
            for h0 in range(0, H, th):
                for w0 in range(0, W, tw):
                    for t in range(t0, min(t0 + tt, T)):
                        for h in range(h0, min(h0 + th, H)):
                            for w in range(w0, min(w0 + tw, W)):
                                out.append((t * H + h) * W + w)
        return out
    return video_order(grid, order, tile).tolist()  # hilbert / transpose: the layout's own (tested there)


def video_tokens(x, grid, text_len, position, order, tile):
    """[B, S, H, D] model order -> [B, H, n_video, D] float64, video tokens in slot order."""
    offset = text_len if position == "prefix" else 0
    idx = torch.tensor(brute_video_order(grid, order, tile)) + offset
    return x[:, idx].transpose(1, 2).double()


def brute_mean_pool_scores(qv, kv):
    """[B, H, nv, nv] softmax over key blocks of mean(q block) . mean(k block) / sqrt(D)."""
    B, H, n, D = qv.shape
    nv = math.ceil(n / BS)
    scores = torch.empty(B, H, nv, nv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            pq = [qv[b, h, i * BS : min(n, (i + 1) * BS)].mean(0) for i in range(nv)]
            pk = [kv[b, h, j * BS : min(n, (j + 1) * BS)].mean(0) for j in range(nv)]
            for i in range(nv):
                logits = torch.stack([pq[i] @ pk[j] for j in range(nv)]) / math.sqrt(D)
                scores[b, h, i] = torch.softmax(logits, 0)
    return scores


def brute_antidiagonal_scores(qv, kv, stride):
    """[B, H, nv, nv] XAttention scores: strided anti-diagonal sums, softmax over strided keys,
    summed per block pair, each query block's row normalised to 1 (tokens past the end are zeros)."""
    B, H, n, D = qv.shape
    nv, rows = math.ceil(n / BS), math.ceil(n / stride)
    scale = D**-0.5 / stride

    def tok(x, i):
        return x[i] if i < n else torch.zeros(D, dtype=x.dtype)

    scores = torch.zeros(B, H, nv, nv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            q, k = qv[b, h], kv[b, h]
            for r in range(rows):
                logits = torch.stack([
                    sum(tok(q, r * stride + stride - 1 - i) @ tok(k, c * stride + i) for i in range(stride))
                    for c in range(rows)
                ]) * scale
                probs = torch.softmax(logits, 0)
                for c in range(rows):
                    scores[b, h, r * stride // BS, c * stride // BS] += probs[c]
    return scores / scores.sum(-1, keepdim=True)


def brute_select(scores, *, topk=None, cdf=None):
    """(keep, ambiguous): keep [B, H, nv, nv] bool (diagonal always kept); ambiguous [B, H, nv]:
    rows whose selection turns on a score gap or cumulative-mass margin below TIE."""
    B, H, nv, _ = scores.shape
    keep = torch.zeros(B, H, nv, nv, dtype=torch.bool)
    ambiguous = torch.zeros(B, H, nv, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nv):
                row = scores[b, h, i].tolist()
                ranked = sorted(range(nv), key=lambda j: -row[j])
                if topk is not None:
                    n_keep = min(nv, max(1, math.ceil(topk * nv)))
                    for j in ranked[:n_keep]:
                        keep[b, h, i, j] = True
                    if n_keep < nv and row[ranked[n_keep - 1]] - row[ranked[n_keep]] < TIE:
                        ambiguous[b, h, i] = True
                else:
                    mass = 0.0
                    for j in ranked:
                        if mass < cdf:
                            keep[b, h, i, j] = True
                        if abs(mass - cdf) < TIE:
                            ambiguous[b, h, i] = True
                        mass += row[j]
                keep[b, h, i, i] = True
    return keep, ambiguous


def full_block_map(video_keep, grid, text_len, position):
    """Video-block selection -> every block of the slot layout: text rows and columns all kept."""
    n_video = math.prod(grid)
    nv = math.ceil(n_video / BS)
    nt = math.ceil(text_len / BS)
    first = nt if position == "prefix" else 0
    text = list(range(nv, nv + nt)) if position == "suffix" else list(range(nt))
    nb = nv + nt
    full = torch.zeros(*video_keep.shape[:2], nb, nb, dtype=torch.bool)
    full[..., first:first + nv, first:first + nv] = video_keep
    for t in text:
        full[..., t, :] = True
        full[..., :, t] = True
    return full, first


# --------------------------------------------------------------------------------------------
# inputs and hand-driven contexts
# --------------------------------------------------------------------------------------------
def structured_qk(B, S, H, D, grid, text_len, position, seed):
    """Random q, k whose video tokens share a random offset per 4x4 spatial cell of each frame,
    so pooled blocks differ clearly (pure noise pools to ~0 and near-uniform scores)."""
    gen = torch.Generator().manual_seed(seed)
    T, Hh, W = grid
    t = torch.arange(T).view(T, 1, 1).expand(grid).reshape(-1)
    h = torch.arange(Hh).view(1, Hh, 1).expand(grid).reshape(-1)
    w = torch.arange(W).view(1, 1, W).expand(grid).reshape(-1)
    cell = (t * math.ceil(Hh / 4) + h // 4) * math.ceil(W / 4) + w // 4
    out = []
    for _ in range(2):
        x = torch.randn(B, S, H, D, generator=gen)
        offsets = 1.5 * torch.randn(B, int(cell.max()) + 1, H, D, generator=gen)
        offset = text_len if position == "prefix" else 0
        x[:, offset:offset + t.numel()] += offsets[:, cell]
        out.append(x)
    return out


def context(store, shape, B, H, step, layer=0, branch="cond"):
    state = store.state("transformer", layer, branch, (shape, B, H))
    return CallContext(transformer="transformer", layer=layer, step=step, branch=branch, shape=shape, batch=B,
                       heads=H, state=state, store=store)


def text_len_for(position):
    return 0 if position == "none" else 8


SELECTION_CASES = [  # (grid, order, text position): block-aligned tile order and a ragged raster grid
    ((3, 8, 16), "tile", "none"),
    ((3, 8, 16), "tile", "prefix"),
    ((2, 10, 13), "raster", "none"),  # the identity layout: q and k used in place
    ((2, 10, 13), "raster", "suffix"),
    ((2, 10, 13), "raster", "prefix"),
    ((2, 8, 16), "hilbert", "none"),
    ((2, 8, 16), "transpose", "suffix"),
]


def check_plan_against_brute_force(config, scores_fn, rule, grid, order, position, seed, expect_sparse=True):
    B, H, D = 2, 2, 16
    text_len = text_len_for(position)
    S = math.prod(grid) + text_len
    q, k = structured_qk(B, S, H, D, grid, text_len, position, seed)
    method = make_method(config)
    plan = method.decide(context(StateStore(64), CallShape(grid, text_len, position), B, H, step=0), q, k)
    tile = (1, 8, 8)
    scores = scores_fn(video_tokens(q, grid, text_len, position, order, tile),
                       video_tokens(k, grid, text_len, position, order, tile))
    video_keep, ambiguous = brute_select(scores, **rule)
    expected, first = full_block_map(video_keep, grid, text_len, position)
    got = plan.any_blocks.expand_as(expected)
    assert ambiguous.float().mean() < 0.1, "inputs too close to ties to test anything"
    rows_ok = torch.ones(expected.shape[:3], dtype=torch.bool)
    rows_ok[..., first:first + ambiguous.shape[-1]] = ~ambiguous
    assert torch.equal(got[rows_ok], expected[rows_ok])
    if expect_sparse:  # (a high cdf may rightly keep every block of near-uniform rows)
        video = expected[..., first:first + scores.shape[-1], first:first + scores.shape[-1]]
        assert video.float().mean() < 1, "the selection kept every block: not a test of selection"


# --------------------------------------------------------------------------------------------
# selection against brute force
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,order,position", SELECTION_CASES)
@pytest.mark.parametrize("rule", [dict(topk=0.3), dict(topk=0.5), dict(cdf=0.6), dict(cdf=0.9)])
def test_topk_selection_matches_brute_force(grid, order, position, rule):
    config = TopKConfig(block_size=BS, order=order, **rule)
    check_plan_against_brute_force(config, brute_mean_pool_scores, rule, grid, order, position, seed=7,
                                   expect_sparse=rule.get("cdf", 0.0) <= 0.6)


def test_topk_default_rule_is_default_fraction():
    grid, position = (3, 8, 16), "none"
    check_plan_against_brute_force(TopKConfig(block_size=BS), brute_mean_pool_scores, dict(topk=DEFAULT_TOPK),
                                   grid, "tile", position, seed=3)


@pytest.mark.parametrize("grid,order,position", [SELECTION_CASES[0], SELECTION_CASES[2], SELECTION_CASES[4],
                                                 SELECTION_CASES[6]])
@pytest.mark.parametrize("threshold,stride", [(0.5, 8), (0.8, 16)])
def test_xattn_selection_matches_brute_force(grid, order, position, threshold, stride):
    config = XAttnConfig(block_size=BS, order=order, threshold=threshold, stride=stride)
    check_plan_against_brute_force(config, lambda q, k: brute_antidiagonal_scores(q, k, stride),
                                   dict(cdf=threshold), grid, order, position, seed=stride,
                                   expect_sparse=threshold <= 0.6)


@pytest.mark.parametrize("config,scores_fn,rule", [
    (TopKConfig(block_size=BS, order="raster", topk=0.3), brute_mean_pool_scores, dict(topk=0.3)),
    (XAttnConfig(block_size=BS, order="raster", threshold=0.5, stride=16), lambda q, k: brute_antidiagonal_scores(q, k, 16),
     dict(cdf=0.5)),
])
def test_triton_scorers_select_as_brute_force(monkeypatch, config, scores_fn, rule):
    """The path CUDA takes: the Triton scoring kernels (here in the interpreter) on the method's
    gathered, non-contiguous q and k views."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    check_plan_against_brute_force(config, scores_fn, rule, (2, 10, 13), "raster", "prefix", seed=5)


def test_keep_from_lists_and_bit_packing_round_trip():
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(2, 3, 7, 13, generator=gen) < 0.4
    counts = keep.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    assert torch.equal(keep_from_lists(counts, indices), keep)
    packed = pack_blocks(keep)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 3, 7, 2)
    assert torch.equal(unpack_blocks(packed, 13), keep)


# --------------------------------------------------------------------------------------------
# refresh and skip propagation, hand-driven
# --------------------------------------------------------------------------------------------
def _video_keep(plan, nv):
    return plan.any_blocks[..., :nv, :nv]  # text_position "none": every block is video


@pytest.mark.parametrize("refresh,dense_steps", [(1, 0), (3, 0), (2, 1)])
def test_refresh_scores_only_at_refresh_steps_and_reuses_between(refresh, dense_steps):
    grid, B, H, D = (3, 8, 16), 1, 2, 16
    shape = CallShape(grid, 0, "none")
    method = make_method(TopKConfig(block_size=BS, topk=0.3, refresh=refresh, dense_steps=dense_steps))
    store = StateStore(64)
    scored, plans = [], {}
    for step in range(8):
        ctx = context(store, shape, B, H, step)
        q, k = structured_qk(B, math.prod(grid), H, D, grid, 0, "none", seed=100 + step)
        plan = method.decide(ctx, q, k)
        if step < dense_steps:
            assert plan is None
        else:
            plans[step] = _video_keep(plan, 6)
        if ctx.counters.get(("scoring", "transformer", step)):
            scored.append(step)
    expected = [s for s in range(dense_steps, 8) if (s - dense_steps) % refresh == 0]
    assert scored == expected
    for step, keep in plans.items():
        last_scored = max(s for s in scored if s <= step)
        assert torch.equal(keep, plans[last_scored])  # reused exactly between refreshes
    assert len({tuple(p.flatten().tolist()) for p in plans.values()}) > 1  # selections do change with q, k


def test_refused_selection_is_rescored_not_reused():
    """A zero budget refuses every stored selection: every sparse step scores instead of reusing."""
    grid, B, H, D = (3, 8, 16), 1, 2, 16
    shape = CallShape(grid, 0, "none")
    method = make_method(TopKConfig(block_size=BS, topk=0.3, refresh=4, cache_budget_mb=0.0))
    store = StateStore(0.0)
    for step in range(3):
        ctx = context(store, shape, B, H, step)
        q, k = structured_qk(B, math.prod(grid), H, D, grid, 0, "none", seed=step)
        method.decide(ctx, q, k)
        assert ctx.counters[("scoring", "transformer", step)] == 1
    assert store.refused >= 2 and store.bytes == 0


def test_skip_set_only_grows_and_skipped_blocks_stay_out():
    """Scores are injected: a block pair below skip_threshold at step 0 stays out at step 1 although
    it scores high there; the skip set at every step contains the previous one."""
    nv, B, H = 6, 1, 2
    grid = (3, 8, 16)
    shape = CallShape(grid, 0, "none")
    method = make_method(TopKConfig(block_size=BS, topk=1.0, skip_threshold=0.05))
    uniform = torch.full((B, H, nv, nv), 1.0 / nv)
    low01 = uniform.clone()
    low01[..., 0, 1] = 0.01
    low23 = uniform.clone()
    low23[..., 2, 3] = 0.01
    low23[..., 0, 1] = 0.5  # block (0, 1) now scores high
    q = torch.randn(B, math.prod(grid), H, 16)
    store = StateStore(64)
    previous = torch.zeros(B, H, nv, nv, dtype=torch.bool)
    for step, scores in enumerate([uniform, low01, low23, uniform]):
        method.block_scores = lambda q_, k_, s=scores: s
        ctx = context(store, shape, B, H, step)
        keep = _video_keep(method.decide(ctx, q, q), nv)
        skip = skip_set(ctx.state, nv)
        assert skip is not None
        assert torch.equal(skip & previous, previous)  # never shrinks
        assert torch.equal(keep, ~skip)  # topk=1.0 keeps everything not skipped
        previous = skip
    assert previous[..., 0, 1].all() and previous[..., 2, 3].all() and int(previous.sum()) == 2 * B * H
    assert not previous.diagonal(dim1=-2, dim2=-1).any()


def test_dense_step_query_does_not_touch_state():
    """renormalise asks for the plan at dense steps: scoring runs, but no selection or skip is stored."""
    grid, B, H = (3, 8, 16), 1, 2
    shape = CallShape(grid, 0, "none")
    method = make_method(TopKConfig(block_size=BS, topk=0.5, refresh=2, skip_threshold=0.9, dense_steps=2))
    ctx = context(StateStore(64), shape, B, H, step=0)
    q, k = structured_qk(B, math.prod(grid), H, 16, grid, 0, "none", seed=0)
    assert method.decide(ctx, q, k) is None
    assert method.plan_for(ctx, q, k) is not None
    assert skip_set(ctx.state, 6) is None and ctx.store.bytes == 0


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,field,value", [
    (TopKConfig, "topk", 0.0), (TopKConfig, "topk", 1.5), (TopKConfig, "cdf", -0.1), (TopKConfig, "cdf", "0.9"),
    (XAttnConfig, "threshold", 0.0), (XAttnConfig, "threshold", 1.2), (XAttnConfig, "stride", 4),
    (TopKConfig, "refresh", 0), (XAttnConfig, "refresh", 1.5), (TopKConfig, "skip_threshold", -0.1),
    (XAttnConfig, "skip_threshold", 1.5), (TopKConfig, "order", "zigzag"), (XAttnConfig, "tile", (1, 8, 4)),
])
def test_bad_config_raises_naming_the_field(cls, field, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}"):
        cls(block_size=BS, **{field: value})


def test_conflicting_fields_raise():
    with pytest.raises(ValueError, match=r"TopKConfig\.topk=0\.2 and TopKConfig\.cdf=0\.9"):
        TopKConfig(topk=0.2, cdf=0.9)
    with pytest.raises(ValueError, match=r"TopKConfig\.tile=.*order='tile'"):
        TopKConfig(block_size=BS, order="hilbert", tile=(1, 8, 8))


# --------------------------------------------------------------------------------------------
# end to end on the tiny pipelines
# --------------------------------------------------------------------------------------------
FOUR_FAMILIES = ["wan", "hunyuan_video", "cogvideox", "flux"]





def run(pipe, family, sparse_size=True, **kw):
    return run_latents(pipe, family, sparse_size, **kw)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", FOUR_FAMILIES)
def test_keep_everything_equals_dense_and_remove_is_bit_identical(family):
    pipe = pipe_for(family)
    ref = run(pipe, family, steps=1)
    for method, knobs in [("topk", dict(topk=1.0)), ("topk", dict(cdf=1.0)), ("xattn", dict(threshold=1.0))]:
        with ditaccel.accelerate(pipe, method, block_size=BS, **knobs) as handle:
            out = run(pipe, family, steps=1)
            stats = handle.stats()
        assert stats["mean_density"] == 1.0 and stats["dense_calls"] == 0, (method, knobs)
        assert sum(stats["counters"]["scoring"].values()) == stats["calls"]  # every call scored
        assert rel_err(out, ref) < 1e-5, (method, knobs)
    handle = ditaccel.accelerate(pipe, "topk", block_size=BS, topk=0.25)
    sparse = run(pipe, family, steps=1)
    density = handle.stats()["mean_density"]
    handle.remove()
    assert density < 1.0 and rel_err(sparse, ref) > 1e-3  # a real selection changes the result
    assert torch.equal(run(pipe, family, steps=1), ref)


@pytest.mark.parametrize("method,knobs", [("topk", dict(topk=0.3)), ("xattn", dict(threshold=0.6, stride=16))])
def test_refresh_counts_in_a_pipeline(method, knobs):
    pipe = pipe_for("wan")
    with ditaccel.accelerate(pipe, method, block_size=BS, refresh=2, dense_steps=1, **knobs) as handle:
        run(pipe, "wan", steps=6, cfg=True)
        stats = handle.stats()
    calls_per_step = {s: v["calls"] for s, v in stats["steps"].items()}
    assert stats["counters"]["scoring"] == {s: calls_per_step[s] for s in (1, 3, 5)}
    assert stats["cache"]["peak_bytes"] > 0  # reused selections are held (and accounted) between refreshes


def test_skip_set_grows_in_a_pipeline(monkeypatch):
    """Instrumented through ctx.state: per (layer, branch), every step's skip set holds the last one's."""
    seen = {}
    original = DynamicMethod.plan_for

    def recording(self, ctx, q, k):
        plan = original(self, ctx, q, k)
        nv = self.video_blocks_for(ctx.shape, q.device).num_blocks
        seen.setdefault((ctx.layer, ctx.branch), []).append((ctx.step, skip_set(ctx.state, nv), plan))
        return plan

    monkeypatch.setattr(DynamicMethod, "plan_for", recording)
    pipe = pipe_for("wan")
    with ditaccel.accelerate(pipe, "topk", block_size=BS, topk=1.0, skip_threshold=0.08, dense_steps=1):
        run(pipe, "wan", steps=5, cfg=True)
    assert len(seen) == 4  # 2 layers x 2 branches
    grew = 0
    for records in seen.values():
        assert [s for s, _, _ in records] == [1, 2, 3, 4]
        for (_, before, _), (_, after, plan) in zip(records, records[1:]):
            assert torch.equal(after & before, before)
            assert not (plan.any_blocks[..., :6, :6] & after).any()  # skipped blocks are never computed
            grew += int(after.sum() > before.sum())
    assert grew > 0  # the threshold did skip blocks, after the first step too


@pytest.mark.parametrize("method,knobs", [
    ("topk", dict(topk=0.6, refresh=2, skip_threshold=0.15)),
    ("xattn", dict(threshold=0.95, refresh=2, skip_threshold=0.1)),
])
def test_two_calls_in_a_row_are_identical(method, knobs):
    pipe = pipe_for("cogvideox")
    with ditaccel.accelerate(pipe, method, block_size=BS, dense_steps=1, **knobs) as handle:
        first = run(pipe, "cogvideox", steps=4, cfg=True)
        second = run(pipe, "cogvideox", steps=4, cfg=True)
        assert handle.stats()["mean_density"] < 1.0
    assert torch.equal(first, second)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_new_resolution_uses_no_stale_selection(family):
    """Size A then size B (same token and block counts, transposed grid): A's selection and skip set
    would fit B's plan, so reusing them would go unnoticed but for the output. The skip threshold is
    high enough that skips decide what is kept (topk alone would keep everything)."""
    pipe = pipe_for(family)
    size_a = SPARSE_SIZE[family]
    size_b = dict(size_a, height=size_a["width"], width=size_a["height"])
    knobs = dict(block_size=BS, topk=1.0, refresh=100, skip_threshold=0.15)
    with ditaccel.accelerate(pipe, "topk", **knobs) as handle:
        run(pipe, family, sparse_size=False, steps=2, **size_a)
        handle.reset_stats()
        second = run(pipe, family, sparse_size=False, steps=2, **size_b)
        assert set(handle.stats()["counters"]["scoring"]) == {0}  # B scored afresh at its first step
    with ditaccel.accelerate(pipe, "topk", **knobs):
        fresh = run(pipe, family, sparse_size=False, steps=2, **size_b)
    assert torch.equal(second, fresh)


def test_accelerate_rejects_bad_dynamic_config_and_leaves_pipeline_untouched():
    pipe = pipe_for("wan")
    ref = run(pipe, "wan", sparse_size=False, steps=1)
    with pytest.raises(ValueError, match=r"XAttnConfig\.stride"):
        ditaccel.accelerate(pipe, "xattn", stride=5)
    with pytest.raises(ValueError, match=r"TopKConfig\.topk"):
        ditaccel.accelerate(pipe, "topk", topk=2.0)
    assert torch.equal(run(pipe, "wan", sparse_size=False, steps=1), ref)
