"""``gmpq finetune DIR`` / ``gmpq finetune FILE``: the positional argument is a sweep folder or a policy file (as
``gmpq status DIR`` and ``gmpq pareto DIR`` take theirs); it was "unrecognized arguments"."""
from __future__ import annotations

import argparse

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.cli import build_parser, main
from orchestrator.commands._finetune_sweep import resolve_target


def parsed(*argv: str) -> argparse.Namespace:
    args = build_parser("finetune").parse_args(["finetune", *argv])
    resolve_target(args)
    return args


def test_a_folder_is_the_sweep_and_a_file_the_policy(tmp_path):
    policy = tmp_path / "policy.json"
    policy.write_text("{}")
    args = parsed(str(tmp_path))
    assert args.sweep == str(tmp_path) and args.policy is None
    args = parsed(str(policy))
    assert args.policy == str(policy) and args.sweep is None
    assert parsed(str(tmp_path), "--sweep", str(tmp_path)).sweep == str(tmp_path)      # the same one twice: fine


def test_a_missing_target_or_two_different_ones_are_refused_naming_them(tmp_path, capsys):
    assert main(["finetune", str(tmp_path / "nope")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"gmpq finetune {tmp_path / 'nope'}: no such file or folder" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="Two sweep folders were given"):
        parsed(str(tmp_path), "--sweep", str(tmp_path.parent))
    policy = tmp_path / "p.json"
    policy.write_text("{}")
    with pytest.raises(ConfigError, match="Two policy files were given"):
        parsed(str(policy), "--policy", str(tmp_path / "other.json"))
