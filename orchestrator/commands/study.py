"""``gmpq study``: the generalization study on Ray, then its results page.

It tests the claim of GMPQ (Wang et al., ICCV 2021, "Generalizable Mixed-Precision Quantization via Attribution
Rank Preservation"): a bit policy searched on a small proxy dataset transfers to the large target, doing about as
well as one searched on the target itself, and better than the same search without the attribution loss (eta0).

    gmpq study --config experiments/generalization_cpu.yaml --out runs/study_cpu   (page: runs/study_cpu/results.md)
    gmpq study --smoke --out /tmp/study_smoke          (experiments/generalization_smoke.yaml, minutes)
    gmpq study --config FILE --smoke                   (FILE shrunk to smoke size)
    gmpq study --out runs/study_cpu --analyze-only     (rewrite the page from DIR/study.parquet)

--analyze-only describes the study in DIR as it was run (DIR/study_config.yaml); a --config or --smoke that
differs from it is refused, as a run with it would be. It attaches the page to the study's MLflow run in the store
that run recorded (DIR/mlflow_parent.json; so does a resume), whatever $MLFLOW_TRACKING_URI says now (--tracking-uri
names another store), and a line of its output names that store.

Rerunning with the same --out skips finished cells; a study stopped midway (Ctrl-C: exit 130, SIGTERM: 143) keeps
its rows, writes its page with the cells not run marked, and prints the command that continues it. Writes
DIR/study.parquet, DIR/study_config.yaml, DIR/mlflow.db (unless --tracking-uri or $MLFLOW_TRACKING_URI), the page
(--report, default DIR/results.md) and two plots: --png (default study_<name>.png next to the page), one panel per
method, and beside it <its stem>_by_budget.png, the methods side by side at each budget (both refused over an image
gmpq study did not write).

The page's first line records that gmpq study wrote it, with a digest of the rest: an existing --report file
outside the study folder is replaced only while it is such a page, unchanged. Any other file (docs/results.md,
which collects several studies and hand-written sections; a page edited since) is refused before any work: pass
--report another file, or move it away. DIR/results.md, the study folder's own page, is always rewritten (also one
an earlier gmpq wrote without the stamp). Hand-written reading goes in --notes FILE, which the page includes.

A difference between methods gets a win/loss/tie verdict only with 3 or more seeds on each side, and none at all
when the target FP model is near chance (below halfway between chance and 100% top-1, the rule a sweep uses for a
weak FP model): the page then says so above its results and keeps only the numbers.
"""
from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from . import address_help, help_text

__all__ = ["register", "run", "REPO_ROOT", "target_fp"]

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = REPO_ROOT / "experiments" / "generalization_smoke.yaml"


def _experiments():
    """Import the ``experiments`` package (it lives in the repository next to ``orchestrator``)."""
    try:
        import experiments.generalization  # noqa: F401
    except ModuleNotFoundError:
        if not (REPO_ROOT / "experiments" / "generalization.py").is_file():
            from gmpq_core.errors import ConfigError
            raise ConfigError("gmpq study needs the repository's experiments/ folder (run it from a source "
                              f"checkout); it was not found under {REPO_ROOT}.") from None
        sys.path.insert(0, str(REPO_ROOT))
    import experiments.generalization as gen
    import experiments.generalization_ray as ray_run
    return gen, ray_run


