"""``gmpq sweep --check`` (and ``gmpq run --check``): every check a sweep runs before Ray starts, and what the sweep
would run, in a few lines (``check_only``); nothing trains, Ray does not start, nothing is written."""
from __future__ import annotations

from typing import Any

__all__ = ["check_only"]


def check_only(cfg: Any, resume: bool | str = False) -> str:
    """``--check``: every check a sweep runs before Ray starts (``sweep.check_sweep``: the folder's state for a start
    or ``resume``, the --address, the model, data, budget range, search settings and stores), and what the sweep
    would run, in a few lines. Nothing trains, Ray does not start, nothing is written."""
    from orchestrator.sampling import sampler_text
    from orchestrator.sweep import check_sweep
    from orchestrator.sweep_checks import shown_url
    from orchestrator.sweep_join import start_text

    checked = check_sweep(cfg, resume, make_folders=False)
    cfg, facts = checked.cfg, checked.facts
    if checked.done is not None:
        from orchestrator.sweep import holds_sweep_state
        from orchestrator.sweep_grow import more_trials_text
        more = f"; {more_trials_text(cfg)}" if holds_sweep_state(cfg) else ""
        return (f"config OK: the sweep '{cfg.name}' in {cfg.out_dir} already ran all its {cfg.n_trials} trials: without "
                "--check, gmpq sweep has nothing to resume (gmpq run goes on to its Pareto and fine-tune stages)"
                f"{more}.")
    (b_lo, b_hi), (g_lo, g_hi) = facts.feasible_avg_bits, facts.feasible_gbitops
    dims = "; ".join(f"{name} {_dim_text(dim)}" for name, dim in cfg.space.dims.items())
    kwargs = ", ".join(f"{k}={v}" for k, v in cfg.pruner.kwargs.items())
    return "\n".join([
        f"config OK: sweep '{cfg.name}' of {cfg.model} at {facts.input_size} px, proxy {cfg.proxy_dataset}, target "
        f"{cfg.target_dataset}; {start_text(cfg).split('; from another terminal')[0]}",
        f"space: {dims}",
        f"budgets reachable with candidates W{list(cfg.candidates.w_bits)} A{list(cfg.candidates.a_bits)}: "
        f"{b_lo:.3g}..{b_hi:.3g} average bits ({g_lo:.4g}..{g_hi:.4g} GBitOPs); budget buckets "
        f"{list(cfg.budget_buckets) or 'none (one bucket)'}",
        f"Optuna: {sampler_text(cfg.sampler.name, cfg.sampler.kwargs, cfg.seed)}; pruner {cfg.pruner.name}"
        f"{f' ({kwargs})' if kwargs else ''} within each budget bucket; storage {shown_url(cfg.optuna_storage)}",
        f"MLflow: {shown_url(cfg.tracking_uri)}; sweep folder {cfg.out_dir}", _final_text(cfg.finetune),
        *facts.downloads, *_fits_here(cfg), *_grows_text(cfg, checked.grown_from),
        f"Nothing was trained. Run the same command without --check to {'resume' if checked.resume else 'start'} the "
        "sweep."])


def _grows_text(cfg: Any, grown_from: int | None) -> list[str]:
    """``--check`` of a resume that raises n_trials: the line the sweep will say."""
    if grown_from is None:
        return []
    from orchestrator.sweep_grow import grown_text
    from orchestrator.sweep_resume import ended_count

    return [grown_text(cfg, grown_from, ended_count(cfg))]


def _final_text(ft: Any) -> str:
    """The final fine-tune the config's ``finetune`` section asks for (gmpq run's stage 3, gmpq finetune --sweep)."""
    steps = f" (at most {ft.max_steps_per_epoch} steps each)" if ft.max_steps_per_epoch else ""
    limit = f" of at most {ft.max_gbitops:g} GBitOPs (finetune.max_gbitops)" if ft.max_gbitops is not None else ""
    return (f"final fine-tune (gmpq run, gmpq finetune --sweep): the top {ft.top_k} policies{limit}, {ft.epochs} epoch"
            f"{'s' * (ft.epochs != 1)}{steps} on {ft.train_size or 'all the'} target training images, " + (
                "the cluster's CPUs (GPUs) shared out as workers (auto)" if ft.workers == "auto" else
                f"{ft.workers} worker{'s' * (ft.workers != 1)} each"))


def _fits_here(cfg: Any) -> list[str]:
    """For a sweep on this machine alone: a line when its CPUs run fewer trials at once than the config asks."""
    import os

    if cfg.address is not None or cfg.resources.gpu:
        return []
    cpus = os.cpu_count() or 1
    fit = max(1, int(cpus // cfg.resources.cpu))
    asked = min(cfg.max_concurrent_trials, cfg.n_trials)
    if fit >= asked:
        return []
    return [f"note: this machine has {cpus} CPUs, so at most {fit} trial{'s' * (fit != 1)} of "
            f"{cfg.resources.cpu:g} CPU run at once, not {asked} (max_concurrent_trials); the others wait their turn"]


def _dim_text(dim: Any) -> str:
    """A space dimension in a few words: '2.5..5 (log)', 'one of [500, 1000]', '= 2'."""
    d = dim.to_dict()
    if d["type"] == "fixed":
        return f"= {d['value']}"
    if d["type"] == "categorical":
        return f"one of {d['choices']}"
    return f"{d['type']} {d['low']:g}..{d['high']:g}{' (log)' if d.get('log') else ''}"
