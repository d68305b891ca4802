"""CLI: ``gmpq pareto``, ``gmpq run`` (config errors before Ray; end to end), the finetune --sweep options."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest

from orchestrator.cli import main
from orchestrator.commands._finetune_sweep import add_sweep_args, format_final_table
from orchestrator.results import TRIALS_FILE, trial_row, write_results


def hand_made_sweep(d: Path) -> None:
    rows = [trial_row(trial_id=t, config={"budget_avg_bits": b}, status=s, last_result=r) for t, b, s, r in [
        ("t1", 3.0, "completed", {"transfer_top1": 70.0, "bitops": 2_000_000, "budget_avg_bits": 3.0}),
        ("t2", 4.0, "completed", {"transfer_top1": 80.0, "bitops": 4_000_000, "budget_avg_bits": 4.0}),
        ("t3", 4.0, "completed", {"transfer_top1": 75.0, "bitops": 5_000_000, "budget_avg_bits": 4.0}),
        ("t4", 2.6, "pruned", {"proxy_top1": 12.0, "expected_gbitops": 0.001})]]
    write_results(d, rows, [])
    (d / "sweep_config.yaml").write_text("name: hand\nbudget_buckets: [3.25, 4.25]\nfinetune: {top_k: 2}\n")


def test_gmpq_pareto_prints_the_table_and_writes_the_files(tmp_path, capsys):
    hand_made_sweep(tmp_path)
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "4 trials (3 completed, 1 pruned): 2 non-dominated, 2 selected" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("*")]
    assert [ln.split()[1] for ln in lines] == ["t1", "t2"]
    front = pd.read_parquet(tmp_path / "pareto.parquet")
    assert front["trial_id"].tolist() == ["t1", "t2"] and front["selected"].all()
    assert (tmp_path / "pareto.png").exists()
    assert main(["pareto", "--sweep", str(tmp_path), "--top-k", "1", "--no-mlflow"]) == 0
    assert pd.read_parquet(tmp_path / "pareto.parquet")["selected"].sum() == 1


def test_gmpq_pareto_on_a_damaged_table_exits_2_naming_it(tmp_path, capsys):
    hand_made_sweep(tmp_path)
    data = (tmp_path / TRIALS_FILE).read_bytes()
    (tmp_path / TRIALS_FILE).write_bytes(data[:100])
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "trials.parquet" in err and "corrupted" in err and "Traceback" not in err


def test_gmpq_run_rejects_bad_configs_before_ray_starts(tmp_path, capsys):
    import ray
    assert main(["run", "--preset", "no_such_preset", "--out", str(tmp_path / "o")]) == 2
    assert "no_such_preset" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: demo\nn_trials: [1,\n")
    assert main(["run", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "line" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_gmpq_run_checks_the_budgets_and_data_before_ray_starts(tmp_path, capsys, monkeypatch):
    # the sweep stage's checks (model, data, budget range against the candidates) ran inside gmpq run's Ray session
    import orchestrator.ray_env as ray_env

    started = []
    real = ray_env.init_ray
    monkeypatch.setattr(ray_env, "init_ray", lambda *a, **k: started.append(a) or real(*a, **k))   # a spy: calls Ray
    cfg = tmp_path / "c.yaml"
    cfg.write_text("preset: demo\nspace: {budget_avg_bits: {type: float, low: 1.0, high: 3.0}}\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "budget_avg_bits 1.0..3.0 is partly outside the feasible range" in " ".join(capsys.readouterr().err.split())
    assert started == [] and not (tmp_path / "o").exists()


def test_finetune_sweep_args_reuse_existing_options():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=1)          # as the single-policy finetune parser has
    p.add_argument("--lr", type=float, default=0.01)
    add_sweep_args(p)
    a = p.parse_args(["--sweep", "D", "--top-k", "2", "--workers", "3", "--epochs", "4", "--test-size", "50"])
    assert (a.sweep, a.top_k, a.workers, a.epochs, a.test_size, a.max_steps_per_epoch) == ("D", 2, 3, 4, 50, None)
    from orchestrator.commands.finetune import add_single_args
    combined = argparse.ArgumentParser()                      # the real single-policy parser + sweep mode
    add_single_args(combined)
    add_sweep_args(combined)
    assert combined.parse_args(["--sweep", "D", "--workers", "2"]).workers == 2
    fresh = argparse.ArgumentParser()
    add_sweep_args(fresh)
    assert fresh.parse_args(["--sweep", "D"]).epochs is None


def test_final_table_is_aligned():
    df = pd.DataFrame([{"trial_id": "abc", "transfer_top1": 70.0, "final_top1": 88.123, "final_top5": 99.0,
                        "gbitops": 0.25, "epochs": 2, "workers": 2, "seconds": 12.3}])
    head, rule, row = format_final_table(df).splitlines()
    assert head.index("final_top1") + len("final_top1") == row.index("88.12") + len("88.12")


TINY = """\
preset: demo
name: tiny
proxy_dataset: mnist5k
target_dataset: mnist5k
n_trials: 2
teacher_epochs: 1
pruner: {name: median, kwargs: {n_startup_trials: 5, n_warmup_steps: 5}}
space:
  budget_avg_bits: {type: float, low: 2.5, high: 5.0}
  proxy_size: [200]
  eta: {type: float, low: 1, high: 100, log: true}
  lam: {type: float, low: 1e-5, high: 1e-3, log: true}
  p_mode: [capacity, fixed]
  kappa: {type: float, low: 8, high: 48}
  p_fixed: 3.0
  lr_arch: {type: float, low: 1e-3, high: 1e-1, log: true}
  search_epochs: 1
