"""``ditaccel compare`` end to end on the embedded pipeline (small sizes), its errors, ``--model``,
every documented example run as bash parses it, ``--json -``, and a light, fast import."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

import ditaccel
from ditaccel import cli
from ditaccel.compare import run_compare
from ditaccel.pipelines import embedded

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--height", "64", "--width", "128", "--frames", "5", "--steps", "3", "--no-progress", "--repeats", "1"]
SPARSE = ["--method", "window", "--set", "kernel_size=1,3,3", "--set", "block_size=64", "--set", "dense_steps=1"]
SMALL_KW = dict(height=64, width=128, frames=5, steps=3, progress=False, repeats=1)


@pytest.fixture(scope="module")
def pipe():
    return embedded.load()


def assert_unwrapped(pipe):
    """No ditaccel hook left: accelerating again works (it refuses a pipeline that is still wrapped)."""
    assert "forward" not in pipe.transformer.__dict__
    ditaccel.accelerate(pipe, "dense").remove()


def run_cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "ditaccel", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def no_strings_for_numbers(x, where="record"):
    """JSON numbers only: no "inf"/"nan" strings anywhere."""
    if isinstance(x, dict):
        for k, v in x.items():
            no_strings_for_numbers(v, f"{where}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            no_strings_for_numbers(v, f"{where}[{i}]")
    else:
        assert x not in ("inf", "-inf", "nan", "Infinity", "NaN"), where


def test_compare_end_to_end(tmp_path, capsys):
    out, extra = tmp_path / "out", tmp_path / "extra.json"
    rc = cli.main(["compare", *SMALL, *SPARSE, "--steps", "2", "--repeats", "2", "--out", str(out),
                   "--json", str(extra)])
    stdout = capsys.readouterr().out
    assert rc == 0
    # the header comes before the runs; the table and the verdicts after
    assert stdout.index("ditaccel compare: WanPipeline (embedded)") < stdout.index("dense run 1/2")
    for word in ("dense ms", "speedup", "dense ÷ accelerated", "mean density", "PSNR", "SSIM", "LPIPS",
                 "latent rel-L2", "speed: ", "sparsity: ", "quality: "):
        assert word in stdout, word

    report = json.loads((out / "compare.json").read_text())
    assert json.loads(extra.read_text()) == report
    no_strings_for_numbers(report)
    assert report["method"] == "window" and report["config"]["kernel_size"] == [1, 3, 3]
    assert report["call"]["num_inference_steps"] == 2 and report["call"]["seed"] == 0
    assert report["latent_shape"] == [1, 16, 2, 8, 16]  # 5 frames -> 2 latent frames, 64x128 / 8
    assert report["grid"] == [2, 8, 16] and report["tokens"] == 256

    t = report["timing"]
    assert t["repeats"] == 2 and len(t["dense_loop_ms"]) == len(t["accel_loop_ms"]) == 2 and t["interleaved"]
    assert len(t["dense_step_ms"]) == 2 and all(s > 0 for s in t["accel_step_ms"])
    assert t["speedup"] == pytest.approx(t["dense_median_ms"] / t["accel_median_ms"])
    assert t["sparse_steps"] == [1]
    assert t["speedup_sparse_steps"] == pytest.approx(sum(t["dense_step_ms"][1:]) / sum(t["accel_step_ms"][1:]))
    assert t["verdict"] == ("inconclusive" if not t["conclusive"] else t["verdict"])

    density = report["density"]
    assert density["per_step"][0] == 1.0  # dense_steps=1
    assert all(0 < d < 1 for d in density["per_step"][1:])
    assert 0 < density["mean"] < 1 and density["calls"] == 2 * 2 * 4  # steps x CFG branches x layers
    assert report["sparsity"]["ran_sparse"] is True

    quality = report["quality"]
    assert 0 < quality["psnr"] < 200 and quality["psnr_min"] <= quality["psnr"] and quality["identical"] is False
    assert len(quality["psnr_per_frame"]) == quality["frames"] == 5
    assert 0 < quality["ssim"] <= 1 and quality["latent_rel_l2"] > 0
    assert (quality["lpips"] is None) == (quality["lpips_note"] is not None)
    assert report["quality_verdict"]["band"] in ("close", "noticeable", "visibly different")

    files = report["files"]
    for name, width, height in (("dense", 128, 64), ("accelerated", 128, 64),
                                ("side_by_side", 3 * 128 + 2 * 6, 64 + 14)):  # labelled: caption bars + diff
        video = iio.imread(files[name], plugin="FFMPEG")
        assert video.shape == (5, height, width, 3), name
        assert video.std() > 0
    picture = iio.imread(files["side_by_side_png"])
    assert picture.shape == (3 * (64 + 14), 3 * 128 + 2 * 6, 3)  # first, middle and last frame
    assert Path(files["json"]) == out / "compare.json"


def test_dense_control_and_nothing_sparse_are_said(pipe):
    dense = run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="dense", overrides={"block_size": 64},
                        **SMALL_KW)
    assert dense["density"]["mean"] == 1.0 and dense["quality"]["latent_rel_l2"] < 1e-4
    assert dense["sparsity"]["ran_sparse"] is False and "control" in dense["sparsity"]["reason"]
    assert any(v.startswith("note: nothing ran sparse") for v in dense["verdicts"])
    scheduled = run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="tile",
                            overrides={"dense_steps": 3, "block_size": 64}, **SMALL_KW)
    assert scheduled["sparsity"]["ran_sparse"] is False and "dense_steps=3" in scheduled["sparsity"]["reason"]
    sparse = run_compare(pipe=pipe, defaults=embedded.DEFAULTS, method="tile",
                         overrides={"tile": (1, 8, 8), "window": (1, 1, 1), "block_size": 64}, **SMALL_KW)
    assert sparse["density"]["mean"] == pytest.approx(0.25)  # 4 tiles of 64 tokens, each sees itself
    assert sparse["quality"]["latent_rel_l2"] > 10 * dense["quality"]["latent_rel_l2"]
    assert sparse["files"] == {}  # out=None writes nothing
    assert_unwrapped(pipe)


def test_failure_inside_the_accelerated_run_still_restores(pipe):
    from ditaccel.eval import call_arguments, evaluate

    def explode(info, q, k, v):
        raise RuntimeError("injected failure inside an attention call")

    call = call_arguments(pipe, embedded.DEFAULTS, "a red ball", steps=2, height=64, width=128, frames=5)
    with pytest.raises(RuntimeError, match="injected"):
        evaluate(pipe, "tile", overrides={"block_size": 64}, call=call, repeats=1, observe=explode, progress=False)
    assert_unwrapped(pipe)


def test_json_to_stdout_and_table_to_stderr(capsys, tmp_path):
    rc = cli.main(["compare", *SMALL, "--steps", "2", "--method", "dense", "--json", "-", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0
    record = json.loads(captured.out)  # stdout is the JSON record alone
    assert record["format"] == "ditaccel-comparison/1" and record["method"] == "dense"
    assert "speedup" in captured.err and not (tmp_path / "-").exists()


def test_unknown_set_field_exits_2_with_one_line(tmp_path):
    out = tmp_path / "never"
    proc = run_cli("compare", "--set", "bogus_field=1", "--out", str(out), "--no-progress")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bogus_field" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # rejected before any run


@pytest.mark.parametrize("args, needle", [
    (["compare", "--set", "window"], "FIELD=VALUE"),
    (["compare", "--method", "nonsense"], "invalid choice: 'nonsense'"),
    (["compare", "--set", "dense_steps=-1"], "dense_steps"),
    (["compare", "--model", "./no/such/dir"], "no such directory"),
    (["compare", "--steps", "0"], "--steps"),
    (["compare", "--repeats", "0"], "--repeats"),
    (["compare", "--steps", "two"], "invalid int value: 'two'"),
    (["compare", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["methods", "nonsense"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(args, needle, tmp_path, capsys):
    rc = cli.main([*args, "--out", str(tmp_path / "o"), "--no-progress"] if args[0] == "compare" else args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0] and err[0].startswith("ditaccel"), err


def test_debug_after_the_command_and_version(capsys):
    with pytest.raises(ValueError, match="--steps"):
        cli.main(["compare", "--steps", "0", "--debug"])
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ditaccel {ditaccel.__version__}"


def test_model_directory_loads_offline(tmp_path):
    model = embedded.save(tmp_path / "tiny-wan")
    out = tmp_path / "out"
    proc = run_cli("compare", "--model", str(model), *SMALL, "--method", "tile", "--set", "block_size=64",
                   "--set", "tile=1,8,8", "--set", "window=1,1,1", "--out", str(out),
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((out / "compare.json").read_text())
    assert report["model"] == str(model) and report["pipeline"] == "WanPipeline"
    assert report["call"]["height"] == 64 and "max_sequence_length" not in report["call"]  # no embedded defaults
    assert report["density"]["mean"] < 1


def test_parse_set():
    assert cli.parse_set(["window=(3,3,3)", "kernel_size=3,9,9", "dense_steps=1", "backend=flex",
                          "dense_layers=[0, 1]", "x= 2.5 "]) == {
        "window": (3, 3, 3), "kernel_size": (3, 9, 9), "dense_steps": 1, "backend": "flex", "dense_layers": [0, 1],
        "x": 2.5}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        cli.parse_set(["=3"])


def test_help_lists_methods_and_examples(capsys):
    assert cli.main(["compare", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--set" in text and "kernel_size=3,9,9" in text and "{dense,window,tile" in text and "examples:" in text
    assert cli.main([]) == 2
    assert tuple(ditaccel.METHODS) == cli.METHOD_NAMES  # the parser's copy of the names is current


def test_methods_command_lists_every_knob_with_effective_defaults(capsys):
    from ditaccel.config import describe_fields
    from ditaccel.methods import REGISTRY

    assert cli.main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, (cls, _) in REGISTRY.items():
        assert re.search(rf"^{name}: ", text, re.M), name
    assert cli.main(["methods", "topk"]) == 0
    topk = capsys.readouterr().out
    for spec in describe_fields(REGISTRY["topk"][0]):
        assert re.search(rf"^  {spec.name} ", topk, re.M), spec.name
    assert "default None (acts as 0.25)" in topk  # the effective default, not a bare None


def test_docs_methods_knob_tables_are_current():
    from ditaccel.methods_doc import replace_knobs

    text = (ROOT / "docs" / "methods.md").read_text()
    assert replace_knobs(text) == text, "regenerate: python -m ditaccel.methods_doc --write docs/methods.md"


def _documented_commands() -> list[str]:
    """Every `ditaccel ...` line in the README's bash blocks and in the compare --help examples."""
    readme = (ROOT / "README.md").read_text()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", readme, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("ditaccel "):
                    lines.append(part)
    epilog = cli.build_parser()._subparsers._group_actions[0].choices["compare"].epilog
    lines += [ln.strip() for ln in epilog.splitlines() if ln.strip().startswith("ditaccel ")]
    return lines


