"""The model-coverage table, generated from the adapter registry, and ``ditaccel presets``.

One row per family: its transformer classes, where text sits in its self-attention, what else shares
that sequence, how the attention product is intercepted, its preset and where the preset comes from.
README.md's "Model coverage" section is this output (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses

ROUTES = {
    "dispatch": "diffusers backend, per processor",
    "dispatch-active": "diffusers active backend, per module call",
    "sdpa": "SDPA TorchFunctionMode",
}


def describe_config(config) -> str:
    """``method(field=value, ...)`` with the fields that differ from the config class's defaults."""
    defaults = type(config)()
    changed = [f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
               if getattr(config, f.name) != getattr(defaults, f.name)]
    return f"{config.method}({', '.join(changed)})"


def _cell(text: str) -> str:
    return (text or "—").replace("|", "\\|")


def coverage_markdown(adapters=None) -> str:
    """The table (markdown) for ``adapters`` (default: the registry's), and the refused classes."""
    from .registry import ADAPTERS, REFUSED

    adapters = ADAPTERS if adapters is None else adapters
    rows = ["| family | transformer classes | text in self-attention | other tokens | attention intercepted by | "
            "preset | preset source |",
            "|---|---|---|---|---|---|---|"]
    for adapter in adapters:
        classes = ", ".join(f"`{c}`" for c in adapter.transformer_classes)
        rows.append("| " + " | ".join(_cell(x) for x in (
            adapter.family, classes, adapter.text_position, adapter.tokens_note,
            ROUTES.get(adapter.attention_route, adapter.attention_route), f"`{describe_config(adapter.preset())}`",
            adapter.preset_source)) + " |")
    refused = "; ".join(f"`{name}`: {reason}" for name, reason in REFUSED.items())
    rows += ["", f"Refused on purpose — {refused}.",
             "Any other transformer: `ditaccel.accelerate(pipe, method, model=ditaccel.ModelSpec(attention=..., "
             "grid=..., text=..., text_len=...))`."]
    return "\n".join(rows) + "\n"


def add_parser(subparsers):
    """Register ``presets`` (imports nothing heavy: the registry loads when the command runs)."""
    p = subparsers.add_parser("presets", help="the model-coverage table: families, classes, presets and their sources",
                              description="Print the model-coverage table (markdown) generated from the adapter "
                                          "registry: family, transformer classes, text position, other tokens, "
                                          "how attention is intercepted, the preset and where it comes from.")
    p.set_defaults(func=main)
    return p


def main(args=None) -> int:
    from ..calibration.preset import presets_markdown

    print(coverage_markdown(), end="")
    print(presets_markdown(), end="")  # the calibrated preset files shipped in the package
    return 0
