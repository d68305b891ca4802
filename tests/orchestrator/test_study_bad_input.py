"""``gmpq study`` on bad input: a one-paragraph error (exit 2) before any work, no traceback, nothing lost.

The checks run through the CLI in process (the study never starts, so each test takes well under a
second); the last test runs a real two-cell study on Ray against an MLflow server that is down.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import load_study_config  # noqa: E402
from experiments.generalization_ray import check_study_dir, check_tracking_uri, write_rows  # noqa: E402
from gmpq_core.errors import ConfigError  # noqa: E402
from orchestrator.cli import main  # noqa: E402

SMOKE = REPO / "experiments" / "generalization_smoke.yaml"


def _down_uri() -> str:
    """An http URI on a loopback port nothing listens on (an MLflow server that is down)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _study(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr with the error paragraph's line breaks undone."""
    rc = main(["study", *argv])
    return rc, " ".join(capsys.readouterr().err.split())


def test_an_unknown_tracking_uri_scheme_is_refused_before_the_study_starts(tmp_path, capsys):
    out = tmp_path / "study"
    rc, err = _study(capsys, "--smoke", "--out", str(out), "--tracking-uri", "bogus://x")
    assert rc == 2 and "'bogus://x' has a scheme MLflow does not know" in err and "--tracking-uri" in err
    assert not out.exists()                                  # nothing started
    for uri in (None, "http://127.0.0.1:1", "sqlite:///x.db", "postgresql+psycopg2://u@h/db", "file:///tmp/m"):
        check_tracking_uri(uri)                              # known schemes; a server that is down is no error


def test_the_study_takes_mlflow_tracking_uri_from_the_environment_and_checks_it(tmp_path, capsys, monkeypatch):
    from experiments.generalization_ray import study_tracking_uri

    cfg = load_study_config(SMOKE)
    assert study_tracking_uri(cfg, tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert study_tracking_uri(cfg, tmp_path) == "http://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    rc, err = _study(capsys, "--smoke", "--out", str(tmp_path / "study"))
    assert rc == 2 and "$MLFLOW_TRACKING_URI 'bogus://x' has a scheme MLflow does not know" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")     # said in a line, as gmpq sweep says it
    rc, err = _study(capsys, "--smoke", "--out", str(tmp_path / "study"), "--address", "")   # (stops it there)
    assert rc == 2 and "gmpq study: MLflow tracking URI http://127.0.0.1:1 from $MLFLOW_TRACKING_URI" in err
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("flag,bad,says", [
    ("--notes", "nosuch.md", "Cannot read the --notes file"),
    ("--notes", ".", "Cannot read the --notes file"),
    ("--report", "afile/x.md", "afile' is a file, not a folder; pass --report"),
    ("--png", "afile/x.png", "afile' is a file, not a folder; pass --png"),
    ("--report", "adir", "is a folder; pass --report a file path"),
    ("--out", "afile", "The study folder"),
])
def test_a_bad_path_is_an_error_naming_it_before_the_study_starts(tmp_path, capsys, monkeypatch, flag, bad, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x\n")
    (tmp_path / "adir").mkdir()
    args = {"--out": str(tmp_path / "study"), flag: bad}
    rc, err = _study(capsys, "--smoke", *[x for kv in args.items() for x in kv])
    assert rc == 2 and says in err and bad.split("/")[0] in err and "Traceback" not in err
    assert not (tmp_path / "study").exists() and (tmp_path / "afile").read_text() == "x\n"


def test_analyze_only_checks_the_notes_before_writing_the_page(tmp_path, capsys):
    d = tmp_path / "study"
    _fake_study(d, [_row(0, "completed")])
    rc, err = _study(capsys, "--out", str(d), "--analyze-only", "--notes", str(tmp_path / "nosuch.md"))
    assert rc == 2 and "nosuch.md" in err and not (d / "results.md").exists() and not list(d.glob("*.png"))


def _sweep_folder(d: Path) -> dict:
    d.mkdir()
    (d / "sweep_config.yaml").write_text(yaml.safe_dump({"name": "demo", "model": "resnet20"}))
    (d / "trials.parquet").write_bytes(b"PAR1")
    parent = {"tracking_uri": f"sqlite:///{d / 'mlflow.db'}", "experiment_name": "demo", "run_id": "abc"}
    (d / "mlflow_parent.json").write_text(json.dumps(parent))
    return parent


def test_a_sweeps_folder_is_refused_and_left_as_it_was(tmp_path, capsys):
    # the study's MLflow sink keeps its ids in the same files as a sweep's: it rewrote mlflow_parent.json
    d = tmp_path / "sweep"
    parent = _sweep_folder(d)
    before = sorted(p.name for p in d.iterdir())
    rc, err = _study(capsys, "--smoke", "--out", str(d))
    assert rc == 2 and f"'{d}' holds the results of sweep 'demo'" in err and "Give --out a new folder" in err
    assert sorted(p.name for p in d.iterdir()) == before
    assert json.loads((d / "mlflow_parent.json").read_text()) == parent
    (d / "sweep_config.yaml").unlink()
    with pytest.raises(ConfigError, match=r"results of a sweep \(trials\.parquet\)"):
        check_study_dir(d)                                   # trials.parquet alone is a sweep's too


def test_a_studys_own_folder_is_accepted_to_resume_it(tmp_path):
    d = tmp_path / "study"
    _fake_study(d, [_row(0, "completed")])
    (d / "mlflow_parent.json").write_text("{}")
    assert check_study_dir(d) == d
    assert check_study_dir(tmp_path / "new" / "study") == tmp_path / "new" / "study"   # made later


def _row(seed: int, status: str) -> dict:
    return {"cell_id": f"uniform|none|b3|s{seed}", "method": "uniform", "proxy": "none", "budget": 3.0, "seed": seed,
            "target_top1": 70.0 + seed if status == "completed" else float("nan"), "gbitops_quantized": 0.1,
            "gbitops_total": 1.0, "cell_seconds": 1.0, "status": status,
            "error": "RuntimeError: boom" if status == "failed" else None}


def _fake_study(d: Path, rows: list[dict]) -> None:
    d.mkdir(parents=True)
    cfg = load_study_config(SMOKE).to_dict()
    (d / "study_config.yaml").write_text(yaml.safe_dump({**cfg, "methods": ["uniform"], "proxies": []}))
    write_rows(d, rows)


def test_failed_cells_exit_nonzero_with_a_line_saying_so_and_mlflow_down_only_warns(tmp_path, capsys):
    d = tmp_path / "study"
    _fake_study(d, [_row(0, "completed"), _row(1, "failed")])
    with pytest.warns(RuntimeWarning, match="MLflow logging disabled") as caught:
        rc, err = _study(capsys, "--out", str(d), "--analyze-only", "--tracking-uri", _down_uri())
    assert rc == 1 and "1 of 2 cells" in err and "failed" in err and "without --analyze-only" in err
    assert (d / "results.md").is_file()                      # the page is written all the same
    msg = str(next(w.message for w in caught if "MLflow logging disabled" in str(w.message)))
    assert str(d / "study.parquet") in msg and "sync-mlflow" not in msg and "trials.parquet" not in msg


def test_a_study_run_with_mlflow_down_warns_once_not_again_for_the_page(tmp_path, capsys, monkeypatch):
    """The study's sink warned as it started, then the sink that attaches the page warned the same again."""
    import experiments.generalization_ray as ray_run

    def run_study(cfg, out, **_):                            # the real one's driver side, without Ray or cells
        ray_run.StudySink(cfg.tracking_uri, out, experiment_name=cfg.name, resolved_config=cfg.to_dict()).connect()
        return ray_run.StudySummary(study_dir=out, n_cells=1, n_skipped=1, n_completed=0, n_failed=0,
                                    prepare_seconds=0.0, wall_seconds=0.0)
    monkeypatch.setattr(ray_run, "run_study", run_study)
    d = tmp_path / "study"
    _fake_study(d, [_row(0, "completed")])
    with pytest.warns(RuntimeWarning, match="MLflow logging disabled") as caught:
        rc, err = _study(capsys, "--out", str(d), "--tracking-uri", _down_uri())
    assert rc == 0 and (d / "results.md").is_file()
    assert sum("MLflow logging disabled" in str(w.message) for w in caught) == 1


@pytest.mark.ray          # a real two-cell study (~30 s): Ray, Fashion-MNIST, no proxies
def test_a_study_with_its_mlflow_server_down_completes_every_cell(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "name": "tiny", "target": "fashion_mnist", "budgets": [3.0], "seeds": [0], "methods": ["uniform", "random"],
        "finetune": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 32},
        "target_fp": {"steps": 2, "batch_size": 32, "lr": 0.1}, "proxy_eval_size": 100, "test_size": 100,
        "ard_images": 8, "resources": {"cpu": 1, "gpu": 0}, "max_concurrent_trials": 2}))
    out = tmp_path / "study"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "study", "--config", str(cfg), "--out", str(out),
           "--tracking-uri", _down_uri()]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr and run.stderr.count("MLflow logging disabled") == 1   # not again for the page
    assert "sync-mlflow" not in run.stderr and str(out / "study.parquet") in run.stderr
    import pandas as pd
    df = pd.read_parquet(out / "study.parquet")
    assert sorted(df["cell_id"]) == ["random|none|b3|s0", "uniform|none|b3|s0"]
    assert (df["status"] == "completed").all()