def _rel(path: Any) -> str:
    import os
    try:
        rel = os.path.relpath(path)
    except ValueError:   # another drive (Windows)
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def _header(cfg: Any, study_dir: Path, config_path: str, timing: dict, df: Any) -> dict[str, Any]:
    import torch

    gen, _ = _experiments()

    gpu = cfg.resources["gpu"] > 0 and torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if gpu else \
        f"CPU ({platform.processor() or platform.machine()}); no GPU was used"
    if timing.get("device"):   # recorded where the rows were computed (this machine or another)
        runner = next((r.get("runner") for r in reversed(timing.get("runs", [])) if r.get("device")), None)
        device = f"{timing['device']} (rows computed by {runner or 'gmpq study'})"
        if timing["device"].startswith("CPU") or timing["device"].endswith("cells on CPU"):
            device += "; no GPU was used"
    fp_note = "-"
    shared = next((r["shared_models"] for r in reversed(timing.get("runs", [])) if r.get("shared_models")), {})
    meta, _ = target_fp(cfg, study_dir, timing, classes=False)
    if meta:   # the model cache, or what a run elsewhere recorded of it (the cache stays on that machine)
        slice_ = (f"a stratified {cfg.proxy_eval_size}-image slice of the target test set" if cfg.proxy_eval_size
                  else "the whole target test set")
        cells = f"a stratified {cfg.test_size}-image slice" if cfg.test_size else "the whole test set"
        fp_note = (f"{meta.get('top1', float('nan')):.2f}% top-1 on {slice_} (the quick check every FP model of the "
                   f"study gets when trained, proxy_eval_size; the cells' top-1 is on {cells}, see 'evaluation') "
                   f"after {meta.get('steps')} SGD steps of batch {cfg.target_fp.batch_size}")
    teachers = ", ".join(f"{p.name} {shared[p.name]['top1']:.1f}%" for p in cfg.proxies
                         if (shared.get(p.name) or {}).get("top1") is not None)
    ft = cfg.finetune_config(0)                     # the values used, defaults filled in
    cells = gen.expand_grid(cfg)
    return {
        "title": f"Generalization study: {cfg.name}",
        "config": f"`{_rel(config_path)}` (resolved copy: `{_rel(study_dir / 'study_config.yaml')}`)",
        "device": device,
        "model": f"{cfg.model} ({'small-input' if cfg.small_input else 'ImageNet'} stem) at {_size_text(cfg, meta)}; "
                 f"candidates W{list(cfg.candidates.w_bits)} "
                 f"A{list(cfg.candidates.a_bits)}; stem and classifier FP",
        "grid": f"{len(cells)} cells = methods {list(cfg.methods)} x proxies {[p.name for p in cfg.proxies]} x budgets "
                f"{list(cfg.budgets)} avg bits x seeds {list(cfg.seeds)} ({len(df)} rows in study.parquet"
                f"{_missing_text(cells, df)})",
        "search": _search_line(cfg, gen),
        "fine-tune (identical for every policy)": f"{ft.epochs} epoch(s) x at most "
                  f"{ft.max_steps_per_epoch or 'all'} steps of batch {ft.batch_size} drawn from the full "
                  f"{_dataset_title(cfg.target)} training set, lr {ft.lr:g} cosine, from the target FP model",
        "target FP model": fp_note,
        "teachers": f"{cfg.teacher.steps} SGD steps on each proxy" + (f" (top-1: {teachers})" if teachers else ""),
        "evaluation": f"{cfg.test_size or 'all'} target test images (stratified, fixed); proxy-side top-1/ARD "
                      f"on {cfg.proxy_eval_size} proxy test images; target ARD on {cfg.ard_images} test images",
        "wall time": timing.get("text", "-"),
    }


def _missing_text(cells: list, df: Any) -> str:
    """For the grid line: the cells of the grid without a row (a study stopped midway), and how to add them."""
    if "cell_id" not in getattr(df, "columns", ()):
        return ""
    have = set(df["cell_id"])
    missing = sum(c["cell_id"] not in have for c in cells)
    return (f"; **{missing} of the {len(cells)} cells not run yet**: the tables below lack them; the same command "
            "adds them") if missing else ""


def target_fp(cfg: Any, study_dir: Path, timing: dict, *, classes: bool = True) -> tuple[dict | None, int | None]:
    """The target FP model's meta (its cache in the study folder, else what a run elsewhere recorded of it in
    ``timing``) and the target's number of classes (its classifier's rows, else the dataset's; None if neither, or
    without ``classes``)."""
    from gmpq_core.fileio import load_checkpoint
    from gmpq_core.models import model_file_tag

    shared = next((r["shared_models"] for r in reversed(timing.get("runs", [])) if r.get("shared_models")), {})
    caches = sorted((study_dir / "cache").glob(f"{model_file_tag(cfg.model)}-{cfg.target}-all-*.pt"))
    saved = load_checkpoint(caches[-1]) if caches else {}
    meta = saved.get("meta", {}) if caches else shared.get("target")
    rows = [v.shape[0] for k, v in (saved.get("state_dict") or {}).items() if k.endswith("weight") and v.ndim == 2]
    if rows or not classes:
        return meta, int(rows[-1]) if rows else None
    try:
        from gmpq_core.data import load_dataset
        return meta, int(load_dataset(cfg.target, root=cfg.data_root).info.num_classes)
    except Exception:  # noqa: BLE001 - the data is not here: no chance level to judge the numbers by
        return meta, None


