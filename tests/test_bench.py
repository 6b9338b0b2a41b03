"""``ditaccel bench`` end to end on a tiny matrix (files, figures, a failing cell, a forced regression
against a doctored baseline), and its parts without a model: matrix files, tolerance rules, atomic
results under an interrupt, the Pareto front and the density grid."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest

import ditaccel
from ditaccel.bench import baseline as bl
from ditaccel.bench import runner
from ditaccel.bench.__main__ import run as bench_main
from ditaccel.bench.matrix import BenchMatrix, MethodSpec, SizeSpec, default_matrix, load_matrix, matrix_from_dict
from ditaccel.eval.plots import density_grid, pareto_front

ROOT = Path(__file__).resolve().parents[1]
SPARSE = {"name": "window", "set": {"kernel_size": [1, 3, 3], "block_size": 64}, "label": "win133"}
# 64x128 px, 5 frames: a (2, 8, 16) token grid. The Triton kernel takes no head dim 32 (the embedded
# transformer's), so that cell fails (at accelerate): the matrix must record it and go on.
FAILING = {"name": "window", "set": {"backend": "triton"}, "label": "window"}
TINY = {"methods": ["dense", SPARSE, FAILING], "sizes": [{"height": 64, "width": 128, "frames": 5, "steps": 3}],
        "seeds": [0], "device": "cpu", "error_steps": [2]}
SPARSE_KEY = "embedded|win133|64x128x5,steps=3|seed=0"
DENSE_KEY = "embedded|dense|64x128x5,steps=3|seed=0"
FAILING_KEY = "embedded|window|64x128x5,steps=3|seed=0"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One in-process bench run of the tiny matrix, saving its own baseline: (out dir, stdout, exit code)."""
    tmp = tmp_path_factory.mktemp("bench")
    matrix = tmp / "matrix.json"
    matrix.write_text(json.dumps(TINY))
    out = tmp / "out"
    code, stdout = _run_bench(["--matrix", str(matrix), "--out", str(out), "--no-progress",
                               "--save-baseline", str(tmp / "baseline.json")])
    return tmp, out, stdout, code


def _run_bench(argv: list[str]) -> tuple[int, str]:
    """``python -m ditaccel.bench ARGV`` in this process (the pipeline build and imports are paid once)."""
    buffer = StringIO()
    with redirect_stdout(buffer):
        code = bench_main(argv)
    return code, buffer.getvalue()


def test_tiny_matrix_writes_results_figures_and_report(tiny_run):
    tmp, out, stdout, code = tiny_run
    assert code == 0, stdout
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is True and results["device"] == "cpu"
    cells = {c["key"]: c for c in results["cells"]}
    assert list(cells) == [DENSE_KEY, SPARSE_KEY, FAILING_KEY]

    failed = cells[FAILING_KEY]
    assert failed["status"] == "failed" and "backend='triton'" in failed["error"]
    assert FAILING_KEY in stdout and "1 failing cell" in stdout

    sparse = cells[SPARSE_KEY]
    assert sparse["status"] == "ok" and sparse["config"]["kernel_size"] == [1, 3, 3]
    t = sparse["timing"]
    assert len(t["dense_step_ms"]) == len(t["accel_step_ms"]) == 3
    assert t["error_steps"] == [2] and t["timed_steps"] == [0, 1]  # the sampled step is kept out of the timing
    assert t["speedup"] == pytest.approx(sum(t["dense_step_ms"][:2]) / sum(t["accel_step_ms"][:2]))
    assert 0 < t["attention_share"] < 1
    d = sparse["density"]
    assert 0 < d["mean"] < 1 and set(d["per_layer"]) == {f"transformer.{i}" for i in range(4)}
    assert len(d["per_layer_step"]) == 4 * 3 * 2  # layers x steps x CFG branches
    q = sparse["quality"]
    assert 0 < q["psnr"] < 100 and len(q["psnr_per_frame"]) == 5 and 0 < q["ssim"] <= 1 and q["latent_rel_l2"] > 0
    err = sparse["attention_error"]
    assert 0 < err["mean"] < 1 and set(err["per_layer"]) == set(d["per_layer"])
    assert {e["step"] for e in err["per_layer_step"]} == {2}
    assert sparse["metrics"] == {"psnr": q["psnr"], "identical": False, "ssim": q["ssim"], "lpips": q["lpips"],
                                 "latent_rel_l2": q["latent_rel_l2"], "attention_error": err["mean"],
                                 "density": d["mean"], "speedup": t["speedup"]}
    assert sparse["block_map"]["kind"] == "static" and sparse["block_map"]["shape"] == [4, 4]
    # The dense method runs our path with every block: same output as the model's attention up to rounding.
    # JSON has no infinity: identical outputs' PSNR is null with "identical": true beside it.
    dense_metrics = cells[DENSE_KEY]["metrics"]
    assert dense_metrics["density"] == 1.0
    assert dense_metrics["identical"] if dense_metrics["psnr"] is None else dense_metrics["psnr"] > 80
    assert cells[DENSE_KEY]["sparsity"]["ran_sparse"] is False and "dense" in cells[DENSE_KEY]["sparsity"]["reason"]
    band = sparse["quality_verdict"]["band"]
    assert band == ("close" if q["psnr"] >= 30 else "visibly different" if q["psnr"] < 20 else "noticeable") or \
        sparse["quality_verdict"]["per_metric"]["ssim"] == band  # the worst metric's band
    assert any(v.startswith("quality: ") and band.split()[0] in v for v in sparse["verdicts"])
    assert t["repeats"] == 1 and t["conclusive"] is False  # one repeat per side: no noise estimate

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["key"] for r in rows] == list(cells)
    assert float(rows[1]["psnr"]) == pytest.approx(q["psnr"]) and rows[2]["status"] == "failed"

    for name in ("pareto.png", "density.png", "block_mask.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = (out / "report.html").read_text()
    # 3 figures + the labelled key frames of the two cells that ran
    assert report.count("data:image/png;base64,") == 5 and "win133" in report and FAILING_KEY in report
    assert "Key frames" in report and "Verdicts" in report
    assert (out / "frames_win133.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp*")) and not list(out.parent.glob(".out.*"))  # nothing temporary left

    saved = json.loads((tmp / "baseline.json").read_text())
    assert saved["format"] == bl.BASELINE_FORMAT and saved["tolerances"] == bl.DEFAULT_TOLERANCES
    assert saved["cells"][SPARSE_KEY]["metrics"]["psnr"] == pytest.approx(q["psnr"])
    assert saved["cells"][FAILING_KEY]["status"] == "failed"


