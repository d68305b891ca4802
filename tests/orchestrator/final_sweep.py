"""A sweep folder as the sweep leaves it for the final stage (``make_sweep``; ``make_fp32_sweep``: float32, one
worker), and the stage with a fake job in place of the Ray Train run (``_stage_without_ray``, ``METRICS``;
``checkpointing_stage``: a fake run that checkpoints and continues as Ray Train does, and a stand-in model file):
shared by the final-stage tests (same folder, pytest puts it on sys.path)."""
from __future__ import annotations

from pathlib import Path


def make_sweep(d: Path, bits: tuple = ((3, 4),), broken: str | None = None, precision: str = "auto",
               workers: int = 2) -> None:
    """A sweep folder as the sweep leaves it: resolved config + trials.parquet with one completed trial per
    (w_bits, a_bits) in ``bits`` (``t1``, ``t2``, ...; more bits, higher transfer top-1, so all are on the front).
    ``broken``: that trial's policy names a layer the model does not have (its fine-tune fails); ``workers``:
    the config's ``finetune.workers``; ``precision``: its ``precision``."""
    from gmpq_core.bitops import count_bitops
    from gmpq_core.models import build_model
    from gmpq_core.policy import BitPolicy
    from orchestrator.results import trial_row, write_results
    from orchestrator.sweep_config import load_sweep_config, save_resolved_config

    cfg = load_sweep_config(None, preset="demo", overrides={
        "out_dir": str(d), "name": "ft", "target_dataset": "mnist5k", "proxy_dataset": "mnist5k",
        "transfer": {"train_size": 200, "test_size": 100, "fp_epochs": 1, "fp_train_size": 200,
                     "fp_max_steps_per_epoch": 2, "fp_batch_size": 32, "batch_size": 32},
        "finetune": {"top_k": len(bits), "workers": workers, "epochs": 1, "batch_size": 32}, "precision": precision})
    save_resolved_config(cfg)
    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    rows = []
    for i, (w, a) in enumerate(bits, start=1):
        policy = BitPolicy.uniform(model, w, a)
        cost = count_bitops(model, policy, 28, 1)
        policy_json = policy.to_json()
        if broken == f"t{i}":
            policy_json = policy_json.replace('"layer1.0.conv1"', '"layer9.0.conv1"')
        rows.append(trial_row(trial_id=f"t{i}", config={"budget_avg_bits": (w + a) / 2}, status="completed",
                              last_result={"transfer_top1": 55.0 + 5 * i, "bitops": cost.bitops_quantized,
                                           "bitops_total": cost.bitops_total, "budget_avg_bits": (w + a) / 2,
                                           "policy_json": policy_json, "layers_json": "[]"}))
    write_results(d, rows, [])


def make_fp32_sweep(d: Path, n: int = 1) -> None:
    """``make_sweep`` with ``n`` trials (``t1``, ``t2``, ...), float32, one worker per fine-tune."""
    make_sweep(d, bits=((3, 4), (4, 4), (6, 6))[:n], precision="fp32", workers=1)


def _stage_without_ray(monkeypatch, tmp_path, job, slots: int):
    """finetune_selected's bookkeeping with ``job(trial_id)`` in place of the Ray Train run (which returns
    the metrics dict of a finished one-epoch run): no Ray, no FP model; MLflow and the files are real."""
    import contextlib

    from orchestrator import final_stage
    from orchestrator.train_stage import FinalRun

    def run_final_job(final_job, *, storage_path, workers, use_gpu=False):
        m = job(final_job.trial_id)
        return FinalRun(trial_id=final_job.trial_id, metrics=m, history=[m], seconds=0.1, workers=workers)
    monkeypatch.setattr(final_stage, "run_final_job", run_final_job)
    monkeypatch.setattr(final_stage, "target_fp_checkpoint", lambda *a, **k: tmp_path / "fp.pt")
    monkeypatch.setattr(final_stage, "ray_session", lambda address=None: contextlib.nullcontext())
    monkeypatch.setattr(final_stage, "_ray_devices", lambda workers, use_gpu, say: (workers, False))
    monkeypatch.setattr(final_stage, "final_slots", lambda n, workers, use_gpu, cap: slots)
    return final_stage


METRICS = {"epoch": 1, "top1": 50.0, "top5": 90.0, "loss": 1.0, "train_images": 100, "test_images": 10}


def fake_export_final_model(sweep_dir, state_dict, job, results):
    """``final_results.export_final_model`` without a model: ``models/<tid>.pt`` is ``{"results": ..., "lr": ...}``
    (the fake run's ``model_state`` names its lr)."""
    from gmpq_core.fileio import save_checkpoint
    from orchestrator import final_results

    path = final_results.final_model_path(sweep_dir, job.trial_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, {"results": dict(results), "lr": state_dict["lr"]})
    return path


def checkpointing_stage(monkeypatch, tmp_path, runs: list, stop_at: set | None = None, slots: int = 1):
    """``_stage_without_ray`` whose Ray Train run checkpoints each epoch in ``<storage>/finetune-<tid>/checkpoint/
    state.pt`` (``{"lr", "epoch"}``) and continues a checkpoint of the same lr (as Ray Train does by run name,
    when the recipe is the same and it has no more epochs), else starts afresh saying why (``restarted_because``);
    ``(trial_id, lr, epoch)`` in ``stop_at``: Ctrl-C during that epoch (once); ``runs`` gets each job. top1 = 50 +
    100 * lr + epochs (each recipe's result differs); the model file is ``fake_export_final_model``'s."""
    from gmpq_core.fileio import load_checkpoint, save_checkpoint
    from gmpq_core.precision import resolve_precision
    from orchestrator import final_results
    from orchestrator.train_stage import FinalRun

    final_stage = _stage_without_ray(monkeypatch, tmp_path, lambda tid: METRICS, slots=slots)
    stop_at = stop_at if stop_at is not None else set()

    def run_final_job(job, *, storage_path, workers, use_gpu=False):
        runs.append(job)
        ckpt = Path(storage_path) / f"finetune-{job.trial_id}" / "checkpoint"
        state = load_checkpoint(ckpt / "state.pt") if (ckpt / "state.pt").is_file() else None
        why = None
        if state is not None and state["lr"] != job.lr:
            why = f"its checkpoint was made with other settings (lr {state['lr']} -> {job.lr})"
        elif state is not None and state["epoch"] > job.epochs:
            why = f"its checkpoint has {state['epoch']} epochs, more than {job.epochs}"
        start = state["epoch"] if state is not None and why is None else 0
        for epoch in range(start + 1, job.epochs + 1):
            if (job.trial_id, job.lr, epoch) in stop_at:
                stop_at.discard((job.trial_id, job.lr, epoch))
                raise KeyboardInterrupt
            ckpt.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt / "state.pt", {"lr": job.lr, "epoch": epoch})
        m = {**METRICS, "epoch": job.epochs, "top1": 50 + 100 * job.lr + job.epochs, "resumed_from_epoch": start,
             "precision": resolve_precision(job.precision, "cpu"), **({"restarted_because": why} if why else {})}
        return FinalRun(trial_id=job.trial_id, metrics=m, history=[m], seconds=0.1, workers=workers,
                        model_state={"lr": job.lr})

    monkeypatch.setattr(final_stage, "run_final_job", run_final_job)
    monkeypatch.setattr(final_results, "export_final_model", fake_export_final_model)
    return final_stage
