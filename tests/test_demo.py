"""``ditaccel demo``: knob widgets from the config registry, the plots, and the real server driven by
``gradio_client`` on a free loopback port (a generation on the embedded default, bad input, out of
memory, a non-safetensors model), plus the command line. The browser test is test_demo_browser.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import ditaccel
from ditaccel.config import describe_fields
from ditaccel.demo import widgets
from ditaccel.methods import config_class

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(steps=2, height=64, width=128, frames=5)  # 2 x 8 x 16 latent tokens: seconds per run on CPU
WINDOW_SMALL = dict(method="window", window__kernel_size_t=1, window__kernel_size_h=3, window__kernel_size_w=3,
                    window__block_size=64)


# --- widgets from the registry -------------------------------------------------------------------

@pytest.mark.parametrize("method", ditaccel.METHODS)
def test_widgets_round_trip_every_field_of_every_method(method):
    """Each knob's widgets show its default, and reading them back rebuilds the default config."""
    knobs = widgets.method_knobs(method)
    cls = config_class(method)
    assert [k.spec.name for k in knobs] != [] and {k.spec.name for k in knobs} == set(cls.field_names())
    own = [k.spec.name for k in knobs if not k.shared]
    assert own == [s.name for s in describe_fields(cls) if s not in set(describe_fields(ditaccel.AttentionConfig))]
    default = cls()
    values = {p: v for k in knobs for p, v in zip(k.params, widgets.widget_values(k, getattr(default, k.spec.name)))}
    overrides = widgets.overrides_from_values(method, knobs, values)
    assert cls(**overrides) == default


def test_widgets_carry_the_validated_ranges():
    with gr.Blocks():
        for knobs in widgets.all_knobs().values():
            for knob in knobs:
                spec = knob.spec
                comps = widgets.make_widgets(gr, knob, spec.default)
                assert len(comps) == len(knob.params), knob
                if spec.choices:
                    assert isinstance(comps[0], gr.Dropdown)
                    assert [c[1] for c in comps[0].choices] == list(spec.choices)
                elif spec.kind in ("int", "float") and spec.low is not None and spec.high is not None:
                    assert isinstance(comps[0], gr.Slider)
                    assert comps[0].maximum == spec.high and comps[0].minimum >= spec.low
                    assert comps[0].minimum > spec.low or not spec.low_open
                elif spec.kind in ("int", "float"):
                    assert isinstance(comps[0], gr.Number) and comps[0].minimum == spec.low
                elif spec.kind == "axes":
                    assert all(isinstance(c, gr.Number) and c.precision == 0 for c in comps)
                    assert all(c.step == (2 if spec.odd else 1) for c in comps)
                elif spec.kind == "bool":
                    assert isinstance(comps[0], gr.Checkbox)
    radial_decay = next(k for k in widgets.method_knobs("radial") if k.spec.name == "decay")
    assert radial_decay.spec.low_open  # the slider above started above 0: decay=0 is not allowed


def test_widget_text_parses_and_bad_text_names_the_field():
    knobs = {k.spec.name: k for k in widgets.method_knobs("window")}
    assert widgets.parse_knob(knobs["dense_layers"], [" "]) == ()
    assert widgets.parse_knob(knobs["dense_layers"], ["2"]) == 2
    assert widgets.parse_knob(knobs["dense_layers"], ["0, 3"]) == (0, 3)
    assert widgets.parse_knob(knobs["cfg_share_steps"], ["4"]) == (4,)
    assert widgets.parse_knob(knobs["tile"], [""]) is None
    assert widgets.parse_knob(knobs["tile"], ["1, 8, 8"]) == (1, 8, 8)
    assert widgets.parse_knob(knobs["kernel_size"], [1, 3.0, 5]) == (1, 3, 5)
    with pytest.raises(ValueError, match=r"WindowConfig\.dense_layers"):
        widgets.parse_knob(knobs["dense_layers"], ["0, x"])
    with pytest.raises(ValueError, match=r"WindowConfig\.kernel_size\[h\]"):
        widgets.parse_knob(knobs["kernel_size"], [1, 2.5, 3])
    with pytest.raises(ValueError, match=r"window__kernel_size_w"):
        widgets.overrides_from_values("window", list(knobs.values()), {"window__kernel_size_t": 1})


# --- the server ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    """The real demo server (default host) on a free loopback port, with a client; shut down after."""
    from ditaccel.demo import launch
    from ditaccel.demo.session import DemoSession

    session = DemoSession()
    app = launch(port=free_port(), session=session, initial=SMALL, block=False, quiet=True)
    try:
        yield app, session, Client(app.local_url, verbose=False)
    finally:
        app.close()
        session.close()


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (Linux /proc/net/tcp, tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1]) if len(address) == 8
                          else address)
    return found