def test_forced_regression_against_a_doctored_baseline_exits_1_and_names_the_metric(tiny_run):
    tmp, _, _, _ = tiny_run
    doctored = json.loads((tmp / "baseline.json").read_text())
    psnr = doctored["cells"][SPARSE_KEY]["metrics"]["psnr"]
    doctored["cells"][SPARSE_KEY]["metrics"]["psnr"] = psnr + 3.0  # the baseline was 3 dB better
    doctored["cells"][FAILING_KEY] = copy.deepcopy(doctored["cells"][SPARSE_KEY])  # "it ran in the baseline"
    doctored["cells"]["embedded|gone|64x128x5,steps=3|seed=0"] = doctored["cells"][DENSE_KEY]
    path = tmp / "doctored.json"
    path.write_text(json.dumps(doctored))
    code, stdout = _run_bench(["--matrix", str(tmp / "matrix.json"), "--out", str(tmp / "again"), "--no-progress",
                               "--baseline", str(path), "--tolerance", "speedup=1"])  # timings: not the point here
    assert code == 1, stdout
    lines = stdout.splitlines()
    psnr_line = [ln for ln in lines if ln.startswith(f"REGRESSION {SPARSE_KEY}: psnr")]
    assert len(psnr_line) == 1 and "may drop by at most 0.5 dB" in psnr_line[0], stdout
    assert any(ln.startswith(f"REGRESSION {FAILING_KEY}: the cell failed") for ln in lines), stdout
    assert not any(ln.startswith(f"REGRESSION {DENSE_KEY}") for ln in lines)  # unchanged: within tolerance
    assert "2 regression(s)" in stdout and "1 not run" in stdout
    results = json.loads((tmp / "again" / "results.json").read_text())
    verdicts = {r["key"]: r["status"] for r in results["baseline"]["cells"]}
    assert verdicts[DENSE_KEY] == "ok" and verdicts[SPARSE_KEY] == "regression"
    assert "Baseline: 2 regression(s)" in (tmp / "again" / "report.html").read_text()


# --- without a model ------------------------------------------------------------------------------

def _fake_bench(monkeypatch, interrupt_at: int | None):
    """The runner with no model: every cell 'fails' fast; the ``interrupt_at``-th cell raises Ctrl-C."""
    calls = []

    def fake_cell(pipe, cell, call, matrix, dense_runs=None, merge=None, dense_side=None):
        calls.append(cell.key)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        record = runner.cell_record(cell)
        record.update(status="failed", error="ValueError: fake", wall_s=0.0)
        return record, None, None

    monkeypatch.setattr(runner, "load_pipeline", lambda *a: (object(), {}))
    monkeypatch.setattr(runner.BenchRun, "_call", lambda self, pipe, defaults, cell: {})
    monkeypatch.setattr(runner, "run_cell", fake_cell)
    return calls


