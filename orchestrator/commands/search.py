"""``gmpq search``: one GMPQ search on a proxy dataset; writes ``DIR/policy.json`` and ``DIR/result.json``.

Settings come from the built-in defaults, then ``--config FILE`` (YAML whose keys mirror
``SearchJob``: model, dataset, proxy_size, ..., and ``search:`` with ``SearchConfig`` keys), then
the command-line flags. The FP teacher is trained on the proxy once and cached (``cache_dir``).
``gmpq finetune --policy DIR/policy.json`` deploys the result (the policy's meta names the model).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gmpq_core.errors import ConfigError, GMPQError
from gmpq_core.fileio import atomic_write_json, check_writable_dir
from gmpq_core.names import SEARCH_DATASET, SEARCH_MODEL

from ..common_args import DataRootArg, dataset_help, flag_text, model_help, naming_flags, naming_section
from ..progress import ProgressReporter, make_progress
from . import add_precision_arg, at_least

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parser (the help) stays quick
    from gmpq_core.jobs import SearchJob
    from gmpq_core.search_config import SearchResult

log = logging.getLogger(__name__)

POLICY_FILE, RESULT_FILE = "policy.json", "result.json"

# flag dest -> (level, key): "job" keys live at the top of the YAML, "search" keys under search:
_FLAG_KEYS = {"model": ("job", "model"), "dataset": ("job", "dataset"), "data_root": ("job", "data_root"),
              "proxy_size": ("job", "proxy_size"), "teacher_epochs": ("job", "teacher_epochs"),
              "cache_dir": ("job", "cache_dir"), "device": ("job", "device"),
              "precision": ("job", "precision"), "eval_size": ("job", "eval_size"),
              "seed": ("search", "seed"), "eta": ("search", "eta"), "lam": ("search", "lam"),
              "p_mode": ("search", "p_mode"), "penalty": ("search", "penalty"), "epochs": ("search", "epochs"),
              "batch_size": ("search", "batch_size"), "max_steps_per_epoch": ("search", "max_steps_per_epoch"),
              "lr_arch": ("search", "lr_arch"), "fill_budget": ("search", "fill_budget"),
              "include_stem": ("search", "include_stem"), "include_classifier": ("search", "include_classifier"),
              "stem_bits": ("search", "stem_bits")}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search", help="search a mixed-precision bit policy with GMPQ on a proxy dataset",
        description="Search per-layer weight/activation bitwidths with GMPQ (attribution-rank-preserving "
                    "differentiable search) on a small proxy dataset; writes DIR/policy.json and DIR/result.json.")
    p.add_argument("--config", metavar="FILE", help="YAML with SearchJob keys and a 'search:' mapping")
    # what a flag left out gets: SearchJob's defaults (torch-free, as gmpq_core.names holds them)
    p.add_argument("--model", metavar="NAME", help=model_help(SEARCH_MODEL))
    p.add_argument("--dataset", metavar="NAME", help=dataset_help(SEARCH_DATASET, "proxy dataset"))
    p.add_argument("--data-root", metavar="DIR", action=DataRootArg, help="where the dataset files are")
    p.add_argument("--target-dataset", metavar="NAME",
                   help="the dataset the policy is meant for, written into its meta: `gmpq finetune --policy` then "
                        "deploys it there (default: the proxy's dataset)")
    p.add_argument("--proxy-size", type=int, action=at_least(1), metavar="N",
                   help="stratified proxy of N training images (default 2000)")
    p.add_argument("--eval-size", type=int, action=at_least(0), metavar="N",
                   help="held-out test images measuring the proxy top-1 of the searched policy (default 1000; 0: none, "
                        "and the summary's proxy top-1 is then measured on the proxy's own training images)")
    p.add_argument("--seed", type=int, help="seed of the teacher, the supernet and the data order (default 0)")
    budget = p.add_argument_group("BitOPs budget (default none: no budget term with the default hinge penalty, "
                                  "and the policy is the argmax of the search, whatever it costs)")
    budget = budget.add_mutually_exclusive_group()
    budget.add_argument("--budget-avg-bits", type=float, metavar="B",
                        help="budget = BitOPs of the uniform WbAb policy on the searchable layers")
    budget.add_argument("--budget-gbitops", type=float, metavar="G", help="budget in GBitOPs (quantized layers)")
    p.add_argument("--eta", type=float, help="weight of the attribution loss (default 40)")
    p.add_argument("--lam", type=float, help="weight of the complexity penalty (default 3e-4)")
    p.add_argument("--p-mode", choices=("capacity", "fixed"), help="capacity-aware p (default) or fixed p")
    p.add_argument("--penalty", choices=("hinge", "official"), help="budget hinge (default) or official lambda-only")
    p.add_argument("--lr-arch", type=float, help="learning rate of the architecture logits (default 0.01)")
    p.add_argument("--fill-budget", action=argparse.BooleanOptionalAction, default=None,
                   help="after the budget repair, raise bits while the policy still fits (default: off)")
    p.add_argument("--include-stem", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the stem at --stem-bits through the search (default: full precision)")
    p.add_argument("--include-classifier", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the classifier at --stem-bits through the search (default: full precision)")
    p.add_argument("--stem-bits", type=int, metavar="B",
                   help="bits of the included stem / classifier, weights and input (default 8)")
    p.add_argument("--epochs", type=int, action=at_least(1), help="search epochs (default 25)")
    p.add_argument("--batch-size", type=int, action=at_least(1), metavar="B", help="search batch size (default 256)")
    p.add_argument("--max-steps-per-epoch", type=int, action=at_least(1), metavar="N",
                   help="cap every epoch at N batches")
    p.add_argument("--teacher-epochs", type=int, action=at_least(1), metavar="E",
                   help="FP teacher epochs on the proxy (default 3)")
    p.add_argument("--cache-dir", metavar="DIR", help="teacher cache (default $GMPQ_CACHE_DIR or ~/.cache/gmpq)")
    p.add_argument("--device", help="torch device (default cpu)")
    add_precision_arg(p, default=None)
    p.add_argument("--out", default="runs/search", metavar="DIR", help="output folder (default runs/search)")
    p.set_defaults(func=run)


def _read_yaml(path: str) -> dict[str, Any]:
    from search_spaces.presets import load_yaml

    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"The config file '{path}' must hold a mapping of settings (model: ..., search: ...), "
                          f"but it holds a {type(data).__name__}.")
    return data


def build_job(args: argparse.Namespace) -> SearchJob:
    """Defaults < YAML (``--config``) < flags."""
    from gmpq_core.jobs import SearchJob

    d = _read_yaml(args.config) if args.config else {}
    search = d.get("search") or {}
    if not isinstance(search, dict):
        raise ConfigError(f"'search' in '{args.config}' must be a mapping of search settings, but got {search!r}.")
    d, search = dict(d), dict(search)
    given: dict[str, tuple[str, Any]] = {}      # key -> (flag, value) of the values a flag gave: errors name the flag
    for dest, (level, key) in _FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            (d if level == "job" else search)[key] = value
            given[key] = ("--" + dest.replace("_", "-"), value)
    for kind in ("avg_bits", "gbitops"):
        value = getattr(args, f"budget_{kind}")
        if value is not None:
            search["budget"] = {kind: value}
            given[kind] = (f"--budget-{kind.replace('_', '-')}", value)
    d["search"] = search
    try:
        return SearchJob.from_dict(d)
    except GMPQError as e:            # a flag's value named as typed; a --config file's search key as written there
        from_file = [k for k in (d.get("search") or {}) if k not in given and k != "budget"]
        raise naming_section(naming_flags(e, given), "search", from_file) from None


def _budget_label(args: argparse.Namespace) -> str | None:
    """What an infeasible budget's message calls a budget given by a flag (None: one from --config)."""
    if args.budget_gbitops is not None:
        return flag_text("--budget-gbitops", args.budget_gbitops)
    return flag_text("--budget-avg-bits", args.budget_avg_bits) if args.budget_avg_bits is not None else None


