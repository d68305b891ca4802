"""Review 18 (a): the study page's search line against the study's own settings, the study's Tune run putting
back the signal handlers, a sweep stopped before any trial ended, the sync command without Ray Tune."""
from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.generalization import StudyConfig  # noqa: E402
from orchestrator.cli import main  # noqa: E402

from test_study_audit import TINY  # noqa: E402  (same folder: pytest puts it on sys.path)


def _search(cfg: StudyConfig, tmp_path: Path) -> str:
    from orchestrator.commands.study import _header

    return _header(cfg, tmp_path, "x.yaml", {"runs": []}, pd.DataFrame())["search"]


def test_the_search_line_names_gmpqs_own_p_mode_against_the_studys_fixed_one(tmp_path):
    cfg = StudyConfig.from_dict({**TINY, "methods": ["gmpq", "gmpq_fixed_p3", "target_search", "uniform"],
                                 "search": {**TINY["search"], "p_mode": "fixed"}})
    line = _search(cfg, tmp_path)
    assert "gmpq sets p_mode capacity" in line and "target_search sets p_mode capacity" in line
    assert "gmpq_fixed_p3 sets" not in line              # p_mode fixed and p_fixed 3: the study's own already
    own = StudyConfig.from_dict({**cfg.to_dict(), "target_search": {"p_mode": "fixed"}})
    line = _search(own, tmp_path)                        # its target_search section decides, said at the end
    assert "target_search sets p_mode" not in line and "target_search overrides {'p_mode': 'fixed'}" in line


def test_the_studys_tune_run_puts_back_the_sigint_handler_it_leaves(tmp_path, monkeypatch):
    from ray import tune

    from experiments import generalization_ray as gr
    from orchestrator import ray_env

    left = []

    class Tuner:                                          # what Ray Tune's fit() does to SIGINT
        def __init__(self, *a, **kw):
            pass

        def fit(self):
            left.append(signal.signal(signal.SIGINT, lambda sig, frame: None))

    sink = types.SimpleNamespace(finish=lambda *a: None, parent_run_id=None)
    monkeypatch.setattr(gr, "check_study_data", lambda cfg: None)
    monkeypatch.setattr(gr, "prepare_models", lambda cfg, d, map_fn=None: {})
    monkeypatch.setattr(gr, "StudyCallback", lambda *a, **kw: types.SimpleNamespace(sink=sink, completed=0, failed=0))
    monkeypatch.setattr(ray_env, "ray_session", lambda *a, **kw: contextlib.nullcontext(True))
    monkeypatch.setattr(tune, "Tuner", Tuner)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    before = signal.getsignal(signal.SIGINT)
    try:
        gr.run_study(StudyConfig.from_dict(TINY), tmp_path / "study")
        assert left and signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


def _stopped_sweep(out: Path, with_a_trial: bool):
    from orchestrator.results import CONFIG_FILE, TRIALS_FILE, write_table, rows_to_table

    def run_sweep(cfg, resume=False, progress=True, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / CONFIG_FILE).write_text("name: demo\n")
        if with_a_trial:
            write_table(out / TRIALS_FILE, rows_to_table([{"trial_id": "t1", "status": "completed", "error": None}]))
        raise KeyboardInterrupt
    return run_sweep


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_a_sweep_stopped_before_any_trial_ended_does_not_claim_finished_trials(tmp_path, monkeypatch, capsys,
                                                                              command):
    from orchestrator import final_stage, ray_env, sweep  # noqa: F401 (final_stage: bound the real ray_session)

    monkeypatch.setattr(ray_env, "ray_session", lambda address=None: contextlib.nullcontext(True))
    extra = ["--workers", "auto"] if command == "run" else []
    for with_a_trial, kept in ((False, "no trial had finished yet, so nothing was lost"),
                               (True, "its finished trials are kept ({})")):
        out = tmp_path / f"{command}{with_a_trial}"
        monkeypatch.setattr(sweep, "run_sweep", _stopped_sweep(out, with_a_trial))
        assert main([command, "--preset", "demo", "--out", str(out), "--quiet", *extra]) == 130
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (f"gmpq {command}: the sweep was interrupted; {kept.format(out / 'trials.parquet')}. "
                       f"Continue with: gmpq {command} --out {out} --resume auto")


def test_sync_mlflow_does_not_import_ray_tune_and_the_callback_still_exports_final_metrics():
    code = ("import sys; import orchestrator.sync, orchestrator.commands.sync_mlflow; "
            "print('ray.tune' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from orchestrator import mlflow_callback, mlflow_notes

    assert mlflow_callback.final_metrics is mlflow_notes.final_metrics
    assert mlflow_callback.POLICY_KEYS is mlflow_notes.POLICY_KEYS
    assert mlflow_notes.final_metrics({"proxy_top1": 1.0}, "completed")["proxy_top1"] == 1.0
