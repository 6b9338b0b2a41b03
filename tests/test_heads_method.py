"""heads: per-head patterns chosen by profiling (ditaccel/methods/heads.py).

Block maps against brute-force maps built from token sets; hand-built heads that are purely
spatial / temporal / diagonal / multi-diagonal / vertical-stripe get that pattern; the plan run
through the kernel equals token-masked attention computed here; refresh and shape changes;
config validation; end to end on the tiny pipelines.
"""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from ditaccel.kernels import run_plan
from ditaccel.layout import VIDEO, build_layout
from ditaccel.methods.base import CallShape
from ditaccel.methods.heads import (
    CHOICE_KEY, PATTERNS, PATTERNS_KEY, PLAN_KEY, HeadsConfig, HeadsMethod, fixed_pattern_maps, profile_heads,
    stripe_maps,
)
from ditaccel.state import CallContext, StateStore


# --- brute force ---------------------------------------------------------------------------------

def block_token_sets(layout):
    """Per block: the (t, h, w) of its video tokens (empty for text / padding blocks)."""
    bs = layout.block_size
    sets = [[] for _ in range(layout.num_blocks)]
    for slot in range(layout.num_slots):
        if int(layout.kind[slot]) == VIDEO:
            sets[slot // bs].append(tuple(int(c) for c in layout.coords[slot]))
    return sets


def brute_map(layout, related):
    """[nb, nb]: block j kept for block i iff some video token pair (a in i, b in j) is ``related``."""
    sets = block_token_sets(layout)
    nb = layout.num_blocks
    keep = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(nb):
        for j in range(nb):
            keep[i, j] = any(related(a, b) for a in sets[i] for b in sets[j])
    return keep


def brute_maps(grid, text_len, text_position, order, tile, bs, spatial_frames, width):
    base = build_layout(grid, text_len, text_position, order, tile, bs)
    trans = build_layout(grid, text_len, text_position, "transpose", tile, bs)
    n_tw = -(-grid[2] // tile[2])
    tile_id = lambda c: (c[1] // tile[1]) * n_tw + c[2] // tile[2]  # noqa: E731
    sets = block_token_sets(base)
    video = torch.tensor([bool(s) for s in sets])
    idx = torch.arange(base.num_blocks)
    return base, trans, {
        "spatial": brute_map(base, lambda a, b: abs(a[0] - b[0]) <= spatial_frames),
        "temporal": brute_map(trans, lambda a, b: a[1:] == b[1:]),
        "diagonal": ((idx[:, None] - idx[None, :]).abs() <= width) & video[:, None] & video[None, :],
        "multi_diagonal": brute_map(base, lambda a, b: abs(tile_id(a) - tile_id(b)) <= width),
        "dense": video[:, None] & video[None, :],
    }


MAP_CASES = [  # grid, text_len, text_position, order, tile, block_size, spatial_frames, width
    ((3, 8, 16), 0, "none", "tile", (1, 8, 8), 64, 0, 0),
    ((3, 8, 16), 8, "prefix", "tile", (1, 8, 8), 64, 1, 1),
    ((5, 6, 10), 7, "suffix", "tile", (4, 4, 4), 64, 1, 1),  # ragged tiles, blocks spanning frames
    ((4, 5, 9), 5, "prefix", "hilbert", (2, 4, 8), 64, 0, 2),
    ((3, 6, 7), 0, "none", "raster", (1, 8, 8), 64, 2, 1),
    ((1, 16, 24), 8, "prefix", "tile", (1, 8, 16), 128, 0, 1),  # an image
]


@pytest.mark.parametrize("grid,text_len,text_position,order,tile,bs,spatial_frames,width", MAP_CASES)
def test_pattern_maps_equal_brute_force(grid, text_len, text_position, order, tile, bs, spatial_frames, width):
    base, trans, expected = brute_maps(grid, text_len, text_position, order, tile, bs, spatial_frames, width)
    cfg = HeadsConfig(block_size=bs, order=order, tile=tile, spatial_frames=spatial_frames, diagonal_width=width)
    maps = fixed_pattern_maps(base, trans, cfg, tile, "cpu")
    for name, want in expected.items():
        assert torch.equal(maps[name], want), name
    # Vertical stripes: the diagonal band plus the listed key blocks for every video query block.
    video = expected["dense"].any(1)
    video_ids = torch.nonzero(video).squeeze(1)
    stripes = torch.stack([video_ids[:2], video_ids[-2:]])
    got = stripe_maps(maps["diagonal"], stripes)
    for h in range(2):
        want = expected["diagonal"].clone()
        for j in stripes[h].tolist():
            want[video, j] = True
        assert torch.equal(got[h], want)


def test_patterns_are_sparse_where_they_should_be():
    """On a grid of several blocks per frame every non-dense pattern leaves blocks out."""
    grid, tile = (4, 16, 16), (1, 8, 8)
    base = build_layout(grid, 0, "none", "tile", tile, 64)
    trans = build_layout(grid, 0, "none", "transpose", tile, 64)
    maps = fixed_pattern_maps(base, trans, HeadsConfig(block_size=64), tile, "cpu")
    dense = int(maps["dense"].sum())
    for name in ("spatial", "temporal", "diagonal", "multi_diagonal"):
        assert 0 < int(maps[name].sum()) < dense, name


# --- hand-built heads ----------------------------------------------------------------------------

GRID, TILE, BS, TEXT = (4, 8, 16), (1, 8, 8), 64, 8  # 8 video blocks, 2 per frame; text prefix block
SINK_BLOCK = 5  # tile-order block the vertical-stripe head attends to


def hand_built_qkv(gain=30.0, seed=0):
    """Five heads whose attention is, by construction, one pattern each (to within e^-gain):
    0 spatial (own frame), 1 temporal (own spatial position), 2 diagonal (own tile-order block),
    3 multi-diagonal (own spatial tile, every frame), 4 vertical stripe (one key block)."""
    T, H, W = GRID
    n = T * H * W
    layout = build_layout(GRID, TEXT, "prefix", "tile", TILE, BS)
    first_video_slot = int(torch.nonzero(layout.kind == VIDEO)[0])
    video_slot = layout.inverse[TEXT:] - first_video_slot  # raster token -> its place among video slots
    t = torch.arange(n) // (H * W)
    pos = torch.arange(n) % (H * W)
    tile_id = (pos // W // TILE[1]) * (W // TILE[2]) + (pos % W) // TILE[2]
    block = video_slot // BS
    D = H * W
    q = torch.zeros(1, TEXT + n, 5, D)
    k = torch.zeros(1, TEXT + n, 5, D)
    onehot = lambda ids: torch.nn.functional.one_hot(ids, D).float()  # noqa: E731
    for head, ids in enumerate((t, pos, block, tile_id)):
        q[0, TEXT:, head] = gain * onehot(ids)
        k[0, TEXT:, head] = onehot(ids)
    q[0, TEXT:, 4, 0] = gain
    k[0, TEXT:, 4, 0] = (block == SINK_BLOCK).float()
    v = torch.randn(1, TEXT + n, 5, D, generator=torch.Generator().manual_seed(seed))
    # D**-0.5 is the scale attention uses: undo it so the logit gap is ``gain``.
    return q * D**0.5, k, v


def make_ctx(store, shape, step, batch=1, heads=5, layer=0, counters=None):
    extra = {} if counters is None else {"counters": counters}
    return CallContext("transformer", layer, step, "cond", shape, batch, heads,
                       state=store.state("transformer", layer, "cond", (shape, batch, heads)), store=store, **extra)


HAND_CFG = dict(block_size=BS, tile=TILE, spatial_frames=0, diagonal_width=0, stripe_blocks=1)


@pytest.mark.parametrize("with_values", [True, False])
def test_hand_built_heads_get_their_pattern(with_values):
    q, k, v = hand_built_qkv()
    method = HeadsMethod(HeadsConfig(**HAND_CFG))
    shape = CallShape(GRID, TEXT, "prefix")
    ctx = make_ctx(StateStore(64), shape, step=0)
    plan = method.decide(ctx, q, k, v if with_values else None)
    assert ctx.state.get(PATTERNS_KEY) == ("spatial", "temporal", "diagonal", "multi_diagonal", "vertical_stripe")
    choice = ctx.state.get(CHOICE_KEY)
    assert choice.stripes[4] == (SINK_BLOCK + 1,)  # + the text block in front of the video blocks
    for head, name in enumerate(choice.patterns):
        assert choice.errors[head][PATTERNS.index(name)] < 1e-6
    assert plan is not None and plan.layout.per_head  # the temporal head runs in transpose order
    assert float(plan.density) < 0.5


def test_profile_errors_equal_masked_attention_computed_here():
    """Output error and dropped mass of every pattern on the sampled rows, against a token-level
    masked softmax built from block maps and layouts here."""
    torch.manual_seed(1)
    grid, text = (3, 8, 16), 8
    shape = CallShape(grid, text, "suffix")
    S, H, D = 3 * 8 * 16 + text, 2, 16
    q, k, v = (torch.randn(2, S, H, D) * s for s in (2.0, 1.0, 1.0))
    method = HeadsMethod(HeadsConfig(block_size=64, tile=(1, 8, 8), sample_rows=20, seed=3))
    base, trans = method.layouts(shape)
    maps = method.maps(shape, "cpu")
    rows = method.sample_rows(shape, "cpu")
    assert rows.numel() == 20 and int(rows.max()) < 384  # video rows (the text is a suffix)
    err_out, stripes, _ = profile_heads(q, k, v, rows, base, trans, maps, 2, maps["diagonal"])
    err_mass, _, _ = profile_heads(q, k, None, rows, base, trans, maps, 2, maps["diagonal"])
    text_blocks = torch.tensor([bool((base.kind[b * 64:(b + 1) * 64] == 1).any()) for b in range(base.num_blocks)])
    logits = torch.einsum("brhd,bshd->bhrs", q[:, rows], k) / D**0.5
    probs = logits.softmax(-1)
    dense = torch.einsum("bhrs,bshd->bhrd", probs, v)
    for p, name in enumerate(PATTERNS):
        layout = trans if name == "temporal" else base
        for h in range(H):
            m = stripe_maps(maps["diagonal"], stripes)[h] if name == "vertical_stripe" else maps[name]
            m = m | text_blocks[None, :]
            blk = layout.inverse // 64
            allowed = m[blk[rows]][:, blk]
            out = torch.einsum("brs,bsd->brd", logits[:, h].masked_fill(~allowed, -torch.inf).softmax(-1), v[:, :, h])
            want = (out - dense[:, h]).norm() / dense[:, h].norm()
            assert abs(float(err_out[h, p]) - float(want)) < 1e-5, (name, h)
            mass = 1 - (probs[:, h] * allowed).sum(-1).mean()  # the dropped mass, computed another way
            assert abs(float(err_mass[h, p]) - float(mass)) < 1e-5, (name, h)
    assert float(err_out[:, PATTERNS.index("dense")].abs().max()) == 0.0


def test_plan_equals_token_masked_attention():
    """The plan of the hand-built heads, run through layout + kernel, equals attention masked token
    by token with each head's pattern in that head's own order (temporal: transpose)."""
    q, k, v = hand_built_qkv(gain=2.0)  # soft attention: dropped blocks matter
    cfg = HeadsConfig(tolerance=10.0, **HAND_CFG)  # tolerance: the cheapest pattern wins outright
    method = HeadsMethod(cfg)
    shape = CallShape(GRID, TEXT, "prefix")
    ctx = make_ctx(StateStore(64), shape, step=0)
    forced = ("spatial", "temporal", "diagonal", "multi_diagonal", "vertical_stripe")
    choice = method.profile(ctx, q, k, v)
    choice = type(choice)(**{**choice.__dict__, "patterns": forced})
    plan = method.plan_from_choice(shape, choice, "cpu")
    layout = plan.layout
    qs, ks, vs = (layout.to_slots(x, dim=1).transpose(1, 2) for x in (q, k, v))
    out = layout.from_slots(run_plan("reference", qs, ks, vs, plan.block_mask).transpose(1, 2), dim=1)

    base, trans = method.layouts(shape)
    maps = method.maps(shape, "cpu")
    text_blocks = torch.zeros(base.num_blocks, dtype=torch.bool)
    text_blocks[0] = True
    D = q.shape[-1]
    for h, name in enumerate(forced):
        lay = trans if name == "temporal" else base
        m = maps[name] if name != "vertical_stripe" else stripe_maps(
            maps["diagonal"], torch.tensor(choice.stripes))[h]
        blk = lay.inverse // BS
        allowed = (m | text_blocks[None, :] | text_blocks[:, None])[blk][:, blk]
        logits = (q[0, :, h] @ k[0, :, h].T) / D**0.5
        want = logits.masked_fill(~allowed, -torch.inf).softmax(-1) @ v[0, :, h]
        assert torch.allclose(out[0, :, h], want, atol=1e-5, rtol=1e-4), name


def test_tolerance_zero_gives_dense():
    q, k, v = hand_built_qkv(gain=2.0)
    method = HeadsMethod(HeadsConfig(tolerance=0.0, **HAND_CFG))
    ctx = make_ctx(StateStore(64), CallShape(GRID, TEXT, "prefix"), step=0)
    assert method.decide(ctx, q, k, v) is None  # every head dense: the model's own attention runs
    assert ctx.state.get(PATTERNS_KEY) == ("dense",) * 5


# --- across steps --------------------------------------------------------------------------------

def test_refresh_profiles_exactly_at_refresh_steps():
    q, k, v = hand_built_qkv()
    method = HeadsMethod(HeadsConfig(dense_steps=2, refresh=3, **HAND_CFG))
    shape = CallShape(GRID, TEXT, "prefix")
    store, counters = StateStore(64), defaultdict(int)
    plans = {}
    for step in range(10):
        noise = torch.randn(q.shape, generator=torch.Generator().manual_seed(step))  # q/k change every step
        ctx = make_ctx(store, shape, step, counters=counters)
        plans[step] = method.decide(ctx, q + noise, k, v)
    profiled = sorted(s for (name, _, s), n in counters.items() if name == "profiling" and n)
    assert profiled == [2, 5, 8]
    assert all(counters[("profiling", "transformer", s)] == 1 for s in profiled)
    assert plans[0] is None and plans[1] is None  # dense_steps
    assert plans[3] is plans[2] and plans[4] is plans[2]  # reused between refreshes
    assert store.bytes > 0  # the stored plan's tensors are accounted


def test_plan_refused_by_budget_is_rebuilt_without_profiling():
    q, k, v = hand_built_qkv()
    method = HeadsMethod(HeadsConfig(refresh=5, cache_budget_mb=0.0, **HAND_CFG))
    shape = CallShape(GRID, TEXT, "prefix")
    store, counters = StateStore(0.0), defaultdict(int)
    first = method.decide(make_ctx(store, shape, 0, counters=counters), q, k, v)
    second = method.decide(make_ctx(store, shape, 1, counters=counters), q, k, v)
    assert store.bytes == 0 and store.refused >= 2
    assert PLAN_KEY not in store.state("transformer", 0, "cond", (shape, 1, 5))
    assert counters[("profiling", "transformer", 1)] == 0
    assert second is not first and torch.equal(second.any_blocks, first.any_blocks)


def test_new_shape_is_profiled_again():
    method = HeadsMethod(HeadsConfig(refresh=100, **HAND_CFG))
    store, counters = StateStore(64), defaultdict(int)
    q, k, v = hand_built_qkv()
    shape_a = CallShape(GRID, TEXT, "prefix")
    plan_a = method.decide(make_ctx(store, shape_a, 0, counters=counters), q, k, v)
    shape_b = CallShape((2, 8, 16), TEXT, "prefix")
    n_b = TEXT + 2 * 8 * 16
    torch.manual_seed(0)
    qb, kb, vb = (torch.randn(1, n_b, 5, q.shape[-1]) for _ in range(3))
    plan_b = method.decide(make_ctx(store, shape_b, 1, counters=counters), qb, kb, vb)
    assert counters[("profiling", "transformer", 1)] == 1
    assert store.state("transformer", 0, "cond", (shape_b, 1, 5)).get(CHOICE_KEY).shape == shape_b
    assert plan_b is None or plan_b.layout.grid == (2, 8, 16)
    assert plan_a.layout.grid == GRID


# --- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("tolerance", -0.1), ("tolerance", "low"), ("sample_rows", 0), ("refresh", 0), ("spatial_frames", -1),
    ("diagonal_width", -1), ("stripe_blocks", 0), ("order", "zigzag"), ("tile", (2, 2, 2)), ("seed", -1),
    ("block_size", 96),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"HeadsConfig\.{field}"):
        HeadsConfig(**{field: value})


def test_registered():
    from ditaccel.methods import REGISTRY, config_class

    assert config_class("heads") is HeadsConfig and REGISTRY["heads"][1] is HeadsMethod


# --- end to end on the tiny pipelines ----------------------------------------------------------

E2E_FAMILIES = ["wan", "hunyuan_video", "cogvideox", "flux"]
# Two grids of several 64-token blocks per family, kept small for speed: video (2, 8, 16) and
# (2, 8, 8), image (1, 16, 16) and (1, 8, 16).
SIZE_A = {fam: dict(height=128, width=256, num_frames=5) for fam in E2E_FAMILIES}
SIZE_A["flux"] = dict(height=256, width=256)
SIZE_B = {fam: dict(height=128, width=128, num_frames=5) for fam in E2E_FAMILIES}
SIZE_B["flux"] = dict(height=128, width=256)
# tolerance=1.0: the cheapest pattern wins almost surely, so something is left out on these grids.
E2E_CFG = dict(block_size=64, tile=(1, 8, 8), tolerance=1.0, refresh=2, sample_rows=32, dense_steps=0)
_PIPES: dict = {}


def run_pipe(family, size, steps=3):
    from tiny_pipelines import FAMILIES, call_kwargs

    if family not in _PIPES:
        _PIPES[family] = FAMILIES[family](seed=0)
    pipe = _PIPES[family]
    out = pipe(**call_kwargs(family, pipe, output_type="latent", steps=steps, **size))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def pattern_recorder(handle, seen):
    """An observer that reads each site's stored choice (the state as the method left it last step)."""
    def observe(info, q, k, v):
        shape = CallShape(info["grid"], info["text_len"], info["text_position"])
        state = handle.store.peek(info["transformer"], info["layer"], info["branch"], (shape, q.shape[0], q.shape[2]))
        if state is not None and state.get(PATTERNS_KEY) is not None:
            seen[(info["transformer"], info["layer"], info["branch"], info["step"])] = state.get(PATTERNS_KEY)
    return observe


@pytest.mark.parametrize("family", E2E_FAMILIES)
def test_pipeline_runs_repeats_and_removes(family):
    """Sparse, profiled at the refresh steps, identical across calls with another resolution in
    between (no stale choice), equal to a fresh wrap at that resolution, and gone after remove()."""
    import ditaccel

    size_a, size_b = SIZE_A[family], SIZE_B[family]
    ref = run_pipe(family, size_a)
    seen = {}
    handle = ditaccel.accelerate(_PIPES[family], "heads", **E2E_CFG)
    try:
        handle.observe(pattern_recorder(handle, seen))
        first = run_pipe(family, size_a)
        stats = handle.stats()
        handle.reset_stats()
        other = run_pipe(family, size_b, steps=2)
        again = run_pipe(family, size_a)
    finally:
        handle.remove()
    after = run_pipe(family, size_a)
    with ditaccel.accelerate(_PIPES[family], "heads", **E2E_CFG):
        fresh_other = run_pipe(family, size_b, steps=2)

    assert torch.isfinite(first).all() and torch.isfinite(other).all()
    assert torch.equal(first, again)
    assert torch.equal(other, fresh_other)
    assert torch.equal(after, ref)
    assert not torch.equal(first, ref)
    assert max(s["density"] for s in stats["steps"].values()) < 1.0
    calls_per_step = {s: v["calls"] for s, v in stats["steps"].items()}
    assert stats["counters"]["profiling"] == {0: calls_per_step[0], 2: calls_per_step[2]}  # refresh=2
    assert seen and all(len(p) == 2 and set(p) <= set(PATTERNS) for p in seen.values())  # 2 heads per layer
    reported = stats["reports"]["heads.patterns"]  # outlives the call's state, unlike ctx.state
    assert set(reported) == {f"{t}.{layer}.{b}" for (t, layer, _, b) in
                             ((c["transformer"], c["layer"], c["step"], c["branch"]) for c in stats["per_layer_step"])}
    assert all(len(p) == 2 and set(p) <= set(PATTERNS) for p in reported.values())


@pytest.mark.parametrize("family", E2E_FAMILIES)
def test_pipeline_tolerance_zero_is_dense(family):
    import ditaccel

    ref = run_pipe(family, SIZE_A[family], steps=2)
    with ditaccel.accelerate(_PIPES[family], "heads", **{**E2E_CFG, "tolerance": 0.0}) as handle:
        out = run_pipe(family, SIZE_A[family], steps=2)
        stats = handle.stats()
    assert stats["dense_calls"] == stats["calls"] > 0
    assert sum(stats["counters"]["profiling"].values()) > 0
    assert torch.equal(out, ref)
