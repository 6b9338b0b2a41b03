"""``ditaccel demo`` under load, bad input and huge requests (issue 16): the summary renders every
outcome, admission control refuses what cannot run before any work, a failed call (an injected
out-of-memory included) leaves nothing behind, and 20 concurrent small requests are all answered.
The real server runs in this process on a free loopback port, driven by ``gradio_client``; the stop
on SIGTERM during a running generation is ``test_demo.py``'s command-line test."""

from __future__ import annotations

import json
import math
import resource
import threading
import time
import weakref

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_demo import free_port, listening_addresses

from ditaccel.demo import admission, render
from ditaccel.demo.admission import Limits
from ditaccel.demo.cancel import Cancellation, GenerationCancelled

TINY = dict(steps=2, height=64, width=64, frames=5)  # latent grid 2 x 8 x 8: 128 tokens, the smallest sparse one
SMALLEST = dict(method="xattn", height=32, width=32, frames=1)  # 1 x 4 x 4: 16 tokens, one block: a block
# method stays dense (the embedded preset, a table of cross-step shares, would not: shares are not blocks)
TILE = dict(method="tile", tile__window_t=1, tile__window_h=1, tile__window_w=1, tile__block_size=64,
            tile__tile="1, 8, 8")  # 2 tiles of 64 tokens, each sees itself: density 0.5


# --- the summary, for every outcome --------------------------------------------------------------

def _report(**changes) -> dict:
    report = {
        "model": "embedded", "pipeline": "WanPipeline", "device": "cpu", "dtype": "float32", "method": "tile",
        "config": {"method": "tile", "window": [1, 1, 1]}, "grid": [2, 8, 8], "dense_cached": False,
        "timing": {"dense": {"denoise_ms": 120.0, "total_ms": 300.0},
                   "accelerated": {"denoise_ms": 100.0, "total_ms": 280.0},
                   "speedup": 1.2, "speedup_median_sparse_step": 1.25},
        "density": {"mean": 0.5},
        "quality": {"psnr": 31.5, "ssim": 0.97, "lpips": 0.04, "latent_rel_l2": 0.01},
    }
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = report
        for key in parents:
            node = node[key]
        if value is KeyError:
            node.pop(leaf)
        else:
            node[leaf] = value
    return report


@pytest.mark.parametrize("psnr", [float("inf"), "inf", "Infinity"])
def test_summary_shows_an_infinite_psnr_in_every_spelling(psnr):
    text = render.summary_markdown(_report(quality__psnr=psnr, density__mean=1.0))
    assert "PSNR ∞ (identical to dense)" in text
    assert "Nothing ran sparse" in text and "latent grid 2x8x8" in text


def test_summary_reads_the_engines_identical_flag_and_missing_figures():
    text = render.summary_markdown(_report(quality={"psnr": None, "identical": True, "ssim": 1.0},
                                           timing__speedup=None, density__mean=None))
    assert "PSNR ∞ (identical to dense)" in text and "speedup n/a×" in text and "density n/a" in text
    assert "LPIPS n/a (weights not present locally)" in text and "Nothing ran sparse" in text
    sparse = render.summary_markdown(_report(quality__lpips=None, quality__lpips_note="LPIPS skipped: no weights"))
    assert "PSNR 31.50 dB" in sparse and "density 0.500" in sparse and "speedup 1.20×" in sparse
    assert "LPIPS n/a (LPIPS skipped: no weights)" in sparse and "Nothing ran sparse" not in sparse
    # A report with nothing in it (or an unexpected shape) still renders.
    for broken in ({}, {"timing": "x", "quality": [], "density": None}, _report(timing__dense=KeyError)):
        assert "speedup" in render.summary_markdown(broken)
    assert "PSNR n/a dB" in render.summary_markdown(_report(quality__psnr="nan"))


