"""Running a bench matrix: every method of a (model, size, seed) group against dense on the same call.

Per cell the accelerated run is timed step by step (``compare.timed_run``), compared with the dense
run of the same seed (``metrics.compare_media``), and its ``handle.stats()`` give density per layer
and step, attention time and, at the sampled ``error_steps``, each layer's attention-output error
against dense attention on the same q, k, v. The extra dense attention those steps run would
inflate their step time, so speed figures use only the steps that were not sampled (both sides,
same steps). With ``paired_timing`` (the default) each accelerated run is preceded by its own dense
run, so both sides of a ratio are timed under the same machine load; without it one dense run per
group serves every method (cheaper; fine on a dedicated GPU).

A cell that fails (the method does not fit the grid, a kernel error, ...) is recorded with its
error and the matrix goes on. ``results.json`` is rewritten atomically after every cell, so an
interrupt leaves a complete JSON of the cells done so far (``"complete": false``).
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from ..compare import (
    _versions,
    call_arguments,
    load_pipeline,
    resolve_device,
    resolve_dtype,
    timed_run,
    warm_up,
    write_json,
)
from .matrix import EMBEDDED, BenchMatrix, Cell

FORMAT = "ditaccel-bench/1"


# --- atomic files ----------------------------------------------------------------------------------

@contextmanager
def atomic_path(path: Path):
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(data: dict, path: Path) -> Path:
    with atomic_path(path) as tmp:
        write_json(data, tmp)
    return Path(path)


# --- steps -----------------------------------------------------------------------------------------

def sampled_error_steps(num_steps: int, requested: tuple[int, ...] | None) -> list[int]:
    """The steps whose attention error is measured: ``requested`` within range, else two spread
    over the run (the middle and the last: errors grow as sparse steps accumulate)."""
    if requested is not None:
        return sorted(s for s in requested if s < num_steps)
    return sorted({max(0, num_steps // 2 - 1), num_steps - 1}) if num_steps else []


def _sum_ratio(num: list[float], den: list[float]) -> float | None:
    return sum(num) / sum(den) if num and den and sum(den) > 0 else None


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


# --- the block mask of one call --------------------------------------------------------------------

class MaskProbe:
    """Keeps q and k of one self-attention call (a layer at a step) through ``handle.observe``, so
    the block map the method picks there can be drawn after the run."""

    def __init__(self, config, step: int, layer: int | None):
        self.config = config
        self.step = step
        self.layer = layer
        self.info: dict | None = None
        self.q = self.k = None

    def __call__(self, info: dict, q, k, v) -> None:
        if self.info is not None or info["step"] != self.step:
            return
        wanted = info["layer"] == self.layer if self.layer is not None else not self.config.layer_is_dense(info["layer"])
        if wanted:
            self.info, self.q, self.k = dict(info), q.detach().clone(), k.detach().clone()

    def block_map(self, head: int) -> dict:
        """``{"kind": "static"|"dynamic"|"dense"|"none", "map": [nq, nk] int8 (0 skipped, 1 partial,
        2 full) or None, "layer", "step", "head", "density", "note"}``."""
        result = {"kind": "none", "map": None, "layer": self.layer, "step": self.step, "head": head,
                  "density": None, "note": None}
        if self.info is None:
            result["note"] = "no sparse call was seen at this layer and step"
            return result
        from ..methods import AttentionMethod, CallShape, make_method

        info = self.info
        result["layer"] = info["layer"]
        shape = CallShape(tuple(info["grid"]), info["text_len"], info["text_position"])
        method = make_method(self.config)
        # Static methods keep the base plan_for (one plan per shape); the others choose per call.
        kind = "static" if type(method).plan_for is AttentionMethod.plan_for else "dynamic"
        try:
            # What the runtime asks: None = dense attention. Cross-step state starts empty here.
            plan = method.decide(_fresh_context(self.config, info, shape, self.q), self.q, self.k)
        except Exception as exc:  # noqa: BLE001 - a drawing aid; the cell itself ran fine
            result.update(kind=kind, note=f"not drawable here ({type(exc).__name__}: {exc})")
            return result
        if plan is None:
            result.update(kind="dense", note="the method runs dense attention for this call")
            return result
        any_b, full_b = _one_head(plan.any_blocks, head), _one_head(plan.full_blocks, head)
        block_map = any_b.to(torch.int8) + (full_b & any_b).to(torch.int8)
        result.update(kind=kind, map=block_map.cpu().numpy(), density=float(any_b.float().mean()),
                      note="selection of this call, scored afresh (no cross-step reuse)" if kind == "dynamic" else None)
        return result


def _one_head(blocks: torch.Tensor, head: int) -> torch.Tensor:
    """[nq, nk], or a per-call selection [B|1, H|1, nq, nk]: batch 0, ``head`` (clamped to what is there)."""
    if blocks.dim() == 4:
        blocks = blocks[0]
    if blocks.dim() == 3:
        blocks = blocks[min(head, blocks.shape[0] - 1)]
    return blocks


def _fresh_context(config, info: dict, shape, q):
    """A CallContext with empty cross-step state, for asking a dynamic method what it selects."""
    from ..state import CallContext, StateStore

    store = StateStore(getattr(config, "cache_budget_mb", 1024.0))
    B, _, H, _ = q.shape
    return CallContext(transformer=info["transformer"], layer=info["layer"], step=info["step"], branch=info["branch"],
                       shape=shape, batch=B, heads=H, state=store.state(info["transformer"], info["layer"],
                                                                         info["branch"], (shape, B, H)),
                       store=store)


# --- one cell --------------------------------------------------------------------------------------

@dataclass
class Reference:
    """The dense run every method of a (model, size, seed) group is compared with."""

    kwargs: dict
    run: object  # compare.RunResult
    device: torch.device


def cell_record(cell: Cell) -> dict:
    return {"key": cell.key, "model": cell.model, "method": cell.method.name, "label": cell.method.label,
            "overrides": cell.method.overrides, "size": cell.size.to_dict(), "seed": cell.seed,
            "status": "pending", "error": None}


def summarise(dense, accel, stats: dict, tracked: list[int]) -> dict:
    """Timing, density, quality and attention error of one accelerated run against its dense run."""
    from ..metrics import compare_media

    n = min(len(dense.step_s), len(accel.step_s))
    timed = [i for i in range(n) if i not in tracked] or list(range(n))
    d_ms, a_ms = [s * 1e3 for s in dense.step_s], [s * 1e3 for s in accel.step_s]
    per_step = stats.get("steps") or {}
    step_density = [per_step[i]["density"] if i in per_step else None for i in range(n)]
    sparse = [i for i in timed if step_density[i] is not None and step_density[i] < 1]
    entries = stats.get("per_layer_step") or []
    if entries and all("time_ms" in e for e in entries):
        attention_ms = sum(e["time_ms"] for e in entries if e["step"] in timed)
        share_of = sum(a_ms[i] for i in timed)
    else:
        attention_ms, share_of = stats.get("attention_time_ms"), sum(a_ms)
    timing = {
        "dense_step_ms": d_ms, "accel_step_ms": a_ms, "timed_steps": timed, "error_steps": tracked,
        "timing_includes_error_steps": bool(set(timed) & set(tracked)),
        "dense_mean_step_ms": _mean(d_ms[i] for i in timed), "accel_mean_step_ms": _mean(a_ms[i] for i in timed),
        "speedup": _sum_ratio([d_ms[i] for i in timed], [a_ms[i] for i in timed]),
        "speedup_sparse_steps": _sum_ratio([d_ms[i] for i in sparse], [a_ms[i] for i in sparse]),
        "attention_time_ms": attention_ms,
        "attention_share": attention_ms / share_of if attention_ms is not None and share_of else None,
        "dense_total_ms": dense.total_s * 1e3, "accel_total_ms": accel.total_s * 1e3,
    }
    layers = stats.get("layers") or {}
    density = {
        "mean": stats.get("mean_density"),
        "per_layer": {name: v.get("density") for name, v in layers.items()},
        "per_step": step_density,
        "per_layer_step": [{k: e.get(k) for k in ("transformer", "layer", "step", "branch", "density", "time_ms")}
                           for e in entries],
        "calls": stats.get("calls"), "dense_calls": stats.get("dense_calls"), "reuse_calls": stats.get("reuse_calls"),
    }
    quality = compare_media(dense.media, accel.media, reference_latents=dense.latents, test_latents=accel.latents)
    error = stats.get("attention_error")
    if error is None:
        error = {"mean": None, "per_layer": {}, "per_layer_step": [],
                 "note": "this ditaccel's handle does not measure attention error"}
    elif error.get("mean") is None:
        error = dict(error, note="no sparse call ran at the sampled steps")
    return {
        "timing": timing, "density": density, "quality": quality, "attention_error": error,
        "metrics": {"psnr": quality["psnr"], "ssim": quality["ssim"], "lpips": quality["lpips"],
                    "latent_rel_l2": quality["latent_rel_l2"], "attention_error": error.get("mean"),
                    "density": density["mean"], "speedup": timing["speedup"]},
    }


def run_cell(pipe, cell: Cell, ref: Reference, matrix: BenchMatrix) -> tuple[dict, dict | None]:
    """(record, block map) of one cell; never raises on a failing method (KeyboardInterrupt passes)."""
    import ditaccel

    record = cell_record(cell)
    wall = time.perf_counter()
    block_map = None
    try:
        handle = ditaccel.accelerate(pipe, cell.method.method, **cell.method.overrides)
        try:
            record["config"] = handle.stats()["config"]
            if matrix.warmup:
                warm_up(pipe, ref.kwargs, seed=cell.seed, runs=matrix.warmup)
            handle.reset_stats()
            num_steps = len(ref.run.step_s)
            tracked = []
            if hasattr(handle, "track_attention_error"):
                tracked = sampled_error_steps(num_steps, matrix.error_steps)
                handle.track_attention_error(tracked)
            probe = None
            if hasattr(handle, "observe"):
                probe = MaskProbe(handle.config, num_steps - 1, matrix.mask_layer)
                handle.observe(probe)
            run = timed_run(pipe, ref.kwargs, seed=cell.seed, device=ref.device, label=cell.method.label,
                            progress=False)
            stats = handle.stats()
            if probe is not None:
                handle.observe(None)
                try:
                    block_map = probe.block_map(matrix.mask_head)
                except Exception as exc:  # noqa: BLE001 - a drawing aid must not fail a cell that ran
                    block_map = {"kind": "none", "map": None, "layer": matrix.mask_layer, "step": num_steps - 1,
                                 "head": matrix.mask_head, "density": None, "note": f"{type(exc).__name__}: {exc}"}
        finally:
            handle.remove()
        record.update(summarise(ref.run, run, stats, tracked))
        record["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - a failing cell is a result; the matrix goes on
        record.update(status="failed", error=f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                      traceback=traceback.format_exc(limit=-6))
    record["wall_s"] = time.perf_counter() - wall
    return record, block_map


# --- the matrix ------------------------------------------------------------------------------------

class BenchRun:
    """The state of one ``ditaccel bench`` run: results (what results.json holds) and block maps."""

    def __init__(self, matrix: BenchMatrix, out: Path, *, progress: bool = True):
        self.matrix = matrix
        self.out = Path(out)
        self.progress = progress
        self.block_maps: dict[tuple, dict] = {}  # (model, method label, size label) -> block map
        self.results = {
            "format": FORMAT, "complete": False, "started": _now(), "finished": None,
            "matrix": matrix.to_dict(), "device": None, "dtype": None, "versions": _versions(),
            "cells": [], "files": {},
        }

    @property
    def json_path(self) -> Path:
        return self.out / "results.json"

    def save(self) -> Path:
        return write_json_atomic(self.results, self.json_path)

    def _add(self, record: dict, bar) -> None:
        self.results["cells"].append(record)
        self.save()
        bar.update(1)
        if record["status"] != "ok":
            bar.write(f"FAILED {record['key']}: {record['error']}", file=sys.stderr)

    def run(self) -> dict:
        from tqdm.auto import tqdm

        cells = self.matrix.cells()
        device = resolve_device(self.matrix.device)
        dtype = resolve_dtype(self.matrix.dtype, device)
        self.results.update(device=str(device), dtype=str(dtype).replace("torch.", ""))
        self.save()
        with tqdm(total=len(cells), unit="cell", desc="ditaccel bench", disable=not self.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for model, model_cells in groupby(cells, key=lambda c: c.model):
                self._run_model(model, list(model_cells), device, dtype, bar)
        self.results.update(complete=True, finished=_now())
        self.save()
        return self.results

    def _run_model(self, model: str, cells: list[Cell], device, dtype, bar) -> None:
        try:
            pipe, defaults = load_pipeline(None if model == EMBEDDED else model, device, dtype)
        except Exception as exc:  # noqa: BLE001
            return self._fail_all(cells, f"loading {model!r}", exc, bar)
        for _, group in groupby(cells, key=lambda c: (c.size, c.seed)):
            group = list(group)
            bar.set_postfix_str(f"{model} {group[0].size.label} seed={group[0].seed}: dense", refresh=True)
            try:
                kwargs, run_device = self._prepare(pipe, defaults, group[0])
                shared = None if self.matrix.paired_timing else self._dense(pipe, kwargs, run_device, group[0].seed)
            except Exception as exc:  # noqa: BLE001
                self._fail_all(group, "the dense reference run", exc, bar)
                continue
            for cell in group:
                bar.set_postfix_str(f"{model} {cell.size.label} seed={cell.seed}: {cell.method.label}", refresh=True)
                try:
                    # Paired: a dense run right before each accelerated one, so both sides see the
                    # same machine load (CPU timings on shared cores drift within minutes).
                    ref = shared if shared is not None else self._dense(pipe, kwargs, run_device, cell.seed)
                except Exception as exc:  # noqa: BLE001
                    self._fail_all([cell], "the dense run", exc, bar)
                    continue
                record, block_map = run_cell(pipe, cell, ref, self.matrix)
                record["model_pipeline"] = type(pipe).__name__
                if block_map is not None:
                    # One map per (model, method, size) for the plots: the first seed's.
                    self.block_maps.setdefault((cell.model, cell.method.label, cell.size.label), block_map)
                    shape = None if block_map["map"] is None else list(block_map["map"].shape)
                    record["block_map"] = {k: v for k, v in block_map.items() if k != "map"} | {"shape": shape}
                self._add(record, bar)
        del pipe

    def _prepare(self, pipe, defaults, cell: Cell) -> tuple[dict, torch.device]:
        """The call every cell of a (size, seed) group makes, and the warm-up before its first timing."""
        from ..pipelines.embedded import DEFAULT_PROMPT

        m, s = self.matrix, cell.size
        kwargs = call_arguments(pipe, defaults, m.prompt or DEFAULT_PROMPT, steps=s.steps, height=s.height,
                                width=s.width, frames=s.frames, guidance=m.guidance)
        # A 1-step call absorbs first-call costs (allocator, BLAS init) that would land on the dense side.
        warm_up(pipe, dict(kwargs, num_inference_steps=1), seed=cell.seed, runs=1)
        warm_up(pipe, kwargs, seed=cell.seed, runs=m.warmup)
        return kwargs, torch.device(pipe._execution_device)

    def _dense(self, pipe, kwargs: dict, device: torch.device, seed: int) -> Reference:
        run = timed_run(pipe, kwargs, seed=seed, device=device, label="dense", progress=False)
        if not run.step_s:
            raise ValueError("the dense run reported no denoising steps (does the pipeline call callback_on_step_end?)")
        return Reference(kwargs, run, device)

    def _fail_all(self, cells: list[Cell], what: str, exc: Exception, bar) -> None:
        message = f"{what} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        for cell in cells:
            record = cell_record(cell)
            record.update(status="failed", error=message, traceback=traceback.format_exc(limit=-6), wall_s=0.0)
            self._add(record, bar)


def _size_label(record: dict) -> str:
    from .matrix import SizeSpec

    return SizeSpec(**record["size"]).label


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def aggregate(cells: list[dict]) -> list[dict]:
    """One row per (model, method label, size): metrics averaged over the seeds that ran."""
    rows = []
    def key(c):
        return c["model"], c["label"], _size_label(c)

    order = {}
    for c in cells:
        order.setdefault(key(c), len(order))
    for k in sorted(order, key=order.get):
        group = [c for c in cells if key(c) == k]
        ok = [c for c in group if c["status"] == "ok"]
        row = {"model": k[0], "label": k[1], "size": k[2], "method": group[0]["method"], "seeds": len(group),
               "ok": len(ok), "errors": sorted({c["error"] for c in group if c["status"] != "ok"})}
        for name in ("psnr", "ssim", "lpips", "latent_rel_l2", "attention_error", "density", "speedup"):
            row[name] = _finite_mean(c["metrics"].get(name) for c in ok)
        row["attention_share"] = _mean(c["timing"]["attention_share"] for c in ok)
        row["accel_mean_step_ms"] = _mean(c["timing"]["accel_mean_step_ms"] for c in ok)
        row["dense_mean_step_ms"] = _mean(c["timing"]["dense_mean_step_ms"] for c in ok)
        rows.append(row)
    return rows


def _finite_mean(values) -> float | None:
    """Mean; an infinite value (PSNR of identical outputs) makes the mean infinite, as it should."""
    values = [float(v) for v in values if v is not None]
    return float(np.mean(values)) if values else None


__all__ = ["BenchRun", "FORMAT", "MaskProbe", "Reference", "aggregate", "atomic_path", "run_cell",
           "sampled_error_steps", "summarise", "write_json_atomic"]
