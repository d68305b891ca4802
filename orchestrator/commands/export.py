"""``gmpq export``: final quantized models rewritten with packed integer weights (their real size).

    gmpq export runs/demo                      # every final model of a sweep: runs/demo/models/<trial>.int.pt
    gmpq export runs/ft/quantized.pt --out model.int.pt

A model file of ``gmpq finetune`` keeps float weights; the integer file stores each quantized layer's
weight codes packed ``w_bits`` to a value plus one step per layer (``gmpq_core.integer_model``). Each file
written is read back and run against its float model on a batch of inputs: the command fails if a
prediction differs. Load one in Python as a float model file is loaded, with
``gmpq_core.load_quantized_model(path)`` (it reads both kinds: ``.model``, ``.normalize``, ``.results``), or with
``gmpq_core.integer_model.load_integer_model(path)``, which reads integer files only. Either needs only
torch and this project's ``gmpq_core`` folder on the Python path (copy it beside your script), none of
gmpq's other dependencies; the command ends with the lines to run (not with --json).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import INT_SUFFIX as SUFFIX
from gmpq_core.fileio import integer_path

from . import help_text
from .train_fp import FP_WEIGHTS

__all__ = ["register", "run", "model_files", "refuse_other_file", "fp_model_message"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write final quantized models with packed integer weights",
                              description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="a model file (DIR/models/<trial>.pt, DIR/quantized.pt) or a folder holding them (a sweep, "
                        "a 'gmpq finetune --policy' folder)")
    p.add_argument("--out", default=None, metavar="FILE", help=f"where to write (one model only; default: beside "
                                                               f"it, with '{SUFFIX}')")
    p.add_argument("--layers", action="store_true", help="print each layer's bits and bytes")
    p.add_argument("--json", action="store_true", help="print one JSON object per model instead of text")
    p.set_defaults(func=run)


def refuse_other_file(path: Path) -> None:
    """ConfigError for a binary file ``torch.save`` did not write (a sweep's trials.parquet, a plot, mlflow.db): the
    loader's message for a damaged checkpoint would suggest deleting it. Text files (a policy JSON) are left to the
    loader, which names the model files to pass instead."""
    with open(path, "rb") as f:
        head = f.read(64)
    torch_file = head.startswith((b"PK\x03\x04", b"\x80"))     # torch.save's zip format, or its older pickle one
    if not torch_file and b"\x00" in head:                      # binary (Parquet, PNG, SQLite all have a NUL early)
        raise ConfigError(f"'{path}' is not a model file (no file torch.save wrote). Pass a model file "
                          "(DIR/models/<trial>.pt or its .int.pt of a sweep after 'gmpq finetune --sweep', "
                          "DIR/quantized.pt of 'gmpq finetune --policy') or the folder that holds it.")


def model_files(path: Path) -> list[Path]:
    """The float model files ``path`` names: itself, or a sweep's ``models/*.pt``, or a folder's ``quantized.pt``,
    or the ``*.pt`` files of a folder that holds them directly (a sweep's ``models/``), never ``fp.pt`` (the
    full-precision model of ``gmpq train-fp``, or the one a ``gmpq finetune --policy`` folder starts from)."""
    if path.is_file():
        refuse_other_file(path)
        return [path]
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist. Pass a model file (DIR/models/<trial>.pt of a sweep after "
                          "'gmpq finetune --sweep', DIR/quantized.pt of 'gmpq finetune --policy') or its folder.")
    found = sorted(p for p in (path / "models").glob("*.pt") if not p.name.endswith(SUFFIX))
    if not found and (path / "quantized.pt").is_file():
        found = [path / "quantized.pt"]
    if not found:               # a folder of model files itself: a sweep's models/ (or models/kept/), a copy of them
        found = sorted(p for p in path.glob("*.pt") if not p.name.endswith(SUFFIX) and p.name != FP_WEIGHTS)
    if not found and (path / FP_WEIGHTS).is_file() and (path / "checkpoints").is_dir():
        raise ConfigError(f"'{path}' is a 'gmpq finetune --policy' folder whose fine-tune has not finished: no "
                          f"quantized.pt yet ({FP_WEIGHTS} is the full-precision model it starts from). Run the same "
                          "'gmpq finetune' command again to resume it from checkpoints/; it writes quantized.pt.")
    if not found and (path / FP_WEIGHTS).is_file():
        raise ConfigError(fp_model_message(path / FP_WEIGHTS, folder=path))
    if not found and (path / "sweep_config.yaml").is_file():
        raise ConfigError(f"'{path}' is a sweep whose final stage has not written a model yet (no models/*.pt): "
                          f"'gmpq finetune --sweep {path}' fine-tunes its selected policies into "
                          "models/<trial_id>.pt, then run this again.")
    if not found:
        raise ConfigError(f"'{path}' holds no final model: no models/*.pt (a sweep's, written by 'gmpq finetune "
                          "--sweep' or 'gmpq run') and no quantized.pt ('gmpq finetune --policy'). Fine-tune first, "
                          "or pass the model file.")
    return found


def fp_model_message(fp: Path, *, folder: Path | None = None) -> str:
    """The paragraph for a full-precision model (``fp.pt`` of ``gmpq train-fp``) given where a quantized one is due:
    what it is and the two commands that make a quantized model of that network."""
    where = f"'{folder}' holds" if folder is not None else f"'{fp}' is"
    return (f"{where} a full-precision model ({FP_WEIGHTS}, the state dict 'gmpq train-fp' writes), not a gmpq "
            "quantized model. To get one: search a bit policy with 'gmpq search --out S' (same --model and "
            f"--dataset), then 'gmpq finetune --policy S/policy.json --fp-checkpoint {fp} --out Q' writes "
            "Q/quantized.pt; pass Q (or Q/quantized.pt) here.")


def run(args: argparse.Namespace) -> int:
    sources = [f for p in args.paths for f in model_files(Path(p).expanduser())]
    if args.out is not None and len(sources) != 1:
        raise ConfigError(f"--out names one file, but {len(sources)} models were given "
                          f"({', '.join(str(s) for s in sources[:3])}{' ...' if len(sources) > 3 else ''}). Drop "
                          f"--out to write each beside its model as <name>{SUFFIX}.")
    if args.out is not None and (Path(args.out).is_dir() or str(args.out).endswith(("/", "\\"))):
        kind = "a folder" if Path(args.out).is_dir() else "a folder name (it ends with a '/')"
        raise ConfigError(f"--out '{args.out}' is {kind}; give a file name, e.g. --out "
                          f"{Path(args.out) / 'model'}{SUFFIX}.")
    pairs = [(src, Path(args.out) if args.out else integer_path(src)) for src in sources]
    for src, out in pairs:                          # every pair is checked before anything is written
        if out.resolve() == src.resolve():
            raise ConfigError(f"--out '{args.out}' is the model file itself; the float model would be lost. Give "
                              f"another file name, e.g. --out {integer_path(src)}.")
        if src.name.endswith(SUFFIX):
            raise ConfigError(f"'{src}' is an integer model file already (written by 'gmpq export'); pass the float "
                              f"model file it was exported from{_float_beside(src)}.")
    _check_out_folders(pairs, given=args.out is not None)
    own = False                                     # a model of the user's own builder among them
    for src, out in pairs:
        row = export_one(src, out)
        own = own or ":" in str(row.get("model", ""))
        if args.json:
            print(json.dumps({k: v for k, v in row.items() if args.layers or k != "layers"}))
        else:
            print(format_row(row, layers=args.layers))
    if not args.json:
        print(usage_note(pairs[-1][1], several=len(pairs) > 1, own_builder=own))
    return 0


def usage_note(out: Path, *, several: bool = False, own_builder: bool = False) -> str:
    """How to run an exported file: the loader of ``gmpq_core``, which needs only torch (no gmpq install)."""
    return (f"Run {'each' if several else 'it'} in Python with torch and this project's gmpq_core folder on the "
            f"path (no gmpq install, no Ray/Optuna/MLflow):\n"
            f"  from gmpq_core import load_quantized_model\n"
            f"  q = load_quantized_model({str(out)!r})\n"
            f"  logits = q.model(q.normalize(images))   # images: float in [0, 1], [N, C, H, W] at "
            f"q.preprocess['image_size'] px"
            + ("\n(a model of your own builder, PATH.py:FUNCTION, also needs that builder file where it was)"
               if own_builder else ""))


def _float_beside(src: Path) -> str:
    """`` (by its name, DIR/model.pt beside it)`` when the float file ``gmpq export`` would have written ``src`` from
    is there; else nothing (an integer file records no source path: ``--out`` may have named it anything)."""
    float_file = src.with_name(src.name.removesuffix(SUFFIX) + ".pt")
    return f" (by its name, {float_file} beside it)" if float_file.is_file() else ""


def _check_out_folders(pairs: list[tuple[Path, Path]], *, given: bool) -> None:
    """Every folder an integer file goes to can be written, checked before the first export (a read-only sweep
    used to end in a traceback at the first file)."""
    from gmpq_core.fileio import check_writable_dir

    if given:
        hint = "pass --out a file in a folder you can write"
    else:
        hint = (f"gmpq export writes <name>{SUFFIX} beside each model: copy the model files (or the sweep folder) to a "
                "folder you can write and export them there" + (", or pass --out FILE in a folder you can write"
                                                                   if len(pairs) == 1 else ""))
    for folder in dict.fromkeys(out.parent for _, out in pairs):
        check_writable_dir(folder, what=f"folder of the integer model file{'s' if len(pairs) > 1 else ''}", hint=hint)


def export_one(src: Path, out: Path) -> dict:
    """Write ``src``'s integer file at ``out``, read it back and compare predictions; its summary row."""
    import torch

    from gmpq_core.export import load_quantized_model
    from gmpq_core.integer_model import INT_FORMAT, integer_sizes, load_integer_model, save_integer_model

    from gmpq_core.fileio import QUANTIZED_MODEL_HINT, load_checkpoint

    blob = load_checkpoint(src, text_hint=QUANTIZED_MODEL_HINT)
    if isinstance(blob, dict) and blob.get("format") == INT_FORMAT:
        raise ConfigError(f"'{src}' is an integer model file already (format {INT_FORMAT!r}); pass the float "
                          "model file it was exported from.")
    model = load_quantized_model(src, blob=blob)
    partial = out.with_name(out.name + ".partial")  # checked before it takes the name: an earlier export survives
    save_integer_model(partial, model)
    again = load_integer_model(partial)
    size = model.preprocess.get("image_size") or model.arch.get("input_size") or 32
    x = torch.randn(16, int(model.arch["in_channels"]), int(size), int(size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model.model(x), again.model(x)
    same = int((ref.argmax(1) == got.argmax(1)).sum())
    top2 = ref.topk(2, dim=1).values if ref.shape[1] > 1 else torch.cat([ref, ref - 1], dim=1)
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4                  # a near tie may flip on float rounding
    diff = float((ref - got).abs().max())
    if bool((clear & (ref.argmax(1) != got.argmax(1))).any()):
        partial.unlink(missing_ok=True)
        raise ConfigError(f"the integer file of '{src}' predicts differently on {len(x) - same} of {len(x)} inputs "
                          f"(max |logit difference| {diff:.3g}); nothing was written. Report this with the model file.")
    os.replace(partial, out)
    sizes = integer_sizes(model)
    return {"source": str(src), "out": str(out), "source_bytes": src.stat().st_size, "out_bytes": out.stat().st_size,
            "weight_float_bytes": sizes["float_bytes"], "weight_packed_bytes": sizes["packed_bytes"],
            "weight_ratio": sizes["ratio"], "check_inputs": len(x), "check_same_top1": same,
            "check_max_logit_diff": diff, "top1": model.results.get("top1"), "model": model.arch["model"],
            "layers": sizes["layers"]}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} KB"


def format_row(row: dict, *, layers: bool = False) -> str:
    lines = [f"{row['out']}: {_mb(row['out_bytes'])} (float model file {_mb(row['source_bytes'])}, "
             f"x{row['source_bytes'] / row['out_bytes']:.1f} smaller)",
             f"  weights {_mb(row['weight_float_bytes'])} as float32 -> {_mb(row['weight_packed_bytes'])} packed "
             f"(x{row['weight_ratio']:.1f}); read back: same top-1 on {row['check_same_top1']}/{row['check_inputs']} "
             f"inputs, max |logit difference| {row['check_max_logit_diff']:.2g}"]
    if layers:
        width = max(len(r["layer"]) for r in row["layers"])
        lines += [f"  {'layer':<{width}}  {'W':>2}  {'params':>9}  {'float32':>10}  {'packed':>10}"]
        lines += [f"  {r['layer']:<{width}}  {r['w_bits']:>2}  {r['params']:>9,}  {r['float_bytes']:>10,}  "
                  f"{r['packed_bytes']:>10,}" for r in row["layers"]]
    return "\n".join(lines)
