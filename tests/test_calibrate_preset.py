"""Preset files: round trip, refusal on a pipeline they do not fit, the resolution note, the shipped one."""

from __future__ import annotations

import json

import pytest
import torch

import ditaccel
from ditaccel.calibration.preset import (model_identity, preset_config, presets_markdown, read_preset,
                                         shipped_presets, write_preset)
from ditaccel.methods import TableConfig

from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

RULES = [{"use": "share", "layers": [1], "steps": [2, 4]},
         {"use": "window", "layers": [0], "heads": [1], "steps": [0.5, 1.0], "knobs": {"kernel_size": [1, 3, 3]}}]


def _write(tmp_path, pipe, grid=(3, 8, 16), **over):
    config = TableConfig(block_size=64, rules=RULES)
    path = write_preset(tmp_path / "p.json", config=config, pipe=pipe,
                        call=dict(height=128, width=256, num_frames=9, num_inference_steps=4), grid=grid,
                        prompts=["a", "b"], target={"psnr": 32.0}, budget={"minutes": 1},
                        measured={"psnr_mean": 33.0, "density": 0.5})
    if over:
        data = json.loads(path.read_text())
        for dotted, value in over.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        path.write_text(json.dumps(data))
    return path, config


def test_preset_round_trips_and_runs_like_its_config(tmp_path):
    pipe = pipe_for("wan")
    path, config = _write(tmp_path, pipe)
    data = read_preset(path)
    assert data["version"] == 1 and data["model"] == model_identity(pipe)
    assert data["prompts"]["count"] == 2 and len(data["prompts"]["sha256"]) == 64
    loaded = preset_config(path, pipe)
    assert loaded.rules == config.rules and loaded.calibrated_grid == (3, 8, 16)
    outs = []
    for how in ({"preset": path}, {"method": config}):
        with ditaccel.accelerate(pipe, **how) as handle:
            outs.append(pipe(**call_kwargs("wan", pipe, steps=4, output_type="latent", **SPARSE_SIZE["wan"])).frames)
            stats = handle.stats()
        assert stats["method"] == "table" and stats["reuse_calls"] == 4
    assert torch.isfinite(outs[0]).all()
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_a_preset_is_refused_by_a_pipeline_it_does_not_fit(tmp_path):
    pipe = pipe_for("wan")
    path, _ = _write(tmp_path, pipe)
    other = pipe_for("hunyuan_video")
    with pytest.raises(ValueError, match="does not fit this pipeline.*transformer class"):
        ditaccel.accelerate(other, preset=path)
    from ditaccel.hooks import STEP_HOOK

    registry = getattr(other.transformer, "_diffusers_hook", None)
    assert registry is None or registry.get_hook(STEP_HOOK) is None  # nothing applied
    path2, _ = _write(tmp_path, pipe, **{"model.config_sha256": "0" * 64})
    with pytest.raises(ValueError, match="config hash differs"):
        ditaccel.accelerate(pipe, preset=path2)
    with pytest.raises(ValueError, match="not both"):
        ditaccel.accelerate(pipe, "tile", preset=path)


@pytest.mark.parametrize("change, match", [
    ({"version": 99}, "version"), ({"format": "other"}, "not a ditaccel preset"),
    ({"config.rules": [{"use": "share", "heads": [0]}]}, r"rules\[0\]\.heads"),
])
def test_bad_preset_files_are_refused_with_the_reason(tmp_path, change, match):
    pipe = pipe_for("wan")
    path, _ = _write(tmp_path, pipe, **change)
    with pytest.raises(ValueError, match=match):
        ditaccel.accelerate(pipe, preset=path)
    with pytest.raises(ValueError, match="does not exist"):
        read_preset(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_preset(tmp_path / "junk.json")


def test_another_resolution_runs_with_a_note(tmp_path):
    pipe = pipe_for("wan")
    path, _ = _write(tmp_path, pipe, grid=(3, 8, 8))
    with ditaccel.accelerate(pipe, preset=path) as handle:
        with pytest.warns(UserWarning, match="calibrated at the token grid"):
            pipe(**call_kwargs("wan", pipe, steps=4, output_type="latent", **SPARSE_SIZE["wan"]))
        notes = handle.stats()["notes"]
    assert any("calibrated at the token grid (3, 8, 8)" in n and "(3, 8, 16)" in n for n in notes)


def test_the_shipped_embedded_preset_fits_the_embedded_pipeline_and_is_listed():
    from ditaccel.pipelines import embedded

    shipped = {p.name: p for p in shipped_presets()}
    assert "embedded.json" in shipped
    data = read_preset(shipped["embedded.json"])
    assert data["model"]["transformer"] == "WanTransformer3DModel"
    assert embedded.PRESET_FILE == shipped["embedded.json"]  # shipped, and the default (embedded.PRESET)
    config = preset_config(shipped["embedded.json"], embedded.load())
    assert config.method == "table" and config.rules
    assert "embedded.json" in presets_markdown()
