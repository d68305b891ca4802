"""What a single-policy ``gmpq finetune`` writes and says (moved here from ``finetune``, which imports them): its
result files' names, the note on a reused FP model trained with another recipe (``_recipe_note``), the note on the
checkpoint it resumes (``_resume_note``) and the JSON record of the fine-tune (``finetune_summary``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ._finetune_resume import CHECKPOINTS
from .train_fp import fp_result_beside

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parser (the help) stays quick
    from gmpq_core.finetune import FinetuneConfig, FinetuneResult
    from gmpq_core.policy import BitPolicy

    from ..common_args import ModelOptions

QUANTIZED_WEIGHTS, RESULT, POLICY = "quantized.pt", "finetune_result.json", "policy.json"


def _recipe_note(args: argparse.Namespace, kept: Path) -> str:
    """" (trained with --fp-epochs 2 --fp-lr 0.1; ...)" when this command line asks for another FP recipe than the
    kept model's (it is not retrained), else ""."""
    config = fp_result_beside(kept).get("config") or {}
    was = {"fp_epochs": config.get("epochs"), "fp_lr": config.get("lr")}
    if all(was[k] is None or was[k] == getattr(args, k) for k in was):
        return ""
    return (f" (trained with --fp-epochs {was['fp_epochs']} --fp-lr {was['fp_lr']}; the --fp-epochs "
            f"{args.fp_epochs} --fp-lr {args.fp_lr} given now apply only when it is trained: pass another --out to "
            "train it with them)")


def _resume_note(out: Path, resume: dict | None, epochs: int) -> str | None:
    """What this run does with the fine-tune checkpoint it resumes from (None: there is none)."""
    from gmpq_core.finetune import CHECKPOINT_NAME, resume_epochs

    if resume is None:
        return None
    done, was = resume_epochs(resume)
    path = out / CHECKPOINTS / CHECKPOINT_NAME
    if epochs > was:
        return (f"continuing from epoch {done} to {epochs}: the fine-tune in {path} was run with --epochs {was}; its "
                f"cosine schedule is stretched to {epochs} epochs (as gmpq finetune --sweep does), and "
                f"{QUANTIZED_WEIGHTS} and {RESULT} are replaced by the {epochs}-epoch result")
    if done == epochs < was:     # interrupted after exactly --epochs: kept as it is
        return (f"nothing left to train: the fine-tune in {path} was started with --epochs {was} and has done {done} "
                f"epoch(s), as many as --epochs {epochs}; writing {QUANTIZED_WEIGHTS} and {RESULT} from it as it is "
                f"(its weights are those of epoch {done} of the {was}-epoch cosine schedule); --epochs {done + 1} or "
                f"more continue it (--epochs {was} finishes it as started)")
    if epochs < was:         # (done < epochs: more done is refused by check_resume_run)
        return (f"continuing from epoch {done} to {epochs}: the fine-tune in {path} was started with --epochs {was}; "
                f"its cosine schedule is shortened to {epochs} epochs (as gmpq finetune --sweep does)")
    if done < epochs:
        return f"resuming the fine-tune in {path} after epoch {done} of {epochs}"
    return (f"already fine-tuned for {epochs} epoch(s) ({path}): evaluating it again and rewriting its result files "
            "(more --epochs continue it)")


def finetune_summary(result: FinetuneResult, policy: BitPolicy, opts: ModelOptions, fp_eval: dict, *,
                     config: FinetuneConfig, dataset: str, policy_source: str, fp_source: str,
                     train_size: int, test_size: int) -> dict:
    """The JSON-able record of one fine-tune (no tensors)."""
    avg_w, avg_a = policy.average_bits()
    bitops = result.bitops.to_dict()
    return {"top1": result.top1, "top5": result.top5, "fp_top1": fp_eval["top1"], "fp_top5": fp_eval["top5"],
            "top1_drop": fp_eval["top1"] - result.top1, "epochs_run": result.epochs_run,
            "resumed_from_epoch": result.resumed_from_epoch,
            "seconds": result.seconds,
            "bitops": {k: bitops[k] for k in ("macs", "bitops_quantized", "bitops_total", "gbitops_quantized",
                                              "gbitops_total")},
            "policy": {"name": policy_source, "n_layers": len(policy.layers), "avg_w_bits": avg_w,
                       "avg_a_bits": avg_a, "fingerprint": policy.fingerprint, "meta": dict(policy.meta)},
            "layers": bitops["layers"], **opts.to_dict(), "dataset": dataset, "fp_checkpoint": fp_source,
            "train_size": train_size, "test_size": test_size, "config": config.to_dict(),
            "history": result.history}
