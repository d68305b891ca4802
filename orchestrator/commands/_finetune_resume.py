"""``gmpq finetune --policy``'s resume checks: a fine-tune checkpoint kept in ``DIR/checkpoints/`` by an earlier run
is refused, before any work, when it was written on another dataset, of another model or training subset, with
another recipe given by a flag (``--lr``, ``--weight-decay``, ``--batch-size``, ...), has already completed more
epochs than this run's (as many keep it as it is: nothing is left to train), or was started from another FP model
(``gmpq_core.finetune`` checks the rest of the recipe, the policy and the precision; a total above the epochs done
continues it on the cosine schedule of that total)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import load_checkpoint

from .train_fp import FP_RESULT, FP_WEIGHTS

if TYPE_CHECKING:       # torch: gmpq_core.data and gmpq_core.finetune load where they are used (the help stays quick)
    from torch import nn

__all__ = ["CHECKPOINTS", "checkpoint_run_info", "check_resume_run", "check_resume_fp", "check_resume_policy",
           "same_dataset", "as_flags", "RUN_FLAGS", "RECIPE_FLAGS"]

CHECKPOINTS = "checkpoints"


def same_dataset(a: str, b: str) -> bool:
    """Whether two dataset names are the same data (``imagefolder:`` paths compared absolute)."""
    from gmpq_core.data import canonical_dataset_name

    return canonical_dataset_name(a) == canonical_dataset_name(b)


def checkpoint_run_info(info, opts, train_size: int) -> dict:
    """What a fine-tune checkpoint's state depends on besides the recipe, the policy and the precision (which
    gmpq_core.finetune checks): the data it trains on and the model it is."""
    from gmpq_core.data import canonical_dataset_name

    return {"dataset": canonical_dataset_name(info.name), **opts.to_dict(), "train_size": train_size}


RUN_FLAGS = {"model": "--model", "input_size": "--input-size", "in_channels": "--in-channels",
             "num_classes": "--num-classes", "small_input": "--small-input", "train_size": "--train-size"}


# the FinetuneConfig fields a checkpoint must match (gmpq_core.finetune's resume keys) that a flag of gmpq finetune
# gives; the others (momentum, nesterov) have no flag and stay with the core's message
RECIPE_FLAGS = {"lr": "--lr", "weight_decay": "--weight-decay", "batch_size": "--batch-size", "seed": "--seed",
                "max_steps_per_epoch": "--max-steps-per-epoch", "distill": "--distill",
                "distill_alpha": "--distill-alpha", "distill_temperature": "--distill-temperature",
                "include_stem": "--include-stem", "include_classifier": "--include-classifier"}


def as_flags(values: Mapping[str, Any], keys: list[str]) -> str:
    """``values``' ``keys`` as the flags that give them (``--input-size 8 --no-small-input``)."""
    return " ".join(("--small-input" if values[k] else "--no-small-input") if k == "small_input"
                    else f"{RUN_FLAGS.get(k, k)} {values[k]}" for k in keys)


def _recipe_flags(values: Mapping[str, Any], keys: list[str]) -> tuple[list[str], list[str]]:
    """``values``' recipe ``keys`` as (flags given: ``--lr 0.01``, ``--distill``; flags left out: ``--distill`` for
    distill=False, ``--max-steps-per-epoch`` for None)."""
    given, left_out = [], []
    for k in keys:
        flag, v = RECIPE_FLAGS[k], values[k]
        if v is False or v is None:
            left_out.append(flag)
        else:
            given.append(flag if v is True else f"{flag} {v}")
    return given, left_out


def _recipe_text(values: Mapping[str, Any], keys: list[str]) -> str:
    """``--lr 0.01 --distill`` / ``--lr 0.01 and no --include-stem``: what a run with ``values`` passed."""
    given, left_out = _recipe_flags(values, keys)
    return " and ".join(part for part in (" ".join(given), " and ".join(f"no {f}" for f in left_out)) if part)


def _check_recipe(out: Path, path: Path, old: Mapping[str, Any], config: Any) -> None:
    """The recipe recorded in the checkpoint at ``path`` (``old``: its ``config``) against this run's ``config``
    (a FinetuneConfig), for the fields a flag gives (``RECIPE_FLAGS``): refused naming the flags."""
    now = config.to_dict()
    changed = [k for k in RECIPE_FLAGS if k in old and k in now and old[k] != now[k]]
    if not changed:
        return
    given, left_out = _recipe_flags(old, changed)
    without = " or ".join(left_out)
    if given:
        how = f"Pass {' '.join(given)}{' without ' + without if left_out else ''} to resume it, another --out"
    else:
        how = f"Leave out {without} to resume it, pass another --out"
    raise ConfigError(f"The fine-tune checkpoint '{path}', kept from an earlier run in this --out folder, was "
                      f"written with {_recipe_text(old, changed)}, but this run has {_recipe_text(now, changed)}. "
                      f"{how} for this run, or delete '{out / CHECKPOINTS}' to start this folder's fine-tune afresh.")


