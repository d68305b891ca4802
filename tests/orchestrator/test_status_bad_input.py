"""Bad input to gmpq status / pareto / sweep / run: one paragraph, exit 2, no traceback, nothing written."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gmpq_core.errors import CheckpointError, ConfigError
from orchestrator.cli import main
from orchestrator.results import TRIALS_FILE, read_trials, trial_row, write_results


def _sweep(d: Path) -> None:
    """A finished two-trial sweep folder (both completed), as gmpq sweep leaves it."""
    rows = [trial_row(trial_id=f"t{i}", config={"budget_avg_bits": 3.0 + i, "proxy_size": 500}, status="completed",
                      last_result={"transfer_top1": 70.0 + i, "proxy_top1": 50.0, "bitops": i * 10**8,
                                   "gbitops": i / 10})
            for i in (1, 2)]
    write_results(d, rows, [])
    (d / "sweep_config.yaml").write_text("name: st\nn_trials: 2\n")


def _replace_column(path: Path, name: str, values: list) -> None:
    t = pq.read_table(path)
    pq.write_table(t.set_column(t.column_names.index(name), name, pa.array(values)), path)


def _run(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gmpq: error: ") and "Traceback" not in err
    return " ".join(err.split())


@pytest.mark.parametrize("argv", [["status", "--sweep"], ["pareto", "--no-mlflow", "--sweep"]])
def test_a_trials_table_of_another_schema_is_named_with_the_fix(tmp_path, capsys, argv):
    _sweep(tmp_path)
    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / TRIALS_FILE)
    err = _run(capsys, argv + [str(tmp_path)])
    assert f"'{tmp_path / TRIALS_FILE}' lacks the columns ['trial_id', 'status']" in err and "Move it away" in err
    assert not (tmp_path / "pareto.parquet").exists()


@pytest.mark.parametrize("argv", [["status", "--sweep"], ["pareto", "--no-mlflow", "--sweep"]])
def test_text_in_a_numeric_column_is_named_with_the_fix(tmp_path, capsys, argv):
    _sweep(tmp_path)
    _replace_column(tmp_path / TRIALS_FILE, "transfer_top1", ["abc", "abc"])
    err = _run(capsys, argv + [str(tmp_path)])
    assert f"'{tmp_path / TRIALS_FILE}' has non-numeric values in the numeric column(s) transfer_top1 (string)" in err
    assert "gmpq sweep --resume" in err
    assert not (tmp_path / "pareto.parquet").exists()


def test_the_numeric_check_passes_gmpq_tables_and_all_null_columns(tmp_path):
    _sweep(tmp_path)
    _replace_column(tmp_path / TRIALS_FILE, "ard", pa.array([None, None], pa.string()))   # never reported: fine
    assert len(read_trials(tmp_path)) == 2
    _replace_column(tmp_path / TRIALS_FILE, "param_proxy_size", ["500", "500"])
    with pytest.raises(CheckpointError, match="param_proxy_size"):
        read_trials(tmp_path)


def test_status_names_a_final_table_without_trial_ids(tmp_path, capsys):
    _sweep(tmp_path)
    pq.write_table(pa.table({"a": [1]}), tmp_path / "final.parquet")
    assert "final.parquet' lacks the columns ['trial_id']" in _run(capsys, ["status", "--sweep", str(tmp_path)])


# gmpq run checked a malformed address before writing already (its Ray session starts first); an empty one ran
@pytest.mark.parametrize("command, address", [("sweep", "bogus"), ("sweep", "127.0.0.1:99999"), ("sweep", ""),
                                              ("sweep", " "), ("run", ""), ("run", " ")])
def test_a_bad_address_fails_before_anything_is_written(tmp_path, capsys, command, address):
    out = tmp_path / "s"
    err = _run(capsys, [command, "--preset", "demo", "--out", str(out), "--address", address])
    assert repr(address) in err and ("HOST:PORT" in err)
    assert "joining the Ray cluster" not in err and not out.exists()


def test_run_sweep_checks_the_address_before_warning_or_writing(tmp_path, caplog):
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep_config

    cfg = load_sweep_config(None, preset="demo", overrides={"out_dir": str(tmp_path / "s"), "address": "bogus"})
    with pytest.raises(ConfigError, match="'bogus'"):
        run_sweep(cfg, progress=False)
    assert "joining the Ray cluster" not in caplog.text and not (tmp_path / "s").exists()


@pytest.mark.parametrize("study_file", ["study_config.yaml", "study.parquet"])
@pytest.mark.parametrize("command", ["sweep", "run"])
def test_a_sweep_refuses_the_folder_of_a_study(tmp_path, capsys, command, study_file):
    (tmp_path / study_file).write_text("x: 1\n")
    (tmp_path / "mlflow_parent.json").write_text('{"run_id": "study"}')
    err = _run(capsys, [command, "--preset", "demo", "--out", str(tmp_path)])
    assert f"The folder '{tmp_path}' holds the results of a study of 'gmpq study' ({study_file})" in err
    assert "Give --out a new folder" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([study_file, "mlflow_parent.json"])
    assert (tmp_path / "mlflow_parent.json").read_text() == '{"run_id": "study"}'


@pytest.mark.parametrize("address", [None, "auto", "local", " auto ", "ray://head:10001", "10.0.0.5:6379",
                                     "[::1]:6379"])
def test_valid_addresses_pass_the_address_check(address):
    from orchestrator.commands.sweep import check_address_arg

    check_address_arg(address)       # no ConfigError: the check is syntax only, nothing is joined


@pytest.mark.parametrize("name, hint", [("trials.parquet", "'gmpq sweep --resume' rewrites trials.parquet"),
                                        ("layers.parquet", "repeats the layers_json column of trials.parquet"),
                                        ("pareto.parquet", "'gmpq pareto --sweep DIR' writes pareto.parquet again"),
                                        ("final.parquet", "'gmpq finetune --sweep DIR'")])
def test_a_damaged_table_gets_the_hint_for_that_table(tmp_path, name, hint):
    from orchestrator.results import read_table

    (tmp_path / name).write_bytes(b"PAR1 not really parquet")
    with pytest.raises(CheckpointError, match="truncated or corrupted") as err:
        read_table(tmp_path / name)
    assert hint in str(err.value)


@pytest.mark.parametrize("argv", [["finetune", "--sweep", "SWEEP"], ["study", "--smoke", "--out", "SWEEP"]])
def test_finetune_and_study_reject_an_empty_address_too(tmp_path, capsys, argv):
    rc = main([a.replace("SWEEP", str(tmp_path / "s")) for a in argv] + ["--address", ""])
    err = capsys.readouterr().err
    assert rc == 2 and "--address '' is empty" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("garbage_lines, warned", [(1, False), (3, False), (8, True)])
def test_a_damaged_events_file_is_named_not_silently_skipped(tmp_path, caplog, garbage_lines, warned):
    import json

    from orchestrator.sweep_status import _events

    good = [json.dumps({"event": "start", "trial_id": f"t{i}"}) for i in range(4)]
    (tmp_path / "trial_events.jsonl").write_text("\n".join(good + ["{cut"] * garbage_lines) + "\n")
    with caplog.at_level("WARNING", logger="orchestrator.sweep_status"):
        assert [e["trial_id"] for e in _events(tmp_path)] == ["t0", "t1", "t2", "t3"]
    assert ("are not JSON events" in caplog.text) == warned      # a crash's cut lines are expected, not damage


def test_a_damaged_sweep_config_is_named_on_one_line(tmp_path, capsys):
    (tmp_path / "sweep_config.yaml").write_text("name: demo\nspace: [1, 2\n")
    rc = main(["status", "--sweep", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and "^" not in err
    assert "sweep_config.yaml' is not valid YAML at line 2, column 13 (the end of the file): expected" in err
