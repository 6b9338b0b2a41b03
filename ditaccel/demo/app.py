"""The Gradio page of ``ditaccel demo``: inputs, knob widgets, one generate button, both outputs.

:func:`build_app` lays out the page for a :class:`~ditaccel.demo.session.DemoSession` and wires its
events. The generate endpoint (API name ``/generate``) takes named parameters — ``model``,
``prompt``, ``seed``, ``steps``, ``height``, ``width``, ``frames``, ``method`` and every method's
knobs (``<method>__<field>``, see ``widgets``) — and returns dense and accelerated media (videos, or
images for image pipelines), a summary, the JSON report, the density heat map and the block map.
It runs one at a time per device (its concurrency id names the device); bad input and
out-of-memory come back as a readable ``gr.Error`` and the server keeps serving.
"""

from __future__ import annotations

import html
import logging
from typing import Any

import torch

from ..methods import METHODS
from ..pipelines.embedded import DEFAULT_PROMPT, DEFAULTS
from . import widgets
from .session import EMBEDDED, PRESET, DemoResult, DemoSession, GenerateRequest

logger = logging.getLogger(__name__)

TITLE = "ditaccel — dense vs accelerated attention"
REQUEST_FIELDS = ("model", "prompt", "seed", "steps", "height", "width", "frames", "method")
INITIAL = dict(model=EMBEDDED, prompt=DEFAULT_PROMPT, seed=0, steps=DEFAULTS["num_inference_steps"],
               height=DEFAULTS["height"], width=DEFAULTS["width"], frames=DEFAULTS["num_frames"], method=PRESET)
"""Initial widget values; ``build_app(initial=...)`` overrides any of them (the CLI's flags do)."""


def _method_choices(methods) -> list[tuple[str, str]]:
    return [("preset (this model's default)", PRESET)] + [(m, m) for m in methods]


def _fmt(x, spec: str) -> str:
    """A number for the page: None/missing -> "n/a"; anything that is not a finite number as text."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a" if x is None else str(x)
    return format(x, spec) if x == x and abs(x) != float("inf") else str(x)


def summary_markdown(result: DemoResult) -> str:
    """The figures a user compares first — times, speedup, density, quality — and the verdicts."""
    r = result.report
    t, q, dens = r.get("timing") or {}, r.get("quality") or {}, r.get("density") or {}
    cfg = ", ".join(f"{k}={v}" for k, v in (r.get("config") or {}).items() if k != "method")
    cached = " (cached: same model, prompt, seed, steps and size)" if r.get("dense_cached") else ""
    lpips = _fmt(q.get("lpips"), ".4f") if q.get("lpips") is not None else \
        f"n/a ({q.get('lpips_note') or 'not computed'})"
    psnr = "identical (∞)" if q.get("identical") else f"{_fmt(q.get('psnr'), '.2f')} dB"
    grid = r.get("grid")
    return "\n".join([
        f"**{r.get('pipeline')}** ({r.get('model')}) on {r.get('device')}, {r.get('dtype')}; "
        f"latent grid {'x'.join(map(str, grid)) if grid else 'n/a'}",
        "",
        "| | dense | " + str(r.get("method")) + " |",
        "|---|---|---|",
        f"| denoising loop | {_fmt(t.get('dense_median_ms'), '.0f')} ms{cached} | "
        f"{_fmt(t.get('accel_median_ms'), '.0f')} ms |",
        "",
        f"**speed: {t.get('verdict', 'n/a')}** (dense time ÷ accelerated time over the denoising loop, "
        f">1 = faster: {_fmt(t.get('speedup'), '.2f')}) · **density {_fmt(dens.get('mean'), '.3f')}** · "
        f"**PSNR {psnr}** · **SSIM {_fmt(q.get('ssim'), '.4f')}** · LPIPS {lpips} · "
        f"latent rel-L2 {_fmt(q.get('latent_rel_l2'), '.3g')}",
        "",
        *[f"- {line}" for line in r.get("verdicts") or []],
        "",
        f"method `{r.get('method')}`: {cfg}",
    ])


def _page_error(gr, exc: BaseException, session: DemoSession, what: str):
    """The ``gr.Error`` the page shows for ``exc``; bad input is logged in one line, anything else with
    its traceback. Out-of-memory frees the device's cached blocks so the next request can run."""
    if isinstance(exc, torch.OutOfMemoryError):
        session.free_memory()
    message = _user_message(exc, session.device)
    if isinstance(exc, (ValueError, OSError, torch.OutOfMemoryError)):
        logger.warning("ditaccel demo: %s: %s", what, message)
    else:
        logger.error("ditaccel demo: %s failed", what, exc_info=exc)
    return gr.Error(html.escape(message), duration=None, print_exception=False)


