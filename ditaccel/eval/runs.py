"""Loading a pipeline and making one timed, seeded call of it: what every comparison is built from.

A :class:`RunResult` is one ``pipe(...)`` call: its media (``output_type="np"``), its final latents
and the wall time of every denoising step. Steps are marked between ``callback_on_step_end`` calls
(the first step from the start of the denoising loop, when the pipeline opens its progress bar);
on CUDA each mark is a CUDA event, read after the call, so timing adds no host sync per step.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

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

    @property
    def loop_s(self) -> float:
        """The denoising loop: every step, from the loop's start to the last step's end."""
        return sum(self.step_s)


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
        from ..pipelines import embedded

        return embedded.load(device=device, dtype=dtype), dict(embedded.DEFAULTS)
    path = os.path.expanduser(model)
    if not os.path.exists(path) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise ValueError(f"--model {model!r}: no such directory")
    from diffusers import DiffusionPipeline

    from ..pipelines.loading import from_pretrained

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
            raise ValueError(f"{type(pipe).__name__} takes no {name!r}: ditaccel cannot time or seed it")
    return kwargs


def call_shape(pipe, kwargs: dict) -> dict:
    """What the call will generate, read before running it: steps, height, width, frames (None where
    the pipeline's own default applies and cannot be read from its signature)."""
    params = inspect.signature(pipe.__call__).parameters

    def value(name):
        if name in kwargs:
            return kwargs[name]
        p = params.get(name)
        return None if p is None or p.default is inspect.Parameter.empty else p.default

    return {"steps": value("num_inference_steps"), "height": value("height"), "width": value("width"),
            "frames": value("num_frames")}


# --- one timed call ------------------------------------------------------------------------------

class _StepClock:
    """Marks the start of the denoising loop (the progress bar opening) and the end of every step."""

    def __init__(self, pipe, device: torch.device, stop=None):
        self.pipe = pipe
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.latents = None
        self.stop = stop

    def mark(self):
        if self.cuda:  # an event on the stream, read after the call: no sync per step
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def __enter__(self):
        self.saved = self.pipe.__dict__.get("progress_bar")
        original = self.pipe.progress_bar

        def progress_bar(*args, **kwargs):
            if not self.marks:
                self.marks.append(self.mark())
            return original(*args, **kwargs)

        self.pipe.progress_bar = progress_bar
        return self

    def __exit__(self, *exc):
        if self.saved is None:
            self.pipe.__dict__.pop("progress_bar", None)
        else:
            self.pipe.progress_bar = self.saved

    def callback(self, pipe, step, timestep, tensors):
        self.marks.append(self.mark())
        self.latents = tensors.get("latents", self.latents)
        if self.stop is not None and self.stop():
            pipe._interrupt = True  # diffusers pipelines check this flag at the top of every step
        return {}

    def steps(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def timed_run(pipe, kwargs: dict, *, seed: int, device: torch.device, label: str, progress: bool = True,
              stop=None) -> RunResult:
    """``pipe(**kwargs)`` seeded with ``seed``: media, final latents and per-step times.

    ``stop``: a callable checked after every step; when it returns True the pipeline is interrupted
    (diffusers' ``_interrupt`` flag) and :class:`Interrupted` is raised."""
    clock = _StepClock(pipe, device, stop)
    with _progress(pipe, disable=not progress, desc=label):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with clock:
            out = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                       callback_on_step_end=clock.callback)
        if device.type == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    if stop is not None and stop():
        raise Interrupted(f"{label} run stopped on request")
    frames = getattr(out, "frames", None)
    media = np.asarray(frames[0] if frames is not None else out.images, dtype=np.float32)
    latents = clock.latents.detach().float().cpu().clone() if clock.latents is not None else None
    return RunResult(label, media, frames is not None, latents, clock.steps(), total)


class Interrupted(RuntimeError):
    """A run stopped through ``timed_run(stop=...)``."""


def warm_up(pipe, kwargs: dict, *, seed: int, runs: int = 1, steps: int | None = None) -> None:
    """Untimed calls (latent output, no progress bar) so one-time costs stay out of the timed calls."""
    if steps is not None:
        kwargs = dict(kwargs, num_inference_steps=steps)
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


__all__ = ["DTYPES", "Interrupted", "RunResult", "call_arguments", "call_shape", "load_pipeline", "resolve_device",
           "resolve_dtype", "timed_run", "warm_up"]
