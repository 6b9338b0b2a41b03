"""``ditaccel compare``: dense vs accelerated on one seed, as a thin layer over :mod:`ditaccel.eval`.

:func:`run_compare` is the whole command without argparse: load (or take) a pipeline, print what
will run before the first run, :func:`ditaccel.eval.evaluate`, write the labelled media and the
JSON record, return the record.
"""

from __future__ import annotations

import os
from pathlib import Path

from .eval.record import write_json
from .eval.text import effective_knobs, format_report, header, large_grid_warning

EMBEDDED_PIXELS = 17 * 144 * 192  # the embedded pipeline's call: 17 frames of 144 x 192


def run_compare(*, pipe=None, model: str | None = None, defaults: dict | None = None, method=None,
                overrides: dict | None = None, prompt: str | None = None, steps: int | None = None,
                height: int | None = None, width: int | None = None, frames: int | None = None,
                guidance: float | None = None, seed: int = 0, device=None, dtype=None, warmup: int = 0,
                repeats: int = 2, progress: bool = True, out: str | os.PathLike | None = None,
                json_path: str | os.PathLike | None = None, fps: int = 8, say=None) -> dict:
    """Dense and accelerated on the same call and seed; returns ``Comparison.to_dict()`` (and writes it).

    ``pipe``: an already loaded pipeline (then ``defaults`` are its call defaults), else ``model``
    (a path or hub id; None = the embedded default) is loaded on ``device`` in ``dtype``.
    ``method``/``overrides`` go to ``ditaccel.accelerate``. ``out``: directory for the media and
    ``compare.json``; ``json_path``: another copy of the JSON (``"-"``: stdout). ``say``: where the
    header and progress lines go (default: nowhere). Raises ValueError on bad input.
    """
    from .eval.engine import evaluate, resolve
    from .eval.media import write_media
    from .eval.runs import call_arguments, call_shape, load_pipeline, resolve_device, resolve_dtype
    from .pipelines.embedded import DEFAULT_PROMPT

    say = say or (lambda line: None)
    overrides = dict(overrides or {})
    if pipe is None:
        device = resolve_device(device)
        pipe, defaults = load_pipeline(model, device, resolve_dtype(dtype, device))
        name = model or "embedded"
    else:
        name = model or type(pipe).__name__
    kwargs = call_arguments(pipe, defaults or {}, prompt or DEFAULT_PROMPT, steps=steps, height=height,
                            width=width, frames=frames, guidance=guidance)
    _, config = resolve(pipe, method, overrides)  # bad knobs fail here, before the long dense run
    shape = call_shape(pipe, kwargs)
    device_type = str(pipe._execution_device).split(":")[0]
    for line in header(name, type(pipe).__name__, str(pipe._execution_device), str(pipe.dtype).replace("torch.", ""),
                       shape, config.method, effective_knobs(config)):
        say(line)
    warning = large_grid_warning(device_type, shape, EMBEDDED_PIXELS)
    if warning:
        say(warning)
    record = evaluate(pipe, config, call=kwargs, seed=seed, repeats=repeats, warmup=warmup, model_name=name,
                      progress=progress, say=say)
    if out is not None:
        record.files = write_media(Path(out), record.dense, record.accelerated, label=config.method, fps=fps)
        record.files["json"] = str(Path(out) / "compare.json")
    report = record.to_dict()
    if out is not None:
        write_json(report, Path(out) / "compare.json")
    if json_path is not None:
        write_json(report, json_path)
    return report


__all__ = ["format_report", "run_compare"]
