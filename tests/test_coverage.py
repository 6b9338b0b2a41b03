"""The model-coverage table: generated from the registry, printed by ``ditaccel presets``, pasted
in README.md, and honest about every adapter (preset source stated, routes named)."""

from __future__ import annotations

from pathlib import Path

from ditaccel.pipelines import ADAPTERS, REFUSED
from ditaccel.pipelines.coverage import ROUTES, coverage_markdown

README = Path(__file__).resolve().parents[1] / "README.md"
EXISTING = {"wan", "hunyuan_video", "cogvideox", "flux"}  # presets with provenance: the other half of issue 13


def test_readme_holds_the_generated_table():
    text = README.read_text()
    assert "## Model coverage" in text
    section = text.split("## Model coverage", 1)[1]
    assert coverage_markdown() in section, "README.md's table is stale: paste the output of `ditaccel presets`"


def test_table_lists_every_adapter_class_and_refusal():
    table = coverage_markdown()
    for adapter in ADAPTERS:
        assert f"| {adapter.family} |" in table
        for cls in adapter.transformer_classes:
            assert f"`{cls}`" in table
        assert adapter.attention_route in ROUTES
    for name in REFUSED:
        assert f"`{name}`" in table


def test_new_family_presets_are_conservative_and_say_so():
    for adapter in ADAPTERS:
        if adapter.family in EXISTING:
            continue
        preset = adapter.preset()
        assert "not yet calibrated" in adapter.preset_source, adapter.family
        assert preset.topk is not None and preset.topk >= 0.3, adapter.family
        assert isinstance(preset.dense_steps, float) and preset.dense_steps >= 0.2, adapter.family  # follows the call
        assert f"default {adapter.typical_steps}" in adapter.preset_source, adapter.family


def test_presets_command_prints_the_table(capsys):
    from ditaccel.cli import main

    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(coverage_markdown())  # then the calibrated preset files shipped
    assert "## Calibrated presets shipped" in out