def test_analyze_only_of_a_folder_without_an_mlflow_run_makes_no_store_and_names_a_folder_without_a_study(
        tmp_path, capsys):
    """A copied study folder (docs/study_data) gets its page without an MLflow store appearing in it; --out of a
    folder that holds no study says so (it named --config / --smoke, as if --out were not given)."""
    d = tmp_path / "study"
    _fake_study(d, [_row(0, "completed")])
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    out = capsys.readouterr().out
    assert (d / "results.md").is_file() and "not logged to MLflow" in out
    assert not (d / "mlflow.db").exists() and not (d / "mlartifacts").exists() and not (d / "mlflow_parent.json").exists()
    (tmp_path / "empty").mkdir()
    rc, err = _study(capsys, "--out", str(tmp_path / "empty"), "--analyze-only")
    assert rc == 2 and "holds none (no study_config.yaml)" in err and str(tmp_path / "empty") in err
    (tmp_path / "sweep").mkdir()                      # a sweep folder given by mistake: named as one
    (tmp_path / "sweep" / "sweep_config.yaml").write_text("name: demo\n")
    rc, err = _study(capsys, "--out", str(tmp_path / "sweep"), "--analyze-only")
    assert rc == 2 and "it is a sweep folder: gmpq status or gmpq pareto read it" in " ".join(err.split())
