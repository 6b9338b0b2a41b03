"""Running a bench matrix: every method of a (model, size, seed) group against dense, through the
evaluation engine (:func:`ditaccel.eval.evaluate`) — the same protocol as ``ditaccel compare``.

Per cell the engine warms up, runs ``repeats`` interleaved dense/accelerated pairs (with
``paired_timing`` off, one dense run per group serves every method), measures quality against the
dense output, and at the sampled ``error_steps`` each layer's attention-output error against dense
attention on the same q, k, v (those steps leave the timing on both sides). The block map of one
layer at the last step is caught with ``handle.observe`` (:class:`ditaccel.eval.probe.MaskProbe`).

A cell that fails (the method does not fit the grid, a kernel error, ...) is recorded with its
error and the matrix goes on. Outputs are a :class:`ditaccel.eval.files.FileSet`: ``results.json``
is rewritten after every cell inside the staging directory, and the whole set (json, csv, figures,
report) replaces the previous run's at the end — an interrupted run leaves ``--out`` as it was.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from itertools import groupby
from pathlib import Path

import numpy as np
import torch

from ..eval.engine import evaluate, pipeline_as_it_is, versions
from ..eval.files import FileSet, write_json_atomic
from ..eval.probe import MaskProbe
from ..eval.runs import call_arguments, load_pipeline, resolve_device, resolve_dtype, timed_run, warm_up
from .matrix import EMBEDDED, BenchMatrix, Cell, SizeSpec, now_utc

FORMAT = "ditaccel-bench/2"


def sampled_error_steps(num_steps: int, requested: tuple[int, ...] | None) -> list[int]:
    """The steps whose attention error is measured: ``requested`` within range, else two spread
    over the run (the middle and the last: errors grow as sparse steps accumulate)."""
    if requested is not None:
        return sorted(s for s in requested if s < num_steps)
    return sorted({max(0, num_steps // 2 - 1), num_steps - 1}) if num_steps else []


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def cell_record(cell: Cell) -> dict:
    return {"key": cell.key, "model": cell.model, "method": cell.method.name, "label": cell.method.label,
            "overrides": cell.method.overrides, "size": cell.size.to_dict(), "seed": cell.seed,
            "status": "pending", "error": None}


def comparison_fields(comparison) -> dict:
    """What a bench cell keeps of a :class:`Comparison` (JSON-safe, numbers only)."""
    d = comparison.to_dict()
    t = dict(d["timing"])
    timed = t["timed_steps"]
    entries = d["stats"].get("per_layer_step") or []
    attention_ms = sum(e["time_ms"] for e in entries if e["step"] in timed) if entries else None
    share_of = sum(t["accel_step_ms"][i] for i in timed) if timed else None
    t.update(error_steps=sorted(set(range(len(t["dense_step_ms"]))) - set(timed)) if timed else [],
             attention_time_ms=attention_ms,
             attention_share=attention_ms / share_of if attention_ms is not None and share_of else None,
             dense_mean_step_ms=_mean(t["dense_step_ms"][i] for i in timed),
             accel_mean_step_ms=_mean(t["accel_step_ms"][i] for i in timed))
    return {"config": d["config"], "timing": t, "density": d["density"], "quality": d["quality"],
            "quality_verdict": d["quality_verdict"], "sparsity": d["sparsity"],
            "attention_error": d["attention_error"], "metrics": d["metrics"], "verdicts": d["verdicts"]}


def run_cell(pipe, cell: Cell, call: dict, matrix: BenchMatrix, dense_runs=None,
             merge=None, dense_side=None) -> tuple[dict, dict | None, object]:
    """(record, block map, comparison) of one cell; never raises on a failing method (KeyboardInterrupt passes).

    ``merge(comparison or None, error or None) -> (comparison or None, error or None)``: called once
    per cell whether it ran or failed (under context parallelism it is a collective over the ranks,
    which must all call it, see :mod:`.distributed`); what it returns is what the record shows.
    ``dense_side``: what ``evaluate`` runs the dense side inside (see there)."""
    from ..eval.engine import resolve

    record = cell_record(cell)
    wall = time.perf_counter()
    block_map = comparison = error = None
    num_steps = call.get("num_inference_steps") or 0
    probe = None
    try:
        _, config = resolve(pipe, cell.method.method, cell.method.overrides)
        probe = MaskProbe(config, num_steps - 1, matrix.mask_layer)
        comparison = evaluate(pipe, config, call=call, seed=cell.seed, repeats=matrix.repeats, warmup=matrix.warmup,
                              model_name=cell.model, dense_runs=dense_runs, observe=probe, progress=False,
                              error_steps=sampled_error_steps(num_steps, matrix.error_steps), dense_side=dense_side)
    except Exception as exc:  # noqa: BLE001 - a failing cell is a result; the matrix goes on
        error = (f"{type(exc).__name__}: {' '.join(str(exc).split())}", traceback.format_exc(limit=-6))
    if merge is not None:
        comparison, error = merge(comparison, error)
    if error is None:
        try:
            record.update(comparison_fields(comparison))
            record["status"] = "ok"
        except Exception as exc:  # noqa: BLE001
            comparison, error = None, (f"{type(exc).__name__}: {' '.join(str(exc).split())}",
                                       traceback.format_exc(limit=-6))
    if error is not None:
        record.update(status="failed", error=error[0], traceback=error[1])
    else:
        try:
            block_map = probe.block_map(matrix.mask_head)
        except Exception as exc:  # noqa: BLE001 - a drawing aid must not fail a cell that ran
            block_map = {"kind": "none", "map": None, "layer": matrix.mask_layer, "step": num_steps - 1,
                         "head": matrix.mask_head, "density": None, "note": f"{type(exc).__name__}: {exc}"}
    record["wall_s"] = time.perf_counter() - wall
    return record, block_map, comparison


class BenchRun:
    """The state of one ``ditaccel bench`` run: results (what results.json holds), block maps, key frames.

    ``write=False``: no files at all (a distributed run's other ranks: rank 0 writes). The methods
    ``_cells``, ``_device``, ``_load``, ``_prepare``, ``merge`` and ``dense_side`` are what
    :mod:`.distributed` changes."""

    merge = None  # see run_cell
    dense_side = staticmethod(pipeline_as_it_is)  # see run_cell

    def __init__(self, matrix: BenchMatrix, out: Path, *, progress: bool = True, write: bool = True):
        self.matrix = matrix
        self.files = FileSet(Path(out)) if write else None
        self.progress = progress
        self.block_maps: dict[tuple, dict] = {}  # (model, method label, size label) -> block map
        self.key_frames: dict[tuple, np.ndarray] = {}  # (model, method label, size label) -> labelled frames
        self.results = {
            "format": FORMAT, "complete": False, "started": now_utc(), "finished": None,
            "matrix": matrix.to_dict(), "device": None, "dtype": None, "versions": None,
            "cells": [], "files": {},
        }

    @property
    def out(self) -> Path:
        """Where files are written during the run (the staging directory until :meth:`commit`)."""
        return self.files.target if self.files.committed else self.files.staging

    @property
    def json_path(self) -> Path:
        return self.out / "results.json"

    def save(self) -> Path | None:
        return write_json_atomic(self.results, self.json_path) if self.files is not None else None

    def commit(self) -> Path:
        return self.files.commit()

    def _add(self, record: dict, bar) -> None:
        self.results["cells"].append(record)
        self.save()
        bar.update(1)
        if record["status"] != "ok":
            bar.write(f"FAILED {record['key']}: {record['error']}", file=sys.stderr)

    def run(self) -> dict:
        import diffusers
        from tqdm.auto import tqdm

        cells = self._cells()
        device = self._device()
        dtype = resolve_dtype(self.matrix.dtype, device)
        self.results.update(device=str(device), dtype=str(dtype).replace("torch.", ""),
                            versions=versions(diffusers.__version__))
        self.save()
        with tqdm(total=len(cells), unit="cell", desc="ditaccel bench", disable=not self.progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for model, model_cells in groupby(cells, key=lambda c: c.model):
                self._run_model(model, list(model_cells), device, dtype, bar)
        self.results.update(complete=True, finished=now_utc())
        self.save()
        return self.results

    def _cells(self) -> list[Cell]:
        """The cells this process runs, in matrix order."""
        return self.matrix.cells()

    def _device(self) -> torch.device:
        return resolve_device(self.matrix.device)

    def _prepare(self, model: str, pipe, first_call) -> None:
        """Called once per loaded pipeline, before its first cell; ``first_call()``: (call, seed) of that cell."""

    def _load(self, model: str, device, dtype):
        return load_pipeline(None if model == EMBEDDED else model, device, dtype)

    def _run_model(self, model: str, cells: list[Cell], device, dtype, bar) -> None:
        try:
            pipe, defaults = self._load(model, device, dtype)
        except Exception as exc:  # noqa: BLE001
            return self._fail_all(cells, f"loading {model!r}", exc, bar)
        # raises on bad input (a refused --cp): the whole run stops
        self._prepare(model, pipe, lambda p=pipe, d=defaults: (self._call(p, d, cells[0]), cells[0].seed))
        for _, group in groupby(cells, key=lambda c: (c.size, c.seed)):
            group = list(group)
            try:
                call = self._call(pipe, defaults, group[0])
                shared = None if self.matrix.paired_timing else [self._dense(pipe, call, group[0].seed)]
            except Exception as exc:  # noqa: BLE001
                self._fail_all(group, "the dense reference run", exc, bar)
                continue
            for cell in group:
                bar.set_postfix_str(f"{model} {cell.size.label} seed={cell.seed}: {cell.method.label}", refresh=True)
                record, block_map, comparison = run_cell(pipe, cell, call, self.matrix, shared, merge=self.merge,
                                                      dense_side=self.dense_side)
                record["model_pipeline"] = type(pipe).__name__
                key = (cell.model, cell.method.label, cell.size.label)
                if block_map is not None:
                    # One map per (model, method, size) for the plots: the first seed's.
                    self.block_maps.setdefault(key, block_map)
                    shape = None if block_map["map"] is None else list(block_map["map"].shape)
                    record["block_map"] = {k: v for k, v in block_map.items() if k != "map"} | {"shape": shape}
                if comparison is not None and key not in self.key_frames:
                    self.key_frames[key] = _key_frames(comparison)
                self._add(record, bar)
        del pipe

    def _call(self, pipe, defaults, cell: Cell) -> dict:
        from ..pipelines.embedded import DEFAULT_PROMPT

        m, s = self.matrix, cell.size
        return call_arguments(pipe, defaults, m.prompt or DEFAULT_PROMPT, steps=s.steps, height=s.height,
                              width=s.width, frames=s.frames, guidance=m.guidance)

    def _dense(self, pipe, call: dict, seed: int):
        with self.dense_side(pipe):
            warm_up(pipe, call, seed=seed, steps=1)
            run = timed_run(pipe, call, seed=seed, device=torch.device(pipe._execution_device), label="dense",
                            progress=False)
        if not run.step_s:
            raise ValueError("the dense run reported no denoising steps (does the pipeline call callback_on_step_end?)")
        return run

    def _fail_all(self, cells: list[Cell], what: str, exc: Exception, bar) -> None:
        message = f"{what} failed: {type(exc).__name__}: {' '.join(str(exc).split())}"
        for cell in cells:
            record = cell_record(cell)
            record.update(status="failed", error=message, traceback=traceback.format_exc(limit=-6), wall_s=0.0)
            self._add(record, bar)


def _key_frames(comparison) -> np.ndarray:
    """The labelled dense | accelerated | difference panels of the first, middle and last frame."""
    from ..eval.media import key_frames, side_by_side, to_uint8

    both = side_by_side(to_uint8(comparison.dense.media), to_uint8(comparison.accelerated.media), comparison.method)
    return np.concatenate([both[i] for i in key_frames(both)], axis=0)


def _size_label(record: dict) -> str:
    return SizeSpec(**record["size"]).label


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
        row["identical"] = bool(ok) and all(c["metrics"].get("identical") for c in ok)
        for name in ("psnr", "ssim", "lpips", "latent_rel_l2", "attention_error", "density", "speedup"):
            row[name] = _mean(c["metrics"].get(name) for c in ok)
        row["attention_share"] = _mean(c["timing"]["attention_share"] for c in ok)
        row["accel_mean_step_ms"] = _mean(c["timing"]["accel_mean_step_ms"] for c in ok)
        row["dense_mean_step_ms"] = _mean(c["timing"]["dense_mean_step_ms"] for c in ok)
        row["conclusive"] = bool(ok) and all(c["timing"].get("conclusive") for c in ok)
        rows.append(row)
    return rows


__all__ = ["FORMAT", "BenchRun", "aggregate", "cell_record", "comparison_fields", "run_cell", "sampled_error_steps"]
