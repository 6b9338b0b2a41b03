"""Dense vs accelerated on the same pipeline, seed and inputs: step timings, density, quality, media.

:func:`run_compare` is the whole ``ditaccel compare`` command without argparse, for the CLI, the
tests and ``bench``. The dense run is the pipeline as loaded (never wrapped); then
``ditaccel.accelerate`` wraps it, the same call runs again, and ``handle.remove()`` restores it in a
``finally``. Each denoising step is timed between ``callback_on_step_end`` timestamps (the first
step from the start of the denoising loop), with ``torch.cuda.synchronize()`` at each mark on CUDA;
the callback also keeps the final latents, so one call per side gives both the media and the
latents.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CALL_FLAGS = (  # (flag, pipeline call argument)
    ("steps", "num_inference_steps"), ("height", "height"), ("width", "width"), ("frames", "num_frames"),
    ("guidance", "guidance_scale"),
)


@dataclass
class RunResult:
    """One timed pipeline call."""

    label: str
    media: np.ndarray  # video [F, H, W, C] or images [N, H, W, C], float in [0, 1]
    is_video: bool
    latents: torch.Tensor | None
    step_s: list[float] = field(default_factory=list)
    total_s: float = 0.0

    def timing(self) -> dict:
        ms = [s * 1e3 for s in self.step_s]
        return {"step_ms": ms, "mean_step_ms": statistics.fmean(ms) if ms else None,
                "median_step_ms": statistics.median(ms) if ms else None, "denoise_ms": sum(ms),
                "total_ms": self.total_s * 1e3}


# --- loading -------------------------------------------------------------------------------------

def resolve_device(device=None) -> torch.device:
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        raise ValueError(f"--device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here (torch {torch.__version__})")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def load_pipeline(model: str | None, device: torch.device, dtype: torch.dtype):
    """(pipe, call defaults): the embedded default when ``model`` is None, else ``from_pretrained``."""
    if model is None:
        from .pipelines import embedded

        return embedded.load(device=device, dtype=dtype), dict(embedded.DEFAULTS)
    path = os.path.expanduser(model)
    if not os.path.exists(path) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ValueError(f"--model {model!r}: no such directory")
    from diffusers import DiffusionPipeline

    from .pipelines.loading import from_pretrained

    # Weights as safetensors only (no pickle), and never code shipped with the checkpoint.
    pipe = from_pretrained(DiffusionPipeline, path if os.path.exists(path) else model, dtype,
                           use_safetensors=True, trust_remote_code=False)
    return pipe.to(device), {}


def call_arguments(pipe, defaults: dict, prompt: str, **flags) -> dict:
    """The pipeline call both runs share: ``defaults`` overridden by the flags that are not None."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs = dict(defaults, prompt=prompt)
    for flag, name in CALL_FLAGS:
        value = flags.get(flag)
        if value is None:
            continue
        if name not in params:
            raise ValueError(f"--{flag}: {type(pipe).__name__} takes no {name!r} argument")
        kwargs[name] = value
    for name in ("callback_on_step_end", "output_type", "generator"):
        if name not in params:
            raise ValueError(f"{type(pipe).__name__} takes no {name!r}: ditaccel compare cannot time or seed it")
    return kwargs


def check_config(pipe, method, overrides: dict):
    """Validate method and fields before the (long) dense run; None if the core does not expose it."""
    try:
        from .accelerate import resolve_config
        from .pipelines import find_adapter
    except ImportError:
        return None
    return resolve_config(find_adapter(pipe), method, overrides, pipe)


# --- one timed call ------------------------------------------------------------------------------

class _StepClock:
    """Marks the start of the denoising loop (the progress bar opening) and the end of every step."""

    def __init__(self, pipe, device: torch.device):
        self.pipe = pipe
        self.cuda = device.type == "cuda"
        self.marks: list[float] = []
        self.latents = None

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def __enter__(self):
        self.saved = self.pipe.__dict__.get("progress_bar")
        original = self.pipe.progress_bar

        def progress_bar(*args, **kwargs):
            if not self.marks:
                self.marks.append(self.now())
            return original(*args, **kwargs)

        self.pipe.progress_bar = progress_bar
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            self.pipe.__dict__.pop("progress_bar", None)
        else:
            self.pipe.progress_bar = self.saved

    def callback(self, pipe, step, timestep, tensors):
        self.marks.append(self.now())
        self.latents = tensors.get("latents", self.latents)
        return {}

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_run(pipe, kwargs: dict, *, seed: int, device: torch.device, label: str, progress: bool = True) -> RunResult:
    """``pipe(**kwargs)`` seeded with ``seed``: media, final latents and per-step wall times."""
    clock = _StepClock(pipe, device)
    with _progress(pipe, disable=not progress, desc=label):
        start = clock.now()
        with clock:
            out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                       callback_on_step_end=clock.callback)
        total = clock.now() - start
    frames = getattr(out, "frames", None)
    media = np.asarray(frames[0] if frames is not None else out.images, dtype=np.float32)
    latents = clock.latents.detach().float().cpu().clone() if clock.latents is not None else None
    return RunResult(label, media, frames is not None, latents, clock.steps(), total)


