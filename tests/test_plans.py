"""Plans equal a brute-force token-level mask built here, independently of ditaccel's predicates.

The brute force works in the model's own token order with plain Python on coordinates; the plan
is expanded back to tokens through its BlockMask (full blocks all-true, partial blocks through
``mask_mod``, absent blocks all-false) and the layout's inverse permutation.
"""

from __future__ import annotations

import math

import pytest
import torch

from ditaccel.kernels.reference import block_sparse_attention_reference
from ditaccel.methods import RadialConfig, TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape, auto_tile


def video_coords(grid):
    T, H, W = grid
    return [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]


def natten_neighbours(i: int, n: int, k: int, d: int) -> set[int]:
    """Positions a query at ``i`` sees on an axis of ``n``: k members of its residue class mod d,
    as centred on ``i`` as the axis ends allow."""
    group = list(range(i % d, n, d))
    pos = group.index(i)
    start = min(max(pos - k // 2, 0), len(group) - k)
    return set(group[start:start + k])


def tile_neighbours(tile_idx: int, n_tiles: int, w: int) -> set[int]:
    start = min(max(tile_idx - w // 2, 0), max(n_tiles - w, 0))
    return set(range(start, min(start + w, n_tiles)))


def token_mask(grid, text_len, text_position, video_rule):
    """[S, S] bool in the model's token order; text rows and columns dense."""
    coords = video_coords(grid)
    n = len(coords)
    S = n + text_len
    video_offset = text_len if text_position == "prefix" else 0
    mask = torch.ones(S, S, dtype=torch.bool)
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            mask[video_offset + i, video_offset + j] = video_rule(a, b)
    return mask


def window_rule(grid, kernel, dilation):
    tables = [[natten_neighbours(i, grid[a], kernel[a], dilation[a]) for i in range(grid[a])] for a in range(3)]
    return lambda q, k: all(k[a] in tables[a][q[a]] for a in range(3))


def tile_rule(grid, tile, window):
    n_tiles = [math.ceil(g / t) for g, t in zip(grid, tile)]
    return lambda q, k: all(
        (k[a] // tile[a]) in tile_neighbours(q[a] // tile[a], n_tiles[a], window[a]) for a in range(3)
    )


def plan_token_mask(plan) -> torch.Tensor:
    """Expand a plan's BlockMask to a token mask in the model's order (what the kernel computes)."""
    bm = plan.block_mask
    layout = plan.layout
    n, bs = layout.num_slots, layout.block_size
    slots = torch.zeros(n, n, dtype=torch.bool)
    for num, idx, partial in ((bm.full_kv_num_blocks, bm.full_kv_indices, False), (bm.kv_num_blocks, bm.kv_indices, True)):
        for qb in range(num.shape[-1]):
            for kb in idx[0, 0, qb, : int(num[0, 0, qb])].tolist():
                q0, k0 = qb * bs, kb * bs
                q1, k1 = min(q0 + bs, n), min(k0 + bs, n)
                if partial:
                    qi = torch.arange(q0, q1)[:, None]
                    ki = torch.arange(k0, k1)[None, :]
                    slots[q0:q1, k0:k1] = bm.mask_mod(torch.tensor(0), torch.tensor(0), qi, ki)
                else:
                    slots[q0:q1, k0:k1] = True
    inv = layout.inverse
    return slots[inv][:, inv]


GRIDS_3D = [(5, 7, 9), (3, 4, 6), (4, 8, 8)]
TEXT = [(0, "none"), (5, "prefix"), (70, "suffix")]


WINDOWS = [((3, 3, 3), (1, 1, 1), "tile"), ((1, 3, 5), (1, 2, 1), "raster"), ((3, 3, 3), (1, 1, 2), "tile")]
WINDOW_CASES = [  # every (grid, window) pair whose kernel x dilation fits the grid
    (grid, *w) for grid in GRIDS_3D for w in WINDOWS if all(k * d <= g for k, d, g in zip(w[0], w[1], grid))
]


@pytest.mark.parametrize("grid,kernel,dilation,order", WINDOW_CASES)
@pytest.mark.parametrize("text_len,text_position", TEXT)
def test_window_plan_equals_brute_force(grid, kernel, dilation, order, text_len, text_position):
    cfg = WindowConfig(kernel_size=kernel, dilation=dilation, order=order, block_size=64)
    plan = make_method(cfg).plan(CallShape(grid, text_len, text_position), "cpu")
    expected = token_mask(grid, text_len, text_position, window_rule(grid, kernel, dilation))
    assert torch.equal(plan_token_mask(plan), expected)
    assert 0 < plan.density <= 1


@pytest.mark.parametrize("grid", GRIDS_3D)
@pytest.mark.parametrize("text_len,text_position", TEXT)
@pytest.mark.parametrize("window", [(1, 1, 1), (3, 3, 3), (1, 3, 5)])
def test_tile_plan_equals_brute_force(grid, text_len, text_position, window):
    cfg = TileConfig(tile=(1, 4, 16), window=window, block_size=64)
    plan = make_method(cfg).plan(CallShape(grid, text_len, text_position), "cpu")
    expected = token_mask(grid, text_len, text_position, tile_rule(grid, (1, 4, 16), window))
    assert torch.equal(plan_token_mask(plan), expected)


@pytest.mark.parametrize("text_len,text_position", [(0, "none"), (9, "prefix")])
def test_2d_plans_equal_brute_force(text_len, text_position):
    grid = (1, 7, 9)  # an image model: one frame
    w = make_method(WindowConfig(kernel_size=(3, 5), block_size=64)).plan(CallShape(grid, text_len, text_position), "cpu")
    assert torch.equal(plan_token_mask(w), token_mask(grid, text_len, text_position, window_rule(grid, (1, 3, 5), (1, 1, 1))))
    t = make_method(TileConfig(window=(1, 3, 3), block_size=64)).plan(CallShape(grid, text_len, text_position), "cpu")
    tile = auto_tile(grid, 64)
    assert tile[0] == 1
    assert torch.equal(plan_token_mask(t), token_mask(grid, text_len, text_position, tile_rule(grid, tile, (1, 3, 3))))


def test_tile_plan_has_no_partial_blocks_on_tile_multiples():
    plan = make_method(TileConfig(tile=(2, 4, 8), window=(1, 3, 3), block_size=64)).plan(CallShape((4, 8, 16), 0, "none"), "cpu")
    assert int(plan.block_mask.kv_num_blocks.sum()) == 0
    assert int(plan.block_mask.full_kv_num_blocks.sum()) > 0


@pytest.mark.parametrize("method_cfg", [
    WindowConfig(kernel_size=(3, 3, 5), dilation=(1, 2, 1), block_size=64),
    TileConfig(tile=(1, 4, 16), window=(1, 3, 3), block_size=64),
    RadialConfig(tile=(1, 4, 16), block_size=64),
])
@pytest.mark.parametrize("text_len,text_position", TEXT)
def test_plan_attention_equals_masked_sdpa(method_cfg, text_len, text_position):
    """Permute, run the reference on the plan, un-permute: equals SDPA with the brute-force mask."""
    grid = (5, 7, 9)
    plan = make_method(method_cfg).plan(CallShape(grid, text_len, text_position), "cpu")
    layout = plan.layout
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, layout.seq_len, 3, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    out = block_sparse_attention_reference(*(layout.to_slots(x, 1).transpose(1, 2) for x in (q, k, v)), plan.block_mask)
    out = layout.from_slots(out.transpose(1, 2), 1)
    mask = plan_token_mask(plan)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