search: {batch_size: 32, max_steps_per_epoch: 2, recalibrate_bn_batches: 1}
transfer: {train_size: 200, test_size: 100, epochs: 1, batch_size: 32, fp_epochs: 1, fp_train_size: 200,
           fp_max_steps_per_epoch: 2, fp_batch_size: 32, max_steps_per_epoch: 2}
finetune: {top_k: 1, workers: 2, epochs: 1, batch_size: 32, max_steps_per_epoch: 2}
"""


@pytest.mark.ray
@pytest.mark.slow
def test_gmpq_run_end_to_end_then_resume_redoes_nothing(tmp_path, capsys):
    import mlflow
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert f"mlflow ui --backend-store-uri sqlite:///{out.resolve() / 'mlflow.db'}" in text
    assert "Final fine-tune" in text and str(out.resolve() / "pareto.png") in text
    for f in ("trials.parquet", "layers.parquet", "pareto.parquet", "final.parquet", "pareto.png", "final.png",
              "mlflow.db", "optuna.db"):
        assert (out / f).exists(), f
    trials = pd.read_parquet(out / "trials.parquet")
    final = pd.read_parquet(out / "final.parquet")
    assert len(trials) == 2 and len(final) == 1 and final.loc[0, "epochs"] == 1
    assert json.loads(final.loc[0, "policy_json"])["layers"]
    from gmpq_core.export import load_quantized_model          # the fine-tuned model, loadable from its file
    assert "Models: " in text and final.loc[0, "model_path"] == f"models/{final.loc[0, 'trial_id']}.pt"
    loaded = load_quantized_model(out / final.loc[0, "model_path"])
    assert loaded.results["top1"] == final.loc[0, "final_top1"] and loaded.policy.to_json() == final.loc[0, "policy_json"]
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["tiny"])
    assert runs["tags.gmpq.role"].value_counts().to_dict() == {"trial": 2, "finetune": 1, "sweep": 1}
    parent = runs[runs["tags.gmpq.role"] == "sweep"]
    assert parent["status"].item() == "FINISHED"
    assert set(runs.loc[runs["tags.gmpq.role"] != "sweep", "tags.mlflow.parentRunId"]) == {parent["run_id"].item()}
    # Resume: nothing is rerun (same trials, same fine-tune row, no new MLflow runs)
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet", "--resume"]) == 0
    assert pd.read_parquet(out / "final.parquet")["seconds"].tolist() == final["seconds"].tolist()
    assert len(mlflow.search_runs(experiment_names=["tiny"])) == 4


def test_gmpq_run_resume_alone_reads_the_folders_saved_config(tmp_path):
    """`gmpq run --out DIR --resume` continues with the config the run started with (it used to demand
    --preset and then refuse because the preset differed from the saved, overridden config)."""
    from orchestrator.cli import build_parser
    from orchestrator.commands.sweep import config_from_args
    from orchestrator.sweep_config import load_sweep_config, save_resolved_config

    started = load_sweep_config(None, preset="demo", overrides={"out_dir": str(tmp_path), "n_trials": 2,
                                                                "finetune.top_k": 1, "space.search_epochs": 1})
    save_resolved_config(started)
    args = build_parser("run").parse_args(["run", "--out", str(tmp_path), "--resume"])
    finetune = {"finetune.top_k": args.top_k, "finetune.workers": args.workers}
    again = config_from_args(args, finetune)
    assert again.resolved().to_dict() == started.resolved().to_dict()
    overridden = config_from_args(build_parser("run").parse_args(["run", "--out", str(tmp_path), "--resume",
                                                                  "--top-k", "2"]), {"finetune.top_k": 2})
    assert overridden.finetune.top_k == 2          # a flag given with --resume still applies (and is checked)


@pytest.mark.parametrize("argv, match", [
    (["--workers", "-1"], r"--workers must be a whole number >= 1, but got --workers -1"),
    (["--workers", "0"], r"--workers .* got --workers 0"),          # was taken as "unset": 2 workers
    (["--epochs", "0"], r"--epochs .* got --epochs 0"),
    (["--max-concurrent", "0"], r"--max-concurrent .* got --max-concurrent 0"),
    (["--lr", "0"], r"--lr must be a positive number"),
    (["--policy", "/nonexist.json"], r"does not use --policy"),     # was ignored silently
    (["--uniform", "4", "4", "--distill"], r"does not use --distill, --uniform"),
    (["--out", "elsewhere"], r"does not use --out"),
])
def test_finetune_sweep_mode_refuses_bad_or_unused_options_before_ray(tmp_path, capsys, argv, match):
    import re

    import ray

    hand_made_sweep(tmp_path)
    assert main(["finetune", "--sweep", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert re.search(match, " ".join(err.split())), err
    assert not ray.is_initialized() and not (tmp_path / "final.parquet").exists()


def test_a_second_sweep_of_another_name_is_refused_in_a_folder_with_results(tmp_path, capsys):
    """The refusal of an existing sweep used to suggest '--name': in the same --out that mixed two sweeps'
    trials in one trials.parquet and under one MLflow parent run."""
    import ray

    hand_made_sweep(tmp_path)                                    # sweep 'hand' with its results
    assert main(["sweep", "--preset", "demo", "--out", str(tmp_path), "--name", "other"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds the results of sweep 'hand'" in err and "--out a new folder" in err, err
    assert not ray.is_initialized() and len(pd.read_parquet(tmp_path / TRIALS_FILE)) == 4
    assert "name: hand" in (tmp_path / "sweep_config.yaml").read_text()   # not overwritten


def test_gmpq_pareto_says_when_the_front_is_smaller_than_top_k(tmp_path, capsys):
    hand_made_sweep(tmp_path)                                  # 2 policies on the front
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow", "--top-k", "3"]) == 0
    assert "(2 selected of the 3 asked for (top-k): only 2 on the front." in capsys.readouterr().out
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow", "--top-k", "2"]) == 0
    assert "asked for" not in capsys.readouterr().out


@pytest.mark.parametrize("knob", [{"workers": 0}, {"top_k": -1}, {"epochs": True}, {"batch_size": 2.5},
                                  {"max_concurrent": 0}])
def test_finetune_selected_checks_its_counts_as_the_command_line_does(tmp_path, knob):
    """The API (what ``gmpq run`` calls) refuses a bad count in the flag's words, before Ray starts."""
    import ray

    from gmpq_core.errors import ConfigError
    from orchestrator.final_stage import finetune_selected

    hand_made_sweep(tmp_path)
    (name, value), = knob.items()
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError, match=f"{flag} must be a whole number >= 1, but got {flag} {value!r}"):
        finetune_selected(tmp_path, **knob)
    assert not ray.is_initialized()


@pytest.mark.ray
def test_gmpq_run_refuses_a_final_stage_the_cluster_cannot_run_before_the_sweep(tmp_path, capsys):
    """finetune.workers beyond the cluster's CPUs used to fail at stage 3, after the whole sweep."""
    import yaml

    from orchestrator.ray_env import local_cpu_count

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "demo", "finetune": {"workers": local_cpu_count() + 1}}))
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"workers={local_cpu_count() + 1} needs" in err and "use --workers" in err
    assert not (tmp_path / "o" / "trials.parquet").exists() and not (tmp_path / "o" / "trial_events.jsonl").exists()


def test_gmpq_pareto_on_a_file_says_it_is_not_a_sweep_folder(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("preset: demo\n")
    assert main(["pareto", "--sweep", str(cfg), "--no-mlflow"]) == 2
    assert "is a file, not a sweep folder" in " ".join(capsys.readouterr().err.split())
