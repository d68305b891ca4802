"""``gmpq run`` on a model of the user's own (``model: ./my_cnn.py:build``): Ray Tune trial actors and Ray Train
workers import the file by its absolute path, and the model files read back elsewhere (real Ray, MNIST)."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

from orchestrator.cli import main

TINY = """\
preset: demo
name: own
model: ./nets/my_cnn.py:build
proxy_dataset: mnist5k
target_dataset: mnist5k
n_trials: 2
teacher_epochs: 1
space: {budget_avg_bits: {type: float, low: 3.0, high: 5.0}, proxy_size: [200], search_epochs: 1}
search: {batch_size: 32, max_steps_per_epoch: 2, recalibrate_bn_batches: 1}
transfer: {train_size: 200, test_size: 100, epochs: 1, batch_size: 32, fp_epochs: 1, fp_train_size: 200,
           fp_max_steps_per_epoch: 2, fp_batch_size: 32, max_steps_per_epoch: 2}
finetune: {top_k: 1, workers: 1, epochs: 1, batch_size: 32, max_steps_per_epoch: 2, test_size: 100}
"""


@pytest.mark.ray
@pytest.mark.slow
def test_gmpq_run_on_a_users_model_file(tmp_path, monkeypatch, capsys, user_cnn):
    (tmp_path / "nets").mkdir()
    (tmp_path / "nets" / "my_cnn.py").write_text(user_cnn)
    (tmp_path / "own.yaml").write_text(TINY)
    monkeypatch.chdir(tmp_path)                                  # the config names the file relative to here
    out = tmp_path / "out"
    assert main(["run", "--config", "own.yaml", "--out", str(out), "--quiet",
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    trials = pd.read_parquet(out / "trials.parquet")
    assert (trials["status"] == "completed").all() and len(trials) == 2
    layers = pd.read_parquet(out / "layers.parquet")
    assert set(layers["layer"]) == {"3", "6"}                    # the user's own convs (stem, classifier FP)
    assert (out / "policies.png").is_file()
    saved = (out / "sweep_config.yaml").read_text()
    assert f"model: {tmp_path / 'nets' / 'my_cnn.py'}:build" in saved
    assert list((tmp_path / "cache" / "teachers").glob("build-mnist5k-*.pt"))
    final = pd.read_parquet(out / "final.parquet")
    assert len(final) == 1
    # the model file, read back from another folder and process (the path it records is absolute)
    model = out / final.loc[0, "model_path"]
    code = ("import sys, torch; from gmpq_core.export import load_quantized_model; "
            "m = load_quantized_model(sys.argv[1]).model.eval(); print(tuple(m(torch.zeros(2, 1, 28, 28)).shape))")
    done = subprocess.run([sys.executable, "-c", code, str(model)], cwd="/", capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(2, 10)"
    assert main(["export", str(out)]) == 0
    assert (out / "models" / f"{final.loc[0, 'trial_id']}.int.pt").is_file()


def test_gmpq_sweep_model_flag_overrides_the_preset_and_is_checked_before_ray(tmp_path, monkeypatch, capsys,
                                                                             user_cnn):
    import ray

    from orchestrator.commands.sweep import config_from_args
    from orchestrator.cli import build_parser

    (tmp_path / "my_cnn.py").write_text(user_cnn)
    monkeypatch.chdir(tmp_path)
    args = build_parser("sweep").parse_args(["sweep", "--preset", "demo", "--model", "./my_cnn.py:build"])
    assert config_from_args(args).resolved().model == f"{tmp_path / 'my_cnn.py'}:build"
    assert main(["sweep", "--preset", "demo", "--model", "./my_cnn.py:bulid", "--out", str(tmp_path / "o")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no function 'bulid' (its functions: build)" in err and "Traceback" not in err
    assert not ray.is_initialized() and not (tmp_path / "o").exists()