def warm_up(pipe, kwargs: dict, *, seed: int, runs: int) -> None:
    """Untimed calls (latent output, no progress bar) so one-time costs stay out of the timed call."""
    with _progress(pipe, disable=True):
        for _ in range(runs):
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent")


class _progress:
    """Set the pipeline's progress-bar config for a block, then put the old one back."""

    def __init__(self, pipe, **config):
        self.pipe, self.config = pipe, config

    def __enter__(self):
        self.saved = self.pipe.__dict__.get("_progress_bar_config")
        self.pipe.set_progress_bar_config(**self.config)

    def __exit__(self, *exc):
        if self.saved is None:
            self.pipe.__dict__.pop("_progress_bar_config", None)
        else:
            self.pipe._progress_bar_config = self.saved


# --- the comparison ------------------------------------------------------------------------------

def run_compare(*, pipe=None, model: str | None = None, defaults: dict | None = None, method=None,
                overrides: dict | None = None, prompt: str | None = None, steps: int | None = None,
                height: int | None = None, width: int | None = None, frames: int | None = None,
                guidance: float | None = None, seed: int = 0, device=None, dtype=None, warmup: int = 0,
                progress: bool = True, out: str | os.PathLike | None = None,
                json_path: str | os.PathLike | None = None, fps: int = 8) -> dict:
    """Run dense then accelerated on the same call and seed; return (and optionally write) every figure.

    ``pipe``: an already loaded pipeline (then ``defaults`` are its call defaults), else ``model``
    (a path or hub id; None = the embedded default) is loaded on ``device`` in ``dtype``.
    ``method``/``overrides`` go to ``ditaccel.accelerate``. ``out``: directory for the media and
    ``compare.json``; ``json_path``: another copy of the JSON. Raises ValueError on bad input.
    """
    import ditaccel

    from .metrics import compare_media
    from .pipelines.embedded import DEFAULT_PROMPT

    wall = time.perf_counter()
    overrides = dict(overrides or {})
    if pipe is None:
        device = resolve_device(device)
        pipe, defaults = load_pipeline(model, device, resolve_dtype(dtype, device))
        name = model or "embedded"
    else:
        name = model or type(pipe).__name__
    device = torch.device(pipe._execution_device)
    kwargs = call_arguments(pipe, defaults or {}, prompt or DEFAULT_PROMPT, steps=steps, height=height,
                            width=width, frames=frames, guidance=guidance)
    check_config(pipe, method, overrides)

    # One untimed 1-step call absorbs process-level first-call costs (allocator, BLAS/cuDNN init, lazy
    # module setup) that would otherwise be charged to whichever side runs first.
    warm_up(pipe, dict(kwargs, num_inference_steps=1), seed=seed, runs=1)
    warm_up(pipe, kwargs, seed=seed, runs=warmup)
    dense = timed_run(pipe, kwargs, seed=seed, device=device, label="dense", progress=progress)
    handle = ditaccel.accelerate(pipe, method, **overrides)
    try:
        if warmup:
            warm_up(pipe, kwargs, seed=seed, runs=warmup)
            if hasattr(handle, "reset_stats"):  # count the timed call only
                handle.reset_stats()
            else:
                handle.remove()
                handle = ditaccel.accelerate(pipe, method, **overrides)
        label = handle.stats()["method"]
        accel = timed_run(pipe, kwargs, seed=seed, device=device, label=label, progress=progress)
        stats = handle.stats()
    finally:
        handle.remove()

    quality = compare_media(dense.media, accel.media, reference_latents=dense.latents, test_latents=accel.latents)
    d, a = dense.timing(), accel.timing()
    per_step = stats.get("steps") or {}
    report = {
        "model": name,
        "pipeline": type(pipe).__name__,
        "device": str(device),
        "dtype": str(pipe.dtype).replace("torch.", ""),
        "method": stats["method"],
        "config": stats["config"],
        "call": {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool))} | {"seed": seed},
        "latent_shape": list(dense.latents.shape) if dense.latents is not None else None,
        "media_shape": list(dense.media.shape),
        "timing": {
            "dense": d, "accelerated": a, "warmup_runs": warmup,
            "speedup": _ratio(d["denoise_ms"], a["denoise_ms"]),
            "speedup_median_step": _ratio(d["median_step_ms"], a["median_step_ms"]),
            "speedup_sparse_steps": _ratio(*_sparse_step_ms(d["step_ms"], a["step_ms"], per_step)),
        },
        "density": {
            "mean": stats["mean_density"], "calls": stats["calls"], "dense_calls": stats.get("dense_calls"),
            "per_step": [per_step[i]["density"] if i in per_step else None for i in range(len(a["step_ms"]))],
        },
        "quality": quality,
        "attention_time_ms": stats.get("attention_time_ms"),
        "stats": stats,
        "versions": _versions(),
    }
    if out is not None:
        report["files"] = write_media(Path(out), dense, accel, fps=fps)
    report["wall_s"] = time.perf_counter() - wall
    if out is not None:
        report["files"]["json"] = str(Path(out) / "compare.json")
        write_json(report, Path(out) / "compare.json")
    if json_path is not None:
        write_json(report, Path(json_path))
    return report


