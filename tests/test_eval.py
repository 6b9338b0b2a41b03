"""The evaluation engine's parts without a model: the speedup definition on synthetic timings, the
noise / drift / load verdicts on injected timings, quality bands, sparsity verdicts, the record's
JSON (numbers only), the labelled side-by-side and the file set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ditaccel.eval.media import side_by_side
from ditaccel.eval.record import clean_quality, jsonable, write_json
from ditaccel.eval.runs import RunResult
from ditaccel.eval.timing import TimingSummary, describe_ratio, summarise_runs
from ditaccel.eval.verdicts import quality_verdict, sparsity_verdict


def runs(*loops_ms, steps=4):
    """RunResults whose steps split each loop time evenly."""
    return [RunResult("x", np.zeros((1, 2, 2, 3)), False, None, [ms / 1e3 / steps] * steps) for ms in loops_ms]


def test_speedup_is_dense_over_accelerated_medians_and_reads_faster_or_slower():
    t = summarise_runs(runs(1000, 1010, 990), runs(500, 505, 498), sparse_steps=[1, 2, 3])
    assert t.speedup == pytest.approx(1000 / 500)
    assert t.conclusive and t.verdict() == "2.00× faster"
    assert t.speedup_range == pytest.approx((990 / 505, 1010 / 498))
    assert t.speedup_sparse_steps == pytest.approx(2.0)
    slow = summarise_runs(runs(1000, 1000), runs(1300, 1300), sparse_steps=[0])
    assert slow.speedup == pytest.approx(1 / 1.3) and slow.verdict() == "1.30× slower"
    assert describe_ratio(1.01).endswith("(no measurable difference)") and describe_ratio(None) == "n/a"


def test_sparse_step_speedup_uses_only_the_sparse_steps():
    dense = [RunResult("d", np.zeros((1, 2, 2, 3)), False, None, [0.1, 0.1, 0.1, 0.1])] * 2
    accel = [RunResult("a", np.zeros((1, 2, 2, 3)), False, None, [0.1, 0.1, 0.05, 0.05])] * 2
    t = summarise_runs(dense, accel, sparse_steps=[2, 3])
    assert t.speedup == pytest.approx(0.4 / 0.3) and t.speedup_sparse_steps == pytest.approx(2.0)
    assert summarise_runs(dense, accel, sparse_steps=[]).speedup_sparse_steps is None


def test_excluded_steps_leave_both_sides():
    dense = [RunResult("d", np.zeros((1, 2, 2, 3)), False, None, [0.1, 0.1, 0.1])] * 2
    accel = [RunResult("a", np.zeros((1, 2, 2, 3)), False, None, [0.05, 0.05, 1.0])] * 2  # step 2 ran a probe
    t = summarise_runs(dense, accel, sparse_steps=[0, 1, 2], excluded_steps=[2])
    assert t.timed_steps == [0, 1] and t.speedup == pytest.approx(2.0)


@pytest.mark.parametrize("dense, accel, needle", [
    ((1000, 1400), (500, 510), "dense repeats spread by 33%"),
    ((1000, 1010), (500, 700), "accelerated repeats spread by 33%"),
    ((1000, 1100, 1250), (500, 505, 510), "drifted by +25%"),
    ((1000,), (500,), "one timed run per side"),
])
def test_noise_and_drift_make_the_verdict_inconclusive(dense, accel, needle):
    t = summarise_runs(runs(*dense), runs(*accel), sparse_steps=[1])
    assert not t.conclusive and t.verdict() == "inconclusive"
    assert any(needle in w for w in t.warnings()), t.warnings()


def test_a_dense_vs_dense_control_within_noise_is_conclusive_and_about_one():
    t = summarise_runs(runs(1000, 1020), runs(1010, 1005), sparse_steps=[])
    assert t.conclusive and "no measurable difference" in t.verdict()


def test_a_ratio_whose_repeats_straddle_one_is_no_measurable_difference():
    t = summarise_runs(runs(1000, 1080), runs(960, 1010), sparse_steps=[1])  # the dense control, say
    assert t.conclusive and t.speedup == pytest.approx(1040 / 985)
    assert t.verdict().startswith("1.06× (no measurable difference: the repeats range 0.99-1.12)")


def test_other_processes_on_the_cores_make_cpu_timings_inconclusive():
    t = summarise_runs(runs(1000, 1001), runs(500, 501), sparse_steps=[1])
    t.other_load_cores, t.load_source = 1.4, "/proc/stat"
    assert not t.conclusive and any("other processes used 1.4" in w for w in t.warnings())
    t.device = "cuda"  # the GPU does the work there: host load does not make the figure meaningless
    assert t.conclusive


def test_load_monitor_sees_a_busy_process(tmp_path):
    import subprocess
    import sys

    from ditaccel.eval.timing import LoadMonitor

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<3: pass"])
    try:
        with LoadMonitor() as load:
            import time
            time.sleep(1.0)
    finally:
        busy.kill()
    if load.source == "/proc/stat":
        assert load.other_cores > 0.5  # one core spinning in another process


def test_timing_dict_names_the_definition():
    d = TimingSummary([1.0], [1.0], [1.0], [1.0], [], [0]).to_dict()
    assert "dense time / accelerated time" in d["definition"] and "> 1 means faster" in d["definition"]


def test_quality_bands_and_worst_frame_warning():
    close = quality_verdict({"psnr": 34.0, "psnr_min": 31.0, "psnr_per_frame": [34, 37, 31], "ssim": 0.97})
    assert close["band"] == "close" and close["line"].startswith("close to dense") and not close["warnings"]
    far = quality_verdict({"psnr": 12.5, "psnr_min": 11.0, "psnr_per_frame": [12.5, 14, 11], "ssim": 0.3})
    assert far["band"] == "visibly different" and "another image" in far["line"]
    mixed = quality_verdict({"psnr": 33.0, "psnr_min": 18.0, "psnr_per_frame": [40, 41, 18], "ssim": 0.95})
    assert mixed["band"] == "close" and "worst frame (2) is 18.0 dB" in mixed["warnings"][0]
    worst_metric = quality_verdict({"psnr": 31.0, "ssim": 0.6, "psnr_per_frame": [31.0]})
    assert worst_metric["band"] == "visibly different" and worst_metric["per_metric"]["psnr"] == "close"
    assert quality_verdict({"identical": True})["band"] == "identical"


def test_sparsity_verdict_says_why_nothing_ran_sparse():
    schedule = sparsity_verdict({"calls": 8, "dense_calls": 8, "reuse_calls": 0, "mean_density": 1.0},
                                {"method": "tile", "dense_steps": 2})
    assert not schedule["ran_sparse"] and "dense_steps=2" in schedule["reason"]
    covered = sparsity_verdict({"calls": 8, "dense_calls": 0, "reuse_calls": 0, "mean_density": 1.0},
                               {"method": "tile", "dense_steps": 0})
    assert not covered["ran_sparse"] and "covers the whole grid" in covered["reason"]
    control = sparsity_verdict({"calls": 8, "dense_calls": 0, "reuse_calls": 0, "mean_density": 1.0},
                               {"method": "dense"})
    assert not control["ran_sparse"] and "control" in control["reason"]
    sparse = sparsity_verdict({"calls": 8, "dense_calls": 2, "reuse_calls": 1, "mean_density": 0.4},
                              {"method": "topk"})
    assert sparse["ran_sparse"] and sparse["line"] == "5 of 8 attention calls sparse, 1 reused from a cache, " \
                                                      "mean density 0.400"
    assert not sparsity_verdict({"calls": 0}, {})["ran_sparse"]


def test_record_json_has_numbers_only(tmp_path, capsys):
    q = clean_quality({"psnr": math.inf, "psnr_min": math.inf, "psnr_per_frame": [math.inf, math.inf], "ssim": 1.0})
    assert q["psnr"] is None and q["identical"] is True and q["psnr_per_frame"] == [None, None]
    part = clean_quality({"psnr": math.inf, "psnr_min": 30.0, "psnr_per_frame": [math.inf, 30.0], "ssim": 1.0})
    assert part["identical"] is False and part["psnr"] == 30.0 and part["identical_frames"] == 1
    assert jsonable({"a": (1, math.inf), "b": float("nan"), "c": np.float32(2.5)}) == {"a": [1, None], "b": None,
                                                                                       "c": 2.5}
    write_json({"x": math.inf}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"x": None}
    write_json({"x": 1}, "-")
    assert json.loads(capsys.readouterr().out) == {"x": 1}


def test_side_by_side_is_labelled_and_shows_the_amplified_difference():
    dense = np.zeros((2, 32, 40, 3), np.uint8)
    accel = dense.copy()
    accel[:, 20:, :, 0] = 10
    out = side_by_side(dense, accel, "xattn")
    assert out.shape == (2, 14 + 32, 3 * 40 + 2 * 6, 3)
    captions = out[:, :14]
    assert captions.std() > 0  # text drawn on the bars
    diff_panel = out[:, 14:, 2 * 46:]
    assert diff_panel[:, 20:, :, 0].min() == 40 and diff_panel[:, :20].max() == 0  # x4 gain, zero elsewhere
