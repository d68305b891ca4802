"""``check_sweep_config(cfg)``: everything about a sweep config that needs the model or the data, checked
before Ray starts (``sweep_config`` checks the rest as it loads): the model and dataset names, proxy and
transfer slices against the dataset sizes, the budget range against what the bit candidates reach and its
buckets (``budget_buckets``: ``[]`` refused, one bucket by accident warned about), the fixed search settings (a dry build of one trial's ``SearchConfig``), the Grad-CAM layer (resolved on the model as
the trials do), and that the sweep, Tune storage and cache folders can be written. ``check_sweep_writable``: the
same writability check for the commands that write into a finished sweep (``gmpq pareto``, ``gmpq finetune
--sweep``). Errors are ``ConfigError``/``BudgetInfeasibleError``/``DataError`` -> exit 2.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from dataclasses import dataclass, fields
from typing import Any

from gmpq_core.errors import BudgetInfeasibleError, ConfigError, did_you_mean

from .budget_buckets import check_budget_buckets, warn_single_bucket
from .sweep_config import ENV_TRACKING_URI, SweepConfig, check_trial_count, env_tracking_uri, trial_search_config

log = logging.getLogger(__name__)

__all__ = ["SweepFacts", "check_sweep_config", "shown_url", "check_tracking_scheme", "check_tracking_uri",
           "check_sweep_writable"]


@dataclass(frozen=True)
class SweepFacts:
    """What validation learnt about the data and the model (reused by the sweep)."""
    input_size: int
    in_channels: int
    proxy_num_classes: int
    target_num_classes: int
    proxy_train_size: int
    target_train_size: int
    target_test_size: int
    feasible_avg_bits: tuple[float, float]
    feasible_gbitops: tuple[float, float]
    downloads: tuple[str, ...] = ()     # a dataset not there yet (--check downloads nothing): where it will go


def _check_writable(cfg: SweepConfig) -> None:
    """The sweep folder, the Tune storage path and the cache folder can be written. Local folders are checked
    without creating anything; a URI storage (s3://, gs://, file://) gets its folder created and a probe file
    written and deleted (``cluster.connect.probe_storage_write``)."""
    from gmpq_core.fileio import check_writable_dir

    r = cfg.resolved()
    check_writable_dir(r.out_dir, what="sweep folder", hint="pass a writable --out DIR")
    if "://" in str(r.storage_path):         # s3://, gs://, file://: a probe file written and deleted
        from cluster.connect import probe_storage_write

        probe_storage_write(str(r.storage_path), label="Tune storage (--storage)",
                            hint=" Nothing has been trained yet; pass another --storage, or leave it out to keep the "
                                 "Tune state in the sweep folder.")
    else:
        check_writable_dir(r.storage_path, what="Tune storage path", hint="pass a writable --storage PATH")
    check_writable_dir(r.cache_dir, what="cache folder", hint="set cache_dir to a writable folder")


def check_sweep_writable(sweep_dir: str | Path, command: str, writes: str, *, folders: tuple[str, ...] = ()) -> None:
    """ConfigError (exit 2) unless the finished sweep folder ``sweep_dir`` and its subfolders ``folders`` can be
    written, for a ``command`` that writes ``writes`` into it (``gmpq pareto``, ``gmpq finetune --sweep``); called
    before any work: a read-only folder used to end in a traceback at the first file written. Commands that only
    read a sweep (``gmpq evaluate``, ``gmpq status``) do not call it."""
    from gmpq_core.fileio import check_writable_dir

    sweep_dir = Path(sweep_dir)
    hint = (f"{command} writes {writes} there: copy the sweep to a folder you can write (cp -r {sweep_dir} NEW_DIR) "
            "and pass that")
    check_writable_dir(sweep_dir, what="sweep folder", hint=hint)
    for name in folders:                      # one that does not exist yet is made in the folder checked above
        if (sweep_dir / name).is_dir():
            check_writable_dir(sweep_dir / name, what=f"folder '{name}' of the sweep", hint=hint)


def check_sweep_config(cfg: SweepConfig, *, make_folders: bool = True) -> SweepFacts:
    """Validate what needs the model and the data (before Ray starts); returns the facts found. ``make_folders``:
    make a missing folder of a sqlite:/// Optuna storage, and download a dataset not there yet (both off for ``gmpq
    sweep --check``, which writes nothing: such a dataset is checked by its known shape and sizes, and named in
    ``SweepFacts.downloads``)."""
    import torch

    from gmpq_core.complexity import CANDIDATES_HOW, bitops_range
    from gmpq_core.data import check_subset_size
    from gmpq_core.layers import searchable_layers
    from gmpq_core.models import build_model, check_model
    from gmpq_core.precision import resolve_precision
    from gmpq_core.search_config import SearchConfig

    from .trainable import trial_device

    check_model(cfg.model)
    resolve_precision(cfg.precision, trial_device(cfg))         # bf16 on a GPU without it: before Ray starts
    (pi, proxy_train, _), proxy_note = _dataset_facts(cfg.proxy_dataset, cfg, download=make_folders)
    (ti, target_train, target_test), target_note = _dataset_facts(cfg.target_dataset, cfg, download=make_folders)
    for size in cfg.proxy_sizes():
        check_subset_size(size, proxy_train, pi.num_classes, "proxy_size", cfg.proxy_dataset, "training",
                          role="proxy")
    tr = cfg.transfer
    for what, size, n, images in (("transfer.train_size", tr.train_size, target_train, "training"),
                                  ("transfer.fp_train_size", tr.fp_train_size, target_train, "training"),
                                  ("transfer.test_size", tr.test_size, target_test, "test"),
                                  ("finetune.train_size", cfg.finetune.train_size, target_train, "training"),
                                  ("finetune.test_size", cfg.finetune.test_size, target_test, "test")):
        check_subset_size(size, n, None, what, cfg.target_dataset, images, role="target")
    with torch.random.fork_rng():
        net = build_model(cfg.model, num_classes=pi.num_classes, in_channels=pi.in_channels,
                          small_input=cfg.small_input, input_size=pi.image_size)
    from gmpq_core.bitops import layer_macs
    all_macs = layer_macs(net, pi.image_size, pi.in_channels)
    macs = {n: all_macs[n] for n in searchable_layers(net)}
    lo, hi = bitops_range(macs, cfg.candidates)
    total = sum(macs.values())
    b_lo, b_hi = math.sqrt(lo / total), math.sqrt(hi / total)
    low, high = cfg.space.bounds("budget_avg_bits")
    if low is None or low < b_lo - 1e-9 or high > b_hi + 1e-9:
        ends = []
        if low is not None and low < b_lo - 1e-9:
            ends.append(f"low {low} is below {b_lo:.3g}")
        if high is not None and high > b_hi + 1e-9:
            ends.append(f"high {high} is above {b_hi:.3g}")
        partly = low is not None and high is not None and high >= b_lo and low <= b_hi
        raise BudgetInfeasibleError(
            f"budget_avg_bits {low}..{high} is {'partly ' if partly else ''}outside the feasible range "
            f"{b_lo:.3g}..{b_hi:.3g} average bits ({lo / 1e9:.4g}..{hi / 1e9:.4g} GBitOPs) for {cfg.model} at "
            f"{pi.image_size} px with candidates w_bits {list(cfg.candidates.w_bits)}, a_bits "
            f"{list(cfg.candidates.a_bits)}: {'; '.join(ends) or 'no bounds given'}. Choose a budget range inside "
            f"it, or {CANDIDATES_HOW}.")
    warn_single_bucket(cfg)
    from .pareto_pick import check_limit_reachable
    check_limit_reachable(cfg.finetune.max_gbitops, cfg.model, lo, low ** 2 * total if low is not None else None, low)
    point = cfg.space.first_point()
    try:   # a dry build of one trial's SearchConfig catches bad fixed search settings now
        search = trial_search_config(cfg, point)
    except TypeError as e:
        known = sorted(f.name for f in fields(SearchConfig) if not f.metadata.get("testing"))
        unknown = sorted(set(cfg.search) - set(known))
        if unknown:
            raise ConfigError(f"Unknown 'search' setting(s) {unknown}.{did_you_mean(unknown, known)} Known search "
                              f"settings: {known}.") from None
        raise ConfigError(f"Bad 'search' settings {sorted(cfg.search)}: {e}. Known search settings: {known}.") from None
    _check_gradcam_layer(cfg, net, search.gradcam_layer, pi.image_size, pi.in_channels)
    _check_stores(cfg)
    _check_writable(cfg)
    from .sweep_resume import holds_sweep_state
    if not holds_sweep_state(cfg.resolved()):                  # a new sweep (a resume keeps what it started with)
        check_trial_count(cfg)
        check_budget_buckets(cfg)
        from .sampling import warmup_text              # (not at import: light commands need no Optuna)
        warmup = warmup_text(cfg.sampler.name, cfg.sampler.kwargs, cfg.n_trials)
        if warmup:
            log.warning("%s", warmup)
    if make_folders:
        _make_sqlite_folder(cfg)
    return SweepFacts(input_size=pi.image_size, in_channels=pi.in_channels, proxy_num_classes=pi.num_classes,
                      target_num_classes=ti.num_classes, proxy_train_size=proxy_train,
                      target_train_size=target_train, target_test_size=target_test,
                      feasible_avg_bits=(b_lo, b_hi), feasible_gbitops=(lo / 1e9, hi / 1e9),
                      downloads=tuple(dict.fromkeys(n for n in (proxy_note, target_note) if n)))


def _dataset_facts(name: str, cfg: SweepConfig, *, download: bool) -> tuple[tuple[Any, int, int], str | None]:
    """``name``'s (DatasetInfo, train images, test images), loaded; with ``download=False``, a dataset not there
    yet is not downloaded (nor its folder made): its known info and sizes, and the line saying where it will go."""
    from gmpq_core.data import load_dataset
    from gmpq_core.errors import DatasetNotDownloadedError

    try:
        bundle = load_dataset(name, root=cfg.data_root, image_size=cfg.image_size, download=download)
    except DatasetNotDownloadedError as e:
        if e.info is None or e.sizes is None:
            raise
        return (e.info, *e.sizes), (f"data: {e.title} is not in {e.folder} yet; the sweep downloads it there when it "
                                    "starts (torchvision; this machine needs internet access then)")
    return (bundle.info, len(bundle.train), len(bundle.test)), None


def _check_gradcam_layer(cfg: SweepConfig, net, override: str | None, input_size: int, in_channels: int) -> None:
    """The Grad-CAM layer every trial uses, resolved now on the preflight's model (``check_gradcam_layer``, shared
    with ``gmpq search``): a bad one used to fail every trial inside Ray, after the shared FP models had trained."""
    from gmpq_core.attribution import check_gradcam_layer

    check_gradcam_layer(net, model_name=cfg.model, override=override, input_size=input_size, in_channels=in_channels,
                        override_where="search.gradcam_layer of the sweep config")


# MLflow tracking URI schemes (a database URI may name its driver: postgresql+psycopg2://...), plus those
# plugins register (entry point group mlflow.tracking_store, e.g. azureml)
_TRACKING_SCHEMES = {"", "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks",
                     "databricks-uc", "uc"}


def _tracking_schemes() -> set[str]:
    from importlib.metadata import entry_points

    return _TRACKING_SCHEMES | {ep.name for ep in entry_points(group="mlflow.tracking_store")}


def check_tracking_scheme(uri: str | None, name: str = "tracking_uri",
                          default: str = "the sweep folder's mlflow.db") -> None:
    """ConfigError naming ``uri`` (as ``name``: a config key or a flag) when MLflow does not know its scheme
    (``bogus://x``); a known scheme, a plain path or no URI pass. ``default``: where runs go without one."""
    from urllib.parse import urlparse

    uri = uri or ""
    scheme = urlparse(uri).scheme.split("+")[0].lower() if "://" in uri else ""
    if scheme not in _tracking_schemes():
        raise ConfigError(f"{name} {uri!r} has a scheme MLflow does not know ({scheme!r}). Give sqlite:///PATH, "
                          "http://HOST:PORT (an MLflow server, e.g. from 'gmpq mlflow-server') or a database URI such "
                          f"as postgresql://..., or leave it out to log to {default}.")


def check_tracking_uri(uri: str | None, name: str = "--tracking-uri", *, default: str = "the sweep folder's mlflow.db",
                       leave_out: str | None = "keep it in the sweep folder") -> None:
    """A tracking URI checked as ``gmpq sweep`` checks its store, before any work: a scheme MLflow knows, and a
    ``sqlite:///PATH`` whose folder can be written (not a file, nor under one) and that is not a folder. ``name``
    names it in the message (a flag or a config key; the fix always says ``--tracking-uri``); ``default`` and
    ``leave_out``: where runs go without it (``leave_out`` None: leaving it out is no fix)."""
    check_tracking_scheme(uri, name, default)
    _check_sqlite_file("tracking_uri", "--tracking-uri", uri, leave_out=leave_out)


def _check_stores(cfg: SweepConfig) -> None:
    """The MLflow tracking URI and the Optuna storage URL are well formed (before any training: a bad
    one used to surface after the shared models had trained, or to switch MLflow off for the sweep)."""
    uri = cfg.tracking_uri or env_tracking_uri() or ""
    from_env = env_tracking_uri() is not None and uri == env_tracking_uri()
    check_tracking_scheme(uri, f"tracking_uri (from ${ENV_TRACKING_URI})" if from_env else "tracking_uri")
    if cfg.optuna_storage:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        try:
            make_url(cfg.optuna_storage).get_dialect()   # an unknown dialect (postgres://, foo://) too
        except (ArgumentError, ValueError) as e:
            raise ConfigError(f"optuna_storage {cfg.optuna_storage!r} is not a database URL ({e}). Use "
                              "sqlite:///PATH (the default: the sweep folder's optuna.db) or e.g. "
                              "postgresql://USER@HOST/DB.") from None
    for what, flag, url in (("optuna_storage", "--optuna-storage", cfg.optuna_storage),
                            ("tracking_uri", "--tracking-uri", uri)):
        _check_sqlite_file(what, flag, url)
    if cfg.optuna_storage:
        _check_database_opens(cfg.optuna_storage)
    from .shared_study import check_study_free
    check_study_free(cfg)


_NO_WORK = ("Nothing has been trained yet; fix the URL (or start the database), or leave optuna_storage "
            "(--optuna-storage) out to keep the Optuna study in the sweep folder's optuna.db.")


def shown_url(url: str) -> str:
    """``url`` as a message shows it: a password in it masked (postgresql://user:***@host/db)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not parseable: shown as given (checked elsewhere)
        return url


# SQLAlchemy's default drivers: the module it imports -> the pip package that installs it
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "pymysql": "PyMySQL",
                    "psycopg": "psycopg[binary]", "cx_Oracle": "cx-Oracle", "pyodbc": "pyodbc"}


def _check_database_opens(url: str) -> None:
    """An Optuna storage is opened once now: a database (postgresql://, mysql://) is connected to, an existing SQLite
    file read (a new one is left to the sweep: nothing is created here). A missing driver, a database that does not
    answer or a file that is no database used to end in a SQLAlchemy traceback once the shared models had trained."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    if url.lower().startswith("sqlite:"):
        database = make_url(url).database
        if not database or database == ":memory:" or not Path(database).expanduser().is_file():
            return
    engine = None
    try:
        engine = create_engine(url)
        with engine.connect() as connection:
            if url.lower().startswith("sqlite:"):
                connection.execute(text("SELECT name FROM sqlite_master LIMIT 1"))
    except ModuleNotFoundError as e:
        package = _DRIVER_PACKAGES.get(str(e.name), "the package that provides it")
        raise ConfigError(f"optuna_storage {shown_url(url)!r} needs the database driver '{e.name}', which is not "
                          f"installed: pip install {package}, or name another driver in the URL (e.g. "
                          f"postgresql+psycopg2://...). {_NO_WORK}") from None
    except Exception as e:  # noqa: BLE001 - any driver's connection error, said in one line
        why = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
        raise ConfigError(f"optuna_storage {shown_url(url)!r} cannot be opened ({type(e).__name__}: {why}). "
                          f"{_NO_WORK}") from None
    finally:
        if engine is not None:
            engine.dispose()


def _check_sqlite_file(what: str, flag: str, url: str | None, *,
                       leave_out: str | None = "keep it in the sweep folder") -> None:
    """A sqlite:///PATH store whose folder cannot be written fails now, naming it (SQLAlchemy raised a
    traceback once the shared models had trained). ``leave_out``: what leaving ``flag`` out does (None: no fix)."""
    if not url or not url.lower().startswith("sqlite:"):
        return
    from sqlalchemy.engine import make_url

    from gmpq_core.fileio import check_writable_dir

    database = make_url(url).database
    if not database or database == ":memory:":
        return
    path = Path(database).expanduser()
    otherwise = f", or leave it out to {leave_out}" if leave_out else ""
    check_writable_dir(path.parent, what=f"folder of the {what} database {url!r}",
                       hint=f"pass {flag} sqlite:///PATH with PATH in a folder you can write{otherwise}")
    if path.is_dir():
        raise ConfigError(f"{what} {url!r} names a folder, not a database file. Pass {flag} "
                          f"sqlite:///PATH/FILE.db{otherwise}.")


def _make_sqlite_folder(cfg: SweepConfig) -> None:
    """The folder of a sqlite:///PATH Optuna storage outside the sweep folder (which the sweep makes itself), made
    when missing (checked writable above), as MLflow makes its store's: SQLite makes no folder, and Optuna's open
    of the file failed with a traceback once the shared models had trained."""
    r = cfg.resolved()
    if not r.optuna_storage.lower().startswith("sqlite:"):
        return
    from sqlalchemy.engine import make_url

    database = make_url(r.optuna_storage).database
    folder = Path(database or ".").expanduser().absolute().parent
    if database and database != ":memory:" and folder != Path(r.out_dir) and not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)

