"""Bad inputs to ``gmpq sweep`` / ``gmpq search`` / ``gmpq finetune`` that must be refused before any compute.

Each ``Case`` is a command line (``{d}`` stands for the case's own folder) plus the files to write
there first, and a regular expression the one-paragraph error must match (the rule and the value,
or the choices / feasible range it suggests). ``{d}/out`` is the output folder of every case: it
must not exist afterwards (nothing half-written).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["Case", "CASES", "VALID_SWEEP", "materialise"]

# A valid tiny sweep; every sweep case changes one thing in it.
VALID_SWEEP: dict[str, Any] = {
    "preset": "demo", "name": "bad", "n_trials": 2, "max_concurrent_trials": 1, "teacher_epochs": 1,
    "proxy_eval_size": 100,
    "space": {"proxy_size": [100], "search_epochs": 1, "budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0}},
    "search": {"batch_size": 32, "max_steps_per_epoch": 2, "recalibrate_bn_batches": 1},
    "transfer": {"train_size": 128, "test_size": 100, "batch_size": 64, "fp_epochs": 1, "fp_train_size": 500},
}


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]
    match: str
    files: Mapping[str, str] = field(default_factory=dict)


def _deep_update(base: dict, over: Mapping[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def _sweep(id_: str, change: Mapping[str, Any], match: str, *extra: str) -> Case:
    text = yaml.safe_dump(_deep_update(VALID_SWEEP, change), sort_keys=False)
    return Case(id_, ("sweep", "--config", "{d}/cfg.yaml", "--out", "{d}/out", "--quiet", *extra), match,
                {"cfg.yaml": text})


_SEARCH = ("search", "--proxy-size", "100", "--epochs", "1", "--max-steps-per-epoch", "1", "--teacher-epochs", "1",
           "--cache-dir", "{d}/cache", "--out", "{d}/out")
_FINETUNE = ("finetune", "--fp-epochs", "1", "--max-steps-per-epoch", "1", "--train-size", "100", "--test-size",
             "100", "--out", "{d}/out")
_BAD_POLICY = json.dumps({"version": 1, "layers": {"layer1.0.conv1": {"w_bits": 12, "a_bits": 4}}})
_FOREIGN_POLICY = json.dumps({"version": 1, "layers": {"features.0": {"w_bits": 4, "a_bits": 4}}})

CASES: tuple[Case, ...] = (
    # -- gmpq sweep -------------------------------------------------------------------------------
    _sweep("sweep-unknown-model", {"model": "resnet999"}, r"Unknown model 'resnet999'.*resnet20"),
    _sweep("sweep-unknown-proxy-dataset", {"proxy_dataset": "nosuch"}, r"nosuch.*fashion_mnist"),
    _sweep("sweep-unknown-target-dataset", {"target_dataset": "nosuch"}, r"nosuch.*fashion_mnist"),
    Case("sweep-unknown-preset", ("sweep", "--preset", "nosuch", "--out", "{d}/out"), r"Unknown preset.*demo"),
    _sweep("sweep-unknown-pruner", {"pruner": {"name": "bogus"}}, r"Unknown pruner 'bogus'.*median"),
    _sweep("sweep-bits-above-8", {"candidates": [2, 3, 9]}, r"9.*1\.\.8|1\.\.8.*9"),
    _sweep("sweep-bits-zero", {"candidates": {"w_bits": [0, 4], "a_bits": [2, 4]}}, r"0.*1\.\.8|1\.\.8.*0"),
    _sweep("sweep-bits-not-integer", {"candidates": [2, 3.5]}, r"3\.5"),
    _sweep("sweep-budget-below-feasible", {"space": {"budget_avg_bits": {"type": "float", "low": 1.0, "high": 4.0}}},
           r"partly outside the feasible range 2\.*0*\.\.6.*: low 1\.0 is below 2"),
    _sweep("sweep-budget-above-feasible", {"space": {"budget_avg_bits": {"type": "float", "low": 3.0, "high": 7.5}}},
           r"feasible range 2\.*0*\.\.6"),
    _sweep("sweep-budget-fixed-infeasible", {"space": {"budget_avg_bits": 8.0}}, r"feasible range"),
    _sweep("sweep-proxy-larger-than-dataset", {"space": {"proxy_size": [100, 100000]}}, r"100000.*60000"),
    _sweep("sweep-transfer-larger-than-dataset", {"transfer": {"test_size": 50000}}, r"50000.*10000"),
    _sweep("sweep-negative-eta", {"space": {"eta": {"type": "float", "low": -1.0, "high": 10.0}}}, r"eta.*-1"),
    _sweep("sweep-negative-lam", {"space": {"lam": -0.001}}, r"lam.*-0\.001"),
    _sweep("sweep-zero-lr-arch", {"space": {"lr_arch": {"type": "float", "low": 0.0, "high": 0.1}}},
           r"lr_arch.*0"),
    _sweep("sweep-zero-search-lr", {"search": {"lr": 0}}, r"lr.*> 0.*lr=0"),
    _sweep("sweep-negative-transfer-lr", {"transfer": {"lr": -0.01}}, r"transfer\.lr.*-0\.01"),
    _sweep("sweep-zero-finetune-lr", {"finetune": {"lr": 0}}, r"finetune\.lr.*0"),
    _sweep("sweep-zero-cpu", {"resources": {"cpu": 0}}, r"resources\.cpu.*0"),
    _sweep("sweep-zero-trials", {}, r"--n-trials must be a whole number >= 1, but got --n-trials 0",
           "--n-trials", "0"),
    _sweep("sweep-out-is-a-file", {}, r"afile.*(cannot be written|is a file)",
           "--out", "{d}/afile"),
    _sweep("sweep-out-under-a-file", {}, r"afile.*(cannot be written|is a file)", "--out", "{d}/afile/out"),
    _sweep("sweep-storage-under-a-file", {}, r"afile.*(cannot be written|is a file)",
           "--storage", "{d}/afile/ray"),
    _sweep("sweep-cache-under-a-file", {"cache_dir": "{d}/afile/cache"}, r"afile.*(cannot be written|is a file)"),
    _sweep("sweep-unknown-key", {"n_trails": 3}, r"n_trails"),
    Case("sweep-malformed-yaml", ("sweep", "--config", "{d}/cfg.yaml", "--out", "{d}/out"), r"line 4, column 9",
         {"cfg.yaml": "preset: demo\nname: broken\nspace: {budget_avg_bits: [2.5, 5.0\nn_trials: 2\n"}),
    Case("sweep-yaml-not-a-mapping", ("sweep", "--config", "{d}/cfg.yaml", "--out", "{d}/out"), r"mapping",
         {"cfg.yaml": "- preset\n- demo\n"}),
    Case("sweep-missing-config", ("sweep", "--config", "{d}/nope.yaml", "--out", "{d}/out"), r"nope\.yaml"),
    # -- gmpq search ------------------------------------------------------------------------------
    Case("search-unknown-model", (*_SEARCH, "--model", "vgg99"), r"Unknown model 'vgg99'.*resnet20"),
    Case("search-unknown-dataset", (*_SEARCH, "--dataset", "nosuch"), r"nosuch.*fashion_mnist"),
    _sweep("sweep-tracking-uri-bad-scheme", {}, r"tracking_uri 'foo://x' has a scheme MLflow does not know",
           "--tracking-uri", "foo://x"),
    _sweep("sweep-optuna-storage-not-a-url", {}, r"optuna_storage 'nope' is not a database URL",
           "--optuna-storage", "nope"),
    _sweep("sweep-optuna-storage-unknown-dialect", {}, r"optuna_storage 'postgres://u@h/db' is not a database URL",
           "--optuna-storage", "postgres://u@h/db"),
    _sweep("sweep-misspelt-search-setting", {"search": {"batchsize": 32}},
           r"Unknown 'search' setting\(s\) \['batchsize'\]\. Did you mean 'batch_size'"),
    Case("search-budget-infeasible", (*_SEARCH, "--budget-avg-bits", "7"), r"feasible range"),
    Case("search-budget-bits-outside-1-8", (*_SEARCH, "--budget-avg-bits", "9"),
         r"--budget-avg-bits 9 is outside the feasible range 2 \.\. 6"),
    Case("search-proxy-larger-than-dataset", (*_SEARCH, "--proxy-size", "100000"), r"100000.*60000"),
    Case("search-negative-eta", (*_SEARCH, "--eta", "-1"), r"eta.*-1"),
    Case("search-zero-lr", (*_SEARCH, "--config", "{d}/cfg.yaml"), r"lr.*lr=0", {"cfg.yaml": "search: {lr: 0}\n"}),
    Case("search-bits-not-in-1-8", (*_SEARCH, "--config", "{d}/cfg.yaml"), r"9",
         {"cfg.yaml": "search: {candidates: [2, 4, 9]}\n"}),
    Case("search-zero-proxy", (*_SEARCH, "--proxy-size", "0"),
         r"--proxy-size must be a whole number >= 1, but got --proxy-size 0"),
    Case("search-zero-max-steps", (*_SEARCH, "--max-steps-per-epoch", "0"),
         r"--max-steps-per-epoch .* got --max-steps-per-epoch 0"),
    Case("search-unknown-device", (*_SEARCH, "--device", "banana"), r"banana.*cpu, cuda"),
    Case("search-out-under-a-file", (*_SEARCH[:-1], "{d}/afile/out"), r"afile"),
    Case("search-malformed-yaml", (*_SEARCH, "--config", "{d}/cfg.yaml"), r"line 2, column \d+",
         {"cfg.yaml": "model: resnet20\nsearch: {eta: [1, 2}\n"}),
    # -- gmpq finetune ----------------------------------------------------------------------------
    Case("finetune-unknown-model", (*_FINETUNE, "--uniform", "4", "4", "--model", "vgg99"),
         r"Unknown model 'vgg99'.*resnet20"),
    Case("finetune-unknown-dataset", (*_FINETUNE, "--uniform", "4", "4", "--dataset", "nosuch"),
         r"nosuch.*fashion_mnist"),
    Case("finetune-bits-above-8", (*_FINETUNE, "--uniform", "9", "4"), r"1\.\.8.*9|9.*1\.\.8"),
    Case("finetune-policy-bits-outside", (*_FINETUNE, "--policy", "{d}/policy.json"), r"policy\.json|12",
         {"policy.json": _BAD_POLICY}),
    Case("finetune-policy-other-model", (*_FINETUNE, "--policy", "{d}/policy.json"), r"features\.0",
         {"policy.json": _FOREIGN_POLICY}),
    Case("finetune-policy-truncated", (*_FINETUNE, "--policy", "{d}/policy.json"), r"policy\.json",
         {"policy.json": _BAD_POLICY[:25]}),
    Case("finetune-zero-lr", (*_FINETUNE, "--uniform", "4", "4", "--lr", "0"), r"lr.*0"),
    Case("finetune-negative-distill-alpha", (*_FINETUNE, "--uniform", "4", "4", "--distill", "--distill-alpha", "-1"),
         r"--distill-alpha must be in \[0, 1\], but got --distill-alpha -1"),   # the flag typed
    Case("finetune-train-larger-than-dataset", (*_FINETUNE, "--uniform", "4", "4", "--train-size", "100000"),
         r"100000.*60000"),
    Case("finetune-negative-train-size", (*_FINETUNE, "--uniform", "4", "4", "--train-size", "-3"),
         r"--train-size must be a whole number >= 1, but got --train-size -3"),
    Case("finetune-out-under-a-file", (*_FINETUNE[:-1], "{d}/afile/out", "--uniform", "4", "4"), r"afile"),
    # -- counts of the later stages: one wording, checked by flag before anything runs ------------
    Case("run-zero-workers", ("run", "--config", "{d}/cfg.yaml", "--out", "{d}/out", "--workers", "0"),
         r"--workers must be a whole number >= 1, but got --workers 0", {"cfg.yaml": yaml.safe_dump(VALID_SWEEP)}),
    Case("run-zero-finetune-epochs", ("run", "--config", "{d}/cfg.yaml", "--out", "{d}/out", "--finetune-epochs", "0"),
         r"--finetune-epochs must be a whole number >= 1, but got --finetune-epochs 0",
         {"cfg.yaml": yaml.safe_dump(VALID_SWEEP)}),
    Case("pareto-zero-top-k", ("pareto", "--sweep", "{d}/out", "--top-k", "0"),
         r"--top-k must be a whole number >= 1, but got --top-k 0"),
    Case("finetune-sweep-negative-top-k", ("finetune", "--sweep", "{d}/out", "--top-k", "-2"),
         r"--top-k must be a whole number >= 1, but got --top-k -2"),
    Case("finetune-single-with-sweep-options", (*_FINETUNE, "--uniform", "4", "4", "--workers", "2", "--top-k", "3"),
         r"--top-k, --workers are for gmpq finetune --sweep DIR"),
    Case("finetune-fp-checkpoint-corrupted", (*_FINETUNE, "--uniform", "4", "4", "--fp-checkpoint", "{d}/fp.pt"),
         r"fp\.pt", {"fp.pt": "PK\x03\x04 this is not a torch checkpoint"}),
)


def materialise(case: Case, d: Path) -> list[str]:
    """Write the case's files into ``d`` (plus ``d/afile``, a plain file) and return its argv."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "afile").write_text("a plain file where a folder is expected\n")
    for name, text in case.files.items():
        (d / name).write_text(text.replace("{d}", str(d)))
    return [a.replace("{d}", str(d)) for a in case.argv]