def test_server_binds_loopback_only(server):
    app, _, _ = server
    assert app.server_name == "127.0.0.1"
    assert listening_addresses(app.server_port) == {"127.0.0.1"}


def test_generate_then_method_change_reuses_dense(server):
    _, session, client = server
    (dense_v, accel_v, dense_i, accel_i, summary, report, heatmap, block_map, side_by_side) = client.predict(
        **WINDOW_SMALL, api_name="/generate")
    assert dense_i is None and accel_i is None  # the embedded pipeline makes videos
    import imageio.v3 as iio

    dense = iio.imread(dense_v, plugin="FFMPEG")  # gradio_client downloaded the files
    accel = iio.imread(accel_v, plugin="FFMPEG")
    assert dense.shape == accel.shape == (5, 64, 128, 3) and dense.std() > 0
    pair = iio.imread(side_by_side)  # the labelled dense | accelerated | difference panels
    assert pair.shape == (3 * (64 + 14), 3 * 128 + 2 * 6, 3)
    assert report["method"] == "window" and report["config"]["kernel_size"] == [1, 3, 3]
    assert report["grid"] == [2, 8, 16] and report["dense_cached"] is False
    assert 0 < report["density"]["mean"] < 1 and len(report["density"]["per_step"]) == 2
    assert 0 < report["quality"]["psnr"] < 200 and 0 < report["quality"]["ssim"] <= 1
    t = report["timing"]
    assert t["speedup"] == pytest.approx(t["dense_median_ms"] / t["accel_median_ms"])  # the engine's record
    for word in ("speedup", "density", "PSNR", "SSIM"):
        assert word in summary
    for picture in (heatmap, block_map):
        assert iio.imread(picture).ndim == 3
    assert "forward" not in session._pipe.transformer.__dict__  # accelerate() was removed

    # Another method on the same request: the dense side comes from the cache, the other side changes.
    report2 = client.predict(method="tile", tile__window_t=1, tile__window_h=1, tile__window_w=1,
                             tile__block_size=64, tile__tile="1, 8, 8", api_name="/generate")[5]
    assert report2["dense_cached"] is True and report2["method"] == "tile"
    assert report2["timing"]["dense_step_ms"] == report["timing"]["dense_step_ms"]
    assert report2["density"]["mean"] == pytest.approx(0.25)  # 4 tiles of 64 tokens, each sees itself
    assert report2["quality"]["psnr"] != report["quality"]["psnr"]


def test_dynamic_method_knobs_come_from_its_config(server):
    """topk was registered after the demo was written: its widgets and block map come from the registry."""
    client = server[2]
    job = client.submit(method="topk", topk__cdf="0.5", topk__block_size=64, topk__tile="1, 8, 8",
                        api_name="/generate")
    stages = set()
    while not job.done():
        for unit in job.status().progress_data or []:
            stages.add(unit.desc)
        time.sleep(0.05)
    *_, report, heatmap, block_map, side_by_side = job.result()
    # The page shows what the long run is doing: its "topk run" stage or the pipeline's own "topk"
    # progress bar, which replaces the stage within milliseconds (a 50 ms poll may see either).
    assert stages & {"topk run", "topk"}
    assert report["method"] == "topk" and report["config"]["cdf"] == 0.5 and report["config"]["topk"] is None
    assert 0 < report["density"]["mean"] < 1
    import imageio.v3 as iio

    assert iio.imread(heatmap).ndim == 3 and iio.imread(block_map).ndim == 3


def test_generation_is_queued_one_at_a_time_per_device(server):
    app, session, _ = server
    fns = {fn.api_name: fn for fn in app.fns.values()}
    for name in ("generate", "load_defaults"):  # both use the pipeline: one group, one at a time
        assert fns[name].concurrency_limit == 1 and fns[name].concurrency_id == f"generate-{session.device}"


def test_bad_input_is_a_readable_error_and_the_server_keeps_serving(server):
    _, _, client = server
    with pytest.raises(AppError, match=r"Invalid input: WindowConfig\.kernel_size\[t\] must be odd"):
        client.predict(method="window", window__kernel_size_t=2, api_name="/generate")
    with pytest.raises(AppError, match=r"Invalid input: steps must be in \[1, 1000\], got 0"):
        client.predict(steps=0, api_name="/generate")
    with pytest.raises(AppError, match=r"Invalid input: .*dense_layers"):
        client.predict(method="radial", radial__dense_layers="1, two", api_name="/generate")
    status = client.predict("embedded", api_name="/load_defaults")[0]
    assert "wan" in status


