"""What a resume knows of a sweep that grows (``orchestrator.sweep_grow`` / ``sweep_resume``): the count Ray Tune saved
(a grown resume stopped before Tune started: the next plain resume still grows it), the lines that say so (how many are
new; whether the sampler is guided), a Tune restore that failed, a resume whose Tune state is gone, an unreachable
storage. Real Ray search-generator state and Optuna storage; the real sweeps: test_sweep_grow_ray.py."""
from __future__ import annotations

import os
from dataclasses import replace

import optuna
import pytest
from ray.tune.search import ConcurrencyLimiter, SearchGenerator

from gmpq_core.errors import ConfigError
from orchestrator.results import trial_row, write_results
from orchestrator.sweep_config import load_sweep_config, save_resolved_config
from orchestrator.sweep_grow import grown_text, restore_failed, tune_saved_count
from orchestrator.sweep_resume import experiment_path, grown_from
from orchestrator.sweep_sections import SamplerConfig
from test_sweep_grow import _Fixed  # same folder (pytest puts it on sys.path)


def _demo(tmp_path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), **overrides})


def _tune_state(cfg, n: int, session: str = "2026-01-01_00-00-00") -> None:
    """The searcher state Ray Tune saves in the sweep's experiment folder for a sweep of ``n`` trials."""
    folder = experiment_path(cfg.resolved())
    os.makedirs(folder, exist_ok=True)
    gen = SearchGenerator(ConcurrencyLimiter(_Fixed(), max_concurrent=2))
    gen.set_state({"counter": n, "total_samples": n, "finished": False, "experiment": None})
    gen.save_to_dir(folder, session_str=session)


def test_a_plain_resume_after_a_grown_one_stopped_before_tune_started_still_grows(tmp_path):
    """grow 2 -> 3 saved sweep_config.yaml's 3, then stopped while Ray started: Tune still holds 2, and a plain
    --resume (the config's 3) grows the sweep from 2 (it used to run the third trial as if nothing grew)."""
    save_resolved_config(_demo(tmp_path, n_trials=3))         # what the stopped grown resume saved
    _tune_state(_demo(tmp_path), 2, "2026-01-01_00-00-00")
    cfg = _demo(tmp_path, n_trials=3).resolved()
    assert tune_saved_count(cfg) == 2 and grown_from(cfg) == 2
    _tune_state(_demo(tmp_path), 3, "2026-01-02_00-00-00")    # Tune saved the new count (the newest file counts)
    assert tune_saved_count(cfg) == 3 and grown_from(cfg) is None
    assert grown_from(_demo(tmp_path, n_trials=5).resolved()) == 3          # raised again: from the saved 3