def _bash_argv(line: str) -> list[str]:
    """The argv bash gives the command (a syntax error fails the test: the README must paste as written)."""
    proc = subprocess.run(["bash", "-c", f"printf '%s\\0' {line[len('ditaccel '):]}"], capture_output=True)
    assert proc.returncode == 0, f"{line!r} is not valid bash: {proc.stderr.decode()}"
    return [a for a in proc.stdout.decode().split("\0") if a]


def test_every_documented_example_runs_as_written(tmp_path, capsys, monkeypatch, pipe):
    from ditaccel.eval import runs

    # The embedded pipeline is loaded once for every example (loading is tested on its own above).
    from ditaccel.bench import runner

    def loaded(model, device, dtype):
        return pipe, dict(embedded.DEFAULTS)

    monkeypatch.setattr(runs, "load_pipeline", loaded)
    monkeypatch.setattr(runner, "load_pipeline", loaded)
    lines = _documented_commands()
    assert any(ln.startswith("ditaccel compare --method") for ln in lines) and any("bench" in ln for ln in lines)
    small = ["--steps", "1", *SMALL[:6], "--repeats", "1", "--no-progress"]  # one step at a 2 x 8 x 16 grid
    for i, line in enumerate(dict.fromkeys(lines)):
        argv = _bash_argv(line)
        if argv[0] == "compare":
            rc = cli.main([*argv, *small, "--out", str(tmp_path / f"c{i}")])
        elif argv[0] == "bench":
            rc = cli.main([*argv, "--size", "64x128x5", "--steps", "1", "--seeds", "0", "--no-progress",
                           "--out", str(tmp_path / f"b{i}")])
        elif argv[0] == "demo":  # a server: check the flags parse, do not serve
            cli.build_parser().parse_args(argv)
            rc = 0
        else:
            rc = cli.main(argv)
        captured = capsys.readouterr()
        assert rc == 0, f"{line!r} exited {rc}: {captured.err[-1500:]}"


