"""What a user sees from the benchmarks on bad input or Ctrl-C: a one-line refusal naming the value (exit 2), before
any compute; one line and exit 130 for Ctrl-C, no traceback, no JSON; ``--json -`` leaves stdout pure JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.benchmarks.refusals import refused

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_final_stage  # noqa: E402
import bench_host_overhead  # noqa: E402
import bench_optimizer  # noqa: E402
import bench_qat_step  # noqa: E402
import bench_search_graph  # noqa: E402
import bench_search_step  # noqa: E402
import reliability_report  # noqa: E402

# tiny cases, so that a benchmark which wrongly accepts the input still ends in seconds
TINY_STEP = ["--models", "resnet20:8:1", "--batch-size", "2", "--steps", "1", "--threads", "1", "--variants", "fused",
             "--no-memory"]
TINY_QAT = ["--models", "resnet20:8:1", "--batch-size", "8", "--rounds", "1", "--chunk", "1", "--threads", "1"]


def _refused(main, argv, capsys) -> str:
    return refused(main, argv, capsys)


def _boom(*a, **k):
    raise AssertionError("the benchmark computed before refusing its input")


@pytest.mark.parametrize("module,base", [(bench_search_step, TINY_STEP), (bench_qat_step, TINY_QAT),
                                         (bench_host_overhead, ["--models", "resnet20:8:1", "--steps", "1",
                                                                "--variants", "fused"])])
@pytest.mark.parametrize("flag,value,says", [("--batch-size", "-1", "--batch-size: must be a positive integer"),
                                             ("--batch-size", "0", "but got 0"),
                                             ("--models", "resnet20:8", "MODEL:INPUT_SIZE:IN_CHANNELS"),
                                             ("--models", "nope:8:1", "Unknown model 'nope'")])
def test_bad_sizes_and_models_are_refused_naming_the_value(module, base, flag, value, says, capsys):
    assert says in _refused(module.main, [*base, flag, value], capsys)


def test_a_zero_step_count_is_refused_not_replaced_by_the_default(capsys):
    # `args.steps or 4` used to turn --steps 0 into 4 timed steps without a word
    assert "--steps: must be a positive integer (1 or more), but got 0" in _refused(
        bench_search_step.main, [*TINY_STEP, "--steps", "0"], capsys)


@pytest.mark.parametrize("target,says", [("missing/rows.json", "does not exist; create it first"),
                                         (".", "that is a folder")])
def test_an_unwritable_json_target_is_refused_before_any_compute(tmp_path, monkeypatch, capsys, target, says):
    monkeypatch.setattr(bench_search_step, "build_bench", _boom)
    monkeypatch.setattr(bench_optimizer, "build_model", _boom)
    path = str(tmp_path / target)
    assert says in _refused(bench_search_step.main, [*TINY_STEP, "--json", path], capsys)
    assert says in _refused(bench_optimizer.main, ["--steps", "1", "--json", path], capsys)


def test_ctrl_c_is_one_line_and_exit_130_with_no_json(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_search_step, "measure_times", interrupted)
    out = tmp_path / "rows.json"
    try:
        rc = bench_search_step.main([*TINY_STEP, "--json", str(out)])
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main: the user sees a traceback")
    err = capsys.readouterr().err
    assert rc == 130 and "interrupted (Ctrl-C)" in err and "Traceback" not in err and not out.exists()


def test_json_to_stdout_is_the_json_alone(capsys):
    assert bench_qat_step.main([*TINY_QAT, "--json", "-"]) == 0
    rows = json.loads(capsys.readouterr().out)        # the table goes to stderr then
    assert [r["variant"] for r in rows] == ["reference", "fused"]


def test_the_step_table_says_what_its_ratios_are_and_progress_goes_to_stderr(capsys):
    assert bench_search_step.main(TINY_STEP) == 0
    out, err = capsys.readouterr()
    assert "ratio = FP img/s / search img/s" in out and "[1/1] resnet20 8 px" in err
    assert "None" not in out.splitlines()[1]          # no memory measured: '-', not None


@pytest.mark.parametrize("variant", ["triton", "fused+tstream"])
def test_cuda_only_variants_are_refused_on_the_cpu_not_timed_under_their_name(variant, capsys):
    # "triton" ran the eager CPU kernels and printed a row named triton
    assert "need CUDA" in _refused(bench_search_step.main, [*TINY_STEP, "--device", "cpu", "--variants", variant],
                                   capsys)


def test_host_overhead_refuses_cuda_only_variants_on_its_cpu(monkeypatch, capsys):
    monkeypatch.setattr(bench_host_overhead, "build_bench", _boom)
    assert "need CUDA" in _refused(bench_host_overhead.main, ["--models", "resnet20:8:1", "--variants", "fused+graph"],
                                   capsys)


def test_final_stage_without_a_sweep_folder_says_how_to_make_one(tmp_path, capsys):
    err = _refused(bench_final_stage.main, ["--sweep", str(tmp_path / "nothing")], capsys)
    assert "no such folder" in err and "make demo" in err


def test_final_stage_refuses_more_workers_than_cpus_instead_of_waiting_forever(tmp_path, capsys):
    import os

    err = _refused(bench_final_stage.main, ["--sweep", str(tmp_path), "--workers", str((os.cpu_count() or 1) + 1)],
                   capsys)
    assert "more than this machine's" in err


def test_a_reliability_scenario_name_with_a_typo_is_refused_not_reported_held(capsys):
    # `--only bad_input` ran nothing and printed "held" with exit 0
    err = _refused(reliability_report.main, ["--only", "bad_input"], capsys)
    assert "unknown scenario(s) bad_input" in err and "bad_inputs" in err


def test_search_graph_on_a_cpu_says_its_ratio_is_noise(monkeypatch, capsys):
    res = SimpleNamespace(search_seconds=1.0, proxy_top1=10.0, bitops_quantized=1e9, history=[{"ce": 1.0}],
                          policy=SimpleNamespace(meta={"precision": "fp32"}, layers={}))
    monkeypatch.setattr(bench_search_graph, "run", lambda args, mode: (1.0, res))
    assert bench_search_graph.main(["--device", "cpu", "--rounds", "1"]) == 0
    assert "not a speed-up" in capsys.readouterr().out


def test_json_to_stdout_is_refused_where_stdout_carries_the_report(monkeypatch, capsys):
    # these scripts take --json PATH only: "-" became a file named "-" in the working folder
    monkeypatch.setattr(bench_search_graph, "run", _boom)
    assert "writes its JSON to a file only" in _refused(bench_search_graph.main, ["--device", "cpu", "--json", "-"],
                                                         capsys)


def test_a_json_file_is_written_whole_or_left_as_it_was(tmp_path, monkeypatch):
    import bench_cli

    path = tmp_path / "rows.json"
    path.write_text("[1]\n")

    def interrupted(*a):
        raise KeyboardInterrupt
    monkeypatch.setattr(bench_cli.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_cli.write_text_file(str(path), "[2, 3]\n")
    assert path.read_text() == "[1]\n" and [p.name for p in tmp_path.iterdir()] == ["rows.json"]
