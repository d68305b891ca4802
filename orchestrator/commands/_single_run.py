"""Helpers of the single-run commands (``gmpq search``, ``train-fp``, ``finetune --policy``): the files a command
writes in its ``--out`` checked before any work, and the one line a Ctrl-C or SIGTERM stop ends with (what is kept,
what rerunning the same command does)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Collection

from gmpq_core.errors import ConfigError, GMPQError
from gmpq_core.fileio import drop_integer_file, integer_path, load_checkpoint

__all__ = ["check_out_paths", "stopped", "finetune_stopped_text", "drop_stale_integer_file", "file_marks",
           "replaced_since", "written_text"]


def check_out_paths(out: Path, command: str, *, files: tuple[str, ...] = (), folders: tuple[str, ...] = (),
                    when: str = "when it ends") -> None:
    """The paths a command writes in its ``--out`` folder ``out``, checked before any work: a ``files`` entry that is
    a folder, or a ``folders`` entry that is a file, is a ConfigError naming it and the fix (the write failed only
    after the work, which was lost). ``out`` itself is checked by ``check_out_arg``."""
    wrong = [(out / n, "a folder", f"writes its {Path(n).name} file there {when}: this run would fail after its work",
              "folder") for n in files if (out / n).exists() and not (out / n).is_file()]
    wrong += [(out / n, "a file", f"keeps its {n} folder there: this run would fail once it writes there", "file")
              for n in folders if (out / n).exists() and not (out / n).is_dir()]
    for path, is_, why, kind in wrong[:1]:
        raise ConfigError(f"'{path}' is {is_}, but {command} {why}. Remove or rename that {kind}, or pass --out "
                          "another folder you can write.")


def stopped(command: str, err: KeyboardInterrupt, kept: str) -> int:
    """A command stopped by Ctrl-C, or SIGTERM (``ctrl_c_signals``: ``Terminated``): one line on stderr, ``kept``
    saying what is kept and what rerunning the same command does; returns the exit status (130, SIGTERM 143)."""
    from orchestrator.ray_env import Terminated, stop_status, stop_word, terminated

    by_sigterm = isinstance(err, Terminated) or terminated()
    print(f"{command}: {stop_word(by_sigterm)}; {kept}", file=sys.stderr, flush=True)
    return stop_status(by_sigterm)


def file_marks(out: Path, names: tuple[str, ...]) -> dict[str, tuple | None]:
    """Each file ``names`` in ``out`` as it stands (device, inode, size, modification time; None: absent), taken
    before a command writes its result files there: after a stop, ``replaced_since`` tells which of them it replaced,
    whenever the stop came (an atomic write leaves a new file: another inode and time), where a flag set after the
    write would miss a stop between the replace and the flag."""
    def mark(path: Path) -> tuple | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns
    return {name: mark(out / name) for name in names}


def replaced_since(out: Path, marks: dict[str, tuple | None] | None) -> list[str]:
    """The files of ``marks`` (``file_marks``; None: none taken) that are another file in ``out`` now."""
    if not marks:
        return []
    now = file_marks(out, tuple(marks))
    return [name for name, was in marks.items() if now[name] is not None and now[name] != was]


def written_text(what: str, out: Path, names: tuple[str, ...], replaced: Collection[str]) -> str | None:
    """What a stop while a command wrote its result files ``names`` (in the order written) into ``out`` left there,
    ``replaced`` being those it had replaced (``replaced_since``): None when none (nothing of the run is kept); else
    that the ``what`` ("search", "training") had finished, which of its files are written and which is not."""
    done = [n for n in names if n in replaced]
    if not done:
        return None
    if len(done) == len(names):
        return (f"the {what} had finished: its {' and '.join(names)} are written in {out} (only its summary was not "
                "printed).")
    left = [n for n in names if n not in replaced]
    was = "; ".join(f"{out / n} is the earlier {what}'s" if (out / n).is_file() else f"there is no {n}" for n in left)
    return (f"the {what} had finished and its {' and '.join(done)} {'is' if len(done) == 1 else 'are'} written in "
            f"{out}, but not its {' and '.join(left)} ({was}).")


def finetune_stopped_text(state: dict) -> str:
    """What an interrupted ``gmpq finetune --policy`` keeps, and what rerunning the same command does (``state``:
    the run's ``out``, its ``phase`` and the FP model's ``fp`` kind, as far as it got)."""
    from gmpq_core.finetune import CHECKPOINT_NAME, resume_epochs

    from .finetune import CHECKPOINTS
    from .train_fp import FP_WEIGHTS

    out: Path | None = state.get("out")
    if out is None:
        return "nothing was started; rerun the same command to fine-tune."
    fp_kept = ""
    if state.get("fp") == "train":
        if state["phase"] == "fp":
            fp_kept = (" The FP model it was training first is not kept (its training keeps no checkpoint): "
                       "rerunning the same command trains it again from epoch 1, then fine-tunes.")
            return f"no fine-tune epoch had started, so nothing of this run is kept.{fp_kept}"
        fp_kept = f" The FP model it trained first is kept as {out / FP_WEIGHTS} and reused by a rerun."
    ckpt = out / CHECKPOINTS / CHECKPOINT_NAME
    try:
        done, total = resume_epochs(load_checkpoint(ckpt)) if ckpt.is_file() else (0, 0)
    except (GMPQError, OSError, KeyError, TypeError, ValueError):
        done, total = 0, 0
    if state["phase"] == "write":
        return (f"the fine-tune had finished ({ckpt} holds all its epochs), but its result files may not all be "
                f"written.{fp_kept} Rerunning the same command writes them from the checkpoint, without training.")
    if state["phase"] == "prepare":
        if done == 0:
            return "nothing was trained yet; rerun the same command to fine-tune."
        return (f"nothing was trained yet; the fine-tune's checkpoint after epoch {done} of {total} in {ckpt} is kept "
                f"as it was. Rerunning the same command resumes it after epoch {done}.")
    if done == 0:
        return (f"no fine-tune epoch had finished, so no fine-tune checkpoint is kept.{fp_kept} Rerunning the same "
                "command starts the fine-tune again at epoch 1.")
    return (f"the fine-tune's checkpoint after epoch {done} of {total} is kept in {ckpt}.{fp_kept} Rerunning the "
            f"same command resumes it after epoch {done}.")


def drop_stale_integer_file(path: Path, results: dict, *, trained: bool) -> Path | None:
    """Remove gmpq export's integer file beside the model file ``path`` just written (returns it; None: kept or
    none) when it holds other weights: after training, or, when nothing was trained, when its recorded results
    are not the new model's: other epochs, or, measured on as many test images, another top-1 or top-5 (a fine-tune
    interrupted after exactly --epochs and kept as it is replaces the model file of an earlier, shorter run). The
    same epochs measured on another number of test images (a rerun with another --test-size evaluates the kept
    model again) are the same weights: the file is kept, its results saying on how many images they were measured."""
    held = integer_path(path)
    if not trained and held.is_file():
        try:
            was = load_checkpoint(held).get("results") or {}
        except (GMPQError, AttributeError):         # unreadable, or not a dict: not the new model's
            was = {}
        other_images = was.get("test_images") is not None and was.get("test_images") != results.get("test_images")
        if was.get("epochs") == results["epochs"] and (
                other_images or all(was.get(k) == results[k] for k in ("top1", "top5"))):
            return None
    return drop_integer_file(path)
