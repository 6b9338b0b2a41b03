"""What the per-call path takes from a plan: permutations and per-key validity, on the device, with no
host-to-device copy after the first call; and tile-padded layouts chosen by kernel work.

Device copies are checked on the ``meta`` device (a device other than the CPU, so a copy of a CPU
index tensor shows up as an ``aten._to_copy`` in a ``TorchDispatchMode``), and by the identity of
the cached tensors.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditaccel.block_geometry import block_work
from ditaccel.layout import PAD, build_layout, per_head_layout
from ditaccel.methods import TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape
from ditaccel.plan import build_block_plan, plan_from_blocks

aten = torch.ops.aten


class HostCopies(TorchDispatchMode):
    """Counts ops that move data between devices or make a tensor from host data."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten._to_copy.default and isinstance(out, torch.Tensor) and args[0].device != out.device:
            self.ops.append(f"{func} {args[0].device}->{out.device}")
        elif func is aten.copy_.default and args[0].device != args[1].device:
            self.ops.append(f"{func} {args[1].device}->{args[0].device}")
        elif func in (aten.lift_fresh.default, aten.lift_fresh_copy.default, aten._local_scalar_dense.default):
            self.ops.append(str(func))
        return out


LAYOUTS = [
    ((3, 5, 7), 4, "suffix", "tile", (2, 4, 4), 32, True),
    ((2, 6, 9), 11, "prefix", "hilbert", (1, 1, 1), 16, False),
    ((4, 3, 5), 0, "none", "transpose", (1, 1, 1), 8, False),
]


@pytest.mark.parametrize("args", LAYOUTS)
def test_permutation_round_trip_and_empty_slots_zero(args):
    layout = build_layout(*args)
    x = torch.randn(2, layout.seq_len, 3, 4, dtype=torch.float64) + 5.0  # no zero entry
    slots = layout.to_slots(x, dim=1)
    assert slots.shape == (2, layout.num_slots, 3, 4)
    real = layout.kind != PAD
    assert bool((slots[:, ~real] == 0).all()) and bool((slots[:, real] != 0).all())
    assert torch.equal(slots[:, real], x[:, layout.src[real]])
    assert torch.equal(layout.from_slots(slots, dim=1), x)
    assert torch.equal(layout.to_slots(x.transpose(1, 2), dim=-2).transpose(1, 2), slots)  # negative dim


@pytest.mark.parametrize("args", LAYOUTS)
def test_second_call_makes_no_host_to_device_copy(args):
    layout = build_layout(*args)
    x = torch.empty(2, layout.seq_len, 3, 4, device="meta")
    with HostCopies() as first:
        layout.from_slots(layout.to_slots(x, dim=1), dim=1)
    assert first.ops, "the first call copies the index to the device (else the check below proves nothing)"
    cached = layout.device_index("inverse", "meta")
    for _ in range(2):
        with HostCopies() as steady:
            out = layout.from_slots(layout.to_slots(x, dim=1), dim=1)
        assert steady.ops == [] and out.shape == x.shape
    assert layout.device_index("inverse", "meta") is cached


def plan_for(grid=(3, 5, 7), text_len=6, position="suffix"):
    cfg = WindowConfig(kernel_size=(3, 3, 3), block_size=64)
    return make_method(cfg).plan(CallShape(grid, text_len, position), "cpu")


@pytest.mark.parametrize("heads", [1, 3])
def test_call_key_valid_combines_padding_and_empty_slots(heads):
    plan = plan_for()
    layout = plan.layout
    gen = torch.Generator().manual_seed(heads)
    padding = torch.rand(2, heads, layout.seq_len, generator=gen) > 0.3
    got = plan.call_key_valid(padding)
    assert got.shape == (2, heads, layout.num_slots) and got.dtype == torch.bool
    src = layout.src.clamp(max=layout.seq_len - 1)
    expected = padding[:, :, src] & (layout.kind != PAD)
    assert torch.equal(got, expected)
    assert torch.equal(plan.call_key_valid(padding[:, 0]), expected[:, :1])  # [B, S] reads as [B, 1, S]
    assert torch.equal(plan.call_key_valid()[0, 0], layout.kind != PAD)
    # Same meaning as the per-call BlockMask ``with_key_padding`` builds: the fixed pattern mask with
    # the combined key validity allows exactly those token pairs.
    n, bs = layout.num_slots, layout.block_size
    per_call = plan.with_key_padding(got)
    ref = plan_token_slots(per_call, n, bs)
    pfull = plan.pattern_full_blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
    pany = plan.any_blocks.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:n, :n]
    rule = plan.pattern_block_mask.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n)[None, :])
    fixed = (pfull | (pany & rule))[None, None] & got[:, :, None, :]
    real_q = layout.kind != PAD
    assert torch.equal(fixed[:, :, real_q], ref.expand_as(fixed)[:, :, real_q])