def check_resume_run(out: Path, run_info: dict, dataset: str, *, trains_fp: bool,
                     epochs: int | None = None, config: Any = None) -> dict | None:
    """A fine-tune checkpoint in ``DIR/checkpoints/`` written by a run on another dataset, or of another model or
    training subset, or with another recipe a flag gives (``config``, a FinetuneConfig: ``--lr``, ``--weight-decay``,
    ...), is refused before any work (it was resumed as if it were this run's), and so is one that has
    completed more than ``epochs`` epochs (a fine-tune cannot go back; one that has completed exactly ``epochs`` is
    kept as it is, and a total above the epochs done continues it: _check_epochs_left) and one started from a
    recorded FP model when this run trains a new one (``trains_fp``; another FP model that is loaded is refused
    once loaded: check_resume_fp). A checkpoint from before these were recorded is not checked; one that
    is not a fine-tune state is named by gmpq_core.finetune. Returns what was read (None: no checkpoint), which
    gmpq_core.finetune resumes from without reading the file again."""
    from gmpq_core.finetune import CHECKPOINT_NAME, recorded_fp

    path = out / CHECKPOINTS / CHECKPOINT_NAME
    if not path.is_file():
        return None
    ckpt = load_checkpoint(path)
    old = ckpt.get("run") if isinstance(ckpt, dict) else None
    if isinstance(old, dict):
        _check_run_info(out, path, old, run_info, dataset)
    if config is not None and isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict):
        _check_recipe(out, path, ckpt["config"], config)
    if epochs is not None and isinstance(ckpt, dict) and isinstance(ckpt.get("epoch"), int):
        _check_epochs_left(out, path, ckpt, epochs)
    started = recorded_fp(ckpt)
    if trains_fp and started is not None:
        _refuse_other_fp(out, started, f"this run trains a new FP model first (no --fp-checkpoint, and no "
                                       f"{out / FP_WEIGHTS} with its {FP_RESULT} to reuse)")
    return ckpt


def check_resume_fp(out: Path, ckpt: dict | None, fp_model: nn.Module, fp_source: str) -> str | None:
    """A fine-tune checkpoint started from an FP model with other weights than ``fp_model`` (loaded from
    ``fp_source``) is refused; the same weights from another file (a copy, a move) resume. A checkpoint without
    the record is not checked. Returns the digest it computed (None: none), which gmpq_core.finetune records."""
    from gmpq_core.finetune import recorded_fp, state_digest

    started = recorded_fp(ckpt)
    if started is None:
        return None
    if (digest := state_digest(fp_model)) == started["sha256"]:
        return digest
    if started.get("source") == os.path.abspath(fp_source):     # the same file, written over since
        _refuse_other_fp(out, started, f"that file holds other weights now (sha256 {digest[:12]})", replaced=True)
    _refuse_other_fp(out, started, f"this run's FP model '{fp_source}' has other weights (sha256 {digest[:12]})")


def _refuse_other_fp(out: Path, started: dict, now: str, *, replaced: bool = False) -> NoReturn:
    """Refuse to resume a fine-tune ``started`` from another FP model than this run's (``now`` says why): its
    start, its distillation teacher and the FP top-1 reported beside it would be two FP models'."""
    from gmpq_core.finetune import CHECKPOINT_NAME, fp_name

    source = started.get("source")
    if replaced:
        back = f"Put those weights back in '{source}' to resume it"
    elif source and Path(source).is_file():
        back = f"Pass --fp-checkpoint {source} to resume it"
    else:
        back = (f"Put {'it back at ' + repr(source) if source else 'that FP model back'} (or pass --fp-checkpoint "
                "with a copy of it) to resume it")
    name = fp_name(started)
    raise ConfigError(f"The fine-tune checkpoint '{out / CHECKPOINTS / CHECKPOINT_NAME}', kept from an earlier run in "
                      f"this --out folder, was started from {name}, but {now}: resuming would mix two FP models (the "
                      f"fine-tune's start, its distillation teacher and the FP top-1 reported). {back}, pass another "
                      f"--out for this run, or delete '{out / CHECKPOINTS}' to start this folder's fine-tune afresh.")


