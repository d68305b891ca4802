"""orchestrator.final_results: final.parquet rows and the models/<trial_id>.pt files of the final stage."""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from gmpq_core.export import load_quantized_model
from gmpq_core.fileio import save_checkpoint
from gmpq_core.finetune import prepare_quantized
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy, QuantSpec
from orchestrator.final_results import (export_saved_final, final_model_path, final_row, read_final, record_final_run,
                                        saved_final_state)

META = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}


def _fine_tuned(tmp_path):
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    fp_path = tmp_path / "target_fp.pt"
    save_checkpoint(fp_path, fp.state_dict())
    fp_path.with_suffix(".json").write_text(json.dumps({"meta": META, "top1": 80.0}))
    policy = BitPolicy(layers={n: QuantSpec(w_bits=4, a_bits=3) for n in searchable_layers(fp)}, meta={"kind": "test"})
    q = prepare_quantized(fp, policy, torch.randn(4, 1, 28, 28)).eval()
    return fp_path, policy, q


def test_a_policy_fine_tuned_before_models_were_exported_gets_its_file_from_the_ray_checkpoint(tmp_path):
    fp_path, policy, q = _fine_tuned(tmp_path)
    storage = tmp_path / "ray_results"
    old, new = storage / "finetune-t1" / "checkpoint_a", storage / "finetune-t1" / "checkpoint_b"
    for d in (old, new):
        d.mkdir(parents=True)
    save_checkpoint(old / "state.pt", {"policy_json": "another policy", "model": {}})
    state = {"policy_json": policy.to_json(), "model": q.state_dict(), "recipe_json": "R", "epoch": 1,
             "history": [{"epoch": 1, "top1": 81.5}]}
    save_checkpoint(new / "state.pt", state)
    os.utime(old / "state.pt", (1, 1))                                # the newest checkpoint is the one read
    assert saved_final_state(storage, "t1", "state.pt")["policy_json"] == policy.to_json()
    prev = {"trial_id": "t1", "final_top1": 81.5, "final_top5": 99.0, "epochs": 1, "bitops": 400_000_000,
            "transfer_top1": 79.0, "recipe_json": "R"}
    job = SimpleNamespace(trial_id="t1", policy_json=policy.to_json(), fp_checkpoint=str(fp_path), dataset="fashion_mnist",
                          data_root=None, image_size=None)
    notes = []
    row = export_saved_final(tmp_path, storage, prev, job, "state.pt", notes.append)
    assert row["model_path"] == "models/t1.pt" and "from its Ray Train checkpoint" in notes[0]
    loaded = load_quantized_model(final_model_path(tmp_path, "t1"))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))
    assert loaded.results["top1"] == 81.5 and loaded.results["gbitops"] == 0.4 and loaded.arch == META
    from gmpq_core.data import load_dataset
    info = load_dataset("fashion_mnist").info                          # the target's input normalisation
    assert loaded.preprocess == {"dataset": "fashion_mnist", "image_size": 28, "mean": list(info.mean),
                                 "std": list(info.std)}
    assert torch.allclose(loaded.normalize(torch.ones(1, 28, 28)), (1 - info.mean[0]) / torch.tensor(info.std[0]))
    # no checkpoint left, or one of a later run with other settings or another epoch: the row stays as it was
    final_model_path(tmp_path, "t1").unlink()
    for other in ({}, {"recipe_json": "R2"}, {"epoch": 2}, {"history": [{"epoch": 1, "top1": 70.0}]}):
        notes.clear()
        save_checkpoint(new / "state.pt", {**state, **other})
        where = tmp_path / "elsewhere" if not other else storage
        assert export_saved_final(tmp_path, where, prev, job, "state.pt", notes.append) == prev
        assert "no Ray Train checkpoint" in notes[0] and not final_model_path(tmp_path, "t1").exists()


