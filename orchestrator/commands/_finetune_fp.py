"""Where ``gmpq finetune --policy`` takes its FP model from, without ``--fp-checkpoint``: ``DIR/fp.pt`` kept (with its
``DIR/fp_result.json``) by an earlier run in the --out folder; else, for a policy exported by a sweep
(``SWEEP/policies/<trial_id>.json``, whose meta names ``sweep_dir`` and ``trial_id``), the sweep's FP target model
(``target_model_path`` in ``SWEEP/shared.json``, the model the final stage fine-tunes from) when it fits the command
line's model options and dataset; else an FP model trained first. (The kept one comes first so that a folder's
fine-tune checkpoint, which records the FP model it started from, resumes as it did.) Also the data root such a
policy's sweep recorded (``data_root`` in ``SWEEP/sweep_config.yaml``), read as the default ``--data-root``."""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq_core.errors import GMPQError
from gmpq_core.fileio import read_json

from ._finetune_resume import as_flags, same_dataset
from .train_fp import FP_RESULT, FP_WEIGHTS, fp_result_beside

if TYPE_CHECKING:       # it imports torch (the help stays quick)
    from gmpq_core.policy import BitPolicy

__all__ = ["FPSource", "pick_fp_source", "kept_fp", "sweep_target", "recorded_data_root", "data_root_default"]

log = logging.getLogger(__name__)


def kept_fp(out: Path) -> Path | None:
    """``DIR/fp.pt`` of an earlier run in ``out`` (with its fp_result.json), which this run reuses; else None."""
    kept = out / FP_WEIGHTS
    return kept if kept.is_file() and (out / FP_RESULT).is_file() else None


@dataclass(frozen=True)
class FPSource:
    """Where this run's FP model comes from: ``kind`` "given" (--fp-checkpoint), "kept" (``DIR/fp.pt`` of an
    earlier run), "sweep" (the FP target model of the sweep that exported the policy) or "train" (trained here);
    ``path`` (None for "train"); ``info``, the record beside it that steers the model options and the dataset ({}:
    none); ``sweep``, a sweep's FP target model that is there but not used, and ``why`` not ("" when none)."""
    kind: str
    path: Path | None = None
    info: dict | None = None
    sweep: Path | None = None
    why: str = ""


_TARGET_KEYS = ("model", "input_size", "in_channels", "num_classes", "small_input")   # the model options it fits


def _sweep_folder(policy_file: str, meta: dict, record: str) -> Path:
    """The folder of the sweep that exported ``policy_file``: the parent of the ``policies/`` folder it is in when
    that holds the sweep's ``record`` file (a copied or moved sweep), else the ``sweep_dir`` its meta names."""
    here = Path(policy_file).resolve().parent
    return here.parent if here.name == "policies" and (here.parent / record).is_file() else Path(str(meta["sweep_dir"]))


def recorded_data_root(args: argparse.Namespace, policy: BitPolicy | None) -> tuple[str | None, str, tuple[str, ...]]:
    """The data root recorded for ``--policy``: its meta's ``data_root``, else, for a policy exported by a sweep
    (meta ``sweep_dir`` and ``trial_id``), the ``data_root`` of that sweep's ``sweep_config.yaml`` (one inside the
    recorded sweep folder, which moved, read inside the folder now used); with the file that records it and the
    datasets it holds (the policy's, and the sweep's proxy and target). (None, "", ()) when nothing is recorded."""
    meta = dict(policy.meta) if policy is not None and args.policy is not None else {}
    datasets = tuple(str(meta[k]) for k in ("dataset", "target_dataset") if meta.get(k))
    if isinstance(meta.get("data_root"), str) and meta["data_root"]:
        return meta["data_root"], str(args.policy), datasets
    if not meta.get("sweep_dir") or not meta.get("trial_id"):
        return _search_data_root(args.policy) if args.policy is not None else (None, "", ())
    from ..moved_sweep import moved_path, recorded_dir
    from ..results import CONFIG_FILE, load_resolved_config
    sweep = _sweep_folder(args.policy, meta, CONFIG_FILE)
    try:
        cfg = load_resolved_config(sweep, follow_moves=False)
    except (GMPQError, OSError) as e:      # an unreadable record: as before, the dataset's default location
        log.debug("no data root recorded for sweep %s: %s", sweep, e)
        return None, "", ()
    root = cfg.get("data_root")
    if not isinstance(root, str) or not root:
        return None, "", ()
    old = recorded_dir(cfg)
    if old is not None and not os.path.isdir(root):
        root = moved_path(root, old, sweep.resolve())
    return root, str(sweep / CONFIG_FILE), (*datasets, *(str(cfg[k]) for k in ("proxy_dataset", "target_dataset")
                                                         if cfg.get(k)))


def _search_data_root(policy_file: str) -> tuple[str | None, str, tuple[str, ...]]:
    """The data root of the ``gmpq search`` that wrote ``policy_file`` (its ``result.json`` beside it records the
    job), with that file and the job's dataset; (None, "", ()) when there is no such record."""
    from .search import RESULT_FILE
    record = Path(policy_file).parent / RESULT_FILE
    try:
        job = read_json(record).get("job") if record.is_file() else None
    except (GMPQError, OSError, ValueError, AttributeError):
        return None, "", ()
    root = job.get("data_root") if isinstance(job, dict) else None
    if not isinstance(root, str) or not root or not job.get("dataset"):
        return None, "", ()
    return root, str(record), (str(job["dataset"]),)


