"""The demo's engine, without Gradio: one loaded pipeline, cached dense runs, one method run against them.

A :class:`DemoSession` serves one device. It keeps the last loaded pipeline (loading another model
replaces it) and the dense result of the last few requests, keyed by everything that changes the
dense output — model, prompt, seed, steps and size — so trying another method or knob on the same
request reruns only the accelerated side. Each generation follows ``ditaccel compare``: the same
call arguments (``call_arguments``), an untimed 1-step warm-up before a dense run, ``timed_run`` for
both sides, ``ditaccel.accelerate`` removed in a ``finally``, ``compare_media`` for the quality
and ``write_media`` for the files. The density heat map and the block map (the method's choice at
one sparse layer of the last step, caught with ``handle.observe``) are drawn by ``ditaccel.bench.plots``.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..eval.plots import block_mask_figure, density_heatmaps
from ..eval.probe import MaskProbe
from ..eval.record import Comparison
from ..eval.runs import RunResult, call_arguments, load_pipeline, resolve_device, resolve_dtype
from .admission import Limits, admit
from .cancel import Cancellation

EMBEDDED = "embedded"
PRESET = "preset"  # the method choice that means "preset config (the family's, or the embedded pipeline's)"
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_FRAMES = 1024
MAX_SEED = 2**63 - 1
CLOSE_TIMEOUT_S = 5.0  # how long close() waits for a cancelled generation to unwind
Progress = Callable[[float, str], None]


def model_key(model: str | None) -> str | None:
    """UI model text -> ``load_pipeline``'s argument: blank or "embedded" is the embedded default (None)."""
    if model is None:
        return None
    if not isinstance(model, str):
        raise ValueError(f"model must be text (a local directory or hub id), got {model!r}")
    model = model.strip()
    return None if model in ("", EMBEDDED) else model


def _check_int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


@dataclass(frozen=True)
class GenerateRequest:
    """What the dense output depends on (besides the device and dtype of the session).

    ``frames`` None: the pipeline's own default (image pipelines take no frame count).
    """

    model: str | None
    prompt: str
    seed: int
    steps: int
    height: int
    width: int
    frames: int | None

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", model_key(self.model))
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be non-empty text, got {self.prompt!r}")
        object.__setattr__(self, "seed", _check_int("seed", self.seed, 0, MAX_SEED))
        object.__setattr__(self, "steps", _check_int("steps", self.steps, 1, MAX_STEPS))
        for name in ("height", "width"):
            object.__setattr__(self, name, _check_int(name, getattr(self, name), 8, MAX_SIDE))
        if self.frames is not None:
            object.__setattr__(self, "frames", _check_int("frames", self.frames, 1, MAX_FRAMES))

    @property
    def label(self) -> str:
        return self.model or EMBEDDED


@dataclass
class DemoResult:
    """One generation: the engine's comparison, the files and the page's JSON report."""

    request: GenerateRequest
    comparison: Comparison
    files: dict[str, str | None]  # dense, accelerated, side_by_side(_png); heatmap, block_map (None: nothing drawn)
    report: dict

    @property
    def dense(self) -> RunResult:
        return self.comparison.dense

    @property
    def accelerated(self) -> RunResult:
        return self.comparison.accelerated

    @property
    def dense_cached(self) -> bool:
        return self.comparison.dense_cached

    @property
    def stats(self) -> dict:
        return self.comparison.stats

    @property
    def quality(self) -> dict:
        return self.comparison.quality


