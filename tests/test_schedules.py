"""Schedules that follow the call: dense_steps as a fraction, dense_above_noise, per-step knob
schedules, across pipeline calls with different step counts."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

import ditaccel
from ditaccel.config import resolve_count



@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield



def run(pipe, family, steps, **kw):
    out = pipe(**call_kwargs(family, pipe, steps=steps, output_type="latent", **kw))
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def dense_steps_seen(handle) -> list[int]:
    """Steps at which every call ran the model's own dense attention."""
    return [s for s, v in handle.stats()["steps"].items() if v["dense_calls"] == v["calls"]]


def test_fraction_rounding():
    assert resolve_count(0.24, 50) == 12  # Radial Attention, Wan 2.1: 12 of 50
    assert resolve_count(0.275, 40) == 11  # Wan 2.2: 11 of 40 (0.275 * 40 is 11.000000000000002)
    assert resolve_count(0.2, 50) == 10 and resolve_count(0.1, 50) == 5 and resolve_count(0.3, 50) == 15
    assert resolve_count(0.25, 3) == 1 and resolve_count(0.5, 3) == 2  # rounded up
    assert resolve_count(4, None) == 4 and resolve_count(0.5, None) is None


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_fraction_follows_each_calls_step_count(family):
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, "tile", dense_steps=0.3, block_size=64) as handle:
        for steps in (4, 7, 2):
            handle.reset_stats()
            run(pipe, family, steps)
            assert sorted(handle.stats()["steps"]) == list(range(steps))
            assert dense_steps_seen(handle) == list(range(math.ceil(0.3 * steps))), steps


def test_fraction_equals_the_count_it_resolves_to():
    pipe = pipe_for("wan")
    for steps, count in ((4, 2), (6, 3)):
        with ditaccel.accelerate(pipe, "tile", tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=0.5):
            by_fraction = run(pipe, "wan", steps, **SPARSE_SIZE["wan"])
        with ditaccel.accelerate(pipe, "tile", tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=count):
            by_count = run(pipe, "wan", steps, **SPARSE_SIZE["wan"])
        assert torch.equal(by_fraction, by_count)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_noise_threshold_follows_the_schedule(family):
    pipe = pipe_for(family)
    threshold = 0.7
    with ditaccel.accelerate(pipe, "tile", dense_above_noise=threshold, block_size=64) as handle:
        counts = []
        for steps in (3, 6):
            handle.reset_stats()
            run(pipe, family, steps)
            sched = pipe.scheduler
            levels = [float(t) / sched.config.num_train_timesteps for t in sched.timesteps]
            expected = next((i for i, lvl in enumerate(levels) if lvl <= threshold), len(levels))
            assert dense_steps_seen(handle) == list(range(expected)), (steps, levels)
            counts.append(expected)
    assert counts[1] > counts[0] >= 1  # more steps above the same noise level in a finer schedule


def test_noise_threshold_and_count_combine():
    pipe = pipe_for("wan")
    with ditaccel.accelerate(pipe, "tile", dense_above_noise=0.999, dense_steps=2, block_size=64) as handle:
        run(pipe, "wan", 5)
        assert dense_steps_seen(handle) == [0, 1]  # the count wins where the noise level says fewer


@pytest.mark.parametrize("steps", [4, 6])
def test_per_step_topk_schedule(steps):
    pipe = pipe_for("wan")
    schedule = {"topk": [1.0, 0.2]}
    with ditaccel.accelerate(pipe, "topk", block_size=64, schedule=schedule) as handle:
        run(pipe, "wan", steps, **SPARSE_SIZE["wan"])
        density = {s: v["density"] for s, v in handle.stats()["steps"].items()}
    assert sorted(density) == list(range(steps))
    for s, d in density.items():
        part = s * 2 // steps
        if part == 0:
            assert d == 1.0, (s, density)
        else:
            assert d < 0.7, (s, density)  # ceil(0.2 * 6 blocks) + the diagonal, of 6


def test_window_schedule_parts():
    """A constant schedule is the fixed config, bit for bit; a two-part one changes at the middle step."""
    pipe = pipe_for("wan")
    kw = dict(tile=(1, 8, 8), block_size=64)
    with ditaccel.accelerate(pipe, "tile", window=(1, 1, 1), **kw):
        fixed = run(pipe, "wan", 2, **SPARSE_SIZE["wan"])
    with ditaccel.accelerate(pipe, "tile", schedule={"window": [(1, 1, 1), (1, 1, 1)]}, **kw):
        constant = run(pipe, "wan", 2, **SPARSE_SIZE["wan"])
    assert torch.equal(fixed, constant)
    with ditaccel.accelerate(pipe, "tile", schedule={"window": [(1, 1, 1), (3, 3, 3)]}, **kw) as handle:
        scheduled = run(pipe, "wan", 2, **SPARSE_SIZE["wan"])
        density = {s: v["density"] for s, v in handle.stats()["steps"].items()}
    assert density[0] < density[1] == 1.0  # step 0: one tile, step 1: the (3, 3, 3) window covers the grid
    assert scheduled.isfinite().all() and not torch.equal(scheduled, fixed)


def test_schedule_validation():
    with pytest.raises(ValueError, match=r"TopKConfig.schedule\['topk'\]\[1\]"):
        ditaccel.TopKConfig(schedule={"topk": [0.5, 1.5]})
    with pytest.raises(ValueError, match="TopKConfig.schedule names 'dense_steps'"):
        ditaccel.TopKConfig(schedule={"dense_steps": [1, 2]})
    with pytest.raises(ValueError, match="TopKConfig.schedule"):
        ditaccel.TopKConfig(schedule={"topk": []})
    with pytest.raises(ValueError, match="TopKConfig.schedule"):
        ditaccel.TopKConfig(schedule="0.5, 0.2")
    cfg = ditaccel.TopKConfig(schedule={"topk": [0.4, 0.3, 0.2]})
    assert [cfg.at_step(s, 9).topk for s in range(9)] == [0.4] * 3 + [0.3] * 3 + [0.2] * 3
    assert [cfg.at_step(s, 4).topk for s in range(4)] == [0.4, 0.4, 0.3, 0.2]


@pytest.mark.parametrize("field,value", [("dense_steps", 0.2), ("dense_above_noise", 0.5),
                                         ("schedule", {"topk": [0.5, 0.2]})])
def test_call_schedules_need_a_scheduler(tiny_wan, field, value):
    before = {n: "forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for n, m in tiny_wan.named_modules()}
    with pytest.raises(ValueError, match=rf"TopKConfig\.{field}=.*no scheduler"):
        ditaccel.accelerate(tiny_wan, "topk", **{field: value})
    assert before == {n: "forward" in m.__dict__ or hasattr(m, "_diffusers_hook") for n, m in tiny_wan.named_modules()}