def format_summary(result: SearchResult, out: Path, *, eval_size: int | None = None,
                   eval_size_from: str = "--eval-size 0") -> str:
    """The search's summary (stdout). ``eval_size`` 0: the proxy top-1 was measured on the proxy's own training
    batches (no held-out images), said as such, ``eval_size_from`` naming where the 0 came from."""
    lines = [f"{'layer':28s} {'W':>2s} {'A':>2s}"]
    lines += [f"{name:28s} {s.w_bits:2d} {s.a_bits:2d}" for name, s in result.policy.layers.items()]
    w, a = result.policy.average_bits()
    budget = (f"{result.budget_bitops / 1e9:.4f} GBitOPs" if result.budget_bitops is not None else "none")
    measured = (f"on the proxy's own training images: no held-out images, {eval_size_from}; "
                if eval_size == 0 else "")
    epochs = result.epochs_run
    lines += [f"BitOPs (quantized layers): {result.bitops_quantized / 1e9:.4f} G; budget {budget}; "
              f"whole network (FP layers at 32x32): {result.bitops_total / 1e9:.4f} G",
              f"mean bits per layer (unweighted; the budget limits the BitOPs above, not these): W {w:.2f}, A {a:.2f}; "
              f"proxy top-1 {result.proxy_top1:.2f}% ({measured}the derived policy, BN "
              f"recalibrated; the epochs' figures are the supernet's); ARD {result.ard:.4f}; "
              f"p {result.p:.3f}; {epochs} epoch{'' if epochs == 1 else 's'} in {result.search_seconds:.1f} s",
              f"wrote {out / POLICY_FILE} and {out / RESULT_FILE}"]
    return "\n".join(lines)