def data_root_default(args: argparse.Namespace, policy: BitPolicy | None, dataset: str) -> tuple[str | None, str]:
    """This run's data root for ``dataset`` (``--data-root``; without it, the one recorded for the policy,
    ``recorded_data_root``, when it is for that dataset and there) and the line that says where the data comes
    from ("": nothing recorded for it, and the data root is as before)."""
    root, record, datasets = recorded_data_root(args, policy)
    if root is None or not any(same_dataset(dataset, d) for d in datasets):
        return args.data_root, ""
    if args.data_root is not None:
        if os.path.abspath(os.path.expanduser(args.data_root)) == os.path.abspath(root):
            return args.data_root, ""
        return args.data_root, (f"reading '{dataset}' from --data-root {args.data_root}, not from {root}, the data "
                                f"root recorded in {record}")
    if not os.path.isdir(root):
        return None, (f"the data root {root} recorded in {record} is not there: reading '{dataset}' from its default "
                      "location (pass --data-root DIR to read it from elsewhere)")
    return root, (f"reading '{dataset}' from {root}, the data root recorded in {record} (pass --data-root DIR to "
                  "read it from elsewhere)")


def sweep_target(args: argparse.Namespace, policy: BitPolicy | None) -> tuple[Path | None, dict, str]:
    """The FP target model of the sweep that exported ``policy`` (``DIR/policies/<trial_id>.json``, its meta naming
    ``sweep_dir`` and ``trial_id``): the ``target_model_path`` in the sweep folder's ``shared.json`` (the model the
    final stage fine-tunes from), with the options and dataset its ``.json`` records; and why it does not fit this
    command line ("": it fits). (None, {}, "") when the policy names no sweep, or the sweep records no model that is
    there. A policy file still in its sweep's ``policies/`` folder is read with that folder's shared.json (a copied
    or moved sweep)."""
    meta = dict(policy.meta) if policy is not None and args.policy is not None else {}
    if not meta.get("sweep_dir") or not meta.get("trial_id"):
        return None, {}, ""
    sweep = _sweep_folder(args.policy, meta, "shared.json")
    try:
        recorded = read_json(sweep / "shared.json").get("target_model_path") if (sweep / "shared.json").is_file() \
            else None
        path = Path(recorded) if isinstance(recorded, str) and recorded else None
        if path is not None and not path.is_file():           # inside the recorded sweep folder, which moved
            from ..moved_sweep import moved_path
            path = Path(moved_path(str(path), Path(str(meta["sweep_dir"])), sweep))
        if path is None or not path.is_file() or not path.with_suffix(".json").is_file():
            return None, {}, ""
        target = read_json(path.with_suffix(".json")).get("meta")
    except (GMPQError, OSError, AttributeError) as e:   # an unreadable record: as before, no sweep model
        log.debug("no usable FP target model for sweep %s: %s", sweep, e)
        return None, {}, ""
    if not isinstance(target, dict) or not isinstance(target.get("dataset"), str):
        return None, {}, ""
    info = {k: target[k] for k in (*_TARGET_KEYS, "dataset") if target.get(k) is not None}
    data = info["dataset"]
    if args.dataset and not same_dataset(args.dataset, data):
        return path, info, f"it was trained on '{data}', not on --dataset {args.dataset}"
    if meta.get("target_dataset") and not same_dataset(str(meta["target_dataset"]), data):
        return path, info, f"it was trained on '{data}', not on the policy's target dataset '{meta['target_dataset']}'"
    given = {k: getattr(args, k, None) for k in _TARGET_KEYS}
    if isinstance(given.get("model"), str):       # ./my_cnn.py:build names the recorded /abs/my_cnn.py:build
        from gmpq_core.models.imported import canonical_model_name

        given["model"] = canonical_model_name(given["model"])
    other = [k for k in _TARGET_KEYS if given[k] is not None and k in info and given[k] != info[k]]
    if other:
        return path, info, f"it is {as_flags(info, other)}, but this command line has {as_flags(vars(args), other)}"
    return path, info, ""


def pick_fp_source(args: argparse.Namespace, out: Path, policy: BitPolicy | None) -> FPSource:
    """This run's FP model (FPSource): --fp-checkpoint; else the kept ``DIR/fp.pt`` of an earlier run; else the
    sweep's FP target model when it fits; else one trained here. A ``DIR/fp_result.json`` left without the fp.pt it
    describes is not read: the FP model is trained again here, and both files are rewritten."""
    if args.fp_checkpoint is not None:
        given = Path(args.fp_checkpoint)
        return FPSource("given", given, fp_result_beside(given) if given.is_file() else {})
    sweep, info, why = sweep_target(args, policy)
    kept = kept_fp(out)
    if kept is not None:
        return FPSource("kept", kept, fp_result_beside(kept), sweep=None if why else sweep)
    if sweep is not None and not why:
        return FPSource("sweep", sweep, info)
    return FPSource("train", None, {}, sweep=sweep, why=why)
