"""radial against an independent implementation of Radial Attention's published mask rule.

The reference here follows the structure of the published ``radial_attn/attn_mask.py``: per
(query frame, key frame) pair a window width from ``get_window_width`` (whole frames at distance
<= 1, then ``2 ** bit_length(n) / 2 ** bit_length(d) * decay_factor`` floored at the block size)
AND-ed with ``get_diagonal_split_mask`` (frame pairs subsampled where the undecayed band is under a
block), key frame 0 a sink; band over each frame's raster token index. It is written in plain
Python per frame pair, independently of ``ditaccel.methods.radial``. The one documented deviation
(ours never drops neighbouring frames; the published split does when a frame has < 128 tokens) is
applied on top, and asserted to change nothing on grids of >= 128 tokens per frame.
"""

from __future__ import annotations

import pytest
import torch
from test_plans import plan_token_mask

from ditaccel.methods import RadialConfig, make_method
from ditaccel.methods.base import CallShape
from ditaccel.methods.radial import radial_bands


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def published_window_width(dist: int, n: int, decay_factor: float, block: int) -> float:
    if dist <= 1:
        return n
    decay_length = 2 ** n.bit_length() / 2 ** dist.bit_length() * decay_factor
    return decay_length if decay_length >= block else block


def published_split_keeps(dist: int, n: int, block: int) -> bool:
    decay_length = 2 ** n.bit_length() / 2 ** dist.bit_length()
    if decay_length >= block:
        return True
    return dist % int(block / decay_length) == 0


def reference_video_mask(grid, decay_factor: float, block: int = 128, sink: int = 1) -> torch.Tensor:
    """[n_video, n_video] in raster (frame-major) order."""
    T, H, W = grid
    n = H * W
    rows = torch.arange(n).view(-1, 1)
    cols = torch.arange(n).view(1, -1)
    mask = torch.zeros(T * n, T * n, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            if j < sink:
                local = torch.ones(n, n, dtype=torch.bool)
            else:
                dist = abs(i - j)
                width = published_window_width(dist, n, decay_factor, block)
                keep = published_split_keeps(dist, n, block)
                if dist <= 1 and not keep:
                    assert n < 128, "the deviation only exists on frames under 128 tokens"
                    keep = True  # documented: neighbouring frames are never dropped
                local = ((cols - rows).abs() <= width) & keep
            mask[i * n:(i + 1) * n, j * n:(j + 1) * n] = local
    return mask


def with_text(video: torch.Tensor, text_len: int, position: str) -> torch.Tensor:
    n = video.shape[0]
    full = torch.ones(n + text_len, n + text_len, dtype=torch.bool)
    off = text_len if position == "prefix" else 0
    full[off:off + n, off:off + n] = video
    return full


CASES = [  # (grid, decay_factor, band_floor = the reference's block size, text)
    ((5, 8, 16), 1.0, 128, (0, "none")),
    ((6, 8, 16), 0.2, 128, (4, "prefix")),  # Wan 2.1's published decay
    ((7, 8, 16), 0.8, 128, (0, "none")),  # Wan 2.2's
    ((9, 4, 32), 0.95, 128, (6, "suffix")),  # HunyuanVideo's
    ((5, 16, 16), 1.0, 128, (0, "none")),
    ((12, 4, 8), 1.0, 8, (0, "none")),  # small frames: a small block so bands and subsampling show
    ((11, 5, 7), 0.5, 4, (3, "prefix")),  # odd grid
    ((16, 3, 5), 1.0, 4, (0, "none")),  # long video: subsampled distant frames
    ((9, 6, 6), 0.3, 16, (5, "suffix")),
    ((3, 7, 9), 1.0, 128, (0, "none")),  # frames under a block: the deviation applies
    ((1, 9, 11), 1.0, 128, (4, "prefix")),  # an image: dense
    ((2, 6, 10), 0.2, 32, (0, "none")),  # two frames: neighbours only
]


@pytest.mark.parametrize("grid,decay_factor,floor,text", CASES)
def test_radial_equals_published_rule(grid, decay_factor, floor, text):
    cfg = RadialConfig(decay_factor=decay_factor, band_floor=floor, block_size=64)
    plan = make_method(cfg).plan(CallShape(grid, *text), "cpu")
    expected = with_text(reference_video_mask(grid, decay_factor, block=floor), *text)
    assert torch.equal(plan_token_mask(plan), expected)
    if grid[0] <= 2:
        assert plan.density == 1.0


def test_radial_tile_order_is_the_same_mask():
    grid = (6, 8, 16)
    cfg = RadialConfig(decay_factor=0.2, order="tile", tile=(1, 8, 8), block_size=64)
    plan = make_method(cfg).plan(CallShape(grid, 0, "none"), "cpu")
    assert torch.equal(plan_token_mask(plan), reference_video_mask(grid, 0.2))


def test_radial_bands_as_the_issue_quotes_the_reference():
    # The reference's widths at 1024 tokens per frame, distances 0..4: [1024, 1024, 512, 512, 256].
    assert radial_bands(5, 1024, 0.5, 1.0, 128) == [1024, 1024, 512, 512, 256]
    # Wan 2.1 (decay_factor 0.2) at 1560 tokens per frame: whole neighbours, then the 128 floor.
    assert radial_bands(4, 1560, 0.5, 0.2, 128) == [1560, 1560, 128, 128]


def test_radial_no_sink_and_sink_frames():
    grid = (8, 8, 16)
    no_sink = make_method(RadialConfig(sink_frames=0, block_size=64)).plan(CallShape(grid, 0, "none"), "cpu")
    sink2 = make_method(RadialConfig(sink_frames=2, block_size=64)).plan(CallShape(grid, 0, "none"), "cpu")
    got0, got2 = plan_token_mask(no_sink), plan_token_mask(sink2)
    ref0 = reference_video_mask(grid, 1.0, sink=0)
    assert torch.equal(got0, ref0)
    n = 128
    assert bool(got2[:, : 2 * n].all()) and torch.equal(got2[:, 2 * n:], ref0[:, 2 * n:])


def test_radial_sparser_with_distance():
    T, n = 16, 128
    plan = make_method(RadialConfig(sink_frames=0, block_size=64)).plan(CallShape((T, 8, 16), 0, "none"), "cpu")
    mask = plan_token_mask(plan).view(T, n, T, n)
    kept = {d: float(torch.stack([mask[i, :, i + d] for i in range(T - d)]).float().mean()) for d in range(T)}
    assert kept[0] == kept[1] == 1.0
    groups = [sum(kept[d] for d in range(lo, 2 * lo)) / lo for lo in (2, 4, 8)]  # distances 2-3, 4-7, 8-15
    assert 1.0 > groups[0] > groups[1] > groups[2] > 0  # fewer frame pairs kept at every doubling: 1/2, 1/4, 1/8
