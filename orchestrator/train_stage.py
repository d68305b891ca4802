"""One policy's final fine-tune with Ray Train (``TorchTrainer``, data parallel): the job, the worker loop
and ``run_final_job``. ``orchestrator.final_stage`` picks the policies (the selection in ``pareto.parquet``,
what is already done) and runs them with it, side by side where the cluster holds them.

For one policy: N workers (gloo on CPU, NCCL on GPU) each take an
equal, disjoint shard of the FULL target train split, start from the sweep's FP target model with
the policy applied (``gmpq_core.finetune.prepare_quantized``, clips calibrated on the same batch on
every rank), and run QAT with SGD + a per-step cosine schedule ``lr_t = lr * (1 + cos(pi t / T)) / 2``
(``T`` = epochs x steps per epoch). After each epoch rank 0 evaluates on the full target test split
and reports with a checkpoint; every rank calls ``ray.train.report`` (it is a barrier).

Resume: each run is ``RunConfig(name=f"finetune-{trial_id}", storage_path=<sweep>/ray_results)``;
rerunning the same call continues from the latest checkpoint (``ray.train.get_checkpoint()``)
without redoing finished epochs (Ray Train V2 resumes by name + storage path), unless the checkpoint
was made with other settings (``recipe_json``, the training precision included: ``auto`` may resolve to bf16
on one machine and float32 on another). Such a run starts again from epoch 0 and says why in its metrics
(``restarted_because``). A GMPQError raised in a worker (a policy that does not
fit the model, say) comes back from ``run_final_job`` as the same class naming the policy.

``batch_size`` is the global batch: each worker gets ``batch_size // workers`` images per step.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gmpq_core.errors import CheckpointError, ConfigError, GMPQError
from gmpq_core.fileio import atomic_write_json, load_checkpoint, save_checkpoint
from gmpq_core.finetune import FinetuneConfig
from gmpq_core.precision import check_precision, resolve_precision

from .recipes import RECIPE_FIELDS, last_epoch_precision, recipe_changes, recipe_dict, same_recipe, with_precision

__all__ = ["STATE_FILE", "RECIPE_DEFAULTS", "FinalJob", "FinalRun", "shard_indices", "train_loop_per_worker", "run_final_job",
           "RECIPE_FIELDS", "recipe_changes", "same_recipe", "with_precision"]   # the last four: orchestrator.recipes

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RECIPE_DEFAULTS = FinetuneConfig()   # the core's recipe defaults (FinalJob's and the final stage's fallbacks)


@dataclass(frozen=True, kw_only=True)
class FinalJob:
    """One policy's final fine-tune (plain data: it travels to every worker as ``train_loop_config``).

    ``train_size``/``test_size``: stratified slices for quick checks (None = the full split).
    """
    trial_id: str
    policy_json: str
    fp_checkpoint: str
    dataset: str
    data_root: str | None = None
    image_size: int | None = None
    epochs: int = RECIPE_DEFAULTS.epochs         # the recipe's defaults are the core's (FinetuneConfig)
    lr: float = RECIPE_DEFAULTS.lr
    momentum: float = RECIPE_DEFAULTS.momentum
    weight_decay: float = RECIPE_DEFAULTS.weight_decay
    batch_size: int = RECIPE_DEFAULTS.batch_size
    distill: bool = RECIPE_DEFAULTS.distill
    seed: int = RECIPE_DEFAULTS.seed
    max_steps_per_epoch: int | None = RECIPE_DEFAULTS.max_steps_per_epoch
    nesterov: bool = RECIPE_DEFAULTS.nesterov
    train_size: int | None = None
    test_size: int | None = None
    progress_file: str | None = None    # rank 0 writes {"epoch", "step", "steps"} here every few seconds
    precision: str = "auto"             # gmpq_core.precision: auto (bf16 on a GPU with bfloat16), fp32, bf16

    def __post_init__(self) -> None:
        self.finetune_config()      # validates the SGD fields with the core's messages
        check_precision(self.precision, "finetune precision")
        for name in ("train_size", "test_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer or None (full split), but got {name}={v!r}.")

    def recipe_json(self) -> str:
        """The settings its result depends on, except ``epochs`` (more epochs continue a finished run); the
        precision as asked (``auto`` too: ``with_precision`` records what it resolved to)."""
        return json.dumps({k: getattr(self, k) for k in RECIPE_FIELDS}, sort_keys=True)

    def finetune_config(self) -> FinetuneConfig:
        return FinetuneConfig(epochs=self.epochs, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                              batch_size=self.batch_size, distill=self.distill, seed=self.seed,
                              max_steps_per_epoch=self.max_steps_per_epoch, nesterov=self.nesterov)


def shard_indices(n: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """Indices of rank ``rank``'s shard: a seeded permutation of ``range(n)`` cut into ``world`` equal parts.

    Every shard has ``n // world`` items (the remainder is dropped) so all ranks run the same number of
    steps, as DistributedSampler(drop_last=True) would; shards are disjoint.
    """
    if not 0 <= rank < world:
        raise ConfigError(f"rank must be in [0, world), but got rank={rank}, world={world}.")
    g = torch.Generator().manual_seed(int(seed))
    per = n // world
    if per < 1:
        raise ConfigError(f"{n} training images cannot be shared by {world} workers; use fewer workers.")
    return torch.randperm(n, generator=g)[rank * per:(rank + 1) * per].sort().values


class _StepProgress:
    """``progress(done, total)`` for rank 0: writes the position to a small JSON file every ``every_s``."""

    def __init__(self, path: str, epoch: int, every_s: float = 5.0) -> None:
        self.path, self.epoch, self.every_s, self.last = path, epoch, every_s, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.time()
        if done == total or now - self.last >= self.every_s:
            self.last = now
            try:
                atomic_write_json(self.path, {"epoch": self.epoch, "step": done, "steps": total, "time": now})
            except OSError as e:      # progress is cosmetic: never fail the training for it
                log.debug("cannot write %s: %s", self.path, e)


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train worker loop (see the module docstring). ``config`` is ``asdict(FinalJob)``."""
    import ray.train
    import ray.train.torch

    from gmpq_core.bn_fold import frozen_teacher_
    from gmpq_core.data import load_dataset, make_loader, proxy
    from gmpq_core.finetune import prepare_quantized
    from gmpq_core.policy import BitPolicy
    from gmpq_core.train import (evaluate, load_optimizer_state, make_cosine_scheduler, make_optimizer, seeded,
                                 set_cosine_position_, steps_per_epoch, train_one_epoch, training_layout_)
    from gmpq_core.transfer import load_target_model

    job = FinalJob(**config)
    ft = job.finetune_config()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bundle = load_dataset(job.dataset, root=job.data_root, image_size=job.image_size)
    info = bundle.info
    train = proxy(bundle.train, job.train_size, seed=job.seed)
    test = proxy(bundle.test, job.test_size, seed=job.seed)
    shard = train.subset(shard_indices(len(train), rank, world, job.seed))
    per_worker = max(1, job.batch_size // world)
    train_loader = make_loader(shard, info, batch_size=per_worker, train=True, seed=job.seed + rank,
                               drop_last=True, device=device)
    calib_loader = make_loader(train, info, batch_size=min(job.batch_size, len(train)), train=True, seed=job.seed)
    calib_loader.set_epoch(0)
    with seeded(job.seed):
        calib = next(iter(calib_loader))[0]          # the same batch on every rank
    fp, _ = load_target_model(job.fp_checkpoint)
    policy = BitPolicy.from_json(job.policy_json)
    model = training_layout_(prepare_quantized(fp, policy, calib).to(device), device, job.precision)
    teacher = training_layout_(frozen_teacher_(fp.to(device)), device, job.precision) if job.distill else None

    steps = steps_per_epoch(train_loader, job.max_steps_per_epoch)
    total = job.epochs * steps
    precision = resolve_precision(job.precision, device)
    recipe = with_precision(job.recipe_json(), precision)
    start, history, state, restarted_because = 0, [], None, None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_checkpoint(Path(d) / STATE_FILE)
        if state.get("trial_id") != job.trial_id or state.get("policy_json") != job.policy_json:
            raise CheckpointError(f"The Ray Train checkpoint of finetune-{job.trial_id} belongs to another policy; "
                                  "delete that run folder under ray_results to start afresh.")
        restarted_because = _not_resumable(state, recipe, job.epochs)
        if restarted_because:
            state = None                    # other settings (lr, precision, ...) or a longer run: start afresh
    if state is not None:
        model.load_state_dict(state["model"])
        start, history = int(state["epoch"]), [dict(h) for h in state["history"]]
    model = ray.train.torch.prepare_model(model)
    net = getattr(model, "module", model)
    optimizer = make_optimizer(model, ft)
    scheduler = make_cosine_scheduler(optimizer, total)
    if state is not None:
        load_optimizer_state(optimizer, state["optimizer"])
        if state.get("total_steps") == total:
            scheduler.load_state_dict(state["scheduler"])
        else:
            set_cosine_position_(optimizer, scheduler, start * steps, total)
    test_loader = make_loader(test, info, batch_size=256, train=False, device=device) if rank == 0 else None

    for epoch in range(start + 1, job.epochs + 1):
        t0 = time.perf_counter()
        train_loader.set_epoch(epoch - 1)
        progress = _StepProgress(job.progress_file, epoch) if rank == 0 and job.progress_file else None
        with seeded(job.seed + epoch, device):
            tr = train_one_epoch(model, train_loader, optimizer, scheduler=scheduler, teacher=teacher,
                                 distill_alpha=ft.distill_alpha if job.distill else 0.0,
                                 distill_temperature=ft.distill_temperature, device=device,
                                 max_steps=job.max_steps_per_epoch, epoch=epoch, progress=progress,
                                 precision=job.precision)
        metrics = {"epoch": epoch, "train_loss": tr["loss"], "train_top1": tr["top1"],
                   "lr": float(optimizer.param_groups[0]["lr"]), "resumed_from_epoch": start, "world_size": world,
                   "train_images": len(train), "images_per_epoch": steps * per_worker * world,
                   "test_images": len(test), "precision": precision,
                   **({"restarted_because": restarted_because} if restarted_because else {})}
        if rank != 0:
            ray.train.report(metrics)
            continue
        ev = evaluate(net, test_loader, device=device, precision=job.precision)
        metrics.update(top1=ev["top1"], top5=ev["top5"], loss=ev["loss"], epoch_seconds=time.perf_counter() - t0)
        history.append(metrics)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d) / STATE_FILE, {
                "trial_id": job.trial_id, "policy_json": job.policy_json, "recipe_json": recipe,
                "epoch": epoch, "history": history,
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "total_steps": total})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _not_resumable(state: dict, recipe: str, epochs: int) -> str | None:
    """Why the checkpoint ``state`` cannot be continued by a fine-tune of ``recipe`` (with the precision its
    workers resolved) for ``epochs`` epochs (None: it can). A checkpoint without a recipe (before recipes) is
    continued; one whose recipe lacks the precision (before it was part of it) is checked against the
    precision its last epoch reports."""
    recorded = state.get("recipe_json")
    if "precision" not in (recipe_dict(recorded) or {}):       # (with_precision leaves a non-recipe as it is)
        recorded = with_precision(recorded, last_epoch_precision(state))
    changes = recipe_changes(recorded, recipe)
    if changes:
        return f"its checkpoint was made with other settings ({', '.join(changes)})"
    if int(state["epoch"]) > epochs:
        return f"its checkpoint has {int(state['epoch'])} epochs, more than {epochs}"
    return None


