"""Preset files: a calibrated ``TableConfig`` with what it was calibrated on, as versioned JSON.

    {"format": "ditaccel-preset", "version": 1,
     "model": {"pipeline", "transformer", "config_sha256", "layers", "heads"},
     "calibrated_at": {"height", "width", "num_frames", "num_inference_steps", "grid"},
     "prompts": {"count", "sha256"}, "target": {"psnr": 32.0}, "budget": {...},
     "measured": {...}, "config": TableConfig.to_json()}

``ditaccel.accelerate(pipe, preset="x.json")`` reads it (:func:`preset_config`): a file written for
another transformer class or configuration is refused (ValueError naming both); a call at another
resolution or frame count than the calibrated one runs, with a note in ``stats()["notes"]`` and a
warning (the table's ``calibrated_grid``). Shipped presets live in :data:`SHIPPED_DIR`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "ditaccel-preset"
VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "reference" / "presets"


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def config_sha256(transformer) -> str:
    """A hash of the transformer's diffusers config (its architecture), stable across processes."""
    config = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    text = json.dumps(_jsonable(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prompts_sha256(prompts) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def model_identity(pipe) -> dict:
    """Pipeline and transformer class, config hash, layer and head count of ``pipe``'s transformer."""
    from ..pipelines import find_adapter

    adapter = find_adapter(pipe)
    transformers = adapter.transformers(pipe)
    if len(transformers) != 1:
        raise ValueError(f"presets describe one transformer; {type(pipe).__name__} has "
                         f"{[a for a, _ in transformers]}")
    _, transformer = transformers[0]
    sites = list(adapter.self_attention_modules(transformer))
    heads = getattr(sites[0][2], "heads", None) if sites else None
    return {"pipeline": type(pipe).__name__, "transformer": type(transformer).__name__,
            "config_sha256": config_sha256(transformer), "layers": len(sites), "heads": heads}


def write_preset(path, *, config, pipe, call: dict, grid, prompts, target: dict, budget: dict,
                 measured: dict) -> Path:
    data = {
        "format": FORMAT, "version": VERSION, "model": model_identity(pipe),
        "calibrated_at": {**{k: call.get(k) for k in ("height", "width", "num_frames", "num_inference_steps")},
                          "grid": list(grid) if grid else None},
        "prompts": {"count": len(prompts), "sha256": prompts_sha256(prompts)},
        "target": target, "budget": _jsonable(budget), "measured": _jsonable(measured),
        "config": config.to_json(),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def read_preset(path) -> dict:
    """The preset file's content, checked for format and version (ValueError naming the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"preset file {str(path)!r} does not exist (shipped presets: "
                         f"{[p.name for p in shipped_presets()]})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"preset file {str(path)!r} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"preset file {str(path)!r} is not a ditaccel preset (format must be {FORMAT!r}, got "
                         f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"preset file {str(path)!r} has version {data.get('version')!r}; this ditaccel reads "
                         f"version {VERSION}")
    for key in ("model", "config"):
        if not isinstance(data.get(key), dict):
            raise ValueError(f"preset file {str(path)!r}: '{key}' must be an object")
    return data


def table_config(data: dict, source: str = "preset"):
    from ..methods.table_config import TableConfig

    values = dict(data["config"])
    grid = (data.get("calibrated_at") or {}).get("grid")
    if grid and "calibrated_grid" not in values:
        values["calibrated_grid"] = list(grid)
    try:
        return TableConfig.from_json(values)
    except ValueError as e:
        raise ValueError(f"{source}: config: {e}") from None


def preset_config(path, pipe):
    """The preset's config, after checking that it was calibrated on this pipeline's transformer."""
    data = read_preset(path)
    want = data["model"]
    have = model_identity(pipe)
    for key, label in (("transformer", "transformer class"), ("config_sha256", "transformer config hash"),
                       ("layers", "self-attention layers"), ("heads", "attention heads")):
        if want.get(key) != have.get(key):
            raise ValueError(
                f"preset {str(path)!r} does not fit this pipeline: it was calibrated on {want.get('transformer')} "
                f"(config {str(want.get('config_sha256'))[:12]}, {want.get('layers')} layers x {want.get('heads')} "
                f"heads), this pipeline has {have['transformer']} (config {have['config_sha256'][:12]}, "
                f"{have['layers']} layers x {have['heads']} heads): the {label} differs. Calibrate this pipeline "
                f"(`ditaccel calibrate --model ...`) or pass a method instead")
    return table_config(data, f"preset {str(path)!r}")


def shipped_presets() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.json")) if SHIPPED_DIR.is_dir() else []


def presets_markdown() -> str:
    """The shipped preset files as a markdown table (``ditaccel presets``)."""
    lines = ["", "## Calibrated presets shipped", "",
             "| file | transformer | calibrated at | target | measured PSNR | density | cost |",
             "|---|---|---|---|---|---|---|"]
    for path in shipped_presets():
        try:
            data = read_preset(path)
        except ValueError as e:
            lines.append(f"| {path.name} | unreadable: {e} | | | | | |")
            continue
        at = data.get("calibrated_at") or {}
        m = data.get("measured") or {}
        psnr = m.get("heldout_psnr_mean", m.get("psnr_mean"))
        lines.append(
            f"| {path.name} | {data['model'].get('transformer')} | {at.get('height')}x{at.get('width')}x"
            f"{at.get('num_frames')}, {at.get('num_inference_steps')} steps | {data.get('target')} | "
            f"{psnr if psnr is None else f'{psnr:.2f}'} | {m.get('density')} | {m.get('cost')} |")
    if not shipped_presets():
        lines.append("| (none) | | | | | | |")
    lines.append("")
    lines.append("Use one with `ditaccel.accelerate(pipe, preset=PATH)`; write one with `ditaccel calibrate`.")
    return "\n".join(lines) + "\n"


__all__ = ["FORMAT", "VERSION", "SHIPPED_DIR", "model_identity", "preset_config", "read_preset", "write_preset",
           "shipped_presets", "presets_markdown", "config_sha256", "prompts_sha256"]