def _sparse_step_ms(dense_ms, accel_ms, per_step) -> tuple[float | None, float | None]:
    """Summed step times of both runs over the steps the accelerated run ran sparse (density < 1)."""
    idx = [i for i in range(min(len(dense_ms), len(accel_ms)))
           if i in per_step and per_step[i]["density"] is not None and per_step[i]["density"] < 1]
    if not idx:
        return None, None
    return sum(dense_ms[i] for i in idx), sum(accel_ms[i] for i in idx)


def _ratio(num, den):
    return num / den if num is not None and den else None


def _versions() -> dict:
    import diffusers

    import ditaccel

    return {"ditaccel": ditaccel.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


# --- files ---------------------------------------------------------------------------------------

def to_uint8(media: np.ndarray) -> np.ndarray:
    return (np.clip(media, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes (H.264 in yuv420p needs them) by repeating the last row/column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """[N, H, W, C] x 2 -> [N, H, 2W + gap, C], a white gap between them."""
    sep = np.full((*left.shape[:2], gap, left.shape[3]), 255, dtype=left.dtype)
    return np.concatenate([left, sep, right], axis=2)


def write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    import imageio.v3 as iio

    frames = _even(frames[..., :3] if frames.shape[-1] >= 3 else np.repeat(frames, 3, axis=-1))
    iio.imwrite(path, frames, fps=fps, plugin="FFMPEG", macro_block_size=2, quality=8)
    return path


def write_image(path: Path, images: np.ndarray) -> Path:
    import imageio.v3 as iio

    img = np.concatenate(list(images), axis=1) if images.shape[0] > 1 else images[0]
    iio.imwrite(path, img.squeeze(-1) if img.shape[-1] == 1 else img)
    return path


def write_media(out: Path, dense: RunResult, accel: RunResult, fps: int = 8) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    d, a = to_uint8(dense.media), to_uint8(accel.media)
    write = (lambda name, m: write_video(out / f"{name}.mp4", m, fps)) if dense.is_video else \
        (lambda name, m: write_image(out / f"{name}.png", m))
    return {"dense": str(write("dense", d)), "accelerated": str(write("accelerated", a)),
            "side_by_side": str(write("side_by_side", side_by_side(d, a)))}


def jsonable(x):
    """JSON-safe copy: tuples -> lists, numpy/torch scalars -> Python, inf/nan -> "inf"/"nan"."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.generic, torch.Tensor)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    return x


def write_json(report: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(report), indent=2) + "\n")
    return path


# --- the table -----------------------------------------------------------------------------------

def _fmt(x, spec: str = ".3f", none: str = "n/a") -> str:
    if x is None:
        return none
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def _x(ratio) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def format_report(report: dict) -> str:
    t, q, dens = report["timing"], report["quality"], report["density"]
    method = report["method"]
    cfg = ", ".join(f"{k}={v}" for k, v in report["config"].items() if k != "method")
    lines = [
        f"ditaccel compare: {report['pipeline']} ({report['model']}) on {report['device']}, {report['dtype']}, "
        f"latents {report['latent_shape']}",
        f"method {method}: {cfg}",
        "",
        f"{'step':>6} {'dense ms':>10} {method + ' ms':>12} {'density':>8}",
    ]
    for i, (dm, am) in enumerate(zip(t["dense"]["step_ms"], t["accelerated"]["step_ms"])):
        ds = dens["per_step"][i] if i < len(dens["per_step"]) else None
        lines.append(f"{i:>6} {dm:>10.1f} {am:>12.1f} {_fmt(ds):>8}")
    for name in ("mean", "median"):
        key = f"{name}_step_ms"
        lines.append(f"{name:>6} {_fmt(t['dense'][key], '.1f'):>10} {_fmt(t['accelerated'][key], '.1f'):>12}")
    lpips = _fmt(q["lpips"], ".4f", none=f"n/a ({q['lpips_note']})")
    lines += [
        "",
        f"speedup         {_x(t['speedup'])} over the denoising loop ({_x(t['speedup_sparse_steps'])} on the "
        f"sparse steps, {_x(t['speedup_median_step'])} median step)",
        f"mean density    {_fmt(dens['mean'])}  ({dens['calls']} attention calls)",
        f"PSNR            {_fmt(q['psnr'], '.2f')} dB (worst frame {_fmt(q['psnr_min'], '.2f')} dB)",
        f"SSIM            {_fmt(q['ssim'], '.4f')}",
        f"LPIPS           {lpips}",
        f"latent rel-L2   {_fmt(q['latent_rel_l2'], '.4g')}",
        f"wall time       {report['wall_s']:.1f} s",
    ]
    if report.get("files"):
        lines.append(f"wrote           {', '.join(report['files'].values())}")
    return "\n".join(lines)


__all__ = ["RunResult", "call_arguments", "format_report", "load_pipeline", "run_compare", "timed_run", "warm_up",
           "write_json", "write_media"]
