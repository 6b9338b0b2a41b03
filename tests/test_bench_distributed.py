"""``ditaccel bench`` under a distributed launch: fast tests of its parts (launch detection, ``--cp``
validation, the round-robin cell split, merging the ranks' shares and stats), and -- ``slow`` -- the
per-cell collectives in 2 gloo processes without a model (a cell failing on one rank only), and a
real 2-process gloo run under ``python -m torch.distributed.run`` (data parallel, ``--cp ulysses=2``,
``--cp ring=2``) of a tiny 3-cell matrix against a 1-process run of the same matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import pytest
import torch

from ditaccel.bench import distributed as dd
from ditaccel.bench.__main__ import run as bench_main
from ditaccel.bench.matrix import BenchMatrix, MethodSpec, SizeSpec

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --- launch and --cp --------------------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"WORLD_SIZE": "1", "RANK": "0"}, None),  # torchrun --nproc-per-node 1: a plain run
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, dd.Launch(2, 1, 1)),
    ({"WORLD_SIZE": "4", "RANK": "3"}, dd.Launch(4, 3, 0)),
])
def test_detect_launch(env, expected):
    assert dd.detect_launch(env) == expected


@pytest.mark.parametrize("env, needle", [
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "2"}, "RANK=None"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 must be < WORLD_SIZE=2"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "WORLD_SIZE='0'"),
])
def test_bad_launch_environment_names_the_variable(env, needle):
    with pytest.raises(ValueError, match="environment variable") as info:
        dd.detect_launch(env)
    assert needle in str(info.value)


def test_parse_cp():
    assert dd.parse_cp("ulysses=2") == {"ulysses": 2}
    assert dd.parse_cp(" ring = 4 ") == {"ring": 4}
    assert dd.parse_cp("ulysses=2,ring=2") == {"ulysses": 2, "ring": 2}
    assert dd.format_cp({"ring": 2, "ulysses": 2}) == "ulysses=2,ring=2"


@pytest.mark.parametrize("text, needles", [
    ("ulysses", ["--cp 'ulysses'", "MODE=DEGREE", "ulysses=2"]),
    ("tensor=2", ["--cp 'tensor=2'", "unknown mode 'tensor'", "ulysses, ring"]),
    ("ulysses=1", ["--cp 'ulysses=1'", "degree 1", ">= 2"]),
    ("ulysses=2,ulysses=2", ["given twice"]),
    ("ulysses=-2", ["is not MODE=DEGREE"]),
    ("", ["--cp ''"]),
])
def test_bad_cp_names_the_value_and_what_is_allowed(text, needles):
    with pytest.raises(ValueError) as info:
        dd.parse_cp(text)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_check_cp_against_the_launch():
    assert dd.check_cp(None, None) is None
    assert dd.check_cp({"ulysses": 2}, dd.Launch(2, 0, 0)) == {"ulysses": 2}
    assert dd.check_cp({"ulysses": 2, "ring": 2}, dd.Launch(4, 1, 1)) == {"ulysses": 2, "ring": 2}
    with pytest.raises(ValueError, match=r"--cp ulysses=2 needs a distributed launch .*WORLD_SIZE is not set"):
        dd.check_cp({"ulysses": 2}, None)
    with pytest.raises(ValueError, match=r"--cp ulysses=4: the degrees multiply to 4, but the world size is "
                                         r"WORLD_SIZE=2; allowed: degrees whose product is 2"):
        dd.check_cp({"ulysses": 4}, dd.Launch(2, 0, 0))
    with pytest.raises(ValueError, match="multiply to 2, but the world size is WORLD_SIZE=4"):
        dd.check_cp({"ring": 2}, dd.Launch(4, 0, 0))


def test_cp_flag_without_a_launch_exits_2_before_running(tmp_path, monkeypatch, capsys):
    for name in LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "out"
    assert bench_main(["--out", str(out), "--cp", "ulysses=2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--cp ulysses=2 needs a distributed launch" in err and len(err.strip().splitlines()) == 1
    assert bench_main(["--out", str(out), "--cp", "ulysses=x"]) == 2
    assert "--cp 'ulysses=x'" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written, nothing staged


def test_rank_device():
    launch = dd.Launch(2, 1, 1)
    assert dd.rank_device(BenchMatrix(device="cpu"), launch).type == "cpu"
    with pytest.raises(ValueError, match=r"device 'cuda:1' under a distributed launch: give 'cuda'"):
        dd.rank_device(BenchMatrix(device="cuda:1"), launch)


# --- splitting and merging ------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (7, 3), (3, 4), (16, 4)])
def test_shard_covers_every_cell_once_and_balances(n, world):
    shares = [dd.shard(n, world, r) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(s == sorted(s) for s in shares)  # matrix order within a rank: groups stay together
    assert shares == [dd.shard(n, world, r) for r in range(world)]  # deterministic


def _matrix():
    return BenchMatrix(methods=(MethodSpec("dense"), MethodSpec("tile")), sizes=(SizeSpec(64, 128, 5, 2),),
                       seeds=(0, 1), device="cpu")


def _record(cell, status="ok", block_map=True):
    r = {"key": cell.key, "model": cell.model, "label": cell.method.label, "size": cell.size.to_dict(),
         "seed": cell.seed, "status": status}
    if block_map:
        r["block_map"] = {"cell": cell.key}
    return r


def test_data_parallel_shares_merge_into_matrix_order(tmp_path):
    matrix = _matrix()
    cells = matrix.cells()  # seed 0: dense, tile; seed 1: dense, tile
    run = dd.DistributedBenchRun(matrix, tmp_path / "out", dd.Launch(2, 1, 0), dd.rank_device(matrix, dd.Launch(2, 1, 0)))
    assert run.files is None and not list(tmp_path.iterdir())  # a non-zero rank writes nothing
    assert [c.key for c in run._cells()] == [cells[1].key, cells[3].key]
    group = lambda c: (c.model, c.method.label, c.size.label)
    shares = []
    for rank in range(2):
        mine = [cells[i] for i in dd.shard(len(cells), 2, rank)]
        records = [_record(c, status="failed" if (rank, c.seed) == (0, 0) else "ok",
                           block_map=(rank, c.seed) != (0, 0)) for c in mine]
        maps, frames = {}, {}
        for c, r in zip(mine, records):
            if "block_map" in r:
                maps.setdefault(group(c), r["block_map"])
            if r["status"] == "ok":
                frames.setdefault(group(c), c.key)
        shares.append({"rank": rank, "cells": records[::-1], "block_maps": maps, "key_frames": frames})
    run._merge_shares(shares)
    assert [c["key"] for c in run.results["cells"]] == [c.key for c in cells]
    assert [c["rank"] for c in run.results["cells"]] == [0, 1, 0, 1]
    # rank 0's seed-0 dense cell failed: the dense map/frames come from seed 1 (rank 0), tile's from seed 0 (rank 1)
    assert run.block_maps == {group(cells[1]): {"cell": cells[1].key}, group(cells[2]): {"cell": cells[2].key}}
    assert run.key_frames == {group(cells[1]): cells[1].key, group(cells[2]): cells[2].key}


def test_merge_rank_stats_averages_densities_and_takes_counts():
    def stats(density, err):
        return {"mean_density": density, "calls": 4, "dense_calls": 1, "reuse_calls": 0,
                "layers": {"transformer.0": {"calls": 4, "dense_calls": 1, "reuse_calls": 0, "density": density,
                                             "time_ms": 1.0}},
                "steps": {0: {"calls": 2, "dense_calls": 1, "reuse_calls": 0, "density": 1.0, "time_ms": 0.5},
                          1: {"calls": 2, "dense_calls": 0, "reuse_calls": 0, "density": density, "time_ms": 0.5}},
                "per_layer_step": [{"layer": 0, "step": 1, "density": density, "time_ms": 0.5}],
                "attention_error": {"mean": err, "per_layer": {"transformer.0": err}, "per_layer_step": []}}

    a, b = stats(0.25, 0.1), stats(0.75, 0.3)
    counts = dict(a, calls=8, dense_calls=2, reuse_calls=0, paths={"sparse": 6}, ranks=2)
    m = dd.merge_rank_stats([a, b], counts)
    assert m["calls"] == 8 and m["paths"] == {"sparse": 6} and m["ranks"] == 2
    assert m["mean_density"] == pytest.approx(0.5)
    assert m["layers"]["transformer.0"]["density"] == pytest.approx(0.5) and m["layers"]["transformer.0"]["calls"] == 8
    assert m["steps"][0]["density"] == 1.0 and m["steps"][1]["density"] == pytest.approx(0.5)
    assert m["per_layer_step"][0]["density"] == pytest.approx(0.5) and m["per_layer_step"][0]["time_ms"] == 0.5
    assert m["attention_error"]["mean"] == pytest.approx(0.2)
    assert m["attention_error"]["per_layer"]["transformer.0"] == pytest.approx(0.2)
    assert a["mean_density"] == 0.25  # the inputs are left as they were


# --- the collectives, 2 processes over gloo, no model ------------------------------------------------------

@dataclass
class _FakeComparison:
    stats: dict


def _stats(density: float, sparse: int) -> dict:
    return {"calls": 4, "dense_calls": 1, "reuse_calls": 0, "mean_density": density,
            "paths": {"sparse": sparse, "dense_by_fallback": {}, "realised_density": density}}


def _collective_worker(rank: int, port: int, out_dir: str, results) -> None:
    import torch.distributed as dist
    from gloo_spawn import reporting

    with reporting(rank, results):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        launch, matrix = dd.Launch(2, rank, 0), _matrix()
        got = {}
        run = dd.DistributedBenchRun(matrix, Path(out_dir) / "cp", launch, torch.device("cpu"), cp={"ulysses": 2})
        assert run.merge == run._merge_cell
        comparison, error = run._merge_cell(_FakeComparison(_stats(0.25 + 0.5 * rank, 3)), None)
        got["ok"] = (error, comparison.stats["mean_density"], comparison.stats["calls"],
                     comparison.stats["paths"]["sparse"])
        # a cell that failed on rank 1 only: both ranks record it failed, and the next collective lines up
        mine = ("ValueError: boom", "tb") if rank == 1 else None
        comparison, error = run._merge_cell(None if mine else _FakeComparison(_stats(0.5, 3)), mine)
        got["one_failed"] = (comparison, error)
        comparison, error = run._merge_cell(None, ("RuntimeError: same", f"tb{rank}"))
        got["all_failed"] = (comparison, error)
        # a model that fails to load on rank 1 only fails on both (its cells are then recorded failed)
        from ditaccel.bench import runner

        def load(model, device, dtype):
            if rank == 1:
                raise OSError("no weights here")
            return "pipe", {}

        runner.load_pipeline = load
        try:
            run._load("embedded", torch.device("cpu"), torch.float32)
            got["load"] = None
        except Exception as exc:  # noqa: BLE001
            got["load"] = f"{type(exc).__name__}: {exc}"
        # data parallel: every rank's share gathered to rank 0 in matrix order
        run = dd.DistributedBenchRun(matrix, Path(out_dir) / "dp", launch, torch.device("cpu"))
        cells = matrix.cells()
        run.results["cells"] = [_record(cells[i]) for i in dd.shard(len(cells), 2, rank)]
        run.results["complete"] = True
        run._gather()
        got["dp"] = [(c["key"], c["rank"]) for c in run.results["cells"]] if rank == 0 else None
        got["ranks"] = run.results["distributed"]["ranks"]
        results[rank] = got


@pytest.mark.slow  # multi-process: 2 spawned interpreters importing torch, 7-12 s on the loaded 2-core machine
def test_collectives_merge_stats_and_survive_a_failure_on_one_rank(tmp_path):
    from gloo_spawn import spawn

    results = spawn(_collective_worker, 2, 120, str(tmp_path))  # a rank hung in a collective: fails here
    cells = _matrix().cells()
    for rank in range(2):
        got = results[rank]
        assert "error" not in got, got.get("error")
        assert got["ok"] == (None, pytest.approx(0.5), 8, 6)  # densities averaged, counts summed
        assert got["one_failed"] == (None, ("on rank(s) 1 of 2: ValueError: boom", "tb"))
        assert got["all_failed"] == (None, ("RuntimeError: same", "tb0"))  # the 1-process message, rank 0's trace
    assert results[0]["load"] == "RuntimeError: on rank(s) 1 of 2: OSError: no weights here"
    assert results[1]["load"] == "OSError: no weights here"
    assert results[0]["dp"] == [(c.key, i % 2) for i, c in enumerate(cells)]
    assert [r["cells"] for r in results[0]["ranks"]] == [2, 2] and results[1]["ranks"] is None
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing committed
    assert len(list(tmp_path.glob(".*partial*"))) == 2  # rank 0's two staging dirs only (runs never committed)


# --- a real 2-process run (slow) ------------------------------------------------------------------------

TINY = {"methods": ["dense",
                    {"name": "window", "set": {"kernel_size": [1, 3, 3], "block_size": 64}, "label": "win133"},
                    {"name": "tile", "set": {"tile": [1, 8, 8], "window": [1, 1, 1], "block_size": 64,
                                             "dense_steps": 1}, "label": "tile"}],
        "sizes": [{"height": 64, "width": 128, "frames": 5, "steps": 2}], "seeds": [0], "device": "cpu",
        "error_steps": [1]}
QUALITY = ("psnr", "ssim", "latent_rel_l2", "density")


def _torchrun(args: list[str], timeout: int = 420) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ditaccel", "bench", *args]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dbench")
    (tmp / "matrix.json").write_text(json.dumps(TINY))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run (OMP_NUM_THREADS=1); much faster on a loaded CPU
    try:
        with redirect_stdout(StringIO()):
            code = bench_main(["--matrix", str(tmp / "matrix.json"), "--out", str(tmp / "one"), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    return tmp, json.loads((tmp / "one" / "results.json").read_text())


def _same_cells(got: dict, ref: dict, *, attention_error_rel: float = 1e-6, quality_rel: float = 1e-6) -> None:
    assert [c["key"] for c in got["cells"]] == [c["key"] for c in ref["cells"]]  # every cell once, matrix order
    assert got["complete"] is True and set(got) - set(ref) == {"distributed"}
    for g, r in zip(got["cells"], ref["cells"]):
        assert g["status"] == r["status"] == "ok", (g["key"], g.get("error"))
        for name in QUALITY:
            a, b = g["metrics"][name], r["metrics"][name]
            assert (a is None and b is None) or abs(a - b) <= quality_rel * max(1.0, abs(b)), (g["key"], name, a, b)
        assert g["metrics"]["identical"] == r["metrics"]["identical"]
        a, b = g["metrics"]["attention_error"], r["metrics"]["attention_error"]
        assert abs(a - b) <= attention_error_rel * max(1e-12, abs(b)), (g["key"], a, b)
    sparse = {c["label"]: c["metrics"]["density"] for c in got["cells"]}
    assert sparse["win133"] < 1 and sparse["tile"] < 1 and sparse["dense"] == 1.0  # the cells really ran sparse


@pytest.mark.slow  # three launches of 2 processes importing torch + diffusers: ~2 min on 2 loaded cores
def test_two_process_runs_match_one_process(single_process):
    tmp, ref = single_process
    matrix = str(tmp / "matrix.json")

    done = _torchrun(["--matrix", matrix, "--out", str(tmp / "dp"), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    dp = json.loads((tmp / "dp" / "results.json").read_text())
    _same_cells(dp, ref)
    d = dp["distributed"]
    assert d["world_size"] == 2 and d["mode"] == "data-parallel" and d["cp"] is None and d["backend"] == "gloo"
    assert [c["rank"] for c in dp["cells"]] == [0, 1, 0]
    assert [r["cells"] for r in d["ranks"]] == [2, 1]
    assert (tmp / "dp" / "report.html").is_file() and (tmp / "dp" / "frames_win133.png").is_file()
    assert done.stdout.count("wrote ") == 1  # rank 0 alone reports
    assert sorted(p.name for p in tmp.iterdir()) == ["dp", "matrix.json", "one"]  # no other rank's staging dir

    done = _torchrun(["--matrix", matrix, "--out", str(tmp / "cp"), "--no-progress", "--cp", "ulysses=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    cp = json.loads((tmp / "cp" / "results.json").read_text())
    # Under Ulysses each rank's attention error is over its H/P heads; their mean is not the all-heads ratio.
    _same_cells(cp, ref, attention_error_rel=0.05)
    assert cp["distributed"]["mode"] == "context-parallel" and cp["distributed"]["cp"] == "ulysses=2"
    assert "rank 0's wall time" in cp["distributed"]["timing"]
    for g, r in zip(cp["cells"], ref["cells"]):
        assert g["density"]["calls"] == 2 * r["density"]["calls"]  # merged: every rank ran every call
        assert g["sparsity"]["ran_sparse"] == r["sparsity"]["ran_sparse"]

    # Ring: ditaccel's LSE ring on the accelerated side, its exact dense ring on the dense side (diffusers'
    # native attention returns no LSE). Same figures up to float rounding: the merge order differs.
    done = _torchrun(["--matrix", matrix, "--out", str(tmp / "ring"), "--no-progress", "--cp", "ring=2"])
    assert done.returncode == 0, done.stderr[-3000:]
    ring = json.loads((tmp / "ring" / "results.json").read_text())
    _same_cells(ring, ref, quality_rel=1e-5, attention_error_rel=0.05)  # error: the mean of each rank's rows'
    d = ring["distributed"]
    assert d["cp"] == "ring=2" and "LSE" in d["dense_reference"]
    for g, r in zip(ring["cells"], ref["cells"]):
        assert g["density"]["calls"] == 2 * r["density"]["calls"]
        assert g["sparsity"]["ran_sparse"] == r["sparsity"]["ran_sparse"]
