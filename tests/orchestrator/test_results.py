"""trials.parquet / layers.parquet: explicit schema, pandas round trip, atomic rewrite, resume merge."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import orchestrator.results as results
from gmpq_core.errors import CheckpointError
from orchestrator.results import (LAYERS_FILE, TRIALS_FILE, layer_rows, read_layers, read_trials, rows_to_table,
                                  trial_row, write_results)
from orchestrator.results_callback import ResultsCallback

LAYERS = [{"name": "layer1.0.conv1", "macs": 100, "w_bits": 4, "a_bits": 3},
          {"name": "fc", "macs": 10, "w_bits": 8, "a_bits": 8}]


def final_result(acc: float) -> dict:
    return {"done": True, "proxy_top1": acc - 5, "transfer_top1": acc, "bitops": 1280, "bitops_total": 9999,
            "budget_bitops": 1500, "budget_avg_bits": 3.5, "budget_bucket": 1, "gbitops": 1.28e-6,
            "ard": 0.4, "p": float("nan"), "search_seconds": 1.5, "transfer_seconds": 0.5, "epochs_run": 2,
            "epoch": 1, "node_id": "node-a", "hostname": "box", "policy_json": "{}", "layers_json": json.dumps(LAYERS)}


def test_schema_types_are_explicit_and_round_trip_through_pandas(tmp_path):
    rows = [trial_row(trial_id="t1", config={"eta": 40.0, "epochs": 3, "space": {"p_mode": "capacity"},
                                             "use_x": True, "cands": [2, 4]}, last_result=final_result(80.0),
                      status="completed", started_at="2026-01-01T00:00:00+00:00"),
            trial_row(trial_id="t2", config={"eta": 10, "epochs": 2, "space": {"p_mode": "fixed"}, "use_x": False,
                                             "cands": [2]}, last_result={"epoch": 0, "proxy_top1": 11.0},
                      status="pruned")]
    write_results(tmp_path, rows, layer_rows("t1", rows[0]["layers_json"]))
    schema = pq.read_schema(tmp_path / TRIALS_FILE)
    assert schema.field("bitops").type == pa.int64() and schema.field("transfer_top1").type == pa.float64()
    assert schema.field("param_eta").type == pa.float64()         # int 10 and float 40.0 -> float64
    assert schema.field("param_epochs").type == pa.int64() and schema.field("param_use_x").type == pa.bool_()
    assert schema.field("param_space.p_mode").type == pa.string()
    assert schema.field("param_cands").type == pa.string()        # lists stored as JSON
    df = pd.read_parquet(tmp_path / TRIALS_FILE)                  # plain pandas reader
    assert list(df["trial_id"]) == ["t1", "t2"] and list(df["status"]) == ["completed", "pruned"]
    assert df.loc[0, "transfer_top1"] == 80.0 and np.isnan(df.loc[1, "transfer_top1"])
    assert np.isnan(df.loc[0, "p"])                               # non-finite metric stored as null
    assert df.loc[1, "last_epoch"] == 0 and json.loads(df.loc[0, "param_cands"]) == [2, 4]
    layers = read_layers(tmp_path)
    assert list(layers["bitops"]) == [1200, 640] and layers["macs"].dtype == np.int64


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError, match="status='done'"):
        trial_row(trial_id="t", config={}, last_result={}, status="done")


def test_rewrite_is_atomic_when_the_writer_dies(tmp_path, monkeypatch):
    write_results(tmp_path, [trial_row(trial_id="t1", config={}, last_result=final_result(70.0), status="completed")], [])
    before = (tmp_path / TRIALS_FILE).read_bytes()

    def dies(table, f):
        f.write(b"PAR1 half a file")
        raise OSError("disk full")
    monkeypatch.setattr(results.pq, "write_table", dies)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, [trial_row(trial_id="t2", config={}, last_result={}, status="failed")], [])
    assert (tmp_path / TRIALS_FILE).read_bytes() == before          # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAYERS_FILE, TRIALS_FILE]  # no temp files left


def test_a_ctrl_c_in_the_middle_of_a_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    from gmpq_core.fileio import atomic_write

    path = tmp_path / "final.parquet"
    path.write_bytes(b"the old table")

    def interrupted(f):
        f.write(b"PAR1 the first half of a new ta")
        raise KeyboardInterrupt                     # Ctrl-C while the new table is being written
    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"the old table" and [p.name for p in tmp_path.iterdir()] == ["final.parquet"]


_FULL_DISK_WRITER = """
import os, resource, signal, sys
from orchestrator.results import TRIALS_FILE, trial_row, write_results
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails with EFBIG, as on a full disk
rows = lambda n, x: [trial_row(trial_id=f"t{j:04d}", config={"x": x}, last_result={"proxy_top1": x},
                               status="completed") for j in range(n)]
