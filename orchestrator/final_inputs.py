"""What the final stage works from, checked before any work: ``finetune_selected``'s arguments
(``check_final_args``: the counts, ``lr``, ``precision`` and the GBitOPs limit, with the Pareto front it must fit) and
the policies it fine-tunes (``selected_policies``: pareto.parquet's selection, or one made again with ``top_k`` or
``max_gbitops``, the sweep config left as it is).

GBitOPs is pareto.parquet's ``gbitops``: the quantized layers' BitOPs / 1e9 (``orchestrator.pareto_pick``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pandas as pd

from gmpq_core.errors import ConfigError, GMPQError

__all__ = ["check_final_args", "limit_given", "reselects", "selected_policies"]


def limit_given(value: Any) -> float | str | None:
    """``max_gbitops`` as a selection takes it: a float > 0, ``pareto_pick.NO_LIMIT`` ("none": the config's limit
    lifted) or None (not given: the config's); the text of ``--max-gbitops`` is read as ``gmpq pareto`` reads it.
    ConfigError naming ``--max-gbitops`` otherwise."""
    from .pareto_pick import check_max_gbitops, limit_arg

    if value is None or isinstance(value, str):
        return limit_arg(value)
    return check_max_gbitops(value, "--max-gbitops")


def reselects(sweep_dir: Path, top_k: int | None, limit: float | str | None) -> bool:
    """Whether the stage selects again (``write_pareto``) rather than read pareto.parquet's selection: ``top_k`` or a
    limit given, or no pareto.parquet yet."""
    from .results import PARETO_FILE

    return top_k is not None or limit is not None or not (Path(sweep_dir) / PARETO_FILE).exists()


def check_final_args(sweep_dir: Path, cfg: dict, *, counts: dict[str, Any], lr: float | None,
                     precision: str | None, top_k: int | None, max_gbitops: Any) -> float | str | None:
    """ConfigError (one paragraph naming the flag and the value) for a count (``{"--epochs": 2, ...}``) that is not a
    whole number >= 1, an ``lr`` <= 0, an unknown ``precision`` or a bad ``max_gbitops``; and, when the stage will
    select again, for a GBitOPs limit in force (given, else the config's) that no policy of the front fits
    (``pareto_pick.no_fit_text``). All before anything is written. Returns the limit given (``limit_given``)."""
    for flag, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{flag} must be a whole number >= 1, but got {flag} {value!r}. Leave it out to use the "
                              f"sweep config's value.")
    if precision is not None:
        from gmpq_core.precision import check_precision
        check_precision(precision, "--precision")
    if lr is not None and not lr > 0:
        raise ConfigError(f"--lr must be a positive number, but got --lr {lr!r}. Leave it out to use the sweep "
                          "config's finetune.lr.")
    limit = limit_given(max_gbitops)
    if reselects(sweep_dir, top_k, limit) and (Path(sweep_dir) / "trials.parquet").is_file():
        from .pareto_pick import check_front_fits, limit_in_force

        check_front_fits(sweep_dir, limit_in_force(limit, cfg, sweep_dir))
    return limit


def _reselect_stale(sweep_dir: Path, cfg: dict, say: Callable[[str], None]) -> bool:
    """Whether pareto.parquet's selection, made from other completed trials than the sweep holds now (a sweep that
    ran on since ``gmpq pareto``: ``pareto_stale``), is made again with the sweep config's settings: yes when it was
    made with them (said); one made otherwise (a --pick, another --top-k or --max-gbitops of gmpq pareto, a config
    changed since), or where that cannot be told (an older pareto.parquet), is kept, its staleness said with the
    command that selects again."""
    from .pareto_stale import CONFIG, PICKED, UNKNOWN, stale_selection, stale_text
    from .results import PARETO_FILE

    stale = stale_selection(sweep_dir, cfg=cfg)
    if stale is None:
        return False
    how = stale.made.how if stale.made is not None else UNKNOWN
    if how == CONFIG:
        was = f"{stale.made_from} completed trial{'' if stale.made_from == 1 else 's'}" \
            if stale.made_from is not None else "an earlier Pareto front"
        have = "trial has" if stale.completed == 1 else "trials have"
        say(f"{sweep_dir / PARETO_FILE}'s selection was made from {was}, and {stale.completed} {have} completed now: "
            "selected again from all of them with the sweep config's settings (finetune.top_k, budget_buckets, "
            "finetune.max_gbitops), as gmpq pareto would")
        return True
    why = ("pareto.parquet does not record how it was made (an earlier version wrote it) and its front is too small "
           "to tell whether that was with the sweep config's settings" if how == UNKNOWN else
           "it was picked by hand (gmpq pareto --pick)" if how == PICKED else
           "it was made by hand (with --top-k / --max-gbitops other than the sweep config's, or with a config "
           "changed since)")
    say(f"{stale_text(stale, sweep_dir)}. Not selected again here: {why}, so it is fine-tuned as it is")
    return False


def selected_policies(sweep_dir: Path, cfg: dict, top_k: int | None, limit: float | str | None,
                      say: Callable[[str], None], *, tracking_uri: str | None = None,
                      mlflow: bool = False) -> pd.DataFrame:
    """The selected rows of pareto.parquet, selected again (``write_pareto``) with ``top_k``
    (default: the config's finetune.top_k) within ``limit`` (``limit_given``'s; default: the config's
    finetune.max_gbitops) when ``reselects``, else pareto.parquet's selection as it is (a pick or a limit of
    ``gmpq pareto`` carries), or selected again when stale (``_reselect_stale``). GMPQError when none is selected;
    says so when fewer than asked for were. A selection made again is logged to MLflow as ``gmpq pareto`` logs it
    (``commands.pareto.pareto_stage``: the parent run's Pareto table, the trial runs' ``pareto`` tags) when
    ``mlflow`` (``tracking_uri``: default the sweep's)."""
    from .commands.pareto import pareto_stage
    from .pareto import DEFAULT_TOP_K, read_pareto
    from .pareto_pick import fewer_text, limit_in_force, limit_text
    from .results import PARETO_FILE

    if reselects(sweep_dir, top_k, limit):
        pareto = pareto_stage(sweep_dir, top_k, tracking_uri, mlflow=mlflow, cfg=cfg, max_gbitops=limit)
    elif _reselect_stale(sweep_dir, cfg, say):
        pareto = pareto_stage(sweep_dir, None, tracking_uri, mlflow=mlflow, cfg=cfg)
    else:
        pareto = read_pareto(sweep_dir)
    chosen = pareto[pareto["selected"]] if len(pareto) else pareto
    if chosen.empty:
        raise GMPQError(f"No policy to fine-tune: {sweep_dir / PARETO_FILE} selects none (no completed trial in "
                        "the sweep?). Check trials.parquet, or resume the sweep with 'gmpq sweep --resume'.")
    if limit is not None:             # this call's limit: said, with the config's that stays in the file
        config, now = limit_in_force(None, cfg), limit_in_force(limit, cfg)
        say(f"selected {len(chosen)} of the Pareto front's {len(pareto)} policies again "
            f"{limit_text(now) if now is not None else 'with no GBitOPs limit'} (--max-gbitops {limit}, this call "
            f"only: {sweep_dir / 'sweep_config.yaml'} keeps finetune.max_gbitops "
            f"{'none' if config is None else f'{config:g}'})")
    asked = top_k if top_k is not None else (
        int((cfg.get("finetune") or {}).get("top_k") or DEFAULT_TOP_K) if limit is not None else None)
    if asked is not None and len(chosen) < asked:     # within the limit in force: given, else the config's
        say(fewer_text(len(chosen), asked, pareto, cfg, given=limit,
                       asked="--top-k" if top_k is not None else "finetune.top_k"))
    return chosen
