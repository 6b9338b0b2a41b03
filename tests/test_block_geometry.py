"""Block-level plan builders equal the brute-force token classifier, and what a plan hands the kernels
per key (``key_valid``, ``pattern_block_mask``) means what the self-contained ``block_mask`` means.

``build_plan`` (the oracle) evaluates the method's token predicate on every token pair;
``build_block_plan`` decides block pairs from boxes of tokens. On random grids (odd sizes, images
with T == 1, text prefix / suffix, every order, packed and tile-padded layouts, windows larger than
the grid, dilation, radial bands with sinks and subsampled frames, block sizes that cut rows and
tiles anywhere) the full, partial and empty sets are equal -- for the self-contained lists and for
the pattern-only ones -- and so is the token-level mask inside partial blocks.
"""

from __future__ import annotations

import random

import pytest
import torch
from plan_reference import slot_token_mask

from ditaccel.block_geometry import block_boxes
from ditaccel.config import ORDERS
from ditaccel.layout import PAD, VIDEO, build_layout
from ditaccel.methods import RadialConfig, WindowConfig, make_method
from ditaccel.methods.tile import tile_window_rule
from ditaccel.plan import build_block_plan, build_plan

N_CASES = 120


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def random_case(rng: random.Random) -> dict:
    kind = rng.choice(["tile", "window", "radial"])
    image = rng.random() < 0.2
    grid = (1 if image else rng.randint(2, 5), rng.randint(1, 9), rng.randint(1, 11))
    position = rng.choice(["none", "prefix", "suffix"])
    text_len = 0 if position == "none" else rng.choice([rng.randint(1, 20), 16, 32])
    order = rng.choice(ORDERS)
    tile = (rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 5))
    pad_tiles = order == "tile" and rng.random() < 0.5
    case = dict(kind=kind, grid=grid, text_len=text_len, position=position, order=order, tile=tile,
                pad_tiles=pad_tiles, block_size=rng.choice([8, 16, 32, 64]))
    if kind == "tile":
        case["window"] = tuple(rng.choice([1, 3, 5]) for _ in range(3))
    elif kind == "window":  # up to 9 tokens x dilation 3 on axes of 1-11 tokens: often larger than the grid
        case["kernel"] = tuple(rng.choice([1, 3, 5, 9]) for _ in range(3))
        case["dilation"] = tuple(rng.choice([1, 1, 2, 3]) for _ in range(3))
    else:
        case["radial"] = dict(decay=rng.choice([0.3, 0.5, 1.0]), decay_factor=rng.choice([0.2, 0.6, 1.0]),
                              sink_frames=rng.randint(0, 2), band_floor=rng.choice([1, 2, 5, 16]))
    return case


def rule_and_predicate(case):
    grid = case["grid"]
    if case["kind"] == "tile":
        rule = tile_window_rule(grid, case["tile"], case["window"])
        return rule, rule.predicate()
    if case["kind"] == "window":
        method = make_method(WindowConfig(kernel_size=case["kernel"], dilation=case["dilation"], block_size=64))
    else:
        method = make_method(RadialConfig(block_size=64, **case["radial"]))
    return method.box_rule(grid), method.video_predicate(grid)


CASES = [random_case(random.Random(f"block-geometry/{i}")) for i in range(N_CASES)]


def test_cases_cover_what_they_claim():
    assert len(CASES) >= 100
    kinds = {(c["kind"], c["order"], c["position"]) for c in CASES}
    assert {k for k, _, _ in kinds} == {"tile", "window", "radial"}
    assert {o for _, o, _ in kinds} == set(ORDERS) and {p for _, _, p in kinds} == {"none", "prefix", "suffix"}
    assert any(c["grid"][0] == 1 for c in CASES) and any(c["pad_tiles"] for c in CASES)
    assert any(c["kind"] == "window" and any(k * d > g for k, d, g in zip(c["kernel"], c["dilation"], c["grid"]))
               for c in CASES)


def check_case(case) -> tuple[int, int]:
    layout = build_layout(case["grid"], case["text_len"], case["position"], case["order"], case["tile"],
                          case["block_size"], case["pad_tiles"])
    rule, predicate = rule_and_predicate(case)
    oracle = build_plan(layout, predicate, "cpu")
    plan = build_block_plan(layout, rule, predicate, "cpu")
    assert torch.equal(plan.any_blocks, oracle.any_blocks), case
    assert torch.equal(plan.full_blocks, oracle.full_blocks), case
    assert torch.equal(plan.pattern_full_blocks, oracle.pattern_full_blocks), case
    assert torch.equal(plan.text_kv_blocks, oracle.text_kv_blocks), case
    assert plan.density == oracle.density, case
    # Token level, inside partial blocks too: the masks the two plans describe are the same.
    mask, expected = slot_token_mask(plan, 1, 1)[0, 0], slot_token_mask(oracle, 1, 1)[0, 0]
    real = layout.kind != PAD
    assert torch.equal(mask[real], expected[real]), case
    # The pattern-only lists with per-key validity allow exactly what the self-contained lists allow.
    n, bs = layout.num_slots, layout.block_size
    pfull = plan.pattern_full_blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
    pany = plan.any_blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
    rule_mask = plan.pattern_block_mask.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
    with_keys = (pfull | (pany & rule_mask)) & plan.call_key_valid()[0, 0][None, :]
    assert torch.equal(with_keys[real], mask[real]), case
    partial = plan.any_blocks & ~plan.full_blocks
    return int(partial.sum()), int((plan.any_blocks & ~plan.pattern_full_blocks).sum())


def test_block_level_plans_equal_brute_force_on_random_grids():
    partial = pattern_partial = 0
    for case in CASES:
        p, pp = check_case(case)
        partial, pattern_partial = partial + p, pattern_partial + pp
    # The sweep must exercise partial blocks, and key-only conditions must remove some of them.
    assert partial > pattern_partial > 0


@pytest.mark.parametrize("order", ORDERS)
def test_boxes_cover_exactly_the_video_tokens_of_each_block(order):
    rng = random.Random(order)
    for _ in range(10):
        grid = (rng.randint(1, 4), rng.randint(1, 9), rng.randint(1, 12))
        layout = build_layout(grid, rng.randint(0, 9), "prefix", order, (rng.randint(1, 2), 3, 4), rng.choice([8, 32]))
        boxes = block_boxes(layout)
        bs = layout.block_size
        for b in range(layout.num_blocks):
            slots = torch.arange(b * bs, min((b + 1) * bs, layout.num_slots))
            want = {tuple(c) for c in layout.coords[slots][layout.kind[slots] == VIDEO].tolist()}
            got = []
            for lo, hi in zip(boxes.lo[b][boxes.valid[b]].tolist(), boxes.hi[b][boxes.valid[b]].tolist()):
                got += [(t, h, w) for t in range(lo[0], hi[0] + 1) for h in range(lo[1], hi[1] + 1)
                        for w in range(lo[2], hi[2] + 1)]
            assert len(got) == len(set(got)) and set(got) == want, (grid, order, b)