def test_import_works_without_triton_gradio_or_playwright_and_compare_runs(tmp_path):
    """The base install has none of them: block their import and run the library and compare."""
    code = f"""
import sys
for name in ("triton", "gradio", "playwright"):
    sys.modules[name] = None  # import raises ImportError, as where they are not installed
import ditaccel
from ditaccel.compare import run_compare
r = run_compare(method="topk", overrides={{"block_size": 64, "dense_steps": 1}}, steps=2, height=64, width=128,
                frames=5, repeats=1, progress=False, out={str(tmp_path)!r})
assert r["sparsity"]["ran_sparse"], r["sparsity"]
r = run_compare(method="xattn", overrides={{"block_size": 64, "dense_steps": 1}}, steps=2, height=64, width=128,
                frames=5, repeats=1, progress=False)
assert r["density"]["mean"] < 1
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_import_and_help_are_fast():
    """`import ditaccel` <= 1.5 s and `ditaccel --help` <= 2 s (measured in a fresh interpreter;
    generous bounds for a shared CI machine: both take well under a second here)."""
    code = ("import time; t = time.perf_counter(); import ditaccel; a = time.perf_counter() - t; "
            "from ditaccel import cli; cli.build_parser().format_help(); b = time.perf_counter() - t; "
            "import sys; print(a, b, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    import_s, help_s, torch_loaded, diffusers_loaded = proc.stdout.split()
    print(f"import ditaccel: {float(import_s):.3f} s, parser + help: {float(help_s):.3f} s")
    assert float(import_s) <= 1.5 and float(help_s) <= 2.0
    assert torch_loaded == "False" and diffusers_loaded == "False"  # nothing heavy until it is used


def test_bench_and_demo_are_subcommands():
    import ditaccel.bench
    import ditaccel.demo

    parser = cli.build_parser()
    assert parser.parse_args(["bench"]).func is ditaccel.bench.main
    assert parser.parse_args(["demo"]).func is ditaccel.demo.main
    assert parser.parse_args(["demo"]).host == "127.0.0.1"  # loopback unless --host is given
    assert parser.parse_args(["bench", "--debug"]).debug is True