def _check_run_info(out: Path, path: Path, old: dict, run_info: dict, dataset: str) -> None:
    """The dataset, model options and training subset recorded in the checkpoint at ``path`` (``old``) against
    this run's."""
    from gmpq_core.finetune import run_info_changes

    fresh = f"delete '{out / CHECKPOINTS}' to start this folder's fine-tune afresh"
    old_data = old.get("dataset")
    if isinstance(old_data, str) and old_data and not same_dataset(old_data, run_info["dataset"]):
        raise ConfigError(f"The fine-tune checkpoint '{path}', kept from an earlier run in this --out folder, was "
                          f"written by a fine-tune on '{old_data}', but this run fine-tunes on '{dataset}'. Pass "
                          f"another --out for the {dataset} run (this folder's fine-tune checkpoints belong to the "
                          f"{old_data} run), or {fresh}.")
    changed = [k for k in run_info_changes(old, run_info) if k != "dataset"]
    if changed:
        raise ConfigError(f"The fine-tune checkpoint '{path}', kept from an earlier run in this --out folder, was "
                          f"written with {as_flags(old, changed)}, but this run has {as_flags(run_info, changed)}. "
                          f"Pass {as_flags(old, changed)} to resume it, another --out for this run, or {fresh}.")


def _check_epochs_left(out: Path, path: Path, ckpt: dict, epochs: int) -> None:
    """``--epochs`` below the epochs the checkpoint's fine-tune has already completed is refused: it continues from
    the checkpoint and cannot go back. Exactly the epochs done keep it as it is (nothing is left to train: its
    result files are written from it, whether it finished its own run or was interrupted in a longer one), and a
    total above the epochs done continues it, on the cosine schedule of that total, longer or shorter than the one
    it was started with (as the Ray Train final stage does in both cases)."""
    from gmpq_core.finetune import epochs_left_ok, resume_epochs

    done, was = resume_epochs(ckpt)
    if epochs_left_ok(done, epochs):
        return
    fresh = f"another --out for a {epochs}-epoch fine-tune, or delete '{out / CHECKPOINTS}' to start this folder's " \
            "fine-tune afresh."
    if done >= was:          # finished
        raise ConfigError(f"The fine-tune checkpoint '{path}', kept from an earlier run in this --out folder, holds a "
                          f"{was}-epoch fine-tune, but this run has --epochs {epochs}: a fine-tune continues from its "
                          f"checkpoint and cannot be shortened (more epochs continue it). Pass --epochs {was} (or "
                          f"more) to keep or continue it, {fresh}")
    shorter = "" if done + 1 == was else (f"; a total under {was} continues it on the cosine schedule of that total, "
                                          "as gmpq finetune --sweep does")
    raise ConfigError(f"The fine-tune checkpoint '{path}', kept from an earlier run in this --out folder, holds a "
                      f"{was}-epoch fine-tune, {done} of them done, but this run has --epochs {epochs}: that fine-tune "
                      f"has already run more epochs ({done}), and it continues from its checkpoint and cannot go "
                      f"back. Pass --epochs {done} to keep it as it is, --epochs {done + 1} or more to continue it "
                      f"(--epochs {was} finishes it as started{shorter}), {fresh}")


def _bits_text(layers: Mapping[str, Any]) -> str:
    """``{layer: [w, a]}`` in words: the mean bits per layer."""
    if not layers:
        return "no layers"
    w = sum(int(v[0]) for v in layers.values()) / len(layers)
    a = sum(int(v[1]) for v in layers.values()) / len(layers)
    return f"mean bits per layer W {w:.2f} A {a:.2f} over {len(layers)} layers"


def _policy_flag(source: str) -> str:
    """The flag that gives a recorded policy source: ``--uniform 4 4`` for "uniform W4A4", else ``--policy FILE``."""
    import re

    m = re.fullmatch(r"uniform W(\d+)A(\d+)", source)
    return f"--uniform {m[1]} {m[2]}" if m else f"--policy {source}"


def check_resume_policy(out: Path, ckpt: dict | None, policy: Any, source: str) -> None:
    """A fine-tune checkpoint of another bit policy than ``policy`` (given as ``source``: the --policy file, or
    "uniform W4A4") is refused, naming the policy it was written with (its source, when the checkpoint records it),
    how the two differ and the fixes. A checkpoint without the record of its policy is not checked here."""
    from gmpq_core.finetune import CHECKPOINT_NAME, policy_difference, policy_layers, recorded_policy_source

    old = ckpt.get("policy_layers") if isinstance(ckpt, dict) else None
    if not isinstance(old, dict) or policy is None:
        return
    now = policy_layers(policy)
    if old == now:
        return
    was = recorded_policy_source(ckpt)
    named = f"the bit policy {was} ({_bits_text(old)})" if was else \
        f"another bit policy ({_bits_text(old)}; the checkpoint does not record its file)"
    back = f"Pass {_policy_flag(was)} to resume it, another --out for this run" if was else \
        "Pass the policy it was written with to resume it, another --out for this run"
    raise ConfigError(f"The fine-tune checkpoint '{out / CHECKPOINTS / CHECKPOINT_NAME}', kept from an earlier run in "
                      f"this --out folder, was written for {named}, but this run fine-tunes the bit policy {source} "
                      f"({_bits_text(now)}): {policy_difference(old, now)}. {back}, or delete '{out / CHECKPOINTS}' "
                      "to start this folder's fine-tune afresh.")
