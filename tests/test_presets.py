"""Family presets: the published configurations, as fractions that follow the call's step count,
each with its source; otherwise a conservative choice marked not yet calibrated."""

from __future__ import annotations

import pytest
from tiny_pipelines import call_kwargs, pipe_for

import ditaccel
from ditaccel.config import resolve_count
from ditaccel.pipelines import ADAPTERS, embedded
from ditaccel.pipelines.cogvideox import CogVideoXAdapter
from ditaccel.pipelines.flux import FluxAdapter
from ditaccel.pipelines.hunyuan_video import HunyuanVideoAdapter
from ditaccel.pipelines.wan import WAN21_PRESET, WAN22_PRESET, WanAdapter


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("preset,steps,dense,layers,decay", [
    (WAN21_PRESET, 50, 12, 1, 0.2),  # Radial Attention, Wan 2.1
    (WAN22_PRESET, 40, 11, 1, 0.8),  # Wan 2.2
    (HunyuanVideoAdapter().preset(), 50, 12, (), 0.95),  # HunyuanVideo
])
def test_published_radial_presets(preset, steps, dense, layers, decay):
    assert preset.method == "radial"
    assert isinstance(preset.dense_steps, float)  # follows the call
    assert resolve_count(preset.dense_steps, steps) == dense  # the published count at the published steps
    assert preset.dense_layers == layers and preset.decay_factor == decay
    assert preset.decay == 0.5 and preset.sink_frames == 1 and preset.band_floor == 128  # the published rule


@pytest.mark.parametrize("adapter", [CogVideoXAdapter(), FluxAdapter()])
def test_uncalibrated_presets_are_conservative(adapter):
    preset = adapter.preset()
    assert "not yet calibrated" in adapter.preset_source
    assert isinstance(preset.dense_steps, float) and preset.dense_steps >= 0.2
    assert preset.method == "topk" and preset.topk >= 0.3


def test_every_adapter_states_its_source():
    for adapter in ADAPTERS:
        assert adapter.preset_source, adapter.family
    assert "Radial Attention" in WanAdapter.preset_source and "Sparse VideoGen" in WanAdapter.preset_source
    assert "Sliding Tile" in HunyuanVideoAdapter.preset_source


def test_wan22_pipeline_gets_the_wan22_preset_and_follows_steps():
    wan22 = pipe_for("wan22")
    with ditaccel.accelerate(wan22) as handle:
        assert handle.config == WAN22_PRESET
        for steps in (4, 8):
            handle.reset_stats()
            wan22(**call_kwargs("wan22", wan22, steps=steps, output_type="latent"))
            dense = [s for s, v in handle.stats()["steps"].items() if v["dense_calls"] == v["calls"]]
            assert dense == list(range(resolve_count(11 / 40, steps))), steps
    wan = pipe_for("wan")
    with ditaccel.accelerate(wan) as handle:
        assert handle.config == WAN21_PRESET
        wan(**call_kwargs("wan", wan, steps=5, output_type="latent"))
        per_layer = handle.stats()["per_layer_step"]
        assert all(c["dense_calls"] == c["calls"] for c in per_layer if c["layer"] == 0)  # 1 dense layer
        assert any(c["dense_calls"] < c["calls"] for c in per_layer if c["layer"] == 1)


def test_presets_on_a_bare_transformer_count_the_family_default_steps(tiny_wan):
    # No scheduler counts a bare transformer's steps: the preset's fraction runs as its count at the
    # family pipeline's default step count, and stats() says so.
    with ditaccel.accelerate(tiny_wan) as handle:
        assert handle.config.decay_factor == 0.2 and handle.config.dense_steps == resolve_count(0.24, 50) == 12
        assert any("bare transformer" in n and "runs as 12" in n for n in handle.stats()["notes"])
    with ditaccel.accelerate(tiny_wan, dense_steps=3) as handle:  # the user's count wins, no note
        assert handle.config.dense_steps == 3 and not handle.stats()["notes"]
    # The user's own fraction is taken as given, and refused (nothing counts the steps).
    with pytest.raises(ValueError, match=r"RadialConfig\.dense_steps=0\.3 follows the pipeline call"):
        ditaccel.accelerate(tiny_wan, dense_steps=0.3)


@pytest.mark.parametrize("family,adapter,count", [("flux", FluxAdapter(), resolve_count(0.25, 28)),
                                                   ("cogvideox", CogVideoXAdapter(), resolve_count(0.25, 50))])
def test_conservative_presets_follow_the_call_and_count_on_a_bare_transformer(family, adapter, count):
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe) as handle:
        assert isinstance(handle.config.dense_steps, float)
    with ditaccel.accelerate(pipe.transformer) as handle:
        assert handle.config.dense_steps == count == resolve_count(adapter.preset().dense_steps, adapter.typical_steps)


def test_named_methods_get_their_published_settings():
    assert WanAdapter().method_defaults("radial") == {"dense_steps": 0.24, "decay_factor": 0.2, "dense_layers": 1}
    assert WanAdapter().method_defaults("heads") == {"dense_steps": 0.2}  # Sparse VideoGen on Wan
    hv = HunyuanVideoAdapter()
    assert hv.method_defaults("radial") == {"dense_steps": 0.24, "decay_factor": 0.95}
    assert hv.method_defaults("heads") == {"dense_steps": 0.1}  # Sparse VideoGen on HunyuanVideo
    assert resolve_count(hv.method_defaults("tile")["dense_steps"], 50) == 15  # Sliding Tile Attention
    assert WanAdapter().method_defaults("tile") == {}  # nothing published: the method's own defaults


def test_named_methods_follow_the_call_on_a_pipeline():
    wan = pipe_for("wan")
    with ditaccel.accelerate(wan, "radial") as handle:
        assert handle.config.dense_steps == 0.24 and handle.config.dense_layers == 1
        for steps in (3, 6):
            handle.reset_stats()
            wan(**call_kwargs("wan", wan, steps=steps, output_type="latent"))
            dense = [s for s, v in handle.stats()["steps"].items() if v["dense_calls"] == v["calls"]]
            assert dense == list(range(resolve_count(0.24, steps))), steps


def test_the_embedded_pipeline_keeps_the_methods_own_defaults():
    from ditaccel.methods import RadialConfig

    pipe = embedded.load()
    assert WanAdapter().method_defaults("radial", pipe) == {}
    with ditaccel.accelerate(pipe, "radial") as handle:
        assert handle.config == RadialConfig()


def test_embedded_preset_is_the_shipped_calibrated_table():
    from ditaccel.calibration.preset import preset_config

    pipe = embedded.load()
    assert embedded.PRESET == preset_config(embedded.PRESET_FILE, pipe)
    assert embedded.PRESET.method == "table" and embedded.PRESET.rules
    assert embedded.HAND_PRESET == ditaccel.XAttnConfig(block_size=64, threshold=0.95, dense_steps=2)
    with ditaccel.accelerate(pipe, preset=embedded.PRESET_FILE) as handle:
        assert handle.config == embedded.PRESET
    with ditaccel.accelerate(pipe) as handle:
        assert handle.config == embedded.PRESET
