"""The final stage with Ray Train: real TorchTrainer, CPU workers (gloo), checkpoint per epoch, resume,
policies side by side (its bookkeeping without Ray: test_final_stage.py)."""
from __future__ import annotations

import json

import pytest
import torch

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_finetune_checkpoints_each_epoch_and_resumes_without_redoing(tmp_path):
    import mlflow
    import ray

    from orchestrator.ray_env import init_ray
    from orchestrator.final_stage import FINAL_PNG, finetune_selected, read_final
    from orchestrator.train_stage import STATE_FILE
    from gmpq_core.fileio import load_checkpoint

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    started = init_ray(num_cpus=2)
    try:
        knobs = dict(max_steps_per_epoch=2, test_size=100, batch_size=32)
        first = finetune_selected(sweep, epochs=1, workers=2, **knobs)
        assert first["epochs"].tolist() == [1] and first["resumed_from_epoch"].tolist() == [0]
        assert first["workers"].tolist() == [2] and first["train_images"].tolist() == [4000]
        assert first["images_per_epoch"].tolist() == [2 * 16 * 2]     # max_steps_per_epoch x per-worker batch x workers
        assert json.loads(first.loc[0, "recipe_json"])["nesterov"] is False      # METHOD.md 6: plain momentum
        ckpts = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        assert len(ckpts) == 1
        e1 = load_checkpoint(ckpts[0] / STATE_FILE)["history"]
        # the fine-tuned model, one file: rebuilt alone, it scores what the stage measured on the same test slice
        from gmpq_core.data import load_dataset, make_loader, proxy
        from gmpq_core.export import load_quantized_model
        from gmpq_core.train import evaluate
        assert first.loc[0, "model_path"] == "models/t1.pt"                   # relative: the folder may move
        model_file = sweep / "models" / "t1.pt"
        loaded = load_quantized_model(model_file)
        bundle = load_dataset("mnist5k")
        test = make_loader(proxy(bundle.test, 100, seed=0), bundle.info, batch_size=256, train=False)
        assert evaluate(loaded.model, test)["top1"] == pytest.approx(first.loc[0, "final_top1"])
        assert loaded.preprocess["mean"] == list(bundle.info.mean) and loaded.preprocess["image_size"] == bundle.info.image_size
        assert loaded.results["top1"] == pytest.approx(first.loc[0, "final_top1"]) and loaded.arch["model"] == "resnet20"
        # Rerun with more epochs: resumes after epoch 1 (no retraining of epoch 1)
        second = finetune_selected(sweep, epochs=2, workers=2, **knobs)
        assert second["epochs"].tolist() == [2] and second["resumed_from_epoch"].tolist() == [1]
        (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        hist = load_checkpoint(ckpt / STATE_FILE)["history"]
        assert [h["epoch"] for h in hist] == [1, 2]
        assert hist[0] == e1[0] and hist[1]["resumed_from_epoch"] == 1
        assert hist[1]["lr"] == pytest.approx(0.0, abs=1e-12)      # the cosine ends at 0 after the last step
        # A third call with the same epochs finds the policy done and runs nothing; a missing model file (a
        # policy fine-tuned before models were exported) is written from the Ray Train checkpoint
        model_file.unlink()
        third = finetune_selected(sweep, epochs=2, workers=2, **knobs)
        assert third["seconds"].tolist() == second["seconds"].tolist() and model_file.is_file()
        assert read_final(sweep).loc[0, "model_path"] == "models/t1.pt"
        saved = load_checkpoint(ckpt / STATE_FILE)["model"]
        assert all(torch.equal(v, saved[k]) for k, v in load_quantized_model(model_file).model.state_dict().items())
        # Other settings (lr) are not "already fine-tuned" and do not resume the old run: a fresh 2-epoch run
        fourth = finetune_selected(sweep, epochs=2, workers=2, lr=0.05, **knobs)
        assert fourth["resumed_from_epoch"].tolist() == [0] and fourth["seconds"].tolist() != second["seconds"].tolist()
        assert json.loads(fourth.loc[0, "recipe_json"])["lr"] == 0.05
        (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
        assert [h["resumed_from_epoch"] for h in load_checkpoint(ckpt / STATE_FILE)["history"]] == [0, 0]
        # fewer epochs than that run: refused before anything runs (it used to train nothing and report 2)
        from gmpq_core.errors import ConfigError
        with pytest.raises(ConfigError, match="--epochs 1 is fewer"):
            finetune_selected(sweep, epochs=1, workers=2, lr=0.05, **knobs)
    finally:
        if started:
            ray.shutdown()
    final = read_final(sweep)
    assert len(final) == 1 and 0.0 <= final.loc[0, "final_top1"] <= 100.0
    assert final.loc[0, "bitops"] > 0 and json.loads(final.loc[0, "policy_json"])["layers"]
    assert (sweep / FINAL_PNG).stat().st_size > 5000
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    ft = runs[runs["tags.gmpq.role"] == "finetune"]                          # one run per recipe: lr 0.01, 0.05
    assert sorted(ft["params.recipe.lr"]) == ["0.01", "0.05"]
    assert sorted(ft["tags.mlflow.runName"]) == ["finetune-t1", "finetune-t1 (lr=0.05)"]
    ft = ft[ft["params.recipe.lr"] == "0.05"]
    assert ft["metrics.final_top1"].item() == pytest.approx(final.loc[0, "final_top1"])
    artifacts = mlflow.MlflowClient().list_artifacts(ft["run_id"].item(), "model")
    assert [a.path for a in artifacts] == ["model/t1.pt"]                      # the fine-tuned model, loadable
    parent = runs[runs["tags.gmpq.role"] == "sweep"]["run_id"].item()
    assert ft["tags.mlflow.parentRunId"].item() == parent


@pytest.mark.ray
@pytest.mark.slow
def test_a_bf16_sweep_fine_tunes_in_bf16_on_two_ddp_workers_and_says_so(tmp_path):
    """precision: bf16 reaches the Ray Train workers (CPU autocast, channels_last, DDP over gloo) and the model
    file."""
    import ray

    from gmpq_core.export import load_quantized_model
    from orchestrator.final_stage import finetune_selected, read_final
    from orchestrator.pareto import write_pareto
    from orchestrator.ray_env import init_ray

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((4, 4),), precision="bf16")
    write_pareto(sweep)
    started = init_ray(num_cpus=2)
    try:
        finetune_selected(sweep, epochs=1, workers=2, max_steps_per_epoch=3, test_size=200, batch_size=32)
    finally:
        if started:
            ray.shutdown()
    final = read_final(sweep).set_index("trial_id")
    assert list(final.index) == ["t1"] and int(final.loc["t1", "workers"]) == 2
    assert 0.0 <= float(final.loc["t1", "final_top1"]) <= 100.0       # (a 2-step FP model: near chance)
    q = load_quantized_model(sweep / "models" / "t1.pt")
    assert q.results["precision"] == "bf16" and q.results["top1"] == pytest.approx(float(final.loc["t1", "final_top1"]))


@pytest.mark.ray
@pytest.mark.slow
def test_policies_fine_tune_side_by_side_and_a_failing_one_keeps_the_others_results(tmp_path):
    import mlflow
    import pandas as pd
    import ray

    from gmpq_core.errors import PolicyMismatchError
    from orchestrator.pareto import read_pareto, write_pareto
    from orchestrator.ray_env import init_ray
    from orchestrator.final_stage import finetune_selected, read_final

    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4), (6, 6)), broken="t1")
    write_pareto(sweep)
    assert read_pareto(sweep)["selected"].sum() == 3
    said: list[str] = []
    started = init_ray(num_cpus=2)
    try:
        # t1's policy does not fit the model: the worker's error comes back as one paragraph naming it
        with pytest.raises(PolicyMismatchError, match="policy t1 failed: .*layer9.0.conv1"):
            finetune_selected(sweep, epochs=1, workers=1, max_steps_per_epoch=2, test_size=100, batch_size=32,
                              say=said.append)
    finally:
        if started:
            ray.shutdown()
    assert any("3 policies 2 at a time, 1 worker(s) each" in m for m in said)
    final = read_final(sweep).set_index("trial_id")
    assert sorted(final.index) == ["t2", "t3"] and (final["workers"] == 1).all()      # t3 ran after t1 failed
    assert (sweep / "models" / "t2.pt").is_file() and (sweep / "models" / "t3.pt").is_file()
    # side by side: each run's window (its end minus its seconds) overlaps the other's
    end = pd.to_datetime(final["finished_at"]).map(lambda t: t.timestamp())
    start = end - final["seconds"]
    assert start["t3"] < end["t2"] and start["t2"] < end["t3"]
    mlflow.set_tracking_uri(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["ft"])
    assert sorted(runs[runs["tags.gmpq.role"] == "finetune"]["tags.mlflow.runName"]) == ["finetune-t2", "finetune-t3"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_storage_uri_gets_the_fine_tunes_ray_train_runs_and_the_sweep_folder_their_progress(tmp_path, monkeypatch):
    """The sweep's storage_path as a URI (here file://; s3:// or gs:// on a cluster) stays a URI for Ray Train
    (it became a local folder named 'file:' in the working directory)."""
    import ray
    import yaml

    from orchestrator.final_stage import finetune_selected
    from orchestrator.ray_env import init_ray

    sweep, remote, cwd = tmp_path / "sweep", tmp_path / "remote", tmp_path / "cwd"
    make_sweep(sweep)
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    cfg["storage_path"] = remote.as_uri()
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    started = init_ray(num_cpus=2)
    try:
        final = finetune_selected(sweep, epochs=1, workers=1, max_steps_per_epoch=2, test_size=100, batch_size=32)
    finally:
        if started:
            ray.shutdown()
    assert final["epochs"].tolist() == [1] and (sweep / "models" / "t1.pt").is_file()
    assert list((remote / "finetune-t1").glob("checkpoint_*"))                 # Ray Train's run, under the URI
    assert json.loads((sweep / "ray_results" / "finetune-t1.progress.json").read_text())["step"] == 2
    assert not list(cwd.iterdir())                                              # nothing made where we stood