def test_out_of_memory_is_reported_and_the_next_request_runs(server, monkeypatch):
    _, session, client = server
    real = session.generate

    def out_of_memory(*args, **kwargs):
        monkeypatch.setattr(session, "generate", real)  # only the first call fails
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(session, "generate", out_of_memory)
    with pytest.raises(AppError, match=r"Out of memory on cpu.*server is still running"):
        client.predict(**WINDOW_SMALL, api_name="/generate")
    report = client.predict(**WINDOW_SMALL, api_name="/generate")[5]
    assert report["method"] == "window" and 0 < report["density"]["mean"] < 1


def test_model_without_safetensors_weights_is_refused(server, tmp_path):
    from ditaccel.pipelines import embedded

    path = tmp_path / "pickled"
    embedded.build().save_pretrained(path, safe_serialization=False)
    assert list(path.rglob("*.bin"))  # the transformer's weights are a pickle
    _, session, client = server
    try:
        with pytest.raises(AppError, match="safetensors"):
            client.predict(model=str(path), api_name="/generate")
    finally:
        session.pipeline(None)  # back to the embedded pipeline for the other tests


# --- command line --------------------------------------------------------------------------------

def test_parser_plugs_into_a_subcommand_table():
    from ditaccel import demo

    parser = argparse.ArgumentParser(prog="ditaccel")
    demo.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["demo", "--port", "8123", "--steps", "2", "--method", "tile"])
    assert args.func is demo.main and args.port == 8123 and args.host == "127.0.0.1"
    assert args.steps == 2 and args.method == "tile"


def test_module_cli_rejects_a_bad_port_in_one_line(monkeypatch, capsys):
    import runpy

    monkeypatch.setattr(sys, "argv", ["ditaccel.demo", "--port", "70000"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("ditaccel.demo", run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "ditaccel demo: error: port must be an int in [1, 65535], got 70000"


def test_module_cli_serves_on_loopback_and_stops_on_sigterm_during_a_generation(tmp_path):
    """The command-line server, SIGTERM while one generation runs and two wait: exit 0 within seconds
    (the running one is cancelled, the waiting ones refused) and the work directory is gone."""
    from gradio_client.utils import Status

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "ditaccel.demo", "--port", str(port), "--steps", "2",
                             "--height", "64", "--width", "128", "--method", "radial"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=5) as response:
                    config = json.load(response)
                break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not come up in 300 s"
                time.sleep(1)
        assert listening_addresses(port) == {"127.0.0.1"}
        values = {c["props"].get("label"): c["props"].get("value") for c in config["components"]}
        assert values["steps"] == 2 and values["height"] == 64 and values["method"] == "radial"
        assert len(list(tmp_path.glob("ditaccel-demo-*"))) == 1  # the session's files
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        # 200 steps: minutes on this CPU unless it is cancelled.
        jobs = [client.submit(steps=200, height=64, width=64, frames=5, method="preset", api_name="/generate")
                for _ in range(3)]
        running = (Status.PROCESSING, Status.PROGRESS)
        started = time.monotonic() + 120
        while not any(job.status().code in running for job in jobs):  # one runs (which one: submit order)
            assert not any(job.done() for job in jobs) and time.monotonic() < started, [j.status() for j in jobs]
            time.sleep(0.1)
        time.sleep(1.0)  # inside the pipeline call
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - stopped < 10, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not list(tmp_path.glob("ditaccel-demo-*"))  # removed on the way out


def test_sigterm_while_the_server_starts_is_a_clean_stop(tmp_path, monkeypatch):
    """The server answers before Gradio starts waiting; a SIGTERM in that gap once exited 130 in CI."""
    from ditaccel import demo

    closed = []

    class StartingApp:  # SIGTERM lands inside launch(), before Gradio's own wait loop catches it
        def launch(self, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            raise AssertionError("SIGTERM was not delivered")

        def close(self):
            closed.append(True)

    monkeypatch.setattr("ditaccel.demo.app.build_app", lambda session, initial: StartingApp())  # launch() imports it
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert demo.main(demo.build_parser().parse_args(["--port", str(free_port())])) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert closed == [True]
    assert not list(tmp_path.glob("ditaccel-demo-*"))  # the session's files are gone too


def test_build_app_rejects_unknown_initial_fields():
    from ditaccel.demo import build_app
    from ditaccel.demo.session import DemoSession

    session = DemoSession()
    try:
        with pytest.raises(ValueError, match=r"initial: unknown field\(s\) \['colour'\]"):
            build_app(session, initial={"colour": "red"})
        with pytest.raises(ValueError, match="initial method"):
            build_app(session, initial={"method": "nonsense"})
    finally:
        session.close()


def test_dataclass_fields_are_described():
    # Widgets only exist for fields declared with knob(): a plain field would be silently missing.
    for method in ditaccel.METHODS:
        cls = config_class(method)
        assert {s.name for s in describe_fields(cls)} == {f.name for f in dataclasses.fields(cls)}, method
