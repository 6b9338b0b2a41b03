"""Token orders and layouts: permutation and inverse permutation never leave a token misplaced.

A property test over random grids, text spans (none / prefix / suffix), block sizes, tiles and every
order (raster, tile, hilbert, transpose), with and without random per-head video permutations:
to_slots then from_slots is the identity, every token lands in exactly one slot, empty slots hold
zeros, text sits in whole blocks of its own, and each order lists the video tokens as it promises.
The Hilbert order is also checked for what makes it useful: on power-of-two cubes, consecutive
cells of the curve are grid neighbours.
"""

from __future__ import annotations

import random

import pytest
import torch

from ditaccel.config import ORDERS
from ditaccel.layout import PAD, TEXT, TEXT_POSITIONS, VIDEO, build_layout, per_head_layout, video_order

CASES_PER_COMBINATION = 25
BLOCK_SIZES = (4, 16, 64, 128)


def random_case(rng: random.Random, order: str, text_position: str) -> dict:
    grid = (rng.randint(1, 5), rng.randint(1, 13), rng.randint(1, 13))
    text_len = 0 if text_position == "none" else rng.randint(1, 40)
    tile = (rng.randint(1, 3), rng.randint(1, 5), rng.randint(1, 5))
    return dict(grid=grid, text_len=text_len, text_position=text_position, order=order, tile=tile,
                block_size=rng.choice(BLOCK_SIZES), pad_tiles=order == "tile" and rng.random() < 0.5)