def _user_message(exc: BaseException, device) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return (f"Out of memory on {device}. Try fewer frames, a smaller resolution or fewer steps; "
                f"the server is still running. ({' '.join(str(exc).split())[:300]})")
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, ValueError):
        return f"Invalid input: {text}"
    if isinstance(exc, OSError):
        return f"Could not load or write: {text}"
    return f"{type(exc).__name__}: {text}"


def build_app(session: DemoSession | None = None, *, initial: dict | None = None, methods=METHODS):
    """The ``gr.Blocks`` page for ``session`` (default: a new one on the default device).

    ``initial``: starting values of the request widgets (keys of :data:`INITIAL`). The knob widgets
    start at the defaults of the initial model's family (``accelerate(pipe, method)`` with no fields),
    which loads that model once here.
    """
    import gradio as gr

    session = session or DemoSession()
    start = dict(INITIAL, **(initial or {}))
    unknown = sorted(set(start) - set(INITIAL))
    if unknown:
        raise ValueError(f"initial: unknown field(s) {unknown}; allowed: {list(INITIAL)}")
    if start["method"] not in (PRESET, *methods):
        raise ValueError(f"initial method must be {PRESET!r} or one of {list(methods)}, got {start['method']!r}")
    knobs = widgets.all_knobs(tuple(methods))
    family, configs = session.family_configs(start["model"], methods)
    concurrency_id = f"generate-{session.device}"

    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"# {TITLE}\nThe same pipeline, seed and inputs run with dense attention and with a "
                    "ditaccel method; the dense result is reused while only the method or its knobs change.")
        with gr.Row():
            with gr.Column(scale=1, min_width=320):
                with gr.Row():
                    model = gr.Textbox(value=start["model"], label="model", scale=3,
                                       info=f"'{EMBEDDED}' (built in, no download), a local pipeline directory "
                                            "or a hub id (safetensors weights only)")
                    load = gr.Button("load model defaults", scale=1, size="sm")
                model_status = gr.Markdown(f"loaded: family **{family}**", elem_id="model-status")
                prompt = gr.Textbox(value=start["prompt"], label="prompt", lines=2)
                with gr.Row():
                    seed = gr.Number(value=start["seed"], precision=0, minimum=0, label="seed")
                    steps = gr.Slider(1, 100, step=1, value=start["steps"], label="steps")
                with gr.Row():
                    height = gr.Slider(16, 2048, step=16, value=start["height"], label="height")
                    width = gr.Slider(16, 2048, step=16, value=start["width"], label="width")
                    frames = gr.Slider(0, 257, step=1, value=start["frames"] or 0, label="frames",
                                       info="0: the pipeline's default (image pipelines)")
                method = gr.Dropdown(choices=_method_choices(methods), value=start["method"], label="method")
                knob_components: dict[str, Any] = {}
                groups = {}
                for name in methods:
                    with gr.Group(visible=name == start["method"]) as groups[name]:
                        own = [k for k in knobs[name] if not k.shared]
                        shared = [k for k in knobs[name] if k.shared]
                        for knob in own:
                            _add_knob(gr, knob, configs[name], knob_components)
                        with gr.Accordion("knobs every method shares", open=False):
                            for knob in shared:
                                _add_knob(gr, knob, configs[name], knob_components)
                preset_note = gr.Markdown(_preset_text(configs[PRESET]), visible=start["method"] == PRESET)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                with gr.Row():
                    dense_video = gr.Video(label="dense", elem_id="dense-video", format="mp4", loop=True,
                                           autoplay=True)
                    accel_video = gr.Video(label="accelerated", elem_id="accelerated-video", format="mp4",
                                           loop=True, autoplay=True)
                with gr.Row():
                    dense_image = gr.Image(label="dense", elem_id="dense-image", type="filepath", visible=False)
                    accel_image = gr.Image(label="accelerated", elem_id="accelerated-image", type="filepath",
                                           visible=False)
                summary = gr.Markdown(elem_id="summary")
                with gr.Row():  # the figures carry their own titles
                    heatmap = gr.Image(label="density per layer and step", type="filepath", elem_id="heatmap",
                                       show_label=False)
                    block_map = gr.Image(label="block map", type="filepath", elem_id="block-map", show_label=False)
                with gr.Accordion("report (JSON)", open=False):
                    report = gr.JSON(label="report", elem_id="report")

        knob_order = [p for name in methods for k in knobs[name] for p in k.params]

        def show_method(choice):
            return [gr.update(visible=choice == name) for name in methods] + [gr.update(visible=choice == PRESET)]

        method.change(show_method, inputs=[method], outputs=[*groups.values(), preset_note], queue=False,
                      api_visibility="private")

        def load_defaults(model_text):
            try:
                fam, cfgs = session.family_configs(model_text, methods)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
                raise _page_error(gr, exc, session, f"loading {model_text!r}") from None
            values = [v for name in methods for k in knobs[name]
                      for v in widgets.widget_values(k, getattr(cfgs[name], k.spec.name))]
            return [f"loaded: family **{fam}**", _preset_text(cfgs[PRESET]), *values]

        load.click(load_defaults, inputs=[model], outputs=[model_status, preset_note,
                                                           *(knob_components[p] for p in knob_order)],
                   concurrency_limit=1, concurrency_id=concurrency_id, api_name="load_defaults")

        def run(progress=gr.Progress(track_tqdm=True), **values):  # noqa: B008 - how Gradio injects progress
            try:
                result = generate_from_values(session, values, knobs, progress=lambda f, d: progress(f, desc=d))
            except Exception as exc:  # noqa: BLE001 - every failure becomes a message in the page
                raise _page_error(gr, exc, session, "generate") from None
            files, video = result.files, result.dense.is_video
            # Plain values (not visibility updates) so API clients receive the files; the chained
            # event below shows the video or the image pair.
            return (files["dense"] if video else None, files["accelerated"] if video else None,
                    None if video else files["dense"], None if video else files["accelerated"],
                    summary_markdown(result), result.report, files["heatmap"], files["block_map"])

        def show_media(report_value):
            video = (report_value or {}).get("media") != "image"
            return [gr.update(visible=video)] * 2 + [gr.update(visible=not video)] * 2

        request_inputs = dict(model=model, prompt=prompt, seed=seed, steps=steps, height=height, width=width,
                              frames=frames, method=method)
        generate.click(
            run, inputs_kwargs={**request_inputs, **knob_components},
            outputs=[dense_video, accel_video, dense_image, accel_image, summary, report, heatmap, block_map],
            concurrency_limit=1, concurrency_id=concurrency_id, api_name="generate", show_progress="full",
            # Raw values: the request and the configs validate them with messages naming the field
            # (Gradio's own slider check names none).
            preprocess=False,
        ).then(show_media, inputs=[report], outputs=[dense_video, accel_video, dense_image, accel_image],
               queue=False, api_visibility="private")
    app.queue(default_concurrency_limit=1)
    return app


