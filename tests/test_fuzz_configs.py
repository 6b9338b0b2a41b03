"""Seeded fuzz of configs at ``accelerate``: 1,200 random configs (valid, boundary and invalid
values: negative, zero, huge, NaN, inf, wrong types) on a tiny bare Wan transformer.

Each config either raises a ``ValueError`` at ``accelerate`` naming one of the fields it set, with
the transformer left exactly as it was, or is accepted; a seeded sample of the accepted ones (the first three of
every method) runs one forward (finite output, ``remove()`` bit-identical) and of the rejected ones is checked
bit-identical by a forward too. Anything else (another exception, a crash at the call) fails.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import ditaccel
from ditaccel.config import describe_fields
from ditaccel.methods import METHODS, config_class

N_CONFIGS = 1200
RUNS_PER_METHOD = 3  # accepted configs run per method (the first ones met): a bounded sample
N_RUN_REJECTED = 6
HUGE = [10**12, 2**40, 10**40]
WRONG_TYPES = ["3", None, [1.5], {"a": 1}, object()]


def int_values(spec, rng):
    low = spec.low if spec.low is not None else -5
    valid = [spec.default, low, low + 1, rng.randint(low, low + 20)] + list(spec.choices or ())
    if spec.high is not None:
        valid += [spec.high, rng.randint(low, spec.high)]
    if spec.choices:
        valid = list(spec.choices)
    if spec.odd:
        valid = [v if v % 2 else v + 1 for v in valid]
    bad = [low - 1, -1, 0, *HUGE, math.nan, math.inf, 2.5, True, *WRONG_TYPES]
    if spec.high is not None:
        bad.append(spec.high + 1)
    return valid, bad


def float_values(spec, rng):
    low = 0.0 if spec.low is None else spec.low
    high = low + 5.0 if spec.high is None else spec.high
    valid = [spec.default, high, rng.uniform(low, high), rng.uniform(low, high)]
    if not spec.low_open:
        valid.append(low)
    bad = [math.nan, math.inf, -math.inf, -1.0, high + 1.0 if spec.high is not None else -0.5, 1e308, 10**400,
           True, "0.5", [0.5]]
    if spec.low_open:
        bad.append(low)
    if spec.kind == "optional_float":
        valid.append(None)
        bad.remove(None) if None in bad else None
    return [v for v in valid if v is not None or spec.kind == "optional_float"], bad


def axes_values(spec, rng):
    odd = spec.odd
    pick = (lambda: rng.choice([1, 3, 5, 9, 63])) if odd else (lambda: rng.choice([1, 2, 3, 4, 7]))
    valid = [spec.default, pick(), (pick(), pick()), (pick(), pick(), pick()), (1, 2**31 - 1, 1)]
    bad = [0, -1, (1, 2, 3, 4), (1.0, 3, 3), "3x3", None, (3, 0, 3), (10**12, 1, 1), (1, math.nan, 1)]
    if odd:
        bad += [2, (3, 4, 3)]
    return valid, bad


TILES = {64: [(1, 8, 8), (1, 4, 16), (2, 4, 8), (1, 1, 64)], 128: [(1, 8, 16), (2, 8, 8), (1, 1, 128), (128, 1, 1)]}


def values_for(spec, cls, rng):
    """(valid, invalid) candidate values of one knob."""
    k = spec.kind
    if k == "int":
        return int_values(spec, rng)
    if k in ("float", "optional_float"):
        return float_values(spec, rng)
    if k == "choice":
        return list(spec.choices), ["bogus", 1, None, ""]
    if k == "bool":
        return [True, False], [1, 0, "yes", None]
    if k == "axes":
        return axes_values(spec, rng)
    if k == "optional_axes":
        return [None, *TILES[64], *TILES[128]], [(3, 3, 3), (0, 8, 8), "8x8", (1, 8, -8), (10**12, 1, 1)]
    if k == "layers":
        return [0, 1, 2, (0,), (1, 5), ()], [-1, (0, -1), "all", 10**40, (1.5,), True]
    if k == "steps":
        return [(), (0,), (1, 2), (2**31 - 1,)], [(-1,), "1", (10**40,), 1.5, (True,)]
    if k == "count_or_fraction":
        return [0, 1, 2, 10**6], [0.0, 1.0, -0.1, math.nan, math.inf, -1, 10**40, True, "0.2", 1.5]
    if k == "schedule":
        numeric = [s for s in describe_fields(cls) if s.kind in ("int", "float", "optional_float")
                   and s.name not in {f.name for f in describe_fields(ditaccel.AttentionConfig)}]
        if not numeric:
            return [()], [{"dense_steps": [1, 2]}, "x"]
        s = rng.choice(numeric)
        good = values_for(s, cls, rng)[0]
        return ([{s.name: [rng.choice(good) for _ in range(rng.randint(1, 4))]}, ()],
                [{"nope": [1]}, {s.name: []}, {s.name: [math.nan]}, {s.name: 3}, "x", {"dense_steps": [1]}])
    raise AssertionError(k)


def random_config(rng):
    method = rng.choice(METHODS)
    cls = config_class(method)
    specs = describe_fields(cls)
    overrides = {}
    for spec in rng.sample(specs, rng.randint(1, min(4, len(specs)))):
        valid, bad = values_for(spec, cls, rng)
        overrides[spec.name] = rng.choice(valid if rng.random() < 0.6 else bad)
    return method, overrides


def snapshot(model):
    """What accelerate may change: forwards, hook registries, processor backends."""
    out = []
    for name, module in model.named_modules():
        proc = getattr(module, "processor", None)
        out.append((name, "forward" in module.__dict__, hasattr(module, "_diffusers_hook"),
                    dict(vars(proc)) if proc is not None else None))
    return out


def forward(model):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 16, 16, generator=gen)  # token grid (3, 8, 8): 192 tokens, several 64-blocks
    text = torch.randn(1, 6, 32, generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                     return_dict=False)[0]


@pytest.mark.filterwarnings("ignore:ditaccel")
def test_fuzzed_configs_fail_at_accelerate_or_run(tiny_wan, one_thread):
    rng = random.Random(1234)
    reference = forward(tiny_wan)
    before = snapshot(tiny_wan)
    accepted, rejected, runs = [], [], {}
    for i in range(N_CONFIGS):
        method, overrides = random_config(rng)
        cls_name = config_class(method).__name__
        try:
            handle = ditaccel.accelerate(tiny_wan, method, **overrides)
        except ValueError as e:
            msg = str(e)
            assert any(f"{cls_name}.{f}" in msg for f in overrides), (method, overrides, msg)
            assert snapshot(tiny_wan) == before, (method, overrides)
            rejected.append((method, overrides))
            if len(rejected) % 97 == 0 and len(rejected) // 97 <= N_RUN_REJECTED:
                assert torch.equal(forward(tiny_wan), reference), (method, overrides)
            continue
        except Exception as e:  # noqa: BLE001 - the point: nothing but ValueError at accelerate
            pytest.fail(f"config {i} {method} {overrides!r}: {type(e).__name__}: {e}")
        accepted.append((method, overrides))
        try:
            if runs.get(method, 0) < RUNS_PER_METHOD:
                runs[method] = runs.get(method, 0) + 1
                out = forward(tiny_wan)
                assert torch.isfinite(out).all(), (method, overrides)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"accepted config {i} {method} {overrides!r} failed at the call: {type(e).__name__}: {e}")
        finally:
            handle.remove()
        assert snapshot(tiny_wan) == before, (method, overrides)
    assert torch.equal(forward(tiny_wan), reference)
    # Not vacuous: plenty of both, every method among the runs.
    assert len(accepted) >= 250 and len(rejected) >= 250, (len(accepted), len(rejected))
    assert runs == {m: RUNS_PER_METHOD for m in METHODS}
