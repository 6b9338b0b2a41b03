"""Figures of comparisons, with matplotlib's object API (no pyplot state, no display needed).

- :func:`pareto_chart`: speedup (x) against PSNR (y), one point per method (mean over seeds), the
  Pareto front (no other method both faster and closer to dense) joined by a line;
- :func:`density_heatmaps`: density over layers x steps, one panel per method;
- :func:`block_mask_figure`: the block map of one layer/head per method ([nq, nk]: skipped,
  partial, full), or the reason it cannot be drawn.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .files import atomic_path

PSNR_CAP = 100.0  # at or above this an output is equal to dense up to rounding: listed, not plotted


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return Path(path)


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher x and higher y), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    """``rows``: aggregate rows (label, speedup, psnr; psnr None with ``identical`` for outputs equal to
    dense). Identical outputs and the ``dense`` control are listed in a note, not plotted: at an
    infinite PSNR they would squash every real method into the bottom of the chart."""
    aside = [r for r in rows if r.get("speedup") is not None and
             (r.get("identical") or r.get("method") == "dense" or (r.get("psnr") or 0) >= PSNR_CAP)]
    usable = [r for r in rows if r.get("speedup") is not None and r.get("psnr") is not None and r not in aside]
    if not usable and not aside:
        return None
    points = [(r["speedup"], r["psnr"]) for r in usable]
    fig = _figure(6.4, 4.4)
    ax = fig.subplots()
    for (x, y), r in zip(points, usable):
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(points)
    if len(front) > 1:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", zorder=2,
                label="Pareto front")
        ax.legend(loc="best", fontsize=8)
    if aside:
        note = "not plotted (output equal or near-equal to dense): " + ", ".join(
            f"{r['label']} {r['speedup']:.2f}x" for r in aside)
        ax.text(0.01, 0.01, note, transform=ax.transAxes, fontsize=7, color="dimgray", va="bottom", wrap=True)
    ax.axvline(1.0, color="lightgray", lw=1, zorder=1)
    ax.set_xlabel("speedup: dense time / accelerated time (>1 = faster)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    return _save(fig, path)


def density_grid(per_layer_step: list[dict]) -> tuple[np.ndarray, list[str], list[int]]:
    """[layers, steps] density (CFG branches averaged; NaN where no call), row labels, step indices."""
    cells = defaultdict(list)
    for e in per_layer_step:
        if e.get("density") is not None:
            cells[(f"{e['transformer']}.{e['layer']}", e["step"])].append(float(e["density"]))
    layers = sorted({k[0] for k in cells}, key=lambda name: (name.rsplit(".", 1)[0], int(name.rsplit(".", 1)[1])))
    steps = sorted({k[1] for k in cells})
    grid = np.full((len(layers), len(steps)), np.nan)
    for (layer, step), values in cells.items():
        grid[layers.index(layer), steps.index(step)] = float(np.mean(values))
    return grid, layers, steps


def _panel_axes(n: int, max_cols: int, width: float, height: float, extra: float):
    """A figure with ``n`` panels, at most ``max_cols`` a row, each ``width`` x ``height`` inches
    (``extra`` inches for titles); returns (fig, flat axes)."""
    cols = min(max_cols, n)
    rows = math.ceil(n / cols)
    fig = _figure(width * cols, height * rows + extra)
    return fig, np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()


def density_heatmaps(panels: list[tuple[str, list[dict]]], path: Path, title: str) -> Path | None:
    """``panels``: (method label, per_layer_step entries); one heat map each, one colour scale."""
    panels = [(label, density_grid(entries)) for label, entries in panels if entries]
    panels = [(label, g) for label, g in panels if g[0].size]
    if not panels:
        return None
    fig, axes = _panel_axes(len(panels), 3, 3.6, 2.6, 0.4)
    image = None
    for ax, (label, (grid, layers, steps)) in zip(axes, panels):
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], fontsize=7)
        ax.set_yticks(range(len(layers)), layers, fontsize=7)
        ax.set_xlabel("step", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes[: len(panels)]), label="density (fraction of block pairs)", shrink=0.9)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


MASK_COLOURS = ("#ffffff", "#f4a261", "#264653")  # skipped, partial (masked in the kernel), full


def block_mask_figure(panels: list[tuple[str, dict]], path: Path, title: str) -> Path | None:
    """``panels``: (method label, block map dict from ``MaskProbe.block_map``); undrawable maps get
    a panel that says why (dynamic selection, dense layer)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    if not panels:
        return None
    fig, axes = _panel_axes(len(panels), 4, 3.0, 3.0, 0.8)
    cmap = ListedColormap(MASK_COLOURS)
    for ax, (label, bm) in zip(axes, panels):
        where = f"layer {bm.get('layer')}, head {bm.get('head')}, step {bm.get('step')}"
        block_map = bm.get("map")
        if block_map is None:
            ax.text(0.5, 0.5, f"{bm.get('kind')}\n{bm.get('note') or ''}", ha="center", va="center", fontsize=7,
                    wrap=True, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.imshow(np.asarray(block_map), cmap=cmap, vmin=0, vmax=2, interpolation="nearest")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("key block", fontsize=7)
            ax.set_ylabel("query block", fontsize=7)
            ax.tick_params(labelsize=6)
            where += f"\ndensity {bm.get('density'):.3f}" + (" (dynamic)" if bm.get("kind") == "dynamic" else "")
        ax.set_title(f"{label}\n{where}", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.legend(handles=[Patch(facecolor=c, edgecolor="gray", label=n)
                        for c, n in zip(MASK_COLOURS, ("skipped", "partial", "full"))],
               loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


__all__ = ["block_mask_figure", "density_grid", "density_heatmaps", "pareto_chart", "pareto_front"]