def _cache_hint(args: argparse.Namespace) -> str:
    """How to point the teacher cache elsewhere, given where its folder came from."""
    import os

    if args.cache_dir is not None:
        return "pass --cache-dir a folder you can write"
    if args.config and "cache_dir" in _read_yaml(args.config):
        return f"set cache_dir in {args.config} to a folder you can write, or pass --cache-dir DIR"
    if os.environ.get("GMPQ_CACHE_DIR"):
        return "set $GMPQ_CACHE_DIR to a folder you can write, or pass --cache-dir DIR"
    return "pass --cache-dir a folder you can write"


def _check_cache_dir(job: SearchJob, args: argparse.Namespace) -> None:
    """The teacher cache (``cache_dir/teachers``) must be a folder this process can write (the teacher is written
    there once trained: a file in the way failed only then, and the training was lost); a read-only cache that
    already holds this job's teacher is fine."""
    from gmpq_core.jobs import teacher_cached

    teachers = Path(job.cache_dir).expanduser() / "teachers"
    try:
        check_writable_dir(teachers, what="teacher cache folder", hint=_cache_hint(args))
    except ConfigError:
        if teachers.is_dir() and teacher_cached(job):
            return
        raise


def _stopped_text(job: SearchJob, out: Path, teacher_done: bool, marks: dict | None = None) -> str:
    """What an interrupted search keeps, by the files in ``out`` now against ``marks`` (``file_marks``, taken before
    it wrote them; None: stopped before), and what rerunning the same command does."""
    from ._single_run import replaced_since, written_text

    written = written_text("search", out, (POLICY_FILE, RESULT_FILE), replaced_since(out, marks))
    earlier = (f" ({out} keeps the earlier search's {POLICY_FILE} and {RESULT_FILE})"
               if (out / POLICY_FILE).is_file() else "")
    cache = Path(job.cache_dir).expanduser() / "teachers"
    if teacher_done:
        teacher = (f"The FP teacher is kept in the cache ({cache}): rerunning the same command reuses it and starts "
                   "the search again at epoch 1.")
    else:
        teacher = ("No FP teacher was cached (its training had not finished): rerunning the same command trains it "
                   "again, then starts the search at epoch 1.")
    if written is not None:             # stopped while it wrote its files (or after): they are this search's
        return f"{written} {teacher}"
    return f"a search keeps no checkpoint, so nothing of this search is kept{earlier}. {teacher}"