def test_summary_of_the_evaluation_engines_record():
    record = {"model": "embedded", "pipeline": "WanPipeline", "device": "cpu", "dtype": "float32", "method": "xattn",
              "config": {}, "grid": [1, 4, 4], "dense_cached": True,
              "timing": {"speedup": 1.01, "verdict": "inconclusive (noise 12%)", "dense_median_ms": 40.0,
                         "accel_median_ms": 39.6},
              "density": {"mean": 1.0}, "sparsity": {"ran_sparse": False},
              "quality": {"psnr": None, "identical": True, "ssim": 1.0, "lpips": None, "lpips_note": "no weights"},
              "verdicts": ["speed: inconclusive", "sparsity: nothing ran sparse"]}
    text = render.summary_markdown(record)
    assert "**speed: inconclusive (noise 12%)** (speedup 1.01×" in text and "| 40 ms (cached" in text
    assert "PSNR ∞ (identical to dense)" in text and "- sparsity: nothing ran sparse" in text
    assert "Nothing ran sparse" in text and "LPIPS n/a (no weights)" in text
    record["sparsity"]["ran_sparse"] = True  # the engine's finding wins over the mean density
    assert "Nothing ran sparse" not in render.summary_markdown(record)


def test_report_sent_to_the_page_is_always_json():
    report = render.json_safe({"psnr": float("inf"), "x": [float("nan"), (1, 2.5)], "t": torch.tensor(2.0),
                               "d": torch.float32})
    assert report == {"psnr": "inf", "x": ["nan", [1, 2.5]], "t": 2.0, "d": "torch.float32"}
    json.dumps(report, allow_nan=False)
    assert render.number("inf") == math.inf and render.number(True) is None and render.number("x") is None


# --- admission: sizing a request before any work ---------------------------------------------------

@pytest.fixture(scope="module")
def embedded_pipe():
    from ditaccel.pipelines import embedded

    return embedded.load()


def test_latent_grid_and_frame_rule_of_the_embedded_wan(embedded_pipe):
    pipe = embedded_pipe
    assert admission.latent_grid(pipe, 64, 128, 5) == (2, 8, 16)  # what the server reports (test_demo.py)
    assert admission.latent_grid(pipe, 144, 192, 17) == (5, 18, 24)  # embedded.DEFAULTS: 2160 tokens
    assert admission.latent_grid(pipe, 4096, 4096, 1025) == (257, 512, 512)
    assert admission.latent_grid(pipe, 4096, 4096, 1024) == (257, 512, 512)  # diffusers runs 1025 frames
    for frames in (None, 1, 5, 17):
        admission.check_frames(pipe, frames)
    with pytest.raises(ValueError, match=r"frames must be 4k\+1 for WanPipeline .* 1, 5, 9, \.\.\.; got 2 "
                                         r"\(nearest: 1 or 5\)"):
        admission.check_frames(pipe, 2)


def test_memory_estimate_stays_above_the_measured_peaks(embedded_pipe):
    # Peak RSS growth measured for one generation (admission.py's notes): the estimate must not be lower.
    measured_mb = {(144, 192, 17): 402, (288, 384, 17): 1214, (144, 192, 65): 1054, (576, 768, 1): 698}
    for (h, w, f), mb in measured_mb.items():
        grid = admission.latent_grid(embedded_pipe, h, w, f)
        estimate = admission.estimate_bytes(embedded_pipe, grid, h * w * f, torch.float32) / 2**20
        assert mb <= estimate <= 2 * mb, (h, w, f, estimate)


