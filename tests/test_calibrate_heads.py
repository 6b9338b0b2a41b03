"""Sparse VideoGen's head patterns among the default candidates: spatial heads (the whole frame) and
temporal heads (the same place in every frame), sized to any grid ("all" axes) and picked by the
profile + search for heads that really are spatial or temporal."""

from __future__ import annotations

import pytest
import torch

from ditaccel.calibration import DEFAULT_CANDIDATES, EXTENDED_CANDIDATES, make_candidates
from ditaccel.calibration.profile import Profile, Profiler, step_ranges
from ditaccel.calibration.search import select, to_rules
from ditaccel.methods import CallShape, TableConfig, make_method
from ditaccel.state import CallContext, StateStore

SPATIAL = "tile:window=(1, 'all', 'all')"
TEMPORAL = "tile:window=('all', 1, 1)"


def coords(grid):
    t, h, w = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    return t.flatten(), h.flatten(), w.flatten()


def token_allowed(plan) -> torch.Tensor:
    slot = plan.layout.inverse
    return plan.slot_allowed(slot[:, None], slot[None, :])


@pytest.mark.parametrize("grid", [(5, 18, 24), (4, 16, 32), (3, 7, 9), (2, 8, 16)])
def test_whole_axis_candidates_cover_the_frame_or_the_time_on_any_grid(grid):
    """Sized at the grid, the spatial window is exactly 'same frame' and the temporal one exactly 'same
    tile of any frame' (brute force from the token coordinates); the token-exact window twin too."""
    cands = {c.name: c for c in make_candidates(
        [SPATIAL, TEMPORAL, "window:kernel_size=(1,all,all)", "window:kernel_size=('all',1,1)"])}
    t, h, w = coords(grid)
    tile = (1, 8, 8)
    same_frame = t[:, None] == t[None, :]
    same_tile = ((h // tile[1])[:, None] == (h // tile[1])[None, :]) & ((w // tile[2])[:, None] == (w // tile[2])[None, :])
    same_place = (h[:, None] == h[None, :]) & (w[:, None] == w[None, :])
    shape = CallShape(grid, 0, "none")
    for name, want in ((SPATIAL, same_frame), (TEMPORAL, same_tile),
                       ("window:kernel_size=(1, 'all', 'all')", same_frame),
                       ("window:kernel_size=('all', 1, 1)", same_place)):
        resolved = cands[name].at_grid(grid)
        sizes = resolved.config.window if resolved.use == "tile" else resolved.config.kernel_size
        assert all(isinstance(x, int) and x % 2 == 1 for x in sizes)
        got = token_allowed(make_method(resolved.config).plan(shape, "cpu"))
        assert torch.equal(got, want), (name, grid, sizes)
        assert resolved.name == name and "all" not in str(resolved.rule(layers=[0]))


@pytest.mark.parametrize("spec, match", [
    ("window:kernel_size=all", r"window\.kernel_size='all'.*\(t, h, w\)"),
    ("tile:window=(all,all,all)", r"tile\.window=\('all', 'all', 'all'\).*one or two axes"),
    ("window:dilation=(1,all,1)", r"window\.dilation=.*allowed only in an axis of window\.kernel_size, tile\.window"),
    ("xattn:threshold=all", r"xattn\.threshold='all'"),
    ("window:kernel_size=(all,3,3),dilation=(2,1,1)", r"dilation=\(2, 1, 1\).*dilation 1"),
    ("tile:window=(1,all,4)", r"candidates\[1\].*window"),  # the other axes keep the method's own rules (odd)
    ("residual:share", r"residual corrects a method's output"),
])
def test_bad_whole_axis_and_residual_candidates_are_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        make_candidates([spec])


def _toy_heads(grid, seed=0):
    """q, k, v [1, S, 3, 64]: head 0 spatial (attends within its frame), head 1 temporal (to its own
    position in every frame), head 2 diffuse (near-uniform over all tokens)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = coords(grid)
    S, D = t.numel(), 64
    frame_code = torch.linalg.qr(torch.randn(D, D, generator=g))[0][: grid[0]]  # orthonormal per frame
    place_code = torch.nn.functional.normalize(torch.randn(grid[1] * grid[2], D, generator=g), dim=-1)
    place = h * grid[2] + w
    q, k = torch.empty(1, S, 3, D), torch.empty(1, S, 3, D)

    def noise():
        return 0.3 * torch.randn(S, D, generator=g)

    q[0, :, 0], k[0, :, 0] = 60 * frame_code[t] + noise(), frame_code[t] + noise() / 10
    q[0, :, 1], k[0, :, 1] = 400 * place_code[place], place_code[place] + noise() / 10
    q[0, :, 2], k[0, :, 2] = 0.05 * noise(), 0.05 * noise()
    v = torch.randn(1, S, 3, D, generator=g)
    return q, k, v


def test_profile_and_search_pick_the_spatial_and_temporal_candidates_for_such_heads():
    """Priced by blocks, cheapest first: the temporal head gets the temporal pattern among every candidate (the extended set);
    on the spatial head xattn (threshold 0.9) keeps the very same frame blocks (a tie at equal density and
    error, which goes to the earlier candidate), so among the static candidates the spatial pattern wins."""
    grid, steps = (4, 8, 32), 2  # 1,024 tokens, 16 blocks of 64, 4 (1, 8, 8) tiles per frame
    cands = make_candidates(["extended"], block_size=64)
    assert [c.name for c in cands] == [c.name for c in make_candidates(EXTENDED_CANDIDATES, block_size=64)]
    assert {SPATIAL, TEMPORAL} <= {c.name for c in cands}
    assert not {SPATIAL, TEMPORAL} & {c.name for c in make_candidates(DEFAULT_CANDIDATES, block_size=64)}
    profile = Profile(steps=steps, layers=1, heads=3, ranges=step_ranges(steps, 1), candidates=[c.name for c in cands])
    profiler = Profiler(profile, cands, sample_rows=256, block_size=64)
    for s in range(steps):
        q, k, v = _toy_heads(grid, seed=s)
        profiler({"layer": 0, "step": s, "branch": "cond", "grid": grid, "text_len": 0, "text_position": "none"},
                 q, k, v)
    errors = {(c.name, h): profile.error(c.name, 0, h, 0) for c in cands if c.config is not None and not c.residual
              for h in range(3)}
    assert errors[(SPATIAL, 0)] < 1e-2 and errors[(TEMPORAL, 1)] < 1e-2  # the patterns fit their heads ...
    assert errors[(SPATIAL, 1)] > 0.5 and errors[(TEMPORAL, 0)] > 0.5  # ... and not each other's
    every = select(profile, cands, 0.05, cost="blocks", min_dense_steps=0)
    assert every.attention[(0, 1, 0)] == TEMPORAL and every.attention[(0, 2, 0)] == "dense"
    assert profile.mean_density(every.attention[(0, 0, 0)], 0, 0, 0) == profile.mean_density(SPATIAL, 0, 0, 0) < 0.3
    static = [c for c in cands if c.use not in ("topk", "xattn")]
    sel = select(profile, static, 0.05, cost="blocks", min_dense_steps=0)
    assert [sel.attention[(0, h, 0)] for h in range(3)] == [SPATIAL, TEMPORAL, "dense"]
    # the table written runs those very masks on those heads
    table = TableConfig(block_size=64, backend="reference", rules=to_rules(sel, profile, static))
    store = StateStore(64)
    ctx = CallContext("transformer", 0, 0, "cond", CallShape(grid, 0, "none"), 1, 3,
                      state=store.state("transformer", 0, "cond", (grid,)), store=store, total_steps=steps)
    plan = make_method(table).decide(ctx, q, k)
    t, h, w = coords(grid)
    slot = plan.layout.inverse
    zero = torch.zeros((), dtype=torch.long)
    per_head = [plan.head_allowed(zero, torch.tensor(i), slot[:, None], slot[None, :]) for i in range(2)]
    assert torch.equal(per_head[0], t[:, None] == t[None, :])
    same_tile = ((h // 8)[:, None] == (h // 8)[None, :]) & ((w // 8)[:, None] == (w // 8)[None, :])
    assert torch.equal(per_head[1], same_tile)