def _add_knob(gr, knob: widgets.Knob, config, into: dict) -> None:
    components = widgets.make_widgets(gr, knob, getattr(config, knob.spec.name))
    into.update(zip(knob.params, components))


def _preset_text(config) -> str:
    cfg = ", ".join(f"{k}={v}" for k, v in config.to_dict().items() if k != "method" and v not in ((), None))
    return f"The preset runs **{config.method}** with {cfg}."


def generate_from_values(session: DemoSession, values: dict, knobs: dict[str, list[widgets.Knob]],
                         progress=None) -> DemoResult:
    """The generate endpoint's named values -> a request, the method's overrides -> ``session.generate``."""
    missing = [f for f in REQUEST_FIELDS if f not in values]
    if missing:
        raise ValueError(f"missing request field(s) {missing}")
    method = values["method"]
    if method != PRESET and method not in knobs:
        raise ValueError(f"method must be {PRESET!r} or one of {list(knobs)}, got {method!r}")
    frames = values["frames"]
    request = GenerateRequest(model=values["model"], prompt=values["prompt"], seed=values["seed"],
                              steps=values["steps"], height=values["height"], width=values["width"],
                              frames=None if frames in (0, None) else frames)
    overrides = {} if method == PRESET else widgets.overrides_from_values(method, knobs[method], values)
    return session.generate(request, method, overrides, progress=progress)


__all__ = ["INITIAL", "TITLE", "build_app", "generate_from_values", "summary_markdown"]