def test_admission_refuses_with_the_limit_and_the_flag(embedded_pipe):
    from ditaccel.demo.session import GenerateRequest

    cpu = torch.device("cpu")

    def request(**kw):
        return GenerateRequest(**{**dict(model=None, prompt="a red square", seed=0, steps=2, height=64, width=64,
                                         frames=5), **kw})

    sizing = admission.admit(embedded_pipe, request(), Limits(), cpu, torch.float32)
    assert sizing.grid == (2, 8, 8) and sizing.token_steps == 256
    with pytest.raises(ValueError, match=r"4096x4096x1024 px is a latent grid of 257x512x512 = 67,371,008 tokens "
                                         r"x 2 steps = 134,742,016 token-steps; the limit on cpu is 2,000,000 "
                                         r"\(raise it with ditaccel demo --max-token-steps N\)"):
        admission.admit(embedded_pipe, request(height=4096, width=4096, frames=1024), Limits(), cpu, torch.float32)
    with pytest.raises(ValueError, match=r"needs about .* GB; the limit is 0\.00 GB \(set with --max-memory-gb; "
                                         r"raise it with ditaccel demo --max-memory-gb GB\)"):
        admission.admit(embedded_pipe, request(), Limits(max_memory_bytes=1000), cpu, torch.float32)
    with pytest.raises(ValueError, match=r"of the memory free on cpu now"):
        admission.admit(embedded_pipe, request(height=4096, width=4096, frames=1024),
                        Limits(max_token_steps=10**12), cpu, torch.float32)
    with pytest.raises(ValueError, match=r"prompt is 31 characters long; the limit is 30 "
                                         r"\(raise it with ditaccel demo --max-prompt-chars N\)"):
        admission.admit(embedded_pipe, request(prompt="x" * 31), Limits(max_prompt_chars=30), cpu, torch.float32)
    with pytest.raises(ValueError, match=r"prompt must be valid Unicode text; character 1 is a lone surrogate"):
        admission.admit(embedded_pipe, request(prompt="a\ud800b"), Limits(), cpu, torch.float32)
    with pytest.raises(ValueError, match=r"Limits\.max_token_steps must be a positive integer, got 0"):
        Limits(max_token_steps=0)


