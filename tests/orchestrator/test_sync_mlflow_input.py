"""`gmpq sync-mlflow` on a sweep folder with nothing to sync yet (it created an MLflow parent run for no trial),
and tracking URIs that cannot work, refused before any work (a sqlite path under a file was a FileExistsError)."""
from __future__ import annotations

import json

import pytest

from orchestrator.cli import main


def refused(capsys, argv: list[str]) -> str:
    """The one-paragraph error of a command that must exit 2 without a traceback, unwrapped."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("gmpq: error: ") and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


def started_sweep(tmp_path, config: str = "name: demo\nmodel: resnet20\n"):
    """What a sweep folder holds before its first trial finishes: only sweep_config.yaml."""
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep_config.yaml").write_text(config)
    return d


def test_a_sweep_with_no_trial_results_has_nothing_to_sync_and_creates_no_run(tmp_path, capsys):
    d = started_sweep(tmp_path)
    assert main(["sync-mlflow", "--sweep", str(d)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"nothing to sync: '{d}' holds no trial results yet (no trials.parquet: no trial of the sweep has "
            f"finished). No MLflow run was created in sqlite:///{d / 'mlflow.db'}; rerun 'gmpq sync-mlflow --sweep "
            f"{d}' once trials have finished.") in out
    assert sorted(p.name for p in d.iterdir()) == ["sweep_config.yaml"]      # no mlflow.db, no mlflow_parent.json
    assert main(["sync-mlflow", "--sweep", str(d), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["nothing_to_sync"] is True and rep["parent_run_id"] is None and rep["changed"] is False


@pytest.mark.slow     # ~10 s: MLflow creates its SQLite schema
def test_nothing_to_sync_opens_an_existing_store_and_creates_no_run_in_it(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    client = MlflowClient(uri)
    client.create_experiment("other")                        # a real store that exists before the sync
    d = started_sweep(tmp_path)
    assert main(["sync-mlflow", "--sweep", str(d), "--tracking-uri", uri]) == 0
    assert "nothing to sync" in capsys.readouterr().out
    experiments = client.search_experiments()
    assert client.search_runs([e.experiment_id for e in experiments]) == []
    assert not (d / "mlflow_parent.json").exists()


@pytest.mark.parametrize("uri, needle", [
    ("sqlite:///{tmp}/afile/mlflow.db", "The folder of the tracking_uri database 'sqlite:///{tmp}/afile/mlflow.db' "
                                        "'{tmp}/afile' cannot be written: '{tmp}/afile' is a file, not a folder; pass "
                                        "--tracking-uri sqlite:///PATH with PATH in a folder you can write, or leave it "
                                        "out to sync to the sweep's own store."),
    ("sqlite:///{tmp}", "tracking_uri 'sqlite:///{tmp}' names a folder, not a database file. Pass --tracking-uri "
                        "sqlite:///PATH/FILE.db, or leave it out to sync to the sweep's own store."),
    ("bogus://host", "--tracking-uri 'bogus://host' has a scheme MLflow does not know ('bogus')."),
    ("", "--tracking-uri '' is empty (an unset shell variable?); give an MLflow tracking URI, or leave --tracking-uri "
         "out to sync to the sweep's own store."),
])
def test_a_tracking_uri_that_cannot_work_is_refused_before_any_work(uri, needle, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    d = started_sweep(tmp_path)
    err = refused(capsys, ["sync-mlflow", "--sweep", str(d), "--tracking-uri", uri.format(tmp=tmp_path)])
    assert needle.format(tmp=tmp_path) in err and "FileExistsError" not in err
    assert sorted(p.name for p in d.iterdir()) == ["sweep_config.yaml"]


def test_a_tracking_uri_flag_is_checked_before_the_folder_is_read(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    err = refused(capsys, ["sync-mlflow", "--sweep", str(tmp_path / "no_sweep"),
                           "--tracking-uri", f"sqlite:///{tmp_path / 'afile' / 'm.db'}"])
    assert "is a file, not a folder; pass --tracking-uri sqlite:///PATH" in err


def test_the_sweeps_own_tracking_uri_under_a_file_is_named_with_the_fix(tmp_path, capsys):
    """The store the sweep recorded, its folder since replaced by a file: the fix is --tracking-uri, not leaving
    it out (that is this store)."""
    (tmp_path / "afile").write_text("")
    d = started_sweep(tmp_path, f"name: demo\nmodel: resnet20\ntracking_uri: sqlite:///{tmp_path}/afile/m.db\n")
    err = refused(capsys, ["sync-mlflow", "--sweep", str(d)])
    assert (f"'{tmp_path}/afile' is a file, not a folder; pass --tracking-uri sqlite:///PATH with PATH in a folder "
            "you can write.") in err
