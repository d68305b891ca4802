"""``gmpq evaluate``: top-1 / top-5 of final quantized models on a dataset's test split, beside what they recorded.

    gmpq evaluate runs/demo                          # every final model of a sweep (float and integer files)
    gmpq evaluate runs/demo/models/<trial>.int.pt --test-size 2000
    gmpq evaluate model.pt --dataset mnist5k         # another dataset with as many classes and channels

A model file (``gmpq finetune``'s float one, or ``gmpq export``'s integer one) records its dataset and input
normalisation; that dataset's test split is the default. The table gives each model's bits, BitOPs, top-1
and top-5 here, and the top-1 its fine-tune recorded, with the number of test images it was measured on where
that differs (a fine-tune capped by --test-size); on the same images, small differences are float-level (another
memory layout, batch size or device). Each row is named by the shortest end of its path that no other row shares
(``runs/ft1/quantized.pt`` and ``runs/ft2/quantized.pt``: ``ft1/quantized.pt``, ``ft2/quantized.pt``); --json
gives that name as ``name`` beside the ``path`` as given. A file named twice (or by two paths) is evaluated once.
--dataset with another dataset than the model's needs as many classes and channels; a note then says that its labels
are read as the model's classes in the same order (label i = class i), which holds only for the same classes.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from gmpq_core.errors import ConfigError

from . import add_precision_arg, at_least, help_text

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..common_args import ExistingDataRootArg

    p = subparsers.add_parser("evaluate", help="top-1 / top-5 of final quantized models on a test split",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a model file (DIR/models/<trial>.pt or .int.pt, DIR/quantized.pt) or a folder holding them")
    p.add_argument("--dataset", default=None, metavar="NAME",
                   help="evaluate on this dataset's test split (default: the one each model records)")
    p.add_argument("--data-root", default=None, metavar="DIR", action=ExistingDataRootArg,
                   help="the folder that holds the dataset files (default: the dataset's own location)")
    p.add_argument("--test-size", type=int, action=at_least(1), default=None, metavar="N",
                   help="a stratified subset of N test images (default: the whole test split)")
    p.add_argument("--batch-size", type=int, action=at_least(1), default=256, metavar="B")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)")
    add_precision_arg(p, what="evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the --test-size subset")
    p.add_argument("--json", action="store_true", help="print one JSON object per model instead of a table")
    p.set_defaults(func=run)


def model_paths(paths: list[str]) -> list[Path]:
    """The model files ``paths`` name: files as given; a folder's float models and, beside each, its integer file."""
    from gmpq_core.fileio import integer_path

    from .export import model_files, refuse_other_file

    out: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_file():
            refuse_other_file(path)
            out.append(path)
            continue
        for f in model_files(path):
            out.append(f)
            exported = integer_path(f)
            if exported.is_file():
                out.append(exported)
    seen: set[Path] = set()                 # one row per file, however often (or by whichever path) it was named
    unique = []
    for f in out:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def row_names(files: list[Path]) -> list[str]:
    """Each file's name in the table: its last path components, as few as make it differ from every other file's
    (a file given twice keeps its whole path, twice)."""
    parts = [f.parts for f in files]
    depth = [1] * len(files)
    while True:
        names = [str(Path(*p[-k:])) for p, k in zip(parts, depth)]
        clash = [i for i, name in enumerate(names) if names.count(name) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return names
        for i in clash:
            depth[i] += 1


def run(args: argparse.Namespace) -> int:
    from ..common_args import resolve_device

    files = model_paths(args.paths)                  # a bad path fails before any model or dataset is read
    names = row_names(files)
    device = resolve_device(args.device)
    data: dict[tuple, Any] = {}
    rows = []
    for i, (f, name) in enumerate(zip(files, names), 1):
        t0 = time.perf_counter()
        row = {"name": name, **evaluate_file(f, args, device, data)}
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        else:                                        # long work shows progress: ~7 s per 10,000 images on 2 cores
            print(f"gmpq evaluate: [{i}/{len(files)}] {f}: top-1 {row['top1']:.2f} % on {row['test_images']} "
                  f"images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if not args.json:
        print(format_table(rows))
    return 0


def evaluate_file(path: Path, args: argparse.Namespace, device: str, data: dict) -> dict:
    """One model's row: its bits and results beside top-1 / top-5 on the test split (``data`` caches loaders)."""
    from gmpq_core.export import load_quantized_model
    from gmpq_core.train import evaluate, training_layout_

    model = load_quantized_model(path, device=device)
    recorded = model.preprocess.get("dataset") or model.results.get("dataset")
    dataset = args.dataset or recorded
    if dataset is None:
        raise ConfigError(f"'{path}' records no dataset (written before model files kept one); pass --dataset NAME "
                          "(the dataset it was fine-tuned on).")
    size = model.preprocess.get("image_size") or model.arch.get("input_size")
    key = (dataset, size)
    if key not in data:
        data[key] = _test_loader(dataset, args, size, device)
    info, loader, n = data[key]
    if (info.num_classes, info.in_channels) != (model.arch["num_classes"], model.arch["in_channels"]):
        raise ConfigError(f"'{path}' is a {model.arch['model']} for {model.arch['num_classes']} classes of "
                          f"{model.arch['in_channels']}-channel images, but {dataset} has {info.num_classes} classes "
                          f"of {info.in_channels}-channel images; evaluate it on "
                          f"{recorded or 'the dataset it was fine-tuned on'} (--dataset).")
    same = recorded is not None and _same_dataset(dataset, recorded)
    _note_other_trial(path, model.results.get("trial_id"))
    if recorded is not None and not same:
        print(f"gmpq evaluate: note: '{path}' was fine-tuned on {recorded}; {dataset} has as many classes "
              f"({info.num_classes}), and its label i is read as the model's class i: top-1 here means something only "
              f"if they are the same classes in the same order (e.g. digits 0-9 of mnist5k and digits).",
              file=sys.stderr, flush=True)
    metrics = evaluate(training_layout_(model.model, device, args.precision), loader, device=device,
                       precision=args.precision)
    avg_w, avg_a = model.policy.average_bits()
    return {"path": str(path), "trial_id": model.results.get("trial_id"), "model": model.arch["model"],
            "dataset": dataset, "test_images": n, "avg_w_bits": avg_w, "avg_a_bits": avg_a, "gbitops": model.results.get("gbitops"),
            "top1": metrics["top1"], "top5": metrics["top5"], "loss": metrics["loss"],
            "recorded_top1": model.results.get("top1") if same else None,
            "recorded_test_images": model.results.get("test_images") if same else None}


def _note_other_trial(path: Path, trial_id: Any) -> None:
    """A note when a sweep's model file (``models/<trial_id>.pt``, ``.int.pt``, a kept ``<trial_id>.<recipe>.pt``)
    holds another trial's model than its name says (renamed, or copied in from another sweep): its row is that
    model's, and its recorded top-1 too. Only in a sweep folder (its sweep_config.yaml): a folder of one's own named
    models/ (models/resnet20.pt) names no trial."""
    named = path.name.split(".")[0]
    folder = path.parent.parent if path.parent.name == "models" else path.parent.parent.parent \
        if path.parent.name == "kept" and path.parent.parent.name == "models" else None
    if trial_id and folder is not None and (folder / "sweep_config.yaml").is_file() and named != str(trial_id):
        print(f"gmpq evaluate: note: '{path}' holds the fine-tuned model of trial {trial_id} (recorded in the file), "
              f"not of trial {named} as its name says: it was renamed or copied from another sweep; its row and "
              f"recorded top-1 are trial {trial_id}'s.", file=sys.stderr, flush=True)


def _same_dataset(a: str, b: str) -> bool:
    """Whether two dataset names name the same dataset (``fashion-mnist`` and ``fashion_mnist`` do)."""
    from gmpq_core.data.registry import canonical_dataset_name

    def key(name: str) -> str:
        return str(canonical_dataset_name(name)).lower().replace("-", "_")

    return key(a) == key(b)


def _test_loader(dataset: str, args: argparse.Namespace, size: int | None, device: str) -> tuple:
    from gmpq_core.data import load_dataset, make_loader, proxy

    bundle = load_dataset(dataset, root=args.data_root, image_size=size)
    split = bundle.test if args.test_size is None else proxy(bundle.test, args.test_size, seed=args.seed,
                                                             what="--test-size")
    loader = make_loader(split, bundle.info, batch_size=args.batch_size, train=False, device=device)
    return bundle.info, loader, len(split)


def format_table(rows: list[dict]) -> str:
    """One line per row, named by its ``name`` (``row_names``; the file name for a row without one); ``avg W`` /
    ``avg A``: the policy's plain mean bits over its layers (``BitPolicy.average_bits``; policies.png shows the
    MAC-weighted ones)."""
    names = [r.get("name") or Path(r["path"]).name for r in rows]
    width = max(len("model file"), *map(len, names))
    lines = [f"{'model file':<{width}}  {'dataset':<14}  {'images':>6}  {'avg W':>5}  {'avg A':>5}  {'GBitOPs':>8}  "
             f"{'top-1':>6}  {'top-5':>6}  recorded top-1"]
    for r, name in zip(rows, names):
        gb = f"{r['gbitops']:.4f}" if isinstance(r["gbitops"], (int, float)) else "-"
        rec = f"{r['recorded_top1']:.2f}" if isinstance(r["recorded_top1"], (int, float)) else "-"
        if rec != "-" and r.get("recorded_test_images") and r["recorded_test_images"] != r["test_images"]:
            rec += f" (on {r['recorded_test_images']} images)"        # another test slice: not comparable as such
        lines.append(f"{name:<{width}}  {r['dataset']:<14}  {r['test_images']:>6}  "
                     f"{r['avg_w_bits']:>5.2f}  {r['avg_a_bits']:>5.2f}  {gb:>8}  {r['top1']:>6.2f}  {r['top5']:>6.2f}  "
                     f"{rec}")
    return "\n".join(lines)