def check_tiles_whole(layout, case) -> None:
    """Padded tile order: tile i owns slots [i * s, (i + 1) * s) of the video run (s = its volume
    rounded up to the block), real tokens first, so no block holds two tiles."""
    grid, tile, bs = case["grid"], case["tile"], case["block_size"]
    per_tile = -(-(tile[0] * tile[1] * tile[2]) // bs) * bs
    n_th, n_tw = -(-grid[1] // tile[1]), -(-grid[2] // tile[2])
    video = torch.nonzero(layout.kind == VIDEO).squeeze(1)
    run_start = -(-case["text_len"] // bs) * bs if case["text_position"] == "prefix" else 0
    t, h, w = layout.coords[video].unbind(-1)
    tile_id = ((t // tile[0]) * n_th + h // tile[1]) * n_tw + w // tile[2]
    offset = video - run_start - tile_id * per_tile
    assert bool((offset >= 0).all()) and bool((offset < per_tile).all()), case
    for i in torch.unique(tile_id).tolist():
        mine = offset[tile_id == i]
        assert sorted(mine.tolist()) == list(range(mine.numel())), case


def token_ids(batch: int, seq_len: int, heads: int) -> torch.Tensor:
    """[B, S, H, 2] with no zero entry: (token index + 1, batch * heads + head + 1), so a token that
    moves, or an empty slot that is not zero, cannot go unnoticed."""
    s = torch.arange(1, seq_len + 1, dtype=torch.float64)[None, :, None].expand(batch, seq_len, heads)
    bh = torch.arange(1, batch * heads + 1, dtype=torch.float64).view(batch, 1, heads).expand(batch, seq_len, heads)
    return torch.stack([s, bh], dim=-1)


def raster_coords(index: torch.Tensor, grid) -> torch.Tensor:
    _, H, W = grid
    return torch.stack([index // (H * W), (index // W) % H, index % W], dim=-1)


def check_order_promise(order: str, grid, tile, vid: torch.Tensor, case) -> None:
    """What each order promises about the raster video indices it lists (``vid``)."""
    n = grid[0] * grid[1] * grid[2]
    assert sorted(vid.tolist()) == list(range(n)), f"not a permutation: {case}"
    t, h, w = raster_coords(vid, grid).unbind(-1)
    if order == "raster":
        assert vid.tolist() == list(range(n)), case
    elif order == "transpose":  # position-major: sorted by (h, w), frames of one position consecutive
        key = ((h * grid[2] + w) * grid[0] + t).tolist()
        assert key == sorted(key) and len(set(key)) == n, case
    elif order == "tile":  # each tile contiguous, tiles in raster order of the tile grid
        n_th, n_tw = -(-grid[1] // tile[1]), -(-grid[2] // tile[2])
        tile_id = (((t // tile[0]) * n_th + h // tile[1]) * n_tw + w // tile[2]).tolist()
        assert tile_id == sorted(tile_id), case
    # hilbert: see test_hilbert_steps_are_grid_neighbours


@pytest.mark.parametrize("text_position", TEXT_POSITIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_layout_round_trip_on_random_grids(order, text_position):
    rng = random.Random(f"{order}/{text_position}")
    for _ in range(CASES_PER_COMBINATION):
        case = random_case(rng, order, text_position)
        layout = build_layout(**case)
        grid, bs, text_len = case["grid"], case["block_size"], case["text_len"]
        n_video = grid[0] * grid[1] * grid[2]
        seq_len = n_video + text_len
        src, kind = layout.src, layout.kind

        # Every token sits in exactly one slot; every other slot is empty and points past the end.
        real = src < seq_len
        assert sorted(src[real].tolist()) == list(range(seq_len)), case
        assert bool((kind[~real] == PAD).all()) and bool((kind[real] != PAD).all()), case
        assert torch.equal(layout.inverse[src[real]], torch.nonzero(real).squeeze(1)), case

        # Text: in model order, starting on a block boundary, never sharing a block with video.
        text_slots = torch.nonzero(kind == TEXT).squeeze(1)
        text_first = 0 if text_position == "prefix" else n_video
        assert src[text_slots].tolist() == list(range(text_first, text_first + text_len)), case
        if text_len:
            assert int(text_slots[0]) % bs == 0, case
        padded = torch.full((layout.num_blocks * bs,), PAD, dtype=kind.dtype)
        padded[: kind.numel()] = kind
        blocks = padded.view(-1, bs)
        mixed = (blocks == TEXT).any(1) & (blocks == VIDEO).any(1)
        assert not bool(mixed.any()), f"text and video share a block: {case}"

        # Video slots: the order's listing, with the coordinates of the token they hold.
        video_slots = torch.nonzero(kind == VIDEO).squeeze(1)
        offset = text_len if text_position == "prefix" else 0
        vid = src[video_slots] - offset
        check_order_promise(order, grid, case["tile"], vid, case)
        assert torch.equal(layout.coords[video_slots], raster_coords(vid, grid)), case
        if case["pad_tiles"]:
            check_tiles_whole(layout, case)
        assert bool((layout.coords[kind != VIDEO] == -1).all()), case

        # to_slots then from_slots is the identity; empty slots hold zeros.
        x = token_ids(2, seq_len, 3)
        slots = layout.to_slots(x, dim=1)
        assert slots.shape[1] == layout.num_slots, case
        assert bool((slots[:, kind == PAD] == 0).all()), case
        assert bool((slots[:, kind != PAD] != 0).all()), case
        assert torch.equal(slots[:, :, :, 0][0, kind != PAD, 0], src[real].double() + 1), case
        assert torch.equal(layout.from_slots(slots, dim=1), x), case


@pytest.mark.parametrize("text_position", TEXT_POSITIONS)
@pytest.mark.parametrize("order", ORDERS)
def test_per_head_layout_round_trip_on_random_permutations(order, text_position):
    rng = random.Random(f"per-head/{order}/{text_position}")
    gen = torch.Generator().manual_seed(rng.randint(0, 2**31))
    for _ in range(CASES_PER_COMBINATION):
        case = random_case(rng, order, text_position)
        base = build_layout(**case)
        heads = rng.randint(1, 4)
        n_video = base.num_video
        orders = torch.stack([torch.randperm(n_video, generator=gen) for _ in range(heads)])
        layout = per_head_layout(base, orders)
        assert layout.per_head, case
        seq_len = base.seq_len
        offset = base.text_len if text_position == "prefix" else 0
        video = base.kind == VIDEO
        for h in range(heads):
            src = layout.src[h]
            # Video slots hold this head's permutation; text and empty slots stay where the base put them.
            assert torch.equal(src[video] - offset, orders[h]), case
            assert torch.equal(src[~video], base.src[~video]), case
            real = src < seq_len
            assert sorted(src[real].tolist()) == list(range(seq_len)), case
            assert torch.equal(layout.inverse[h][src[real]], torch.nonzero(real).squeeze(1)), case
            assert torch.equal(layout.coords[h][video], raster_coords(orders[h], base.grid)), case

        x = token_ids(2, seq_len, heads)
        slots = layout.to_slots(x, dim=1)
        assert slots.shape[:3] == (2, base.src.numel(), heads), case
        for h in range(heads):
            # Head h's slots hold head h's tokens only, in head h's order.
            owner = (torch.arange(2, dtype=torch.float64) * heads + h + 1)[:, None].expand(2, seq_len)
            assert torch.equal(slots[:, base.kind != PAD, h, 1], owner), case
            assert torch.equal(slots[0, base.kind != PAD, h, 0], layout.src[h][base.kind != PAD].double() + 1), case
        assert bool((slots[:, base.kind == PAD] == 0).all()), case
        assert torch.equal(layout.from_slots(slots, dim=1), x), case


@pytest.mark.parametrize("side", [2, 4, 8, 16])
def test_hilbert_steps_are_grid_neighbours(side):
    grid = (side, side, side)
    vid = video_order(grid, "hilbert", (1, 1, 1))
    coords = raster_coords(vid, grid)
    assert sorted(vid.tolist()) == list(range(side**3))
    steps = (coords[1:] - coords[:-1]).abs().sum(-1)
    assert bool((steps == 1).all()), f"non-adjacent steps at {torch.nonzero(steps != 1).squeeze(1).tolist()[:5]}"


def test_hilbert_blocks_are_compact():
    """A run of 64 cells along the curve on a 16^3 cube spans at most a 4 x 4 x 4 box (raster: a whole row
    of 16 and more): the reason to use it for block-sparse plans."""
    grid = (16, 16, 16)
    coords = raster_coords(video_order(grid, "hilbert", (1, 1, 1)), grid).view(-1, 64, 3)
    extent = coords.amax(1) - coords.amin(1) + 1
    assert bool((extent.prod(-1) == 64).all())