@dataclass(frozen=True)
class FinalRun:
    """Outcome of one policy's fine-tune: last metrics (rank 0), per-epoch history, wall seconds."""
    trial_id: str
    metrics: dict
    history: list[dict]
    seconds: float
    workers: int
    model_state: dict | None = None     # the fine-tuned weights (rank 0's last checkpoint)


def _our_error(err: BaseException, trial_id: str) -> GMPQError | None:
    """A worker's GMPQError (bad policy, checkpoint of another policy) inside Ray Train's failure, as the same
    class naming the policy, so the CLI prints one paragraph; None for anything else (a real bug keeps its
    traceback)."""
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        cause = getattr(failure, "cause", None) or failure
        if isinstance(cause, GMPQError):
            try:
                return type(cause)(f"The fine-tune of policy {trial_id} failed: {cause}")
            except TypeError:       # a subclass with another constructor
                return GMPQError(f"The fine-tune of policy {trial_id} failed: {cause}")
    return None


def run_final_job(job: FinalJob, *, storage_path: str | Path, workers: int, use_gpu: bool = False) -> FinalRun:
    """Fit (or resume) the TorchTrainer ``finetune-<trial_id>`` under ``storage_path``."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    trainer = TorchTrainer(train_loop_per_worker, train_loop_config=asdict(job),
                           scaling_config=ScalingConfig(num_workers=int(workers), use_gpu=bool(use_gpu)),
                           run_config=RunConfig(name=f"finetune-{job.trial_id}", storage_path=str(storage_path),
                                                checkpoint_config=CheckpointConfig(num_to_keep=1)))
    try:
        result = trainer.fit()
    except Exception as e:
        raise _our_error(e, job.trial_id) or e
    if result.error is not None:
        raise _our_error(result.error, job.trial_id) or result.error
    history: list[dict] = []
    state: dict = {}
    if result.checkpoint is not None:
        with result.checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / STATE_FILE)
        history = [dict(h) for h in state["history"]]
    metrics = dict(history[-1]) if history else dict(result.metrics or {})
    if metrics.get("epoch", 0) < job.epochs:
        raise GMPQError(f"The fine-tune of {job.trial_id} stopped after epoch {metrics.get('epoch', 0)} of "
                        f"{job.epochs}; rerun the same command to resume it.")
    return FinalRun(trial_id=job.trial_id, metrics=metrics, history=history, seconds=time.perf_counter() - t0,
                    workers=int(workers), model_state=state.get("model"))