def test_limit_flags_reach_the_session():
    from ditaccel import demo

    args = demo.build_parser().parse_args(["--max-token-steps", "5000", "--max-memory-gb", "1.5",
                                           "--max-prompt-chars", "100"])
    assert demo.limits_from_args(args) == Limits(max_prompt_chars=100, max_token_steps=5000,
                                                 max_memory_bytes=int(1.5 * 2**30))
    assert demo.limits_from_args(demo.build_parser().parse_args([])) == Limits()
    for bad, message in ((["--max-memory-gb", "inf"], "--max-memory-gb must be a positive number of GB, got inf"),
                         (["--max-token-steps", "0"], "--max-token-steps must be >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            demo.limits_from_args(demo.build_parser().parse_args(bad))


def test_cancellation_stops_the_next_module_call_and_goes_away():
    layer = torch.nn.Linear(4, 4)
    cancel = Cancellation()
    cancel.check()
    layer(torch.ones(1, 4))
    cancel.cancel()
    with pytest.raises(GenerationCancelled):
        layer(torch.ones(1, 4))
    with pytest.raises(GenerationCancelled, match="shutting down"):
        cancel.check()
    cancel.release()
    layer(torch.ones(1, 4))  # nothing hooked any more
    assert cancel.requested


# --- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    from ditaccel.demo import launch
    from ditaccel.demo.session import DemoSession

    session = DemoSession()
    app = launch(port=free_port(), session=session, initial=TINY, block=False, quiet=True)
    try:
        yield app, session, Client(app.local_url, verbose=False)
    finally:
        app.close()
        session.close()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def test_twenty_concurrent_requests_are_all_answered(server, monkeypatch):
    from ditaccel.demo import session as session_module

    app, _, client = server
    assert listening_addresses(app.server_port) == {"127.0.0.1"}
    # Matplotlib is a third of a tiny request's time: the dense-only ones skip their (all-ones)
    # pictures here, which also runs the page's "nothing drawn" path; the tile ones draw theirs.
    for name in ("density_heatmaps", "block_mask_figure"):
        real = getattr(session_module, name)
        monkeypatch.setattr(session_module, name,
                            lambda pairs, path, _real=real, **kw: _real(pairs, path, **kw) if pairs[0][0] == "tile"
                            else None)
    start = time.monotonic()
    sparse = {4, 15}  # tile on 64x64x5; the other 18 run xattn on 32x32x1 (one block: dense)
    jobs = [client.submit(**(TILE if i in sparse else SMALLEST), api_name="/generate") for i in range(20)]
    results = [job.result(timeout=240) for job in jobs]
    elapsed = time.monotonic() - start
    for i, (dense_video, accel_video, *_, summary, report, heatmap, block_map, _pair) in enumerate(results):
        assert "speedup" in summary and "PSNR" in summary and dense_video and accel_video
        if i in sparse:  # tile: half the blocks
            assert report["grid"] == [2, 8, 8] and "Nothing ran sparse" not in summary and heatmap and block_map
            assert report["density"]["mean"] == pytest.approx(0.5) and 0 < report["quality"]["psnr"] < 200
        else:  # nothing runs sparse, PSNR is infinite: the case that failed 16 times in 20
            assert report["grid"] == [1, 4, 4] and report["density"]["mean"] == 1.0
            assert "Nothing ran sparse" in summary and "PSNR ∞ (identical to dense)" in summary
    assert sum(r[5]["dense_cached"] for r in results) == 18  # one dense run per size, reused by the rest
    assert elapsed < 240


def test_bad_input_gets_a_one_line_message_and_nothing_runs(server, monkeypatch):
    _, session, client = server
    cases = [
        (dict(prompt="x" * 10_000), r"Invalid input: prompt is 10000 characters long; the limit is 2000 "
                                    r"\(raise it with ditaccel demo --max-prompt-chars N\)"),
        (dict(frames=2), r"Invalid input: frames must be 4k\+1 for WanPipeline"),
        (dict(method="window", window__cache_budget_mb="inf"), r"Invalid input: WindowConfig\.cache_budget_mb "
                                                               r"must be a number"),
    ]
    calls = []  # transformer calls: none may happen for refused requests
    counter = session._pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        _refused_up_front(client, cases, monkeypatch)
    finally:
        counter.remove()
    assert calls == []


def _refused_up_front(client, cases, monkeypatch):
    for values, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(**values, api_name="/generate")

    # 4096 x 4096 x 1024 is refused up front, quickly and without growing the server's memory.
    before, start = _rss_mb(), time.monotonic()
    with pytest.raises(AppError, match=r"Invalid input: request too large: 4096x4096x1024 px .* token-steps; "
                                       r"the limit on cpu is 2,000,000 \(raise it with ditaccel demo "
                                       r"--max-token-steps N\)"):
        client.predict(height=4096, width=4096, frames=1024, api_name="/generate")
    assert time.monotonic() - start < 30 and _rss_mb() - before < 100

    # What a JSON client can send but httpx (so gradio_client) refuses to: Infinity, NaN, a lone
    # surrogate (JSON "\\ud800"). Let it, for these calls.
    import httpx._content

    monkeypatch.setattr(httpx._content, "json_dumps",
                        lambda obj, **kw: json.dumps(obj, **{**kw, "allow_nan": True, "ensure_ascii": True}))
    with pytest.raises(AppError, match=r"Invalid input: prompt must be valid Unicode text; character 1 is a lone "
                                       r"surrogate"):
        client.predict(prompt="a\ud800", api_name="/generate")
    with pytest.raises(AppError, match=r"Invalid input: WindowConfig\.cache_budget_mb must be a finite number, "
                                       r"got inf"):
        client.predict(method="window", window__cache_budget_mb=float("inf"), api_name="/generate")
    with pytest.raises(AppError, match=r"Invalid input: steps must be an integer, got nan"):
        client.predict(steps=float("nan"), api_name="/generate")


def test_unicode_prompt_and_oversize_refusal_then_a_good_request(server, monkeypatch):
    _, session, client = server
    prompt = "ünïcødé 日本語 🙂 a red square"
    summary, report = client.predict(prompt=prompt, **SMALLEST, api_name="/generate")[4:6]
    assert report["call"]["prompt"] == prompt and "PSNR" in summary
    monkeypatch.setattr(session, "limits", Limits(max_token_steps=300))
    with pytest.raises(AppError, match=r"Invalid input: request too large: 64x128x5 px is a latent grid of 2x8x16 "
                                       r"= 256 tokens x 2 steps = 512 token-steps; the limit on cpu is 300 "
                                       r"\(raise it with ditaccel demo --max-token-steps N\)"):
        client.predict(width=128, api_name="/generate")
    assert client.predict(**SMALLEST, api_name="/generate")[5]["grid"] == [1, 4, 4]  # 32 token-steps fit


def test_failed_accelerated_run_after_a_good_dense_one(server):
    from ditaccel.hooks import STEP_HOOK

    _, session, client = server
    transformer = session._pipe.transformer

    def fail_when_accelerated(module, args):
        registry = getattr(transformer, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(STEP_HOOK) is not None:  # only inside the accelerated run
            raise RuntimeError("injected failure in the accelerated run")

    hook = transformer.blocks[0].attn1.register_forward_pre_hook(fail_when_accelerated)
    try:
        with pytest.raises(AppError, match=r"RuntimeError: injected failure in the accelerated run"):
            client.predict(seed=7, **SMALLEST, api_name="/generate")
    finally:
        hook.remove()
    summary, report = client.predict(seed=7, **SMALLEST, api_name="/generate")[4:6]  # the same request runs
    assert report["grid"] == [1, 4, 4] and report["method"] == "xattn" and "PSNR" in summary
    assert "forward" not in transformer.__dict__  # no wrapper left behind


def test_out_of_memory_mid_run_frees_what_it_held(server):
    _, session, client = server
    transformer = session._pipe.transformer
    held = []

    def out_of_memory(module, args):
        handle.remove()  # one failure only
        big = torch.ones(64, 2**20)  # 256 MB that only this failed call refers to
        held.append(weakref.ref(big))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")

    handle = transformer.blocks[1].register_forward_pre_hook(out_of_memory)
    with pytest.raises(AppError, match=r"Out of memory on cpu.*server is still running"):
        client.predict(seed=11, **SMALLEST, api_name="/generate")
    assert held and held[0]() is None  # freed: not kept alive by the error's traceback
    assert "forward" not in transformer.__dict__  # no wrapper left behind
    report = client.predict(seed=11, **SMALLEST, api_name="/generate")[5]
    assert report["dense_cached"] is False and report["quality"]["ssim"] > 0.99


def test_closing_the_session_stops_a_running_generation(embedded_pipe, tmp_path):
    """session.close() from another thread (what SIGTERM does) ends a long call within seconds."""
    from ditaccel.demo.session import DemoSession, GenerateRequest

    session = DemoSession()
    from ditaccel.pipelines import embedded

    session._pipe, session._pipe_model, session._defaults = embedded_pipe, None, dict(embedded.DEFAULTS)
    failure = []
    started = threading.Event()

    def long_call():
        try:
            session.generate(GenerateRequest(None, "a red square", 0, 200, 64, 64, 5), "tile", {},
                             progress=lambda fraction, desc: started.set())
        except BaseException as exc:  # noqa: BLE001 - what the thread ended with is the result
            failure.append(exc)

    worker = threading.Thread(target=long_call)
    worker.start()
    assert started.wait(60)
    time.sleep(0.5)  # inside the pipeline call
    start = time.monotonic()
    session.close()
    worker.join(10)
    assert not worker.is_alive() and time.monotonic() - start < 10
    assert len(failure) == 1 and isinstance(failure[0], GenerationCancelled)
    assert not session.work_dir.exists()
    torch.nn.Linear(2, 2)(torch.ones(1, 2))  # the stop hook is gone again
    assert "forward" not in embedded_pipe.transformer.__dict__  # accelerate() (if it ran) was removed
