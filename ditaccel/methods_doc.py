"""Every method's knobs, from the config declarations: ``ditaccel methods`` and ``docs/methods.md``.

The knob tables in ``docs/methods.md`` sit between ``<!-- knobs:begin -->`` and ``<!-- knobs:end -->``
and are :func:`knobs_markdown`'s output (a test keeps them equal; regenerate with
``python -m ditaccel.methods_doc --write docs/methods.md``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- knobs:begin -->", "<!-- knobs:end -->"


def _allowed(spec) -> str:
    if spec.choices:
        return " / ".join(str(c) for c in spec.choices)
    if spec.low is None and spec.high is None:
        return {"axes": "3 ints >= 1 (t, h, w)", "optional_axes": "None or 3 ints >= 1", "layers":
                "int N (first N) or indices", "steps": "step/layer indices", "bool": "True / False",
                "count_or_fraction": "int N >= 0 or a float in (0, 1)",
                "schedule": "{knob: [values over the steps]}"}.get(spec.kind, "any")
    low = "" if spec.low is None else (f"> {spec.low}" if spec.low_open else f">= {spec.low}")
    high = "" if spec.high is None else f"<= {spec.high}"
    return ", ".join(x for x in (low, high) if x) + (" (odd)" if spec.odd else "")


def _default(config, spec) -> str:
    value = getattr(config, spec.name)
    rule = getattr(config, "selection_rule", None)
    if value is None and rule is not None and spec.name in rule():
        return f"None (acts as {rule()[spec.name]})"
    return repr(value)


def method_rows(name: str):
    """(field, kind, allowed, default, help) of every knob of ``name``; shared knobs last."""
    from .config import AttentionConfig, describe_fields
    from .methods import config_class

    cls = config_class(name)
    config = cls()
    shared = {s.name for s in describe_fields(AttentionConfig)}
    specs = describe_fields(cls)
    ordered = [s for s in specs if s.name not in shared] + [s for s in specs if s.name in shared]
    return [(s.name, s.kind, _allowed(s), _default(config, s), s.help, s.name in shared) for s in ordered]


def methods_text(only: str | None = None) -> str:
    from .methods import COMPOSED_METHODS, METHODS, REGISTRY

    lines = []
    for name in (*METHODS, *COMPOSED_METHODS) if only is None else (only,):
        module = sys.modules[REGISTRY[name][0].__module__]
        doc = (module.__doc__ or "").strip().splitlines()[0]
        lines.append(doc if doc.startswith(f"{name}:") else f"{name}: {doc}")
        if name in COMPOSED_METHODS:
            lines.append("  rules  (list of {use, layers, heads, steps, knobs}: see ditaccel.methods.table_config)")
        rows = method_rows(name)
        width = max(len(r[0]) for r in rows)
        for field, kind, allowed, default, help_, shared in rows:
            if shared and only is None:
                continue
            lines.append(f"  {field:<{width}}  {kind:<14} {allowed:<28} default {default}")
            lines.append(f"  {'':<{width}}  {help_}")
        lines.append("")
    if only is None:
        lines.append("shared by every method (`ditaccel methods NAME` shows them with each method):")
        for field, kind, allowed, default, help_, shared in method_rows("dense"):
            if shared:
                lines.append(f"  {field:<18} {kind:<14} {allowed:<28} default {default}")
                lines.append(f"  {'':<18} {help_}")
    return "\n".join(lines).rstrip() + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def knobs_markdown() -> str:
    from .methods import METHODS

    out = []
    for name in METHODS:
        own = [r for r in method_rows(name) if not r[5]]
        out += [f"#### `{name}`", ""]
        if not own:
            out += ["No knobs of its own (the shared ones below).", ""]
            continue
        out += ["| knob | kind | allowed | default | what it does |", "|---|---|---|---|---|"]
        out += [f"| `{f}` | {k} | {_cell(a)} | `{_cell(d)}` | {_cell(h)} |" for f, k, a, d, h, _ in own]
        out.append("")
    out += ["#### Shared by every method", "", "| knob | kind | allowed | default | what it does |",
            "|---|---|---|---|---|"]
    out += [f"| `{f}` | {k} | {_cell(a)} | `{_cell(d)}` | {_cell(h)} |"
            for f, k, a, d, h, shared in method_rows("dense") if shared]
    return "\n".join(out) + "\n"


def replace_knobs(text: str) -> str:
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"no {BEGIN} ... {END} section to fill")
    return pattern.sub(lambda _: f"{BEGIN}\n{knobs_markdown()}{END}", text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="print or write the knob reference")
    p.add_argument("--write", metavar="FILE", help="fill the knob section of this markdown file")
    args = p.parse_args(argv)
    if args.write:
        path = Path(args.write)
        path.write_text(replace_knobs(path.read_text()))
    else:
        sys.stdout.write(knobs_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
