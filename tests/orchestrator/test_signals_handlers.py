"""The driver's signal handlers (``ray_env.ctrl_c_signals``): the handlers from before put back after a Ray Tune
run and a Ray session, SIGTERM as Ctrl-C but exit 143 with a line that says it was terminated (Ctrl-C: 130)."""
from __future__ import annotations

import os
import signal
import sys
import time
import types

import pytest

from orchestrator import ray_env
from orchestrator.cli import main


def _stop(by_sigterm: bool) -> KeyboardInterrupt:
    """What a stopped command sees: KeyboardInterrupt (Ctrl-C) or ``ray_env.Terminated`` (SIGTERM)."""
    return ray_env.Terminated() if by_sigterm else KeyboardInterrupt()


def _one_result(config: dict) -> dict:
    return {"x": 1}


@pytest.mark.ray
def test_a_tune_run_leaves_its_sigint_handler_and_the_sweep_puts_back_the_one_before(tmp_path):
    """Ray Tune's fit() leaves a SIGINT handler that only logs (Ctrl-C in a sweep's last steps did nothing); the
    sweep's fit puts Python's back, and the Ray session puts back the SIGTERM handler from before ray.init."""
    import ray
    from ray import cloudpickle, tune

    from orchestrator.ray_env import ray_session
    from orchestrator.ray_env import fit_restoring_handlers

    if ray.is_initialized():                       # a session another test left: this one starts its own
        ray.shutdown()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])     # workers cannot import test modules

    def tuner(name: str):
        return tune.Tuner(_one_result, run_config=tune.RunConfig(name=name, storage_path=str(tmp_path), verbose=0))

    def own_sigterm(sig, frame):                   # what the process had before Ray
        pass
    previous = signal.signal(signal.SIGTERM, own_sigterm)
    try:
        with ray_session(num_cpus=1):
            tuner("raw").fit()
            left = signal.getsignal(signal.SIGINT)
            assert left is not signal.default_int_handler and callable(left)    # Tune's, left behind
            signal.signal(signal.SIGINT, signal.default_int_handler)
            assert fit_restoring_handlers(tuner("sweep")).num_errors == 0
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            with pytest.raises(KeyboardInterrupt):                 # Ctrl-C works again after the trials
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        assert signal.getsignal(signal.SIGTERM) is own_sigterm    # not ray.init's
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_ctrl_c_signals_puts_back_what_a_run_inside_installed_and_sigterm_is_ctrl_c():
    from orchestrator.ray_env import Terminated, ctrl_c_signals, stop_status, terminated

    tune_like, seen = (lambda sig, frame: seen.append(sig)), []
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    with ctrl_c_signals():
        signal.signal(signal.SIGINT, tune_like)                   # a Ray Tune run's handler, left after it
        signal.signal(signal.SIGUSR1, tune_like)
        os.kill(os.getpid(), signal.SIGTERM)                       # handed to it: the run stops gracefully
        time.sleep(0.1)
    assert seen == [signal.SIGINT] and terminated()                # (and the command then exits 143)
    assert {sig: signal.getsignal(sig) for sig in before} == before
    with pytest.raises(Terminated):                                # Python's Ctrl-C in place: Terminated
        with ctrl_c_signals():
            assert not terminated()                                # a new command's SIGTERM: not seen yet
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    assert issubclass(Terminated, KeyboardInterrupt) and (stop_status(True), stop_status(False)) == (143, 130)
    previous = signal.signal(signal.SIGINT, tune_like)
    try:
        with ctrl_c_signals(sigterm=False, python_sigint=True):
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
            assert signal.getsignal(signal.SIGTERM) is before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) is tune_like
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_ends_gmpq_finetune_sweep_with_143_and_says_it_was_terminated(tmp_path, monkeypatch, capsys):
    from orchestrator.commands import finetune

    def fine_tune(args):
        with ray_env.ctrl_c_signals():                                     # what ray_session does
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    monkeypatch.setattr(finetune, "run_sweep_finetune", fine_tune)
    assert main(["finetune", "--sweep", str(tmp_path), "--top-k", "1"]) == 143
    err = capsys.readouterr().err.strip()
    assert err.startswith("gmpq finetune: the fine-tune was terminated (SIGTERM);") and "\n" not in err
    assert f"({tmp_path / 'final.parquet'})" in err
    assert err.endswith(f"Continue with: gmpq finetune --sweep {tmp_path} --top-k 1")