def _size_text(cfg: Any, meta: dict | None) -> str:
    """The input size the study's models saw: its ``image_size``, else the one the target model recorded."""
    size = cfg.image_size or (meta or {}).get("input_size")
    return f"{size} px" if size else "the dataset's own image size"


def _dataset_title(name: str) -> str:
    """A registered dataset's own title ('Fashion-MNIST' for fashion_mnist); ``name`` for a folder dataset."""
    from gmpq_core.data import DATASETS

    spec = DATASETS.get(name.partition(":")[0])
    return spec.description.split(":")[0] if spec is not None and not spec.takes_path else name


def _search_line(cfg: Any, gen: Any) -> str:
    """The search settings every searched method shares, as the searches used them (SearchConfig's default for a
    key the study config leaves out, not None), and what a method sets on top of them."""
    searched = [m for m in cfg.methods if m in gen.SEARCHED]
    if not searched:
        return "none (no method of this study searches a policy)"
    from gmpq_core.search_config import SearchConfig

    # the study's search settings, no method's own (cfg.search_config minus SEARCH_OVERRIDES and target_search)
    sc = SearchConfig.from_dict({**cfg.search, "candidates": cfg.candidates, "budget": {"avg_bits": cfg.budgets[0]},
                                 "seed": 0})
    own = {m: [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in gen.SEARCH_OVERRIDES[m].items()
               if getattr(sc, k) != v and not (m == "target_search" and k in cfg.target_search)]
           for m in searched}
    own = "".join(f"; {m} sets {', '.join(kv)}" for m, kv in own.items() if kv)
    return (f"{sc.epochs} epoch(s) x at most {sc.max_steps_per_epoch or 'all'} steps of batch {sc.batch_size}; eta "
            f"{sc.eta:g}, lambda {sc.lam:g}, fill_budget {sc.fill_budget}{own}; target_search overrides "
            f"{dict(cfg.target_search) or 'none'}")


def _studied_config(cfg: Any, out: Path, gen: Any, ray_run: Any) -> Any:
    """--analyze-only: the config of the study whose rows ``out`` holds (its study_config.yaml), with ``cfg``'s
    tracking URI. A ``cfg`` (--config, --smoke) that differs from it is refused: where a run would be refused too
    (``check_same_study_config``), with its rule and the ways out of --analyze-only (nothing is resumed here), or,
    where a run would resume the grid, in its name or grid, as the page would describe another study than the rows'. Without a saved config or rows: ``cfg`` (nothing to describe)."""
    from gmpq_core.errors import ConfigError

    saved = out / ray_run.CONFIG_FILE
    if not (saved.is_file() and (out / ray_run.STUDY_FILE).is_file()):
        return cfg
    fix = ("--analyze-only writes the page of the study as it was run: leave out --config and --smoke to use the "
           "saved config")
    gen.check_same_study_config(cfg, out, ray_run.STUDY_FILE,
                                fix=f"{fix}, or give --out the folder of the study this config ran.")
    old = gen.load_study_config(saved)
    before, now = old.to_dict(), cfg.to_dict()
    diff = [k for k in ("name", "methods", "proxies", "budgets", "seeds") if before[k] != now[k]]
    if diff:
        raise ConfigError(f"'{out}' holds rows of a study whose config differs in {', '.join(diff)} from this one "
                          f"(saved in '{saved}'). {fix}, or run this one without --analyze-only to add its cells.")
    return gen.StudyConfig.from_dict({**before, "tracking_uri": cfg.tracking_uri})