def test_interrupt_keeps_a_complete_json_of_the_cells_done(tmp_path, monkeypatch):
    """An interrupt in the middle of the matrix: the staged results.json parses and holds the finished cells."""
    calls = _fake_bench(monkeypatch, interrupt_at=2)
    matrix = BenchMatrix(methods=(MethodSpec("dense"), MethodSpec("tile")), sizes=(SizeSpec(64, 64, 5, 2),),
                         seeds=(0,), device="cpu")
    run = runner.BenchRun(matrix, tmp_path / "out", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run.run()
    saved = json.loads(run.json_path.read_text())
    assert saved["complete"] is False and [c["key"] for c in saved["cells"]] == calls[:1]
    assert not (tmp_path / "out").exists()  # nothing committed by the runner itself


def _previous_run(out: Path) -> dict:
    out.mkdir()
    old = {"results.json": '{"old": true}', "results.csv": "old", "report.html": "old"}
    for name, text in old.items():
        (out / name).write_text(text)
    return old


def test_an_interrupted_rerun_replaces_the_previous_files_as_one_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    old = _previous_run(out)
    _fake_bench(monkeypatch, interrupt_at=2)
    code = bench_main(["--method", "dense", "--method", "tile", "--size", "64x64x5", "--steps", "2", "--seeds", "0",
                       "--out", str(out), "--no-progress"])
    assert code == 130
    results = json.loads((out / "results.json").read_text())
    assert results["complete"] is False and results["interrupted"] is True and len(results["cells"]) == 1
    assert (out / "results.csv").read_text() != old["results.csv"] and "incomplete" in (out / "report.html").read_text()
    assert all(Path(p).parent == out for p in results["files"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old set left


def test_a_second_interrupt_while_writing_leaves_the_previous_files(tmp_path, monkeypatch):
    from ditaccel.bench import report

    out = tmp_path / "out"
    old = _previous_run(out)
    _fake_bench(monkeypatch, interrupt_at=2)

    def interrupted_html(*args, **kwargs):
        raise KeyboardInterrupt  # the second Ctrl-C lands while the report is being written

    monkeypatch.setattr(report, "render_html", interrupted_html)
    code = bench_main(["--method", "dense", "--method", "tile", "--size", "64x64x5", "--steps", "2", "--seeds", "0",
                       "--out", str(out), "--no-progress"])
    assert code == 130
    assert {p.name: p.read_text() for p in out.iterdir()} == old  # all old: nothing of the new run mixed in


def test_atomic_json_keeps_the_old_file_when_writing_fails(tmp_path):
    from ditaccel.eval.files import write_json_atomic

    class Unprintable:
        def __str__(self):
            raise TypeError("cannot serialise")

    path = tmp_path / "results.json"
    write_json_atomic({"cells": [1]}, path)
    with pytest.raises(TypeError):
        write_json_atomic({"cells": [Unprintable()]}, path)  # fails half-way through serialising
    assert json.loads(path.read_text()) == {"cells": [1]} and os.listdir(tmp_path) == ["results.json"]


def test_example_yaml_and_default_matrix():
    m = load_matrix(ROOT / "benchmarks" / "bench_matrix.example.yaml")
    labels = [s.label for s in m.method_specs()]
    assert labels == ["preset", "dense", "tile", "tile-w133", "window-dil2"]
    assert m.method_specs()[3].overrides == {"window": (1, 3, 3), "dense_steps": 1}
    assert len(m.cells()) == 5 * 2 * 2
    d = default_matrix()
    # "all", expanded at run time: every method, plus the embedded pipeline's calibrated table
    assert [s.name for s in d.method_specs()] == [*ditaccel.METHODS, "calibrated"]
    assert d.seeds == (0, 1) and d.device == "cpu" and d.sizes == (SizeSpec(128, 256, 9, 4),)


@pytest.mark.parametrize("data, needle", [
    ({"sizes": ["256by256"]}, "HEIGHTxWIDTH"),
    ({"seeds": [0, 0]}, "seeds lists 0 twice"),
    ({"seeds": [-1]}, "seeds[] must be an int >= 0"),
    ({"methods": [{"set": {"window": 3}}]}, "needs a 'name'"),
    ({"methods": [{"name": "tile", "label": "a b"}]}, "label 'a b'"),
    ({"dtype": "int8"}, "dtype must be one of"),
    ({"sizes": [{"height": 0, "width": 64}]}, "sizes[].height must be an int >= 1"),
    ({"speed": 1}, "unknown key(s) ['speed']"),
])
def test_bad_matrix_values_name_the_field(data, needle):
    with pytest.raises(ValueError) as exc:
        matrix_from_dict(data)
    assert needle in str(exc.value)


def test_module_entry_point_exit_status(tmp_path):
    """``python -m ditaccel.bench`` exits with main's status: 2 and one line on bad input."""
    proc = subprocess.run([sys.executable, "-m", "ditaccel.bench", "--tolerance", "fps=1", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    expected = ("ditaccel bench: error: --tolerance: unknown metric 'fps'; tolerances exist for "
                "['psnr', 'ssim', 'lpips', 'latent_rel_l2', 'attention_error', 'density', 'speedup']")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [expected]


def test_bad_flags_exit_2_with_one_line(tmp_path, capsys):
    assert bench_main(["--tolerance", "psnr=abc", "--out", str(tmp_path)]) == 2
    assert "--tolerance expects METRIC=NUMBER" in capsys.readouterr().err
    assert bench_main(["--tolerance", "fps=1", "--out", str(tmp_path)]) == 2
    assert "unknown metric 'fps'" in capsys.readouterr().err
    assert bench_main(["--baseline", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()  # rejected before anything ran


def test_metric_rules():
    tol = bl.DEFAULT_TOLERANCES
    assert bl.compare_metric("psnr", 40.0, 39.6, tol["psnr"])["verdict"] == "ok"
    assert bl.compare_metric("psnr", 40.0, 39.4, tol["psnr"])["verdict"] == "regression"
    assert bl.compare_metric("psnr", "inf", 120.0, tol["psnr"])["verdict"] == "ok"  # both above the 100 dB cap
    assert bl.compare_metric("psnr", 40.0, "nan", tol["psnr"])["verdict"] == "regression"
    assert bl.compare_metric("lpips", 0.1, None, tol["lpips"])["verdict"] == "not measured"
    # Relative rules: 10 % plus an absolute floor, so rounding-level values do not flap.
    assert bl.compare_metric("latent_rel_l2", 1e-7, 5e-5, tol["latent_rel_l2"])["verdict"] == "ok"
    assert bl.compare_metric("latent_rel_l2", 0.02, 0.0225, tol["latent_rel_l2"])["verdict"] == "regression"
    assert bl.compare_metric("speedup", 2.0, 1.1, tol["speedup"])["verdict"] == "ok"
    assert bl.compare_metric("speedup", 2.0, 0.9, tol["speedup"])["verdict"] == "regression"
    assert bl.compare_metric("density", 0.40, 0.42, tol["density"])["verdict"] == "regression"
    assert bl.compare_metric("density", 0.40, 0.30, tol["density"])["verdict"] == "ok"


def test_pareto_front_and_density_grid():
    points = [(1.0, 40.0), (2.0, 35.0), (1.5, 30.0), (0.5, 45.0), (2.0, 34.0)]
    assert pareto_front(points) == [3, 0, 1]
    entries = [{"transformer": "transformer", "layer": layer, "step": step, "branch": b, "density": 0.1 * layer + b}
               for layer in (10, 2) for step in (0, 1) for b in (0, 1)]
    grid, layers, steps = density_grid(entries)
    assert layers == ["transformer.2", "transformer.10"] and steps == [0, 1]  # numeric layer order
    assert grid[0].tolist() == pytest.approx([0.7, 0.7]) and grid[1].tolist() == pytest.approx([1.5, 1.5])
    assert not any(math.isnan(v) for v in grid.ravel())


def test_committed_cpu_baseline_describes_the_default_matrix():
    """CI compares the default matrix with benchmarks/baselines/cpu.json: same matrix, same cell keys."""
    from ditaccel.eval.record import jsonable

    path = ROOT / "benchmarks" / "baselines" / "cpu.json"
    loaded = bl.load_baseline(path)
    raw = json.loads(path.read_text())
    assert raw["format"] == bl.BASELINE_FORMAT and loaded["device"] == "cpu"
    assert raw["matrix"] == jsonable(default_matrix().to_dict())
    default_keys = {c.key for c in default_matrix().cells()}
    assert set(loaded["cells"]) <= default_keys  # a method added since only shows as "new"
    assert all(c["status"] == "ok" for c in loaded["cells"].values())