def plan_token_slots(block_mask, n, bs):
    """[B, H, n, n] from a BlockMask's lists and mask_mod (per batch and head)."""
    B, H = block_mask.kv_num_blocks.shape[:2]
    out = torch.zeros(B, H, n, n, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for num, idx, partial in ((block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False),
                                      (block_mask.kv_num_blocks, block_mask.kv_indices, True)):
                for qb in range(num.shape[-1]):
                    for kb in idx[b, h, qb, : int(num[b, h, qb])].tolist():
                        qs, ks = slice(qb * bs, min(qb * bs + bs, n)), slice(kb * bs, min(kb * bs + bs, n))
                        if partial:
                            qi, ki = torch.arange(n)[qs][:, None], torch.arange(n)[ks][None, :]
                            out[b, h, qs, ks] = block_mask.mask_mod(torch.tensor(b), torch.tensor(h), qi, ki)
                        else:
                            out[b, h, qs, ks] = True
    return out


def test_call_key_valid_rejects_a_wrong_shape():
    plan = plan_for()
    with pytest.raises(ValueError, match=r"key_padding must be a bool .* S = \d+"):
        plan.call_key_valid(torch.ones(2, plan.layout.seq_len + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding"):
        plan.call_key_valid(torch.ones(2, plan.layout.seq_len))


def test_call_key_valid_makes_no_host_copy_after_the_first_call():
    plan = plan_for()
    padding = torch.ones(2, 1, plan.layout.seq_len, dtype=torch.bool, device="meta")
    plan.call_key_valid(padding)
    with HostCopies() as steady:
        out = plan.call_key_valid(padding)
    assert steady.ops == [] and out.shape == (2, 1, plan.layout.num_slots)


def test_tile_plan_on_a_ragged_grid_takes_the_padded_layout_and_has_no_partial_blocks():
    # 7 frames in tiles of 2 and 21 rows in tiles of 8: ragged on two axes, as Wan's 21 x 45 x 80 is.
    grid, window = (7, 21, 48), (1, 3, 3)
    method = make_method(TileConfig(window=window))  # tile (2, 8, 8), block 128
    plan = method.plan(CallShape(grid, 0, "none"), "cpu")
    assert plan.layout_choice == "padded" and plan.layout.pad_tiles
    assert "padded tiles" in plan.layout_note and "packed" in plan.layout_note
    assert int((plan.any_blocks & ~plan.pattern_full_blocks).sum()) == 0  # every pair full or empty
    packed_layout = build_layout(grid, 0, "none", "tile", (2, 8, 8), 128)
    packed = build_block_plan(packed_layout, method.box_rule(grid), method.video_predicate(grid), "cpu")
    assert block_work(plan.any_blocks, 128) < block_work(packed.any_blocks, 128)
    assert int((packed.any_blocks & ~packed.pattern_full_blocks).sum()) > 0  # what the padding removed
    # Every pair full or empty: in model order token q sees token k iff their blocks are listed, and
    # that is the tile rule (its per-axis tables are checked against brute force in test_plans).
    slot_block = plan.layout.inverse // 128  # block of each token, model order
    listed = plan.any_blocks[slot_block][:, slot_block]
    t, h, w = (torch.arange(math.prod(grid)) // d % g for d, g in ((21 * 48, 7), (48, 21), (1, 48)))
    tables = method.box_rule(grid).tables
    assert torch.equal(listed, tables[0][t][:, t] & tables[1][h][:, h] & tables[2][w][:, w])
    # Tiles start on block boundaries and keep their tokens together, real tokens first.
    video = plan.layout.kind == 0
    t, h, w = plan.layout.coords[video].unbind(-1)
    tile_of = ((t // 2) * 3 + h // 8) * 6 + w // 8
    slots = torch.nonzero(video).squeeze(1)
    assert torch.equal(slots // 128, tile_of)
    starts = torch.zeros(plan.layout.num_blocks, dtype=torch.long).scatter_reduce(0, tile_of, slots % 128, "amin")
    assert int(starts.max()) == 0


def test_layout_choice_keeps_packed_when_padding_costs_more_work():
    # One ragged frame at the end of 9: padding adds a whole tile row for little gain.
    plan = make_method(TileConfig(tile=(2, 4, 8), window=(3, 3, 3), block_size=64)).plan(
        CallShape((9, 8, 32), 0, "none"), "cpu")
    assert plan.layout_choice == "packed" and not plan.layout.pad_tiles
    work = [int(s.replace(",", "")) for s in plan.layout_note.replace(" on", " ").split() if s[0].isdigit()
            and "," in s]
    assert len(work) == 4 and work[0] >= work[2]  # padded work, padded slots, packed work, packed slots
    assert plan.layout.num_slots == math.prod((9, 8, 32))


def test_call_key_valid_on_a_per_head_layout_permutes_each_head():
    base = build_layout((2, 4, 5), 6, "prefix", "raster", (1, 1, 1), 16)
    gen = torch.Generator().manual_seed(3)
    orders = torch.stack([torch.randperm(base.num_video, generator=gen) for _ in range(3)])
    layout = per_head_layout(base, orders)
    plan = plan_from_blocks(layout, torch.ones(1, 3, layout.num_blocks, layout.num_blocks, dtype=torch.bool))
    padding = torch.rand(2, 1, layout.seq_len, generator=gen) > 0.4
    src = layout.src.clamp(max=layout.seq_len - 1)
    expected = torch.stack([padding[:, 0, src[h]] for h in range(3)], 1) & (layout.kind != PAD)
    assert torch.equal(plan.call_key_valid(padding), expected)
