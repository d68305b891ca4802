"""``gmpq finetune --policy``: one policy source (the file's absolute path, or "uniform W4A4") for its checkpoint,
its result files and its summary line; its refusal of another policy's checkpoint says how the two differ in the
core's words (``gmpq_core.finetune_policy``). Tiny digits runs, a second or two each."""
from __future__ import annotations

import json
import os

import pytest

from gmpq_core.errors import CheckpointError, ConfigError
from gmpq_core.fileio import load_checkpoint
from gmpq_core.finetune import check_resume_state
from gmpq_core.finetune_policy import policy_difference, policy_layers
from gmpq_core.policy import BitPolicy, QuantSpec
from orchestrator.cli import main
from orchestrator.commands._finetune_resume import check_resume_policy

TINY = ["--dataset", "digits", "--train-size", "100", "--test-size", "40", "--batch-size", "16",
        "--max-steps-per-epoch", "1", "--fp-epochs", "1"]


def test_gmpq_finetune_and_the_core_describe_another_policy_in_the_same_words(tmp_path):
    old = {"a": [4, 4], "b": [4, 4], "x": [8, 8]}
    now = BitPolicy(layers={"a": QuantSpec(w_bits=2, a_bits=4), "b": QuantSpec(w_bits=4, a_bits=4),
                            "y": QuantSpec(w_bits=4, a_bits=4)})
    ckpt = {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "history": [], "policy_layers": old,
            "policy_source": "uniform W4A4"}
    clause = policy_difference(old, policy_layers(now))
    with pytest.raises(ConfigError) as cli:
        check_resume_policy(tmp_path, ckpt, now, "uniform W2A4")
    with pytest.raises(CheckpointError) as core:
        check_resume_state(tmp_path / "last.pt", ckpt, policy=now)
    assert f"): {clause}. Pass --uniform 4 4 to resume it" in str(cli.value)
    assert f"than this run's: {clause}; use the policy" in str(core.value)


def test_the_policy_source_is_one_absolute_path_in_the_checkpoint_the_result_files_and_the_summary(
        tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--uniform", "4", "4", *TINY, "--out", "first"]) == 0
    capsys.readouterr()
    assert main(["finetune", "--policy", "first/policy.json", *TINY, "--out", "second"]) == 0
    said = capsys.readouterr().out
    source = os.path.abspath("first/policy.json")
    assert load_checkpoint(tmp_path / "second" / "checkpoints" / "last.pt")["policy_source"] == source
    assert json.loads((tmp_path / "second" / "finetune_result.json").read_text())["policy"]["name"] == source
    assert load_checkpoint(tmp_path / "second" / "quantized.pt")["results"]["policy_source"] == source
    assert f"quantized ({source}, mean bits per layer" in said
