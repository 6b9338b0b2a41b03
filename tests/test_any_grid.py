"""Any resolution and frame count: windows and tiles larger than the grid cover that axis (noted in
``stats()``), never a call-time error; images (T = 1) and single-frame video work for every method."""

from __future__ import annotations

import pytest
import torch
from test_plans import natten_neighbours, plan_token_mask, tile_neighbours, token_mask
from tiny_pipelines import call_kwargs, pipe_for

import ditaccel
from ditaccel.methods import METHODS, TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield



def run(pipe, family, steps=2, **kw):
    out = pipe(**call_kwargs(family, pipe, steps=steps, output_type="latent", **kw))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def covering_window_rule(grid, kernel, dilation):
    """NATTEN's window per axis; an axis the window over-spans (kernel * dilation > grid) is whole."""
    def sees(a, i):
        n, k, d = grid[a], kernel[a], dilation[a]
        return set(range(n)) if k * d > n else natten_neighbours(i, n, k, d)

    tables = [[sees(a, i) for i in range(grid[a])] for a in range(3)]
    return lambda q, k: all(k[a] in tables[a][q[a]] for a in range(3))


@pytest.mark.parametrize("grid,kernel,dilation", [
    ((1, 7, 9), (3, 3, 3), (1, 1, 1)),  # an image: t over-spanned
    ((2, 5, 6), (3, 9, 3), (1, 1, 1)),  # h over-spanned, t too
    ((4, 3, 11), (3, 3, 5), (1, 2, 3)),  # h by dilation, w by dilation, t fits
    ((3, 8, 4), (5, 3, 9), (1, 3, 1)),  # t and w over-spanned, h dilated and fitting
])
def test_window_larger_than_grid_equals_covered_axes(grid, kernel, dilation):
    method = make_method(WindowConfig(kernel_size=kernel, dilation=dilation, block_size=64))
    plan = method.plan(CallShape(grid, 3, "prefix"), "cpu")
    assert torch.equal(plan_token_mask(plan), token_mask(grid, 3, "prefix", covering_window_rule(grid, kernel, dilation)))
    over = [a for a, k, d, g in zip("thw", kernel, dilation, grid) if k * d > g]
    assert over and all(any(f"kernel_size[{a}]" in n for n in method.notes) for a in over)


@pytest.mark.parametrize("grid,tile,window", [
    ((3, 4, 5), (1, 1, 64), (3, 3, 3)),  # tile over-spans w, window over-spans t
    ((2, 9, 3), (64, 1, 1), (1, 3, 1)),
    ((5, 6, 7), (1, 8, 8), (9, 1, 3)),
])
def test_tile_larger_than_grid_equals_cut_tile(grid, tile, window):
    method = make_method(TileConfig(tile=tile, window=window, block_size=64))
    plan = method.plan(CallShape(grid, 0, "none"), "cpu")
    cut = tuple(min(t, g) for t, g in zip(tile, grid))
    n_tiles = [-(-g // t) for g, t in zip(grid, cut)]

    def rule(q, k):
        return all((k[a] // cut[a]) in tile_neighbours(q[a] // cut[a], n_tiles[a], window[a]) for a in range(3))

    assert torch.equal(plan_token_mask(plan), token_mask(grid, 0, "none", rule))
    assert method.notes


def test_default_window_on_a_small_grid_equals_dense():
    """The issue's case: WindowConfig's default (3, 9, 9) on a (3, 4, 5) grid raised at the first call."""
    pipe = pipe_for("wan")
    ref = run(pipe, "wan")
    with ditaccel.accelerate(pipe, "window", block_size=64) as handle:
        out = run(pipe, "wan")
        notes = handle.stats()["notes"]
    assert rel_err(out, ref) < 1e-5
    assert any("kernel_size[h]" in n for n in notes) and any("kernel_size[w]" in n for n in notes)


def test_hunyuan_tile_1_1_128_runs():
    """The issue's case: tile=(1, 1, 128) on HunyuanVideo; with a window covering the rest, dense."""
    pipe = pipe_for("hunyuan_video")
    ref = run(pipe, "hunyuan_video")
    with ditaccel.accelerate(pipe, "tile", tile=(1, 1, 128), window=(3, 9, 3)) as handle:
        out = run(pipe, "hunyuan_video")
        assert any("tile=(1, 1, 128)" in n for n in handle.stats()["notes"])
    assert rel_err(out, ref) < 1e-5
    with ditaccel.accelerate(pipe, "tile", tile=(1, 1, 128), window=(1, 1, 1), dense_steps=1):
        assert torch.isfinite(run(pipe, "hunyuan_video")).all()
    assert torch.equal(run(pipe, "hunyuan_video"), ref)


@pytest.mark.parametrize("family,size", [("wan", dict(num_frames=1)), ("flux", {})])
def test_every_method_on_one_frame(family, size):
    pipe = pipe_for(family)
    ref = run(pipe, family, **size)
    for method in METHODS:
        with ditaccel.accelerate(pipe, method, block_size=64) as handle:
            out = run(pipe, family, **size)
            stats = handle.stats()
        assert torch.isfinite(out).all(), method
        assert stats["calls"] > 0, method
        if method == "dense":
            assert rel_err(out, ref) < 1e-5
    assert torch.equal(run(pipe, family, **size), ref)