def run(args: argparse.Namespace) -> int:
    from orchestrator.ray_env import ctrl_c_signals

    from ._single_run import stopped

    state: dict[str, Any] = {}
    with ctrl_c_signals(python_sigint=True):     # SIGTERM (a batch job stopped, kill) as Ctrl-C: one line, exit 143
        try:
            return _run(args, state)
        except KeyboardInterrupt as e:
            if "job" not in state:               # stopped before any work
                return stopped("gmpq search", e, "nothing was started; rerun the same command to search.")
            teacher = state.get("teacher", False)
            if not teacher:                      # stopped before its teacher was loaded: one cached earlier?
                from gmpq_core.jobs import teacher_cached
                try:
                    teacher = teacher_cached(state["job"])
                except (GMPQError, OSError):
                    teacher = False
            return stopped("gmpq search", e, _stopped_text(state["job"], state["out"], teacher, state.get("marks")))


def _run(args: argparse.Namespace, state: dict[str, Any]) -> int:
    from gmpq_core.data import check_dataset_name
    from gmpq_core.jobs import check_job, load_teacher, run_search_job
    from gmpq_core.precision import resolve_precision

    from ..common_args import resolve_device
    from ._single_run import check_out_paths, file_marks

    job = build_job(args)
    if args.data_root is not None:                     # typed here (a typo: not other data); a config's as before
        from orchestrator.data_roots import check_given_data_root
        check_given_data_root(args.data_root, job.dataset)
    job = dataclasses.replace(job, device=resolve_device(job.device))   # a bad or absent GPU: exit 2, not a traceback
    resolve_precision(job.precision, job.device)                        # bf16 on a GPU without it: the same
    if args.target_dataset is not None:
        check_dataset_name(args.target_dataset)
    out = check_writable_dir(args.out, hint="pass --out a folder you can write")  # before any training
    check_out_paths(out, "gmpq search", files=(POLICY_FILE, RESULT_FILE), when="when the search ends")
    _check_cache_dir(job, args)
    state.update(job=job, out=out)
    if (out / POLICY_FILE).exists():
        print(f"gmpq search: {out} holds an earlier search's {POLICY_FILE} and {RESULT_FILE}; this search replaces "
              "them when it ends (pass another --out to keep them)", file=sys.stderr)
    # before the teacher is trained: the model builds, its Grad-CAM layer resolves, the budget is feasible
    check_job(job, gradcam_where=f"search.gradcam_layer of the --config file {args.config}",
              budget_label=_budget_label(args))
    bar = make_progress("teacher epoch")
    try:
        teacher = load_teacher(job, progress=bar, reporter=ProgressReporter("teacher, training top-1", total_epochs=job.teacher_epochs))
    finally:
        bar.close()
    state["teacher"] = True                      # trained and cached (or read from the cache)
    print(f"FP teacher: top-1 {teacher.test_top1:.2f}% on {teacher.test_images} held-out test images"
          f"{' (cached)' if teacher.cached else ''}", file=sys.stderr)
    weak = teacher.weak_message(job)
    if weak:
        print(f"gmpq search: warning: {weak}", file=sys.stderr)
    bar = make_progress("search epoch")
    try:
        result = run_search_job(job, progress=bar, reporter=ProgressReporter("search", total_epochs=job.search.epochs),
                                checked=True)                  # check_job above
    finally:
        bar.close()
    if args.target_dataset is not None:
        result.policy.meta["target_dataset"] = args.target_dataset
    out.mkdir(parents=True, exist_ok=True)
    state["marks"] = file_marks(out, (POLICY_FILE, RESULT_FILE))     # what a stop finds replaced: this search's
    result.policy.save(out / POLICY_FILE)
    atomic_write_json(out / RESULT_FILE, {**result.to_dict(), "job": job.to_dict()})
    print(format_summary(result, out, eval_size=job.eval_size,
                         eval_size_from="--eval-size 0" if args.eval_size == 0 else f"eval_size: 0 in {args.config}"),
          file=sys.stdout)
    return 0
