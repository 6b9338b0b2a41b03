"""``ditaccel compare`` end to end on the embedded pipeline (small sizes), its errors and ``--model``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

import ditaccel
from ditaccel import cli
from ditaccel.compare import jsonable, run_compare
from ditaccel.pipelines import embedded

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "128", "--frames", "5", "--steps", "3", "--no-progress"]
SPARSE = ["--method", "window", "--set", "kernel_size=(1,3,3)", "--set", "block_size=64", "--set", "dense_steps=1"]
SMALL_KW = dict(height=64, width=128, frames=5, steps=3, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return embedded.load()


def assert_unwrapped(pipe):
    """No ditaccel hook left: accelerating again works (it refuses a pipeline that is still wrapped)."""
    assert "forward" not in pipe.transformer.__dict__
    ditaccel.accelerate(pipe, "dense").remove()


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ditaccel", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_compare_end_to_end(tmp_path, capsys):
    out, extra = tmp_path / "out", tmp_path / "extra.json"
    rc = cli.main(["compare", *SMALL, *SPARSE, "--out", str(out), "--json", str(extra)])
    stdout = capsys.readouterr().out
    assert rc == 0
    for word in ("dense ms", "speedup", "mean density", "PSNR", "SSIM", "LPIPS", "latent rel-L2"):
        assert word in stdout

    report = json.loads((out / "compare.json").read_text())
    assert json.loads(extra.read_text()) == report
    assert report["method"] == "window" and report["config"]["kernel_size"] == [1, 3, 3]
    assert report["call"]["num_inference_steps"] == 3 and report["call"]["seed"] == 0
    assert report["latent_shape"] == [1, 16, 2, 8, 16]  # 5 frames -> 2 latent frames, 64x128 / 8

    timing = report["timing"]
    for side in ("dense", "accelerated"):
        steps = timing[side]["step_ms"]
        assert len(steps) == 3 and all(s > 0 for s in steps)
        assert timing[side]["denoise_ms"] == pytest.approx(sum(steps))
        assert timing[side]["total_ms"] > timing[side]["denoise_ms"]  # plus text encoding and decoding
    assert timing["speedup"] == pytest.approx(timing["dense"]["denoise_ms"] / timing["accelerated"]["denoise_ms"])
    sparse_dense, sparse_accel = sum(timing["dense"]["step_ms"][1:]), sum(timing["accelerated"]["step_ms"][1:])
    assert timing["speedup_sparse_steps"] == pytest.approx(sparse_dense / sparse_accel)

    density = report["density"]
    assert density["per_step"][0] == 1.0  # dense_steps=1
    assert all(0 < d < 1 for d in density["per_step"][1:])
    assert 0 < density["mean"] < 1 and density["calls"] == 3 * 2 * 4  # steps x CFG branches x layers

    quality = report["quality"]
    assert 0 < quality["psnr"] < 200 and quality["psnr_min"] <= quality["psnr"]
    assert len(quality["psnr_per_frame"]) == quality["frames"] == 5
    assert 0 < quality["ssim"] <= 1
    assert quality["latent_rel_l2"] > 0
    assert (quality["lpips"] is None) == (quality["lpips_note"] is not None)

    files = report["files"]
    for name, width in (("dense", 128), ("accelerated", 128), ("side_by_side", 2 * 128 + 8)):
        video = iio.imread(files[name], plugin="FFMPEG")
        assert video.shape == (5, 64, width, 3), name
        assert video.std() > 0
    assert Path(files["json"]) == out / "compare.json"


def test_dense_method_matches_dense_run_and_pipeline_is_restored(pipe):
    dense = run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="dense", overrides={"block_size": 64},
                        **SMALL_KW)
    sparse = run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="tile",
                         overrides={"tile": (1, 8, 8), "window": (1, 1, 1), "block_size": 64}, **SMALL_KW)
    assert dense["density"]["mean"] == 1.0
    assert dense["quality"]["latent_rel_l2"] < 1e-4
    assert sparse["density"]["mean"] == pytest.approx(0.25)  # 4 tiles of 64 tokens, each sees itself
    assert sparse["quality"]["latent_rel_l2"] > 10 * dense["quality"]["latent_rel_l2"]
    assert sparse["quality"]["psnr"] < dense["quality"]["psnr"]
    assert "files" not in sparse  # out=None writes nothing
    assert_unwrapped(pipe)


def test_failure_inside_the_accelerated_run_still_restores(pipe, capsys):
    # A 3-frame window cannot fit 2 latent frames: the plan fails mid-call, remove() still runs.
    with pytest.raises(ValueError, match="kernel_size"):
        run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="window", overrides={"kernel_size": (3, 3, 3)},
                    **SMALL_KW)
    assert_unwrapped(pipe)


def test_unknown_set_field_exits_2_with_one_line(tmp_path):
    out = tmp_path / "never"
    proc = run_cli("compare", "--set", "bogus_field=1", "--out", str(out), "--no-progress")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus_field" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # rejected before any run


@pytest.mark.parametrize("args, needle", [
    (["--set", "window"], "FIELD=VALUE"),
    (["--method", "nonsense"], "nonsense"),
    (["--set", "dense_steps=-1"], "dense_steps"),
    (["--model", "./no/such/dir"], "no such directory"),
    (["--steps", "0"], "--steps"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    rc = cli.main(["compare", *args, "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0] and err[0].startswith("ditaccel compare: error:")


def test_model_directory_loads_offline(tmp_path):
    model = embedded.save(tmp_path / "tiny-wan")
    out = tmp_path / "out"
    proc = run_cli("compare", "--model", str(model), *SMALL, "--method", "tile", "--set", "block_size=64",
                   "--set", "tile=(1,8,8)", "--set", "window=(1,1,1)", "--out", str(out),
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["model"] == str(model) and report["pipeline"] == "WanPipeline"
    assert report["call"]["height"] == 64 and "max_sequence_length" not in report["call"]  # no embedded defaults
    assert report["density"]["mean"] < 1


def test_parse_set_and_json_helpers():
    assert cli.parse_set(["window=(3,3,3)", "dense_steps=1", "backend=flex", "dense_layers=[0, 1]", "x= 2.5 "]) == {
        "window": (3, 3, 3), "dense_steps": 1, "backend": "flex", "dense_layers": [0, 1], "x": 2.5}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli.parse_set(["=3"])
    assert jsonable({"a": (1, math.inf), "b": float("nan")}) == {"a": [1, "inf"], "b": "nan"}


def test_help_and_missing_command(capsys):
    assert cli.main(["compare", "--help"]) == 0
    assert "--set" in capsys.readouterr().out
    assert cli.main([]) == 2


def test_bench_and_demo_are_subcommands():
    import ditaccel.bench
    import ditaccel.demo

    parser = cli.build_parser()
    assert parser.parse_args(["bench"]).func is ditaccel.bench.main
    assert parser.parse_args(["demo"]).func is ditaccel.demo.main
    assert parser.parse_args(["demo"]).host == "127.0.0.1"  # loopback unless --host is given
