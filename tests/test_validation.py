"""Bad input caught at accelerate (the issue's fuzz findings, one by one), and register_method."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

import ditaccel
from ditaccel.config import AttentionConfig, knob
from ditaccel.methods import AttentionMethod


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def state(model):
    return [(n, "forward" in m.__dict__, hasattr(m, "_diffusers_hook"),
             dict(vars(m.processor)) if getattr(m, "processor", None) is not None else None)
            for n, m in model.named_modules()]


def forward(model, frames=3):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, frames, 16, 16, generator=gen)
    text = torch.randn(1, 5, 32, generator=gen)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("method,overrides,needle", [
    ("tile", dict(backend="triton"), r"TileConfig\.backend='triton'.*head dim 16"),  # tiny_wan: 2 heads x 16
    ("window", dict(cache_budget_mb=math.inf), r"WindowConfig\.cache_budget_mb must be a finite number"),
    ("window", dict(cache_budget_mb=math.nan), r"WindowConfig\.cache_budget_mb"),
    ("window", dict(cache_budget_mb=1e300), r"WindowConfig\.cache_budget_mb must be in"),
    ("window", dict(cache_budget_mb=10**400), r"WindowConfig\.cache_budget_mb must be a finite number"),
    ("heads", dict(spatial_frames=10**30), r"HeadsConfig\.spatial_frames must be at most"),
    ("cluster", dict(iters_first=10**6), r"ClusterConfig\.iters_first must be <= 200"),
    ("tile", dict(window=(1, 10**12, 1)), r"TileConfig\.window\[h\] must be <="),
    ("radial", dict(decay_factor=math.inf), r"RadialConfig\.decay_factor"),
    ("topk", dict(dense_layers=10**40), r"TopKConfig\.dense_layers"),
    ("tile", dict(dense_steps=1.0), r"TileConfig\.dense_steps must be an int count >= 0 or a float fraction"),
    ("tile", dict(dense_steps=math.nan), r"TileConfig\.dense_steps"),
])
def test_rejected_at_accelerate_and_untouched(tiny_wan, method, overrides, needle):
    ref = forward(tiny_wan)
    before = state(tiny_wan)
    with pytest.raises(ValueError, match=needle):
        ditaccel.accelerate(tiny_wan, method, **overrides)
    assert state(tiny_wan) == before
    assert torch.equal(forward(tiny_wan), ref)


def test_boundaries_that_are_valid_run(tiny_wan, one_thread):
    ref = forward(tiny_wan)
    for method, overrides in [("heads", dict(spatial_frames=2**31 - 1, block_size=64)),
                              ("window", dict(kernel_size=(2**31 - 1, 3, 3), cache_budget_mb=1e9, block_size=64)),
                              ("cluster", dict(iters_first=200, iters_step=200, block_size=64)),
                              ("radial", dict(band_floor=2**31 - 1, sink_frames=2**31 - 1, block_size=64))]:
        with ditaccel.accelerate(tiny_wan, method, **overrides):
            out = forward(tiny_wan)
        assert torch.isfinite(out).all(), method
    assert torch.equal(forward(tiny_wan), ref)


# --- register_method -------------------------------------------------------------------------

@dataclass(frozen=True)
class StripeConfig(AttentionConfig):
    """A toy static method from outside the package: each query sees keys of its own frame and the
    ``reach`` frames before it."""

    method = "toy_stripe"
    reach: int = knob(0, "int", low=0, help="earlier frames each query also sees")


class StripeMethod(AttentionMethod):
    name = "toy_stripe"

    def order(self) -> str:
        return "raster"

    def video_predicate(self, grid):
        reach = self.config.reach
        return lambda qc, kc: (qc[..., 0] - kc[..., 0] >= 0) & (qc[..., 0] - kc[..., 0] <= reach)


def test_register_method_runs_through_accelerate(tiny_wan, one_thread):
    ref = forward(tiny_wan)
    ditaccel.register_method("toy_stripe", StripeConfig, StripeMethod)
    try:
        with pytest.raises(ValueError, match="StripeConfig.reach must be >= 0"):
            ditaccel.accelerate(tiny_wan, "toy_stripe", reach=-1)
        with ditaccel.accelerate(tiny_wan, "toy_stripe", reach=0, block_size=64) as handle:
            out = forward(tiny_wan, frames=4)  # 4 frames of 64 tokens: one block each
            stats = handle.stats()
        assert stats["method"] == "toy_stripe" and stats["calls"] == 2
        assert stats["mean_density"] == pytest.approx(4 / 16)  # the block diagonal of 4 x 4 frame blocks
        assert torch.isfinite(out).all()
        with ditaccel.accelerate(tiny_wan, "toy_stripe", reach=3, block_size=64) as handle:
            forward(tiny_wan, frames=4)
            assert handle.stats()["mean_density"] == pytest.approx(10 / 16)  # the lower triangle
        assert torch.equal(forward(tiny_wan), ref)
        with pytest.raises(ValueError, match="already registered"):
            ditaccel.register_method("toy_stripe", StripeConfig, StripeMethod)
    finally:
        ditaccel.unregister_method("toy_stripe")
    with pytest.raises(ValueError, match="method must be one of"):
        ditaccel.accelerate(tiny_wan, "toy_stripe")


def test_register_method_rejects_bad_registrations():
    with pytest.raises(ValueError, match="built-in"):
        ditaccel.register_method("tile", StripeConfig, StripeMethod)
    with pytest.raises(ValueError, match="method must be 'other'"):
        ditaccel.register_method("other", StripeConfig, StripeMethod)
    with pytest.raises(ValueError, match="subclass of AttentionMethod"):
        ditaccel.register_method("toy_stripe", StripeConfig, object)
    with pytest.raises(ValueError, match="dataclass subclass of AttentionConfig"):
        ditaccel.register_method("toy_stripe", dict, StripeMethod)
