"""``gmpq study --analyze-only`` (and a resume) logs to the MLflow store the study's run recorded
(``mlflow_parent.json``), not to ``$MLFLOW_TRACKING_URI`` set since for other work; ``--tracking-uri`` still names
another store; the output names the store. Two real SQLite stores, in process, without Ray (a few seconds)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import load_study_config  # noqa: E402
from experiments.generalization_ray import StudySink, recorded_tracking_uri, study_tracking_uri  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from test_study_report_page import _fake_study  # noqa: E402  (same folder: on sys.path)

SMOKE = REPO / "experiments" / "generalization_smoke.yaml"


def _study_with_run(d: Path, uri: str):
    """A study folder with one completed cell and the parent run its study made in the store ``uri``."""
    _fake_study(d)
    cfg = yaml.safe_load((d / "study_config.yaml").read_text())
    sink = StudySink(uri, d, experiment_name=cfg["name"], resolved_config=cfg)
    assert sink.connect()
    return cfg["name"], sink.parent_run_id


def _artifacts(uri: str, name: str) -> dict[str, list[str]]:
    """Each run of experiment ``name`` in the store ``uri``: the files under its results/ (none: {})."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return {}
    return {r.info.run_id: sorted(a.path for a in client.list_artifacts(r.info.run_id, "results"))
            for r in client.search_runs([exp.experiment_id])}


def test_analyze_only_logs_to_the_store_the_study_recorded_not_the_environments(tmp_path, capsys, monkeypatch):
    d = tmp_path / "study"
    own = f"sqlite:///{d / 'mlflow.db'}"              # the study ran without the variable: the folder's store
    other = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    name, parent = _study_with_run(d, own)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)  # set since for other work
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    cap = capsys.readouterr()
    assert _artifacts(own, name) == {parent: ["results/results.md", "results/study.parquet",
                                              f"results/study_{name}.png", f"results/study_{name}_by_budget.png"]}
    assert _artifacts(other, name) == {}               # nothing in the variable's store
    assert json.loads((d / "mlflow_parent.json").read_text())["tracking_uri"] == own     # the record kept
    assert f"MLflow: the page, plots and study.parquet attached to the study's run in {own}" in cap.out
    err = " ".join(cap.err.split())
    assert f"MLflow tracking URI {own}, where the study's run logged" in err and f"not {other} from" in err

    # --tracking-uri still names another store: the page goes there (a parent run made there), and it says so
    assert main(["study", "--out", str(d), "--analyze-only", "--tracking-uri", other]) == 0
    out = capsys.readouterr().out
    assert f"attached to the study's run in {other}" in out
    assert [len(files) for files in _artifacts(other, name).values()] == [4]


def test_the_recorded_store_follows_a_moved_study_folder_and_a_missing_record_is_none(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    (old / "mlflow_parent.json").write_text(json.dumps({"tracking_uri": f"sqlite:///{old / 'mlflow.db'}",
                                                        "sweep_dir": str(old), "run_id": "r"}))
    shutil.copytree(old, new)
    assert recorded_tracking_uri(new) == f"sqlite:///{new / 'mlflow.db'}"       # its own store moved along
    assert recorded_tracking_uri(old) == f"sqlite:///{old / 'mlflow.db'}"
    server = "http://mlflow.example:5000"
    (new / "mlflow_parent.json").write_text(json.dumps({"tracking_uri": server, "sweep_dir": str(old)}))
    assert recorded_tracking_uri(new) == server                                   # a server stays as it is
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere:5000")
    cfg = load_study_config(SMOKE)
    assert study_tracking_uri(cfg, new) == server                                 # the record over the variable
    (new / "mlflow_parent.json").write_text("{trunc")
    assert recorded_tracking_uri(new) is None and study_tracking_uri(cfg, new) == "http://elsewhere:5000"
    assert recorded_tracking_uri(tmp_path / "none") is None


def test_analyze_only_of_a_study_without_a_run_says_one_thing_of_the_variables_store(tmp_path, capsys, monkeypatch):
    """It named the variable's store as the one it logs to, then said it logged nowhere."""
    d = tmp_path / "study"
    _fake_study(d)                                     # rows, no MLflow run recorded (a copy, docs/study_data)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    cap = capsys.readouterr()
    assert "MLflow tracking URI" not in cap.err and not any(line.startswith("MLflow: ") for line in cap.out.split("\n"))
    assert (f"(not logged to MLflow: {d} has no MLflow run of the study, so $MLFLOW_TRACKING_URI ({other}) is not "
            "used either; --tracking-uri URI logs the page there)") in cap.out
    assert not (tmp_path / "other.db").exists() and not (d / "mlflow.db").exists()