def run(args: argparse.Namespace) -> int:
    import logging

    from gmpq_core.errors import ConfigError
    from gmpq_core.fileio import atomic_write_json, read_json
    from orchestrator.mlflow_notes import noting_mlflow_off
    from orchestrator.mlflow_sink import PARENT_FILE
    from orchestrator.study import check_page_replaceable, write_results_md
    from orchestrator.study_plot import check_plot_replaceable, companion_path, plot_study, plot_title
    from orchestrator.commands.sweep import check_address_arg

    from orchestrator.commands import quiet_libraries

    from ._study_store import log_page, not_logged_text, say_store

    quiet_libraries(getattr(args, "verbose", False))    # no MLflow / Alembic INFO lines between the cells' lines
    gen, ray_run = _experiments()
    logging.getLogger("experiments").setLevel(logging.INFO)
    config_path = args.config or (str(SMOKE_CONFIG) if args.smoke else None)
    out = Path(args.out).expanduser().resolve() if args.out else None
    if config_path is None:
        if args.analyze_only and out is not None and not (out / ray_run.CONFIG_FILE).is_file():
            sweep = (out / "sweep_config.yaml").is_file()     # gmpq status / pareto read those
            raise ConfigError(f"--analyze-only rewrites the results page of a study, but '{out}' holds none (no "
                              f"{ray_run.CONFIG_FILE}{'; it is a sweep folder: gmpq status or gmpq pareto read it' if sweep else ''}): "
                              "check --out (the folder 'gmpq study' wrote), or run the study first with --config FILE.")
        if out is None or not (out / ray_run.CONFIG_FILE).is_file():
            raise ConfigError("gmpq study needs --config FILE (e.g. experiments/generalization_cpu.yaml), --smoke, "
                              "or --out DIR of an earlier study (its study_config.yaml is reused).")
        config_path = str(out / ray_run.CONFIG_FILE)
    cfg = gen.load_study_config(config_path)
    if args.smoke and args.config:
        cfg = gen.smoke_version(cfg)
    if args.tracking_uri:
        cfg = gen.StudyConfig.from_dict({**cfg.to_dict(), "tracking_uri": args.tracking_uri})
    out = out or Path("runs") / cfg.name
    if args.analyze_only:       # the page describes the study the rows come from, not another config
        cfg = _studied_config(cfg, out, gen, ray_run)
    # every input checked before the study runs: a bad one is an error now, not a traceback after hours
    ray_run.check_tracking_uri(cfg.tracking_uri, out)
    # --analyze-only of a folder without an MLflow run (a copy, docs/study_data) logs nowhere: no store made or named
    logged = not args.analyze_only or bool(args.tracking_uri) or (out / PARENT_FILE).is_file()
    say_store(cfg, out, ray_run, logs=logged)
    check_address_arg(args.address)
    if not args.analyze_only:
        ray_run.check_study_dir(out)
    notes = _read_notes(args.notes)
    report = Path(args.report).expanduser() if args.report else out / "results.md"
    png = Path(args.png).expanduser() if args.png else report.parent / f"study_{cfg.name}.png"
    _check_output(report, "results page", "--report", "results.md")
    own_page = report.resolve() == (out / "results.md").resolve()    # the study folder's own page: its output
    if not own_page:                    # a hand-written or edited page elsewhere is not replaced: refused now
        check_page_replaceable(report)
    if args.png:
        _check_output(png, "plot", "--png", f"study_{cfg.name}.png")
    own_png = png.resolve().parent == out.resolve()      # in the study folder: its output, always rewritten
    if not own_png:                     # someone's image elsewhere is not replaced: refused now
        check_plot_replaceable(png)
    timing_file = out / "study_timing.json"
    timing = read_json(timing_file) if timing_file.is_file() else {"runs": []}
    mlflow_warned: list[str] = []
    not_run = 0
    if not args.analyze_only:
        with noting_mlflow_off() as mlflow_warned:
            summary = ray_run.run_study(cfg, out, address=args.address, progress=lambda m: print(m, flush=True))
        timing["runs"].append({"wall_seconds": summary.wall_seconds, "prepare_seconds": summary.prepare_seconds,
                               "cells_run": summary.n_completed + summary.n_failed, "failed": summary.n_failed,
                               **({"device": summary.device, "runner": "gmpq study"} if summary.device else {})})
        if summary.device:          # the page names it, also when written later on another machine
            timing["device"] = summary.device
        atomic_write_json(timing_file, timing)
        print(f"{summary.n_completed} cells completed, {summary.n_failed} failed, {summary.n_skipped} skipped in "
              f"{summary.wall_seconds / 60:.1f} min; rows: {out / ray_run.STUDY_FILE}")
        not_run = summary.n_cells - summary.n_skipped - summary.n_completed - summary.n_failed
    df = ray_run.read_study(out)
    if df.empty:
        raise ConfigError(f"No results in {out / ray_run.STUDY_FILE}; run the study first (without --analyze-only).")
    runs = timing["runs"]
    total = sum(r["wall_seconds"] for r in runs)
    timing["text"] = (f"{total / 60:.1f} min over {len(runs)} invocation(s) (shared FP models "
                      f"{sum(r['prepare_seconds'] for r in runs) / 60:.1f} min of it); sum of per-cell seconds "
                      f"{df['cell_seconds'].sum() / 60:.1f} min") if runs else "-"
    if not own_page:
        check_page_replaceable(report)  # again: the file may have appeared while the study ran
    if not own_png:
        check_plot_replaceable(png)
    meta, num_classes = target_fp(cfg, out, timing)
    smoke = bool(args.smoke) or cfg.name.endswith("_smoke")
    plot_study(df, png, title=plot_title(cfg.name, df, fp_top1=(meta or {}).get("top1"), num_classes=num_classes,
                                         smoke=smoke), fp_top1=(meta or {}).get("top1"))
    write_results_md(df, report, png_path=png, header=_header(cfg, out, config_path, timing, df), notes=notes,
                     target=_dataset_title(cfg.target), fp_top1=(meta or {}).get("top1"), num_classes=num_classes,
                     smoke=smoke)
    store = None
    if logged:       # (quiet: the study's warning said it all, not twice)
        store = log_page(cfg, out, report, png, ray_run, quiet=bool(mlflow_warned))
    print(f"Results page: {report}\nPlots: {png}, {companion_path(png).name} beside it")
    if store:
        print(f"MLflow: the page, plots and {ray_run.STUDY_FILE} attached to the study's run in {store}")
    if not args.analyze_only and not_run > 0:       # stopped (Ctrl-C, SIGTERM): not a finished study
        from orchestrator.ray_env import stop_status, stop_word, terminated

        again = shlex.join(["gmpq", *getattr(args, "argv", ["study", "--out", str(out)])])    # every flag given
        print(f"gmpq study: the study was {stop_word(terminated())}: {not_run} of {summary.n_cells} cells did not run "
              f"(the page describes the {len(df)} with rows; their rows are kept). Continue with: {again}",
              file=sys.stderr)
        return stop_status(terminated())
    if not logged:
        print(not_logged_text(out))
    if args.print:
        print(report.read_text())
    failed = int((df["status"] != "completed").sum())
    if failed:
        print(f"gmpq: {failed} of {len(df)} cells in {out / ray_run.STUDY_FILE} failed (its 'error' column says why); "
              "run the study again (same --out, without --analyze-only) to retry them.", file=sys.stderr)
        return 1
    return 0


