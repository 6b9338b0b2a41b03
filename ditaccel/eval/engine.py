"""The evaluation engine: run a pipeline dense and accelerated on the same call, return one record.

    from ditaccel.eval import evaluate
    record = evaluate(pipe, "xattn", call=kwargs, seed=0, repeats=2)
    print(record.speedup, record.quality["psnr"], record.verdicts())

Protocol (the same for ``compare``, ``bench``, the demo and the calibrator):

1. Warm-up, untimed: one short call per side (dense first, then accelerated, lengthened until it
   reaches a sparse step, so plan building and kernel compilation stay out of the timings), plus
   ``warmup`` full calls per side.
2. ``repeats`` interleaved pairs: dense, accelerated, dense, accelerated, ... Dense is always the
   pipeline as loaded — ditaccel is applied for each accelerated run and removed after it.
3. Quality from the first pair (CPU and GPU runs are deterministic per seed), stats from the first
   accelerated run (attention error and observers too), timings from every repeat
   (:mod:`.timing`: one definition of speedup, spread, drift, load).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Callable

import torch

from .record import Comparison, clean_quality
from .runs import RunResult, timed_run, warm_up
from .timing import LoadMonitor, summarise_runs
from .verdicts import quality_verdict, sparsity_verdict

Say = Callable[[str], None]


def resolve(pipe, method=None, overrides: dict | None = None):
    """(adapter, validated config) for ``pipe`` — before any run, so bad input fails fast."""
    from ..handle import resolve_config
    from ..pipelines import find_adapter

    adapter = find_adapter(pipe)
    return adapter, resolve_config(adapter, method, dict(overrides or {}), pipe)


def _observers(*fns):
    fns = [f for f in fns if f is not None]

    def observe(info, q, k, v):
        for f in fns:
            f(info, q, k, v)

    return observe


def _sparse_steps(stats: dict) -> list[int]:
    """Steps at which some call ran a sparse plan or reused a cached output."""
    out = []
    for step, s in (stats.get("steps") or {}).items():
        sparse_calls = s["calls"] - s["dense_calls"]
        if sparse_calls > 0 and (s["reuse_calls"] > 0 or (s["density"] is not None and s["density"] < 1.0 - 1e-9)):
            out.append(int(step))
    return sorted(out)


def _warmup_steps(config, steps: int | None) -> int | None:
    """Steps for the accelerated warm-up call: one past the dense steps, so it reaches a sparse step
    (plans built, kernels compiled) without running the whole call."""
    if not steps:
        return None
    dense = getattr(config, "dense_steps", 0) or 0
    if isinstance(dense, float) and 0 < dense < 1:  # a fraction of the call's steps
        dense = math.ceil(dense * steps)
    try:
        dense = int(dense)
    except (TypeError, ValueError):
        dense = 0
    return max(1, min(steps, dense + 1))


def pipeline_as_it_is(pipe):
    """The default dense side of a comparison: the pipeline as it is (a context that changes nothing)."""
    return contextlib.nullcontext()


def evaluate(pipe, method=None, *, overrides: dict | None = None, call: dict, seed: int = 0, repeats: int = 2,
             warmup: int = 0, model_name: str | None = None, dense_runs: list[RunResult] | None = None,
             error_steps=None, observe=None, progress: bool = True, say: Say | None = None,
             stop=None, dense_side=None) -> Comparison:
    """Dense vs accelerated ``pipe(**call)`` with ``seed``; see the module doc for the protocol.

    ``method``/``overrides``: what ``ditaccel.accelerate`` takes. ``dense_runs``: dense runs made
    earlier for this very call and seed (the demo's cache): they are reused instead of timing dense
    again, and the record says the timing was not interleaved. ``error_steps``: steps whose
    attention error against dense is measured (those steps then leave the timing, on both sides).
    ``observe(info, q, k, v)``: called on every self-attention call of the first accelerated run.
    ``say``: progress lines for people. ``stop``: a callable; True interrupts the current run.
    ``dense_side(pipe)``: a context manager every dense run goes inside (None: the pipeline as it is;
    the distributed bench under ring context parallelism runs dense attention through ditaccel there).
    """
    import diffusers

    import ditaccel

    from ..metrics import compare_media

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    say = say or (lambda line: None)
    dense_side = dense_side or pipeline_as_it_is
    wall = time.perf_counter()
    _, config = resolve(pipe, method, overrides)
    device = torch.device(pipe._execution_device)
    steps = call.get("num_inference_steps")
    seen: dict = {}

    def grab_grid(info, q, k, v):
        seen.setdefault("grid", [int(x) for x in info["grid"]])

    def accelerated(observer=None, track=None):
        handle = ditaccel.accelerate(pipe, config)
        handle.observe(_observers(grab_grid, observer))
        if track:
            handle.track_attention_error(track)
        return handle

    # 1. warm-up
    cached = list(dense_runs or [])
    if not cached:
        say("warm-up")
        with dense_side(pipe):
            warm_up(pipe, call, seed=seed, steps=1)
    with accelerated():
        warm_up(pipe, call, seed=seed, steps=_warmup_steps(config, steps))
    if seen.get("grid"):
        g = seen["grid"]
        say(f"latent grid {g[0]}x{g[1]}x{g[2]} = {g[0] * g[1] * g[2]:,} video tokens")
    for _ in range(warmup):
        if not cached:
            with dense_side(pipe):
                warm_up(pipe, call, seed=seed)
        with accelerated():
            warm_up(pipe, call, seed=seed)

    # 2. interleaved repeats
    tracked = sorted(set(error_steps or ()))
    dense_list: list[RunResult] = [] if not cached else cached
    accel_list: list[RunResult] = []
    stats = None
    with LoadMonitor() as load:
        for r in range(repeats):
            if not cached:
                say(f"dense run {r + 1}/{repeats}")
                with dense_side(pipe):
                    dense_list.append(timed_run(pipe, call, seed=seed, device=device, label="dense",
                                                progress=progress, stop=stop))
            say(f"{config.method} run {r + 1}/{repeats}")
            first = r == 0
            with accelerated(observe if first else None, tracked if first else None) as handle:
                run = timed_run(pipe, call, seed=seed, device=device, label=config.method, progress=progress,
                                stop=stop)
                if first:
                    stats = handle.stats()
            accel_list.append(run)
    dense, accel = dense_list[0], accel_list[0]
    if not dense.step_s:
        raise ValueError("the dense run reported no denoising steps (does the pipeline call callback_on_step_end?)")

    # 3. figures
    timing = summarise_runs(dense_list, accel_list, sparse_steps=_sparse_steps(stats), excluded_steps=tracked,
                            device=device.type, interleaved=not cached, warmup_runs=warmup, load=load)
    quality = clean_quality(compare_media(dense.media, accel.media, reference_latents=dense.latents,
                                          test_latents=accel.latents))
    return Comparison(
        model=model_name or type(pipe).__name__, pipeline=type(pipe).__name__, device=str(device),
        dtype=str(pipe.dtype).replace("torch.", ""), method=config.method, config=config.to_dict(),
        call={k: v for k, v in call.items() if isinstance(v, (str, int, float, bool))} | {"seed": seed},
        dense=dense, accelerated=accel, timing=timing, quality=quality, quality_verdict=quality_verdict(quality),
        sparsity=sparsity_verdict(stats, config.to_dict()), stats=stats, grid=seen.get("grid"),
        dense_cached=bool(cached), versions=versions(diffusers.__version__), wall_s=time.perf_counter() - wall)


def versions(diffusers_version: str) -> dict:
    import platform

    from .. import __version__

    return {"ditaccel": __version__, "torch": torch.__version__, "diffusers": diffusers_version,
            "python": platform.python_version()}


__all__ = ["evaluate", "resolve", "versions"]
