"""Every family's adapter on a tiny random transformer at an odd grid (builders: tiny_families.py).

Per family: the dense method equals the original forward; a static (window) and a dynamic (topk)
method run with finite output and really run sparse; ``remove()`` gives back bit-identical output;
and every intercepted self-attention call's output equals masked attention on the same q, k, v
with a token mask built here by brute force in the model's own token order (video-video pairs by
the window rule on the grid's coordinates, every pair with a dense token kept, the model's own
mask applied on top).
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import BUILDERS, brute_force_mask, model_allowed

import ditaccel
from ditaccel.intercept import processor_kind
from ditaccel.pipelines import find_adapter
from ditaccel.runtime import AttentionSite

pytestmark = pytest.mark.filterwarnings("error:ditaccel")

NAMES = list(BUILDERS)
_CASES: dict = {}
KERNEL_VIDEO, KERNEL_IMAGE = (1, 3, 3), (1, 3, 5)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def case_for(name):
    if name not in _CASES:
        _CASES[name] = BUILDERS[name]()
    return _CASES[name]


def kernel_for(grid):
    return KERNEL_IMAGE if grid[0] == 1 else KERNEL_VIDEO


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("name", NAMES)
def test_dense_equals_original(name):
    case = case_for(name)
    ref = case.run()
    with ditaccel.accelerate(case.model, "dense") as handle:
        out = case.run()
        assert handle.stats()["calls"] > 0
    assert rel(out, ref) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_static_and_dynamic_methods_run_sparse(name):
    case = case_for(name)
    ref = case.run()
    for method, knobs in (("window", {"kernel_size": kernel_for(case.grid)}), ("topk", {"topk": 0.5})):
        with ditaccel.accelerate(case.model, method, block_size=64, **knobs) as handle:
            out = case.run()
            stats = handle.stats()
        assert torch.isfinite(out).all(), method
        assert out.shape == ref.shape
        assert stats["calls"] > 0 and stats["dense_calls"] < stats["calls"], (method, stats["calls"])
    after = case.run()
    assert torch.equal(after, ref)  # remove() restores the original forward bit for bit


@pytest.mark.parametrize("name", NAMES)
def test_plan_equals_brute_force_mask(name, monkeypatch):
    case = case_for(name)
    adapter = find_adapter(case.model)
    sites = adapter.self_attention_modules(case.model)
    assert {processor_kind(m.processor).value for _, _, m in sites} == {adapter.attention_route}
    calls = []
    original = AttentionSite.attend

    def recording(self, q, k, v, attn_mask, scale, dense):
        out = original(self, q, k, v, attn_mask, scale, dense)
        calls.append((q, k, v, attn_mask, scale, out))
        return out

    monkeypatch.setattr(AttentionSite, "attend", recording)
    kernel = kernel_for(case.grid)
    with ditaccel.accelerate(case.model, "window", kernel_size=kernel, block_size=64):
        case.run()
    assert len(calls) == len(sites)
    layouts = case.segments if isinstance(case.segments[0], list) else [case.segments]
    masks = {sum(n for _, n in segs): brute_force_mask(case.grid, segs, kernel) for segs in layouts}
    for q, k, v, attn_mask, scale, out in calls:
        B, S, H, D = q.shape
        mask = masks[S]
        assert 0 < mask.float().mean() < 1
        allowed = mask & model_allowed(attn_mask, B, S)
        qd, kd, vd = (x.double().transpose(1, 2) for x in (q, k, v))
        expected = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=allowed, scale=scale)
        rows = allowed.any(-1).expand(B, H, S)  # query rows the model masks out entirely are not compared
        got = out.double().transpose(1, 2)
        err = (got - expected)[rows].abs().max()
        assert err <= 1e-4 * expected[rows].abs().max(), float(err)


def test_lumina2_unequal_caption_lengths_run_the_models_attention():
    """Samples whose image tokens sit at different offsets: the adapter asks for dense, the output is
    the model's own."""
    from tiny_families import build_lumina2

    case = build_lumina2(mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]))
    ref = case.run()
    with pytest.warns(UserWarning, match="caption lengths differ"):
        with ditaccel.accelerate(case.model, "window", kernel_size=KERNEL_IMAGE, block_size=64):
            out = case.run()
    assert torch.equal(out, ref)