def _sweep_stub(out, *, stop: bool | None = None, summary_changes: dict | None = None):
    """A run_sweep that saved its config, then is stopped (``stop``: by SIGTERM) or returns a summary."""
    from orchestrator.sweep import SweepSummary

    def run_sweep(cfg, resume=False, progress=True, **kw):
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_config.yaml").write_text("name: demo\n")
        if stop is not None:
            raise _stop(stop)
        return SweepSummary(**{"sweep_dir": out, "n_completed": 1, "n_pruned": 0, "n_failed": 0, "wall_seconds": 1.0,
                               "n_unfinished": 1, "n_planned": 3, **(summary_changes or {})})
    return run_sweep


@pytest.mark.parametrize("stop, status, word", [(False, 130, "interrupted"), (True, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_gmpq_sweep_stopped_outside_its_trials_says_what_is_kept_and_how_to_continue(tmp_path, monkeypatch, capsys,
                                                                                    stop, status, word):
    from orchestrator import sweep

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep, "run_sweep", _sweep_stub(out, stop=stop))
    assert main(["sweep", "--preset", "demo", "--out", str(out), "--quiet"]) == status
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"gmpq sweep: the sweep was {word}; no trial had finished yet, so nothing was lost. "
                   f"Continue with: gmpq sweep --out {out} --resume auto")          # no Tune state yet: auto


def test_gmpq_sweep_stopped_by_sigterm_in_its_trials_exits_143_and_says_terminated(tmp_path, monkeypatch, capsys):
    from orchestrator import sweep

    out = tmp_path / "sweep"
    monkeypatch.setattr(sweep, "run_sweep", _sweep_stub(out, summary_changes={"terminated": True}))
    assert main(["sweep", "--preset", "demo", "--out", str(out), "--quiet"]) == 143
    text = capsys.readouterr().out
    assert (f"The sweep was terminated (SIGTERM): 1 of 3 trials finished; 2 still to run (1 stopped midway: it "
            f"starts again). Finished trials are kept. Continue with: gmpq sweep --out {out} --resume") in text


@pytest.mark.parametrize("stop, status, word", [(False, 130, "interrupted"), (True, 143, "terminated (SIGTERM)")],
                         ids=["ctrl-c", "sigterm"])
def test_gmpq_run_stopped_in_its_sweep_outside_the_trials_says_what_is_kept(tmp_path, monkeypatch, capsys,
                                                                           stop, status, word):
    import contextlib

    from orchestrator import final_stage, ray_env, sweep  # noqa: F401 (final_stage: bound the real ray_session)

    out = tmp_path / "run"
    monkeypatch.setattr(ray_env, "ray_session", lambda address=None: contextlib.nullcontext(True))
    monkeypatch.setattr(sweep, "run_sweep", _sweep_stub(out, stop=stop))
    assert main(["run", "--preset", "demo", "--out", str(out), "--workers", "auto", "--quiet"]) == status
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"gmpq run: the sweep was {word}; no trial had finished yet, so nothing was lost. "
                   f"Continue with: gmpq run --out {out} --resume auto")


def test_gmpq_run_terminated_in_its_final_stage_exits_143(tmp_path, monkeypatch, capsys):
    import contextlib

    import pandas as pd

    from orchestrator import ray_env, sweep
    from orchestrator.commands import _finetune_sweep, pareto

    from orchestrator.results import trial_row, write_results

    out = tmp_path / "run"
    summary = types.SimpleNamespace(rows=[], n_completed=2, n_pruned=0, n_failed=0, wall_seconds=1.0,
                                    sweep_dir=out, interrupted=False)
    write_results(out, [trial_row(trial_id=f"t{i}", config={"budget_avg_bits": 3.0}, status="completed",
                                  last_result={"transfer_top1": 70.0 + i, "proxy_top1": 50.0, "bitops": 4e8,
                                               "gbitops": 0.4}) for i in (1, 2)], [])   # what the sweep wrote

    def stage3(sweep_dir, args, *, say=None):
        with ray_env.ctrl_c_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
    monkeypatch.setattr(ray_env, "ray_session", lambda address=None: contextlib.nullcontext(True))
    monkeypatch.setattr(sweep, "run_sweep", lambda cfg, resume, progress, **kw: summary)
    monkeypatch.setattr(pareto, "pareto_stage", lambda *a: pd.DataFrame({"selected": [True]}))
    monkeypatch.setattr(_finetune_sweep, "finetune_stage", stage3)
    assert main(["run", "--preset", "demo", "--out", str(out), "--workers", "auto", "--quiet"]) == 143
    err = capsys.readouterr().err
    assert "gmpq run: the final fine-tune was terminated (SIGTERM); the sweep, its Pareto selection" in err
    assert err.rstrip().endswith(f"Continue with: gmpq run --out {out} --resume")
    assert not (out / "driver.json").exists()