def test_after_a_fine_tune_the_model_file_and_its_row_are_written_and_a_failed_write_keeps_the_row(tmp_path):
    fp_path, policy, q = _fine_tuned(tmp_path)
    job = SimpleNamespace(trial_id="t1", policy_json=policy.to_json(), fp_checkpoint=str(fp_path),
                          dataset="fashion_mnist", data_root=None, image_size=None, recipe_json=lambda: "R")
    run = SimpleNamespace(trial_id="t1", seconds=10.0, workers=2, model_state=q.state_dict(),
                          metrics={"top1": 80.0, "top5": 99.0, "loss": 0.5, "epoch": 1})
    pareto = {"trial_id": "t1", "bitops": 5, "bitops_total": 9, "policy_json": policy.to_json(), "transfer_top1": 70.0}
    rows, notes = {}, []
    path = record_final_run(tmp_path, rows, pareto, run, job, notes.append)
    assert path == final_model_path(tmp_path, "t1") and load_quantized_model(path).results["top1"] == 80.0
    assert read_final(tmp_path)["model_path"].tolist() == ["models/t1.pt"] and not notes
    sweep = tmp_path / "other"
    (sweep / "models").parent.mkdir()
    (sweep / "models").write_text("a file where the models folder goes")
    assert record_final_run(sweep, {}, pareto, run, job, notes.append) is None
    assert read_final(sweep)["model_path"].isna().all() and read_final(sweep)["final_top1"].tolist() == [80.0]
    assert "cannot write its model file" in notes[0]


def test_a_final_row_names_its_model_file_or_none():
    run = SimpleNamespace(trial_id="t1", seconds=10.0, workers=2,
                          metrics={"top1": 80.0, "top5": 99.0, "loss": 0.5, "epoch": 1})
    pareto = {"trial_id": "t1", "bitops": 5, "bitops_total": 9, "policy_json": "{}", "transfer_top1": 70.0}
    assert final_row(pareto, run, "{}", None)["model_path"] is None
    assert final_row(pareto, run, "{}", "models/t1.pt")["model_path"] == "models/t1.pt"


def test_fewer_epochs_than_a_policy_already_ran_with_the_same_settings_is_refused_before_anything_runs(tmp_path):
    import pytest

    from gmpq_core.errors import ConfigError
    from orchestrator.final_results import check_not_shorter

    jobs = [({}, SimpleNamespace(trial_id=t, recipe_json=lambda: "R")) for t in ("t1", "t2", "t3")]
    existing = {"t1": {"epochs": 3, "recipe_json": "R"}, "t2": {"epochs": 5, "recipe_json": "other settings"},
                "t3": {"epochs": 3, "recipe_json": float("nan")}}      # a row from before recipes, as pandas reads it
    with pytest.raises(ConfigError, match=r"--epochs 2 is fewer .* t1 \(3 epochs\), t3 \(3 epochs\)\. .*Pass --epochs 3") as e:
        check_not_shorter(jobs, existing, 2, tmp_path)
    assert "t2" not in str(e.value)                       # other settings start afresh anyway
    check_not_shorter(jobs, existing, 3, tmp_path)        # the same or more epochs: keep or continue


def test_a_remote_ray_storage_stays_a_uri_and_progress_files_go_to_the_sweep_folder(tmp_path):
    """A cluster sweep's --storage s3://... : the fine-tunes' Ray Train runs go there (it was made a local
    folder named 's3:' in the working directory), their progress files into the sweep folder."""
    from orchestrator.final_results import finetune_progress_dir, finetune_storage, saved_final_state

    remote = {"storage_path": "s3://bucket/gmpq/ray_results"}
    assert finetune_storage(remote, tmp_path) == "s3://bucket/gmpq/ray_results"
    assert finetune_progress_dir(remote, tmp_path) == tmp_path.resolve() / "ray_results"
    assert saved_final_state("s3://bucket/gmpq/ray_results", "t1", "state.pt") is None
    local = {"storage_path": str(tmp_path / "rr")}
    assert finetune_storage(local, tmp_path) == finetune_progress_dir(local, tmp_path) == (tmp_path / "rr").resolve()
    assert finetune_storage({}, tmp_path) == tmp_path.resolve() / "ray_results"
    from orchestrator.final_results import local_storage
    assert local_storage((tmp_path / "x y").as_uri()) == tmp_path / "x y" and local_storage("gs://b/x") is None
    assert local_storage(tmp_path) == tmp_path