def test_a_plain_resume_through_ray_client_of_a_growth_tune_never_ran_is_refused_before_ray_starts(tmp_path):
    """The growth Tune's saved count shows is checked as a grown resume is: through Ray Client (Tune restores the
    sweep on the cluster, its count out of reach) refused now, nothing written; it used to end in cannot_grow's
    'this Ray version' once Tune had restored it."""
    ray_client = "ray://head:10001"
    save_resolved_config(_demo(tmp_path, n_trials=3, address=ray_client))     # what the stopped grown resume saved
    _tune_state(_demo(tmp_path), 2)
    saved = (tmp_path / "sweep_config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        grown_from(_demo(tmp_path, n_trials=3, address=ray_client).resolved())
    said = " ".join(str(e.value).split())
    assert (f"The sweep in '{tmp_path}' grows from 2 to 3 trials (n_trials 3 in its sweep_config.yaml, saved by a "
            "grown resume that stopped before Ray Tune ran it; Tune's saved state holds 2), but through Ray Client "
            f"({ray_client})") in said
    assert "(--address auto) to grow it" in said and f"set n_trials back to 2 in {tmp_path / 'sweep_config.yaml'}" \
        in said and "this Ray" not in said
    assert (tmp_path / "sweep_config.yaml").read_text() == saved
    assert grown_from(_demo(tmp_path, n_trials=3, address="auto").resolved()) == 2       # from the head node: grows


def test_the_growth_line_says_how_many_are_new_and_whether_the_sampler_is_guided(tmp_path):
    demo = _demo(tmp_path, n_trials=3)                         # demo: TPE's first 10 trials are random
    said = grown_text(demo, 2, 2)
    assert said.startswith("the sweep grows from 2 to 3 trials (1 new; 2 ended so far) in the same Optuna study, but "
                           "its sampler draws all 3 at random (its first 10 trials are random: n_startup_trials=10)")
    assert "told" not in said and "learning" not in said
    tpe = replace(demo, sampler=SamplerConfig(name="tpe", kwargs={}))          # Optuna's default: warmup_text's words
    assert grown_text(tpe, 2, 2).endswith("in the same Optuna study, but the TPESampler's first 10 trials are random "
                                          "(n_startup_trials=10) and this sweep has 3: every trial is drawn at random, "
                                          "none guided by earlier ones")
    guided = replace(demo, sampler=SamplerConfig(name="tpe", kwargs={"n_startup_trials": 2}))
    assert grown_text(guided, 2, 2).endswith("in the same Optuna study: its sampler is guided by the trials that ended")
    plain = replace(demo, sampler=SamplerConfig(name="random", kwargs={}))
    assert grown_text(plain, 2, "?").endswith("(1 new; ? ended so far) in the same Optuna study")


def test_the_growth_line_takes_the_samplers_fact_whatever_its_fix_says(tmp_path, monkeypatch):
    """sampling.warmup gives its fact and its fix apart: the growth line says the fact, without parsing the
    sentence warmup_text makes of both (it cut it at the fix's first words)."""
    from orchestrator import sampling

    tpe = replace(_demo(tmp_path, n_trials=3), sampler=SamplerConfig(name="tpe", kwargs={}))
    said = sampling.warmup("tpe", {}, 3)
    assert sampling.warmup_text("tpe", {}, 3) == f"{said.fact}. {said.fix}"
    assert grown_text(tpe, 2, 2).endswith(f"in the same Optuna study, but {said.fact}")
    monkeypatch.setattr(sampling, "warmup", lambda *a: sampling.Warmup(fact="every trial is random", fix="Reworded."))
    assert grown_text(tpe, 2, 2).endswith("in the same Optuna study, but every trial is random")


def test_the_start_line_of_a_grown_resume_says_how_many_are_new(tmp_path):
    from orchestrator.sweep_join import start_text

    cfg = _demo(tmp_path, n_trials=3, max_concurrent_trials=2).resolved()
    assert start_text(cfg, 2, 2).startswith("3 trials (1 new), 2 at a time")
    assert start_text(cfg, 2).startswith("3 trials, 2 at a time")


def test_the_n_trials_help_says_a_larger_count_runs_more():
    import argparse

    from orchestrator.commands.sweep import add_sweep_args

    p = argparse.ArgumentParser()
    add_sweep_args(p)
    text = " ".join(p.format_help().split())
    assert "with --resume: a larger count runs more trials (never fewer)" in text


def test_a_failed_tune_restore_names_the_newest_state_and_puts_the_count_back(tmp_path):
    """Tune restores the newest experiment_state-*.json; a damaged one: move it aside, the one before is restored."""
    save_resolved_config(_demo(tmp_path, n_trials=3))         # a grown resume saved 3 as it was accepted
    cfg = _demo(tmp_path, n_trials=3).resolved()
    exp = experiment_path(cfg)
    os.makedirs(exp)
    for stamp in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        open(f"{exp}/experiment_state-{stamp}.json", "w").write("{}")
    e = restore_failed(cfg, 2)
    assert isinstance(e, ConfigError)
    said = " ".join(str(e).split())
    assert "Ray Tune could not restore the sweep in" in said and "nothing was run" in said
    assert (f"move it aside (mv {exp}/experiment_state-2026-01-02_00-00-00.json {exp}/experiment_state-2026-01-02_00-"
            "00-00.json.bad) and resume again, so Tune restores the one before it "
            "(experiment_state-2026-01-01_00-00-00.json)") in said
    assert load_sweep_config(tmp_path / "sweep_config.yaml").n_trials == 2          # the count Tune holds


def test_a_resume_whose_tune_state_is_gone_says_nothing_to_resume(tmp_path):
    """ray_results/ deleted: the resume said a new sweep would join the study's trials (shared_study's words)."""
    from orchestrator.sweep import check_sweep

    cfg = _demo(tmp_path, n_trials=3, cache_dir=str(tmp_path / "cache"))
    save_resolved_config(cfg)
    write_results(tmp_path, [trial_row(trial_id="t0", config={"budget_avg_bits": 3.0}, status="completed",
                                       last_result={"transfer_top1": 70.0})], [])
    study = optuna.create_study(storage=cfg.resolved().optuna_storage, study_name=cfg.name,
                                directions=["maximize", "minimize"])
    study.tell(study.ask(), [50.0, 0.3])
    with pytest.raises(ConfigError) as e:
        check_sweep(load_sweep_config(tmp_path / "sweep_config.yaml"), True)
    said = " ".join(str(e.value).split())
    assert said.startswith("Nothing to resume: no Tune experiment state in") and "join" not in said


def test_an_unreachable_tune_storage_is_not_said_to_be_gone(tmp_path, monkeypatch):
    from orchestrator import shared_study, sweep_resume

    assert shared_study.state_folder_exists("nosuchfs://bucket/sweeps/x") is None
    assert shared_study.state_folder_exists(str(tmp_path / "none")) is False
    cfg = _demo(tmp_path / "sweep", storage_path="nosuchfs://bucket/sweeps", cache_dir=str(tmp_path / "cache"))
    save_resolved_config(cfg)
    study = optuna.create_study(storage=cfg.resolved().optuna_storage, study_name=cfg.name,
                                directions=["maximize", "minimize"])
    study.tell(study.ask(), [50.0, 0.3])
    # (Tune's can_restore raises for this URI before the check gets there: here it answers as S3 might, "no state")
    monkeypatch.setattr(sweep_resume, "holds_sweep_state", lambda cfg: False)
    with pytest.raises(ConfigError) as e:
        shared_study.check_study_free(cfg)
    said = " ".join(str(e.value).split())
    assert "could not be reached" in said and "is gone" not in said
