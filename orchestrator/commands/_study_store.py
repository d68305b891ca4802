"""``gmpq study``'s MLflow store: which one the study logs to, said in a line when ``$MLFLOW_TRACKING_URI`` is set
(``say_store``), and the results page, plots and study.parquet attached to the study's run there (``log_page``).
``ray_run`` is ``experiments.generalization_ray`` (imported by ``gmpq study`` from the source checkout)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

__all__ = ["say_store", "not_logged_text", "log_page"]


def say_store(cfg: Any, out: Path, ray_run: Any, *, logs: bool = True) -> None:
    """One line on stderr when ``$MLFLOW_TRACKING_URI`` is set and no --tracking-uri (or config key) is: the store
    the study logs to, the variable's (as gmpq sweep says it: a variable set for other work) or, once the study's run
    recorded one, that one (``study_tracking_uri``: a resume or --analyze-only logs where the study is). Nothing
    when the command logs nowhere (``logs`` False: --analyze-only of a folder without a run, ``not_logged_text``)."""
    from orchestrator.mlflow_sink import PARENT_FILE
    from orchestrator.sweep_config import ENV_TRACKING_URI, env_tracking_uri

    env = env_tracking_uri()
    if cfg.tracking_uri is not None or not env or not logs:
        return
    recorded = ray_run.recorded_tracking_uri(out)
    if recorded is None:
        print(f"gmpq study: MLflow tracking URI {env} from ${ENV_TRACKING_URI} (--tracking-uri names "
              f"another store; unset the variable to log to {out / 'mlflow.db'})", file=sys.stderr, flush=True)
    elif recorded != env:
        print(f"gmpq study: MLflow tracking URI {recorded}, where the study's run logged ({out / PARENT_FILE}), not "
              f"{env} from ${ENV_TRACKING_URI} (--tracking-uri names another store)", file=sys.stderr, flush=True)


def not_logged_text(out: Path) -> str:
    """The line of --analyze-only in a folder whose study has no MLflow run (a copy, docs/study_data): nothing is
    logged, ``$MLFLOW_TRACKING_URI`` (when set) included, and the flag that logs the page."""
    from orchestrator.sweep_config import ENV_TRACKING_URI, env_tracking_uri

    env = env_tracking_uri()
    unused = f", so ${ENV_TRACKING_URI} ({env}) is not used either" if env else ""
    return (f"(not logged to MLflow: {out} has no MLflow run of the study{unused}; --tracking-uri URI logs the page "
            "there)")


def log_page(cfg: Any, out: Path, report: Path, png: Path, ray_run: Any, *, quiet: bool = False) -> str | None:
    """Attach the page, plot and Parquet to the study's MLflow parent run (warn-once on failure; ``quiet``: not
    even once, as the study run this command made has warned already); returns the store's URI, None when the
    store could not be reached or refused a file."""
    from orchestrator.mlflow_sink import DISABLED
    from orchestrator.study_plot import companion_path

    with warnings.catch_warnings():
        if quiet:
            warnings.filterwarnings("ignore", message=DISABLED, category=RuntimeWarning)
        sink = ray_run.StudySink(ray_run.study_tracking_uri(cfg, out), out, experiment_name=cfg.name,
                                 resolved_config=cfg.to_dict())
        if not sink.connect():
            return None
        for f in (report, png, companion_path(png), out / "study.parquet"):
            if f.is_file():
                sink.call(f"logging {f.name}", sink.client.log_artifact, sink.parent_run_id, str(f), "results")
    return sink.tracking_uri if sink.enabled else None