def _read_notes(path: str | None) -> str:
    """The --notes file's text ("" without one), read before the study runs."""
    from gmpq_core.errors import ConfigError

    if not path:
        return ""
    try:
        return Path(path).expanduser().read_text()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"Cannot read the --notes file '{path}' ({reason}); pass --notes a markdown file you can "
                          "read, or leave it out.") from None


def _check_output(path: Path, what: str, flag: str, example: str) -> None:
    """ConfigError unless ``path`` (the page or the plot) can be written: not a folder, in a folder that can be
    made and written."""
    from gmpq_core.errors import ConfigError
    from gmpq_core.fileio import check_writable_dir

    if path.is_dir():
        raise ConfigError(f"The {what} '{path}' is a folder; pass {flag} a file path, e.g. {path / example}.")
    check_writable_dir(path.parent, what=f"folder of the {what}", hint=f"pass {flag} a path in a folder you can write")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("study", help="the generalization study (grid on Ray) and its results page",
                              description=help_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="study YAML (experiments/generalization*.yaml)")
    p.add_argument("--smoke", action="store_true",
                   help="minutes-long version: the smoke config, or --config FILE shrunk to smoke size")
    p.add_argument("--out", metavar="DIR", help="study folder (default runs/<name>); rerun to resume")
    p.add_argument("--report", metavar="PATH", help="results page to write (default DIR/results.md); an existing file is replaced "
                   "only if gmpq study wrote it and it is unchanged")
    p.add_argument("--png", metavar="PATH", help="plot to write (default study_<name>.png next to the page); the "
                   "per-budget plot goes beside it as <its stem>_by_budget.png")
    p.add_argument("--notes", metavar="FILE", help="hand-written reading (markdown) to include in the page")
    p.add_argument("--analyze-only", action="store_true", help="only rewrite the page from DIR/study.parquet")
    p.add_argument("--address", metavar="ADDR", help=address_help("start a local one"))
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow URI (default: the store the study's run recorded in DIR, else "
                   "$MLFLOW_TRACKING_URI if set, else sqlite:///DIR/mlflow.db)")
    p.add_argument("--print", action="store_true", help="print the page when done")
    p.set_defaults(func=run)