write_results(sys.argv[1], rows(3, 1.0), [])
size = os.path.getsize(os.path.join(sys.argv[1], TRIALS_FILE))
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    write_results(sys.argv[1], rows(3000, 2.0), [])
except OSError as e:
    print("write failed:", e)
"""


def test_a_real_rewrite_of_trials_parquet_that_fails_midway_leaves_the_old_table(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _FULL_DISK_WRITER, str(tmp_path)], cwd=root, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "write failed:" in done.stdout, done.stdout + done.stderr[-2000:]
    df = read_trials(tmp_path)                          # the table before the failed rewrite, whole
    assert len(df) == 3 and set(df["param_x"]) == {1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAYERS_FILE, TRIALS_FILE]     # no temp file left


def trial(tid: str, acc: float | None, x: float):
    """Duck-typed stand-in for ray.tune Trial (the attributes the callback reads)."""
    return SimpleNamespace(trial_id=tid, config={"x": x}, last_result=final_result(acc) if acc else {"epoch": 0},
                           pickled_error_file=None, error_file=None)


def test_callback_resume_merges_by_trial_id_without_duplicates(tmp_path):
    cb = ResultsCallback(tmp_path)
    cb.on_trial_start(0, [], trial("a", 70.0, 1.0))
    cb.on_trial_complete(0, [], trial("a", 70.0, 1.0))
    cb.on_trial_error(0, [], trial("b", None, 2.0))
    assert read_trials(tmp_path)["status"].tolist() == ["completed", "failed"]
    # a new driver (resume): loads both rows, the failed trial reruns and replaces its row
    cb2 = ResultsCallback(tmp_path)
    assert [r["trial_id"] for r in cb2.rows] == ["a", "b"]
    cb2.on_trial_start(0, [], trial("b", 75.0, 2.0))
    cb2.on_trial_complete(0, [], trial("b", 75.0, 2.0))
    cb2.on_trial_complete(0, [], trial("c", None, 3.0))
    df = read_trials(tmp_path)
    assert df["trial_id"].tolist() == ["a", "b", "c"]
    assert df["status"].tolist() == ["completed", "completed", "pruned"]
    assert df["attempt"].tolist() == [1, 2, 1] and df.loc[1, "transfer_top1"] == 75.0
    layers = read_layers(tmp_path)
    assert layers.groupby("trial_id").size().to_dict() == {"a": 2, "b": 2}


def test_callback_survives_pickling_and_reloads_from_disk(tmp_path):
    import pickle
    cb = ResultsCallback(tmp_path)
    clone = pickle.loads(pickle.dumps(cb))       # what Tuner.restore does with tuner.pkl
    cb.on_trial_complete(0, [], trial("a", 70.0, 1.0))
    clone.setup()
    clone.on_trial_complete(0, [], trial("b", 71.0, 1.0))
    assert read_trials(tmp_path)["trial_id"].tolist() == ["a", "b"]


@pytest.mark.parametrize("name", [TRIALS_FILE, LAYERS_FILE])
def test_truncated_parquet_raises_checkpoint_error_naming_the_file(tmp_path, name):
    write_results(tmp_path, [trial_row(trial_id="t1", config={}, last_result=final_result(70.0), status="completed")],
                  layer_rows("t1", json.dumps(LAYERS)))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    reader = read_trials if name == TRIALS_FILE else read_layers
    with pytest.raises(CheckpointError, match=name) as e:
        reader(tmp_path)
    assert "corrupted" in str(e.value)
    with pytest.raises(CheckpointError, match=name):
        ResultsCallback(tmp_path)                 # a resume refuses to overwrite a damaged table


def test_missing_or_foreign_tables(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_trials(tmp_path)
    assert read_trials(tmp_path, missing_ok=True).empty
    pq.write_table(pa.table({"a": [1]}), tmp_path / TRIALS_FILE)
    with pytest.raises(CheckpointError, match=r"lacks the columns \['trial_id', 'status'\]"):
        read_trials(tmp_path)


def test_rows_to_table_handles_ints_given_as_floats_and_missing_values():
    t = rows_to_table([{"trial_id": "a", "bitops": 12.0, "epochs_run": None}])
    assert t.column("bitops").to_pylist() == [12] and t.column("epochs_run").to_pylist() == [None]


def test_backfill_writes_ended_trials_only_not_ones_an_interrupt_stopped(tmp_path):
    """Ctrl-C stops the running trials (Tune: TERMINATED, last result an epoch report): no row for them,
    so --resume runs them again; a trial that reported its end, a pruned one and a failed one get rows."""
    from orchestrator.trial_status import TrialStatusBook

    book = TrialStatusBook(tmp_path / "trial_status.json")
    book.mark_pruned("pruned", "median")
    stopped = SimpleNamespace(**vars(trial("stopped", None, 1.0)), status="TERMINATED")
    stopped.last_result = {"phase": "search", "epoch": 1, "proxy_top1": 10.0}
    ended = SimpleNamespace(**vars(trial("ended", 70.0, 2.0)), status="TERMINATED")
    pruned = SimpleNamespace(**vars(trial("pruned", None, 3.0)), status="TERMINATED")
    pruned.last_result = {"phase": "search", "epoch": 2, "proxy_top1": 12.0}
    failed = SimpleNamespace(**vars(trial("failed", None, 4.0)), status="ERROR")
    cb = ResultsCallback(tmp_path, status_book=book)
    assert sorted(cb.backfill([stopped, ended, pruned, failed])) == ["ended", "failed", "pruned"]
    df = read_trials(tmp_path).set_index("trial_id")
    assert df["status"].to_dict() == {"ended": "completed", "failed": "failed", "pruned": "pruned"}
    assert results.has_ended("stopped", stopped.last_result, book) is False
    assert results.has_ended("x", {"done": True}) is True and results.has_ended("x", {"epoch": 1}) is False


def test_the_table_keeps_transfer_top5_and_merges_an_older_table_without_it(tmp_path):
    import pyarrow.parquet as pq

    from orchestrator.results import TRIALS_FILE, read_trials, trial_row, write_results

    a = trial_row(trial_id="a", config={"budget_avg_bits": 3.0}, status="completed",
                  last_result={"transfer_top1": 70.0, "bitops": 5})
    write_results(tmp_path, [a], [])
    pq.write_table(pq.read_table(tmp_path / TRIALS_FILE).drop(["transfer_top5"]), tmp_path / TRIALS_FILE)  # older
    b = trial_row(trial_id="b", config={"budget_avg_bits": 3.0}, status="completed",
                  last_result={"transfer_top1": 71.0, "transfer_top5": 99.0, "bitops": 5})
    write_results(tmp_path, [*read_trials(tmp_path).to_dict("records"), b], [])
    df = read_trials(tmp_path).set_index("trial_id")
    assert df.loc["b", "transfer_top5"] == 99.0 and df.loc["a", "transfer_top5"] != df.loc["a", "transfer_top5"]  # NaN


def test_a_tuner_pickle_from_before_the_callback_moved_still_loads():
    """Tune pickles a sweep's callbacks by import path (tuner.pkl); older sweeps name orchestrator.results."""
    import pickle

    from orchestrator.results_callback import ResultsCallback as moved
    assert pickle.loads(b"corchestrator.results\nResultsCallback\n.") is moved
    with pytest.raises(AttributeError):
        results.NoSuchThing
