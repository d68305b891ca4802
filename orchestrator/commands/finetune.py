"""``gmpq finetune``: quantization-aware fine-tune of one bit policy from FP weights.

Writes ``DIR/quantized.pt`` (the quantized model, self-contained: ``gmpq_core.load_quantized_model(path).model``
rebuilds it for inference), ``DIR/policy.json``, ``DIR/finetune_result.json`` (top-1/top-5 of the quantized
and the FP model, BitOPs in both conventions, the policy summary) and per-epoch checkpoints in
``DIR/checkpoints/``, from which an interrupted run resumes (a checkpoint of a run on another dataset or
model, with other settings, or from another FP model, is refused, not resumed; an ``--epochs`` above the epochs it
has done continues it, its cosine schedule set for that total as ``--sweep`` does, and replaces the result files; as
many as it has done keep it as it is, nothing left to train, the result files written from it evaluated again on
this run's test images (another --test-size is measured, not copied), as ``--sweep`` does;
fewer are refused). Without ``--data-root``, a policy exported by a sweep reads its data from the data root the
sweep recorded (``SWEEP/sweep_config.yaml``). Without
``--fp-checkpoint`` the FP model is, in this order: ``DIR/fp.pt`` kept with its ``DIR/fp_result.json`` by an earlier
run (one without the other is not trusted); the sweep's FP target model, for a policy exported by a sweep
(``SWEEP/policies/<trial_id>.json``: its meta's ``sweep_dir``, whose ``shared.json`` records the model) when it fits
the model options and the dataset; else trained first (``--fp-epochs``) and kept as ``DIR/fp.pt``.

The resume checks of this folder's checkpoint live in ``_finetune_resume``, the checks of the options, the policy
and the FP model's dataset in ``_finetune_checks``, the single-policy options in ``_finetune_args``, the result
files' names, notes and summary record in ``_finetune_notes``. The single-policy logic lives in
``run_single_finetune(args)`` so that other modes (a Ray Train
sweep over many policies) can extend the parser and dispatch from ``run``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gmpq_core.errors import ConfigError, GMPQError
from gmpq_core.fileio import atomic_write_json
from gmpq_core.precision import resolve_precision

from ..common_args import (ModelOptions, build_seeded_model, check_out_arg, check_policy_fits, dataset_source,
                           naming_flags, policy_meta, resolve_device, resolve_model_options, uniform_policy)
from ..progress import ProgressReporter, make_progress
from ._finetune_checks import _check_fp_dataset, _check_single_args, _policy_from_args
from ._finetune_fp import FPSource, data_root_default, pick_fp_source
from ._finetune_resume import CHECKPOINTS, check_resume_fp, check_resume_run, checkpoint_run_info
from ._finetune_sweep import add_sweep_args, add_target_arg, resolve_target, run_sweep_finetune
from .train_fp import FP_RESULT, FP_WEIGHTS, load_data, load_fp_model, loaders, train_fp_stage
from ._finetune_args import (_FP_DEFAULTS, SINGLE_DEFAULTS, SWEEP_MODE_OPTIONS,  # noqa: F401 (re-exported)
                             WITH_SWEEP, _single_mode_options_given, add_single_args)
from ._finetune_notes import (POLICY, QUANTIZED_WEIGHTS, RESULT, _recipe_note, _resume_note,  # noqa: F401 (re-exported)
                              finetune_summary)

if TYPE_CHECKING:       # torch and what imports it load where they are used: the parser (the help) stays quick
    from torch import nn

log = logging.getLogger(__name__)


# FinetuneConfig keys a flag of the same name (dashes for underscores) sets: its errors name the flag
_FLAG_KEYS = ("epochs", "lr", "weight_decay", "batch_size", "distill_alpha", "distill_temperature", "seed",
              "max_steps_per_epoch")

def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="quantization-aware fine-tune of a bit policy",
        description="Apply a bit policy (--policy FILE or --uniform W A) to an FP model, calibrate the "
                    "activation clips on one batch, then fine-tune with SGD + cosine (optionally distilling "
                    "from the FP model). Resumes from DIR/checkpoints/ when interrupted.")
    add_single_args(p)
    add_sweep_args(p)
    add_target_arg(p)
    p.set_defaults(func=run, batch_size=None, precision=None)  # None: SINGLE_DEFAULTS, or the sweep config's (--sweep)


def run(args: argparse.Namespace) -> int:
    resolve_target(args)                                 # gmpq finetune DIR / FILE
    if getattr(args, "sweep", None):
        extra = _single_mode_options_given(args)
        if extra:
            raise ConfigError(f"gmpq finetune --sweep does not use {', '.join(extra)}: it fine-tunes the sweep's "
                              "selected policies with the sweep's FP model, data and finetune settings, and writes "
                              "into the sweep folder. Drop those options, or fine-tune one policy without --sweep.")
        if getattr(args, "address", None) is not None:
            return run_sweep_finetune(args)
        from orchestrator.ray_env import address_origin
        from orchestrator.results import CONFIG_FILE

        config = Path(args.sweep).expanduser().resolve() / CONFIG_FILE     # without --address: the sweep's address
        with address_origin(f"the sweep's config {config}"):
            return run_sweep_finetune(args)
    sweep_only = [f"--{k.replace('_', '-')}" for k in ("top_k", "max_gbitops", "workers", "max_concurrent", "address",
                                                       "tracking_uri")
                  if getattr(args, k, None) is not None]
    if sweep_only:
        raise ConfigError(f"{', '.join(sweep_only)} {'is' if len(sweep_only) == 1 else 'are'} for gmpq finetune "
                          "--sweep DIR (the Ray Train fine-tune of a sweep's selected policies); fine-tuning one "
                          "policy (--policy or --uniform) runs here without Ray or MLflow. Add --sweep DIR, or drop "
                          "those options.")
    for key, value in SINGLE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return run_single_finetune(args)


def _fp_model(args: argparse.Namespace, out: Path, opts: ModelOptions, data,
              fp: FPSource) -> tuple[nn.Module, str, str | None]:
    """The FP model: from --fp-checkpoint, from an earlier run's DIR/fp.pt, the sweep's FP target model, or trained
    now (``fp``); with where it came from and the note to print about a loaded one (returned, so that a refusal
    after the load stays the only paragraph on stderr)."""
    ignored = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in _FP_DEFAULTS
               if getattr(args, k) != _FP_DEFAULTS[k]]
    ignored = f"{' and '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored" if ignored else ""
    if fp.kind == "given":
        model = load_fp_model(args.fp_checkpoint, opts)
        note = (f"{ignored}: the FP model is loaded from --fp-checkpoint {args.fp_checkpoint}, not trained"
                if ignored else None)
        return model, str(args.fp_checkpoint), note
    if fp.kind == "sweep":
        model = load_fp_model(fp.path, opts)
        return model, str(fp.path), (f"using the sweep's FP target model {fp.path} (pass --fp-checkpoint to use "
                                     f"another){f'; {ignored}: it is not trained' if ignored else ''}")
    if fp.kind == "kept":
        model = load_fp_model(fp.path, opts)
        not_sweep = (f" (not the sweep's FP target model {fp.sweep}: pass --fp-checkpoint {fp.sweep} and another "
                     "--out to fine-tune from that one)") if fp.sweep is not None else ""
        return model, str(fp.path), (f"reusing the FP model {fp.path} from an earlier run{not_sweep}"
                                     f"{_recipe_note(args, fp.path)}")
    lone = [f.name for f in (out / FP_WEIGHTS, out / FP_RESULT) if f.is_file()]     # one without the other
    stale = (f"; the {lone[0]} left in {out} without its {({FP_WEIGHTS, FP_RESULT} - set(lone)).pop()} is not used "
             "and is replaced") if lone else ""
    not_sweep = f"; the sweep's FP target model {fp.sweep} is not used: {fp.why}" if fp.sweep is not None else ""
    n = args.fp_epochs
    print(f"no --fp-checkpoint: training the FP model first ({n} epoch{'' if n == 1 else 's'}){stale}{not_sweep}",
          file=sys.stderr)
    model, _ = train_fp_stage(args, out=out, opts=opts, data=data, epochs=args.fp_epochs, lr=args.fp_lr,
                              max_steps_per_epoch=args.max_steps_per_epoch)
    return model, str(out / FP_WEIGHTS), None


def run_single_finetune(args: argparse.Namespace) -> int:
    """Fine-tune one policy as ``args`` describe; write the result files under ``args.out``. Ctrl-C and SIGTERM end
    it with one line saying what is kept and what rerunning the same command does (exit 130 / 143)."""
    from orchestrator.ray_env import ctrl_c_signals

    from ._single_run import finetune_stopped_text, stopped

    state: dict = {}
    with ctrl_c_signals(python_sigint=True):     # SIGTERM (a batch job stopped, kill) as Ctrl-C: one line, exit 143
        try:
            return _run_single_finetune(args, state)
        except KeyboardInterrupt as e:
            return stopped("gmpq finetune", e, finetune_stopped_text(state))


def _run_single_finetune(args: argparse.Namespace, state: dict) -> int:
    from gmpq_core.export import preprocess_of, save_quantized_model
    from gmpq_core.finetune import CHECKPOINT_NAME, FinetuneConfig, check_resume_state, finetune
    from gmpq_core.train import evaluate

    from ._finetune_resume import check_resume_policy
    from ._single_run import check_out_paths, drop_stale_integer_file

    out = check_out_arg(args.out)  # before any training
    state.update(out=out, phase="prepare")
    policy = _policy_from_args(args)
    fp = pick_fp_source(args, out, policy)
    state["fp"] = fp.kind
    # the files it writes there: one of the wrong kind fails now, not after the training
    check_out_paths(out, "gmpq finetune", files=(QUANTIZED_WEIGHTS, POLICY, RESULT, f"{CHECKPOINTS}/{CHECKPOINT_NAME}",
                                                 *((FP_WEIGHTS, FP_RESULT) if fp.kind == "train" else ())),
                    folders=(CHECKPOINTS,))
    # where the policy comes from, one form for the checkpoint, the refusals, the result files and the summary line
    policy_source = (os.path.abspath(args.policy) if args.policy is not None
                     else f"uniform W{args.uniform[0]}A{args.uniform[1]}")
    _check_single_args(args, trains_fp=fp.kind == "train")
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    meta = policy_meta(policy)
    fp_info = fp.info or {}                                        # {} when there is none
    given = {key: ("--" + key.replace("_", "-"), getattr(args, key)) for key in _FLAG_KEYS
             if getattr(args, key, None) is not None}      # errors name the flag typed: --lr -1, not lr=-1.0
    try:
        config = FinetuneConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                batch_size=args.batch_size, distill=args.distill, distill_alpha=args.distill_alpha,
                                distill_temperature=args.distill_temperature, seed=args.seed,
                                max_steps_per_epoch=args.max_steps_per_epoch, include_stem=args.include_stem,
                                include_classifier=args.include_classifier)
    except GMPQError as e:
        raise naming_flags(e, given) from None
    fp_data, target = fp_info.get("dataset"), meta.get("target_dataset")
    if not args.dataset and fp_data and target and fp_data != target:
        raise ConfigError(f"The policy names the target dataset '{target}', but the FP checkpoint '{fp.path}' was "
                          f"trained on '{fp_data}'. Pass --dataset {target} with an FP checkpoint of that dataset, or "
                          f"--dataset {fp_data} to deploy the policy there on purpose.")
    dataset = args.dataset or fp_data or target or meta.get("dataset")
    if not args.dataset and fp_data and meta.get("dataset") and fp_data != meta.get("dataset") and not target:
        print(f"fine-tuning on '{fp_data}', the FP checkpoint's dataset (the policy was searched on the proxy "
              f"'{meta.get('dataset')}'); pass --dataset NAME to choose another", file=sys.stderr)
    if not args.dataset and not fp_info.get("dataset") and meta.get("dataset") and not meta.get("target_dataset"):
        print(f"fine-tuning on '{dataset}', the dataset the policy was searched on (its proxy's source); pass "
              "--dataset NAME to deploy it on another target", file=sys.stderr)
    from orchestrator.data_roots import check_given_data_root
    check_given_data_root(args.data_root, dataset or args.default_dataset)   # typed (a recorded one: its fallback)
    args.data_root, data_note = data_root_default(args, policy, dataset or args.default_dataset)
    if data_note:
        print(data_note, file=sys.stderr)
    data = load_data(args, train_size=args.train_size, dataset=dataset, train_flag="--train-size",
                     input_size=args.input_size if args.input_size is not None else fp_info.get("input_size"))
    info, train_split, test_split = data
    other_data = _check_fp_dataset(args, fp, fp_info, info)     # before the options: it names both datasets
    opts = resolve_model_options(args, sources=[fp_info, dataset_source(info), meta], dataset_info=info)
    run_info = checkpoint_run_info(info, opts, len(train_split))
    resume = check_resume_run(out, run_info, info.name,           # before a possibly long FP training; read once:
                               trains_fp=fp.kind == "train", epochs=config.epochs, config=config)  # finetune gets it
    if resume is not None:      # the recipe, the precision and a given policy too, before that training
        check_resume_policy(out, resume, policy, policy_source)
        check_resume_state(out / CHECKPOINTS / CHECKPOINT_NAME, resume, config=config, precision=precision,
                           policy=policy)
    if policy is not None:  # fail before a possibly long FP training
        for warning in check_policy_fits(policy, build_seeded_model(opts, args.seed), opts, flags=False, args=args,
                                         dataset=dataset_source(info)):
            print(f"gmpq finetune: warning: {warning}", file=sys.stderr, flush=True)
    state["phase"] = "fp"
    fp_model, fp_source, fp_note = _fp_model(args, out, opts, data, fp)
    state["phase"] = "finetune"
    fp_digest = check_resume_fp(out, resume, fp_model, fp_source)
    if policy is None:
        policy = uniform_policy(fp_model, *args.uniform, flags=("--uniform W", "--uniform A"),
                                meta={**opts.to_dict(), "dataset": info.name})
        if resume is not None:
            check_resume_policy(out, resume, policy, policy_source)
            check_resume_state(out / CHECKPOINTS / CHECKPOINT_NAME, resume, policy=policy)
    for note in (fp_note, other_data, _resume_note(out, resume, config.epochs)):   # every refusal is behind us
        if note:
            print(note, file=sys.stderr)
    train_loader, test_loader = loaders(info, train_split, test_split, batch_size=args.batch_size,
                                        seed=args.seed, device=device)
    fp_eval = evaluate(fp_model.to(device), test_loader, device=device, precision=precision)
    bar = make_progress("finetune epoch")
    try:
        result = finetune(fp_model, policy, train_loader, test_loader, config=config, input_size=opts.input_size,
                          in_channels=opts.in_channels, device=device, checkpoint_dir=out / CHECKPOINTS,
                          reporter=ProgressReporter("finetune", total_epochs=config.epochs), progress=bar,
                          precision=precision, run_info=run_info, fp_source=os.path.abspath(fp_source),
                          resume_state=resume, fp_digest=fp_digest, policy_source=policy_source)
    finally:
        bar.close()
    state["phase"] = "write"
    summary = finetune_summary(result, policy, opts, fp_eval, config=config, dataset=info.name,
                               policy_source=policy_source,
                               fp_source=fp_source, train_size=len(train_split), test_size=len(test_split))
    summary["precision"] = precision
    policy.save(out / POLICY)
    results = {"top1": result.top1, "top5": result.top5, "dataset": info.name,
               "gbitops": summary["bitops"]["gbitops_quantized"], "epochs": result.epochs_run,
               "policy_source": summary["policy"]["name"], "precision": precision, "test_images": len(test_split)}
    save_quantized_model(out / QUANTIZED_WEIGHTS, result.model, policy, arch=opts.to_dict(), results=results,
                         preprocess=preprocess_of(info))
    atomic_write_json(out / RESULT, summary)
    stale = drop_stale_integer_file(out / QUANTIZED_WEIGHTS, results,
                                     trained=result.epochs_run > result.resumed_from_epoch)
    if stale is not None:                  # it held the old weights
        print(f"removed {stale}, gmpq export's integer file of the model just replaced (it held the old weights); "
              f"run 'gmpq export {out}' again to write the new model's", file=sys.stderr)
    b = summary["bitops"]
    print(f"FP {opts.model}: top-1 {fp_eval['top1']:.2f}%   quantized ({summary['policy']['name']}, "
          f"mean bits per layer W {summary['policy']['avg_w_bits']:.2f} A {summary['policy']['avg_a_bits']:.2f}): "
          f"top-1 {result.top1:.2f}%, top-5 {result.top5:.2f}% after {result.epochs_run} "
          f"epoch{'' if result.epochs_run == 1 else 's'}")
    capped = (f", at most {args.max_steps_per_epoch} batch{'' if args.max_steps_per_epoch == 1 else 'es'} of "
              f"{args.batch_size} per epoch"
              if args.max_steps_per_epoch else "")
    trained = ("" if result.epochs_run > result.resumed_from_epoch else
               "; nothing left to train: the kept fine-tune evaluated again")
    print(f"(top-1 on {len(test_split)} test images of {info.name}; the fine-tune on {len(train_split)} training "
          f"images{capped}{trained})")
    print(f"BitOPs: {b['gbitops_quantized']:.4f} G over quantized layers, {b['gbitops_total']:.4f} G whole network "
          f"(FP layers at 32x32); {b['macs'] / 1e6:.2f} M MACs")
    print(f"wrote {out / QUANTIZED_WEIGHTS}, {out / POLICY} and {out / RESULT}", file=sys.stderr)
    return 0