class DemoSession:
    """Generation state of one demo server: device, dtype, the loaded pipeline and the dense cache."""

    def __init__(self, device=None, dtype=None, *, dense_cache_size: int = 4, fps: int = 8,
                 work_dir: str | Path | None = None, keep_results: int = 4, limits: Limits | None = None):
        self.device = resolve_device(device)
        self.limits = limits or Limits()  # admission control: what one request may ask for
        self.cancellation = Cancellation()
        self.dtype = resolve_dtype(dtype, self.device)
        self.fps = fps
        self.dense_cache_size = dense_cache_size
        self.keep_results = keep_results
        self._owned_dir = work_dir is None
        self.work_dir = Path(tempfile.mkdtemp(prefix="ditaccel-demo-") if work_dir is None else work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._pipe = None
        self._pipe_model: str | None = None
        self._defaults: dict = {}
        self._dense: OrderedDict[tuple, RunResult] = OrderedDict()
        self._results: list[Path] = []
        self._counter = 0
        # The page queues its events one at a time per device; the lock also covers direct callers
        # (scripts, tests): one pipeline must never run two calls at once.
        self._lock = threading.RLock()

    # --- model -----------------------------------------------------------------------------------
    def pipeline(self, model: str | None):
        """(pipe, call defaults) for ``model``, loading it (and dropping the previous one) if needed."""
        model = model_key(model)
        with self._lock:
            if self._pipe is None or self._pipe_model != model:
                self._pipe = None
                self._dense.clear()
                self.free_memory()
                pipe, defaults = load_pipeline(model, self.device, self.dtype)
                self._pipe, self._pipe_model, self._defaults = pipe, model, dict(defaults)
            return self._pipe, self._defaults

    def family_configs(self, model: str | None, methods) -> tuple[str, dict]:
        """(family name, {method: config}) — the configs ``accelerate(pipe, method)`` would use, with
        the family's tuned defaults; and under :data:`PRESET`, the preset for this pipeline."""
        from ..handle import resolve_config
        from ..pipelines import find_adapter

        pipe, _ = self.pipeline(model)
        adapter = find_adapter(pipe)
        configs = {m: resolve_config(adapter, m, {}, pipe) for m in methods}
        configs[PRESET] = resolve_config(adapter, None, {}, pipe)
        return adapter.family, configs

    def free_memory(self) -> None:
        gc.collect()  # a failed call's tensors may sit in reference cycles (frames of its traceback)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # --- one generation --------------------------------------------------------------------------
    def generate(self, request: GenerateRequest, method: str | None, overrides: dict | None = None,
                 progress: Progress | None = None) -> DemoResult:
        """Dense (cached) and accelerated runs of ``request``; ``method`` None or "preset": the preset."""
        from ..eval.engine import evaluate, resolve
        from ..eval.media import write_media

        say = progress or (lambda fraction, desc: None)
        method = None if method in (None, PRESET) else method
        self.cancellation.check()
        with self._lock:
            self.cancellation.check()  # queued behind a call that was running when the server stopped
            say(0.0, f"loading {request.label}")
            pipe, defaults = self.pipeline(request.model)
            # Before any work: the prompt, the frame count, the size against the device (admission.py).
            admit(pipe, request, self.limits, self.device, self.dtype)
            kwargs = call_arguments(pipe, defaults, request.prompt, steps=request.steps, height=request.height,
                                    width=request.width, frames=request.frames)
            _, config = resolve(pipe, method, overrides)

            key = (request, str(self.device), str(self.dtype))
            cached = self._dense.get(key)
            if cached is not None:
                self._dense.move_to_end(key)
            say(0.05 if cached is None else 0.5, "dense run" if cached is None else f"{config.method} run")
            probe = MaskProbe(config, step=request.steps - 1, layer=None)  # the last step, first sparse layer
            record = evaluate(pipe, config, call=kwargs, seed=request.seed, repeats=1, model_name=request.label,
                              dense_runs=None if cached is None else [cached], observe=probe, progress=True,
                              say=lambda line: say(0.5, line) if line.startswith(config.method) else None)
            if cached is None:
                self._dense[key] = record.dense
                if len(self._dense) > self.dense_cache_size:
                    self._dense.popitem(last=False)

            say(0.9, "metrics and pictures")
            out = self._result_dir()
            files = write_media(out, record.dense, record.accelerated, label=config.method, fps=self.fps)
            mean = record.stats["mean_density"]
            heatmap = density_heatmaps([(config.method, record.stats["per_layer_step"])], out / "density.png",
                                       title="density per layer and step"
                                             + (f" (mean {mean:.3f})" if mean is not None else ""))
            block_map = block_mask_figure([(config.method, probe.block_map(head=0))], out / "block_map.png",
                                          title=f"{config.method}: blocks computed (head 0)")
            files.update(heatmap=str(heatmap) if heatmap else None, block_map=str(block_map) if block_map else None)
            record.files = files
            report = record.to_dict() | {"media": "video" if record.dense.is_video else "image"}
            say(1.0, "done")
            return DemoResult(request, record, files, report)

    def _result_dir(self) -> Path:
        """A fresh directory per result; Gradio copies the files it serves, so old ones are pruned."""
        self._counter += 1
        out = self.work_dir / f"result-{self._counter:05d}"
        out.mkdir(parents=True)
        self._results.append(out)
        while len(self._results) > self.keep_results:
            shutil.rmtree(self._results.pop(0), ignore_errors=True)
        return out

    def close(self) -> None:
        """Refuse new generations, stop a running one (``cancel.py``), free the pipeline, remove the files."""
        busy = not self._lock.acquire(blocking=False)
        self.cancellation.cancel(running=busy)
        held = not busy or self._lock.acquire(timeout=CLOSE_TIMEOUT_S)
        try:
            if held:
                self.cancellation.release()
                self._pipe = None
                self._dense.clear()
                self.free_memory()
        finally:
            if held:
                self._lock.release()
            if self._owned_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)


__all__ = ["DemoResult", "DemoSession", "GenerateRequest", "PRESET", "model_key"]
