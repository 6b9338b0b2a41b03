"""What a bench run leaves behind: results.csv, the figures, a self-contained report.html, a table.

Figures are drawn per (model, size) group: the Pareto chart of the methods, their density heat
maps and their block maps. ``report.html`` embeds them as data URIs, so it is one file to attach.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import re
from pathlib import Path

from ..eval.files import atomic_path
from ..eval.media import write_image
from ..eval.plots import block_mask_figure, density_heatmaps, pareto_chart
from .runner import BenchRun, _size_label, aggregate

CSV_COLUMNS = (
    "key", "model", "method", "label", "height", "width", "frames", "steps", "seed", "status", "error",
    "psnr", "identical", "psnr_min", "ssim", "lpips", "latent_rel_l2", "attention_error", "density", "speedup",
    "speedup_sparse_steps", "dense_mean_step_ms", "accel_mean_step_ms", "attention_share", "wall_s", "baseline",
)


def csv_row(cell: dict, verdict: str | None) -> dict:
    row = {k: cell.get(k) for k in ("key", "model", "method", "label", "seed", "status", "error", "wall_s")}
    size = cell["size"]
    row.update(height=size["height"], width=size["width"], frames=size["frames"], steps=size["steps"])
    if cell["status"] == "ok":
        row.update(cell["metrics"])
        row["psnr_min"] = cell["quality"]["psnr_min"]
        t = cell["timing"]
        row.update({k: t[k] for k in ("speedup_sparse_steps", "dense_mean_step_ms", "accel_mean_step_ms",
                                      "attention_share")})
    row["baseline"] = verdict
    return row


def write_csv(results: dict, path: Path, diff: dict | None = None) -> Path:
    verdicts = {r["key"]: r["status"] for r in diff["cells"]} if diff else {}
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for cell in results["cells"]:
            writer.writerow({k: _csv_value(v) for k, v in csv_row(cell, verdicts.get(cell["key"])).items()})
    return Path(path)


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return v


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80] or "group"


def write_figures(run: BenchRun, rows: list[dict]) -> dict[str, dict[str, str]]:
    """{group title: {"pareto": path, "density": path, "mask": path}} for every (model, size) group."""
    figures = {}
    cells = run.results["cells"]
    groups = dict.fromkeys((r["model"], r["size"]) for r in rows)
    multi = len(groups) > 1
    for model, size in groups:
        title = f"{model}, {size}"
        prefix = f"{_slug(model)}_{_slug(size)}_" if multi else ""
        group_rows = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        first_ok = {}
        for c in cells:
            if c["model"] == model and _size_label(c) == size and c["status"] == "ok":
                first_ok.setdefault(c["label"], c)
        paths = {
            "pareto": pareto_chart(group_rows, run.out / f"{prefix}pareto.png", f"speedup vs PSNR: {title}"),
            "density": density_heatmaps([(label, c["density"]["per_layer_step"]) for label, c in first_ok.items()],
                                        run.out / f"{prefix}density.png",
                                        f"density over layers x steps (seed {_first_seed(first_ok)}): {title}"),
            "mask": block_mask_figure([(r["label"], run.block_maps[(model, r["label"], size)]) for r in group_rows
                                       if (model, r["label"], size) in run.block_maps],
                                      run.out / f"{prefix}block_mask.png", f"block maps: {title}"),
        }
        figures[title] = {k: str(v) for k, v in paths.items() if v is not None}
        frames = []
        for r in group_rows:
            picture = run.key_frames.get((model, r["label"], size))
            if picture is not None:
                path = run.out / f"{prefix}frames_{_slug(r['label'])}.png"
                with atomic_path(path) as tmp:
                    write_image(tmp, picture[None])
                frames.append((r["label"], str(path)))
        figures[title]["frames"] = frames
    return figures


def _first_cells(results: dict, model: str, size: str) -> list[dict]:
    first = {}
    for c in results["cells"]:
        if c["model"] == model and _size_label(c) == size and c["status"] == "ok":
            first.setdefault(c["label"], c)
    return list(first.values())


def _first_seed(first_ok: dict) -> str:
    seeds = sorted({c["seed"] for c in first_ok.values()})
    return ", ".join(map(str, seeds)) or "-"


# --- text ------------------------------------------------------------------------------------------

def _f(x, spec: str = ".3f") -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


TABLE_COLUMNS = (  # (header, row key, format)
    ("method", "label", "s"), ("ok", "ok", "s"), ("speedup", "speedup", ".2f"), ("dense ms", "dense_mean_step_ms", ".0f"),
    ("accel ms", "accel_mean_step_ms", ".0f"), ("attn %", "attention_share", ".0%"), ("density", "density", ".3f"),
    ("PSNR", "psnr", ".2f"), ("SSIM", "ssim", ".4f"), ("LPIPS", "lpips", ".4f"), ("lat rel-L2", "latent_rel_l2", ".3g"),
    ("attn err", "attention_error", ".3g"),
)


def _cell_text(row: dict, key: str, spec: str) -> str:
    if key == "ok":
        return f"{row['ok']}/{row['seeds']}"
    if key == "speedup":  # dense / accelerated; '?' marks a figure the timing noise does not support
        return _f(row.get(key), spec) + ("" if row.get("conclusive") or row.get(key) is None else "?")
    if key == "psnr" and row.get("identical"):
        return "identical"
    if spec == "s":
        return str(row[key])
    return _f(row.get(key), spec)


def format_table(results: dict, rows: list[dict]) -> str:
    """The aggregate table (means over seeds), one block per (model, size), then failures."""
    lines = [f"ditaccel bench: {len(results['cells'])} cell(s) on {results['device']} ({results['dtype']})"
             + ("" if results["complete"] else " -- INCOMPLETE")]
    for model, size in dict.fromkeys((r["model"], r["size"]) for r in rows):
        group = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        table = [[h for h, _, _ in TABLE_COLUMNS]] + [[_cell_text(r, k, s) for _, k, s in TABLE_COLUMNS] for r in group]
        widths = [max(len(line[i]) for line in table) for i in range(len(TABLE_COLUMNS))]
        lines += ["", f"{model}, {size} (means over seeds)"]
        lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
                  for line in table]
    failed = [c for c in results["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["", f"{len(failed)} failing cell(s):"] + [f"  {c['key']}: {c['error']}" for c in failed]
    lines += ["", "speedup = dense time / accelerated time over the denoising loop (>1 = faster); "
              "'?' = inconclusive (one repeat, spread or drift > 20%, or a loaded machine)"]
    return "\n".join(lines)


# --- html ------------------------------------------------------------------------------------------

def _img(path: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(Path(path).name)}" src="data:image/png;base64,{data}">'


def _html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r) + "</tr>" for r in body)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


_STYLE = (
    "<style>body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;border:1px solid #eee;margin:6px 0}pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
    ".bad{color:#b00020}</style>"
)


def render_html(results: dict, rows: list[dict], figures: dict, diff: dict | None, diff_text: str | None) -> str:
    m = results["matrix"]
    versions = ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items())
    incomplete = "" if results["complete"] else " — <b class=bad>incomplete (interrupted)</b>"
    error_steps = m["error_steps"] if m["error_steps"] is not None else "middle and last"
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>ditaccel bench</title>{_STYLE}</head><body>",
        "<h1>ditaccel bench</h1>",
        (f"<p>{len(results['cells'])} cell(s) on <b>{html.escape(str(results['device']))}</b> "
         f"({html.escape(str(results['dtype']))}), started {html.escape(str(results['started']))}"
         f"{incomplete}. {html.escape(versions)}.</p>"),
        (f"<p>Seeds {html.escape(str(m['seeds']))}; attention error sampled at steps "
         f"{html.escape(str(error_steps))}, which are left out of the step timings of both sides. "
         "Speedup = dense time / accelerated time over the denoising loop (&gt;1 = faster; the same steps on "
         "both sides); '?' marks a figure the timing noise does not support (one repeat, spread or drift "
         "&gt; 20%, or a loaded machine).</p>"),
    ]
    if diff is not None:
        cls = "bad" if diff["regressions"] else ""
        parts.append(f"<h2 class='{cls}'>Baseline: {diff['regressions']} regression(s)</h2>"
                     f"<pre>{html.escape(diff_text or '')}</pre>")
    for model, size in dict.fromkeys((r["model"], r["size"]) for r in rows):
        title = f"{model}, {size}"
        group = [r for r in rows if (r["model"], r["size"]) == (model, size)]
        body = [[_cell_text(r, k, s) for _, k, s in TABLE_COLUMNS] for r in group]
        parts += [f"<h2>{html.escape(title)}</h2>", "<p>Means over seeds.</p>",
                  _html_table([h for h, _, _ in TABLE_COLUMNS], body)]
        verdicts = [(c["label"], c.get("verdicts") or []) for c in _first_cells(results, model, size)]
        if verdicts:
            parts += ["<h3>Verdicts (first seed)</h3>", "<ul>" + "".join(
                f"<li><b>{html.escape(label)}</b>: {html.escape('; '.join(v))}</li>" for label, v in verdicts) + "</ul>"]
        frames = figures.get(title, {}).get("frames") or []
        if frames:
            parts.append("<h3>Key frames (first, middle, last): dense | accelerated | difference x4</h3>")
            parts += [f"<h4>{html.escape(label)}</h4>{_img(path)}" for label, path in frames]
        for name, caption in (("pareto", "Speedup vs PSNR"), ("density", "Density over layers x steps"),
                              ("mask", "Block map of one layer/head (the last step)")):
            path = figures.get(title, {}).get(name)
            if path:
                parts += [f"<h3>{caption}</h3>", _img(path)]
    failed = [c for c in results["cells"] if c["status"] != "ok"]
    if failed:
        parts += ["<h2 class='bad'>Failing cells</h2>",
                  _html_table(["cell", "error"], [[c["key"], str(c["error"])] for c in failed])]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(run: BenchRun, diff: dict | None = None, diff_text: str | None = None) -> dict[str, str]:
    """results.csv, the figures and report.html for what ``run`` holds so far; their paths."""
    results = run.results
    rows = aggregate(results["cells"])
    files = {"json": str(run.json_path), "csv": str(write_csv(results, run.out / "results.csv", diff))}
    figures = write_figures(run, rows)
    for title, paths in figures.items():
        for name, path in paths.items():
            for label, p in (path if name == "frames" else [(None, path)]):
                key = name if label is None else f"{name} {label}"
                files[f"{key}: {title}" if len(figures) > 1 else key] = p
    report = run.out / "report.html"
    with atomic_path(report) as tmp:
        tmp.write_text(render_html(results, rows, figures, diff, diff_text))
    files["report"] = str(report)
    return files


__all__ = ["CSV_COLUMNS", "format_table", "render_html", "write_csv", "write_figures", "write_outputs"]
