"""``gmpq search``'s messages about its flags, before any work: a value from a flag is named as the flag typed
(``--eta -1``, not ``eta=-1.0``); an average-bits budget is checked against the range the bit candidates reach (it
said "1..8", then 1 failed against "average bits 2 .. 6"); an infeasible budget says how to change the candidates."""
from __future__ import annotations

import pytest

from gmpq_core.errors import BudgetInfeasibleError, ConfigError
from orchestrator.cli import main
from orchestrator.common_args import naming_flags

SEARCH = ["search", "--dataset", "digits", "--proxy-size", "100"]
HOW = "'candidates: [2, 3, 4, 6, 8]'"


def _err(tmp_path, capsys, *argv: str) -> str:
    cache = tmp_path / "cache"
    assert main([*SEARCH, *argv, "--cache-dir", str(cache), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1 and not cache.exists()
    return " ".join(err.split())


@pytest.mark.parametrize("bits", ["9", "1", "0.5", "6.5"])
def test_an_average_bits_budget_is_checked_against_the_candidates_range(tmp_path, capsys, bits):
    err = _err(tmp_path, capsys, "--budget-avg-bits", bits)
    assert f"--budget-avg-bits {float(bits):g} is outside the feasible range 2 .. 6 average bits" in err
    assert "1..8" not in err and "avg_bits=" not in err and HOW in err and "--config FILE" in err


def test_the_candidates_of_the_config_set_the_average_bits_range(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("candidates: [3, 4, 8]\n")
    err = _err(tmp_path, capsys, "--config", str(cfg), "--budget-avg-bits", "2")
    assert "--budget-avg-bits 2 is outside the feasible range 3 .. 8 average bits" in err
    assert "w_bits [3, 4, 8]" in err


def test_a_budget_from_the_config_file_keeps_its_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("search: {budget: {avg_bits: 9}}\n")
    assert "The budget avg_bits=9 is outside the feasible range 2 .. 6" in _err(tmp_path, capsys, "--config", str(cfg))


def test_an_infeasible_gbitops_budget_names_the_flag_and_how_to_change_the_candidates(tmp_path, capsys):
    err = _err(tmp_path, capsys, "--budget-gbitops", "1000")
    assert err.startswith("gmpq: error: --budget-gbitops 1000 is above the all-6-bit policy")
    assert "feasible range" in err and HOW in err and "gmpq search --config FILE" in err


@pytest.mark.parametrize("argv, says", [
    (("--eta", "-1"), "--eta must be a number >= 0, but got --eta -1."),
    (("--lam", "-0.5"), "--lam must be a number >= 0, but got --lam -0.5."),
    (("--lr-arch", "0"), "--lr-arch must be a number > 0, but got --lr-arch 0. Use e.g. --lr-arch 0.01."),
    (("--stem-bits", "9"), "--stem-bits must be a whole number of bits in 1..8, but got --stem-bits 9."),
    (("--seed", "-2"), "--seed must be a non-negative integer, but got --seed -2."),
    (("--budget-gbitops", "-1"), "but got --budget-gbitops -1."),
])
def test_a_bad_flag_value_is_named_as_the_flag(tmp_path, capsys, argv, says):
    assert says in _err(tmp_path, capsys, *argv)


def test_a_bad_value_from_the_config_file_keeps_its_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("search: {eta: -1}\n")
    err = _err(tmp_path, capsys, "--config", str(cfg), "--lam", "1")
    assert "search.eta must be a number >= 0, but got search.eta=-1." in err       # named as written in the file


def test_naming_flags_keeps_the_error_type_and_other_keys():
    err = naming_flags(BudgetInfeasibleError("eta must be >= 0, but got eta=-1.0; lam=-1.0 too."),
                       {"eta": ("--eta", -1.0), "seed": ("--seed", 3)})
    assert isinstance(err, BudgetInfeasibleError)
    assert str(err) == "--eta must be >= 0, but got --eta -1; lam=-1.0 too."
    same = ConfigError("lam must be >= 0, but got lam=-1.0.")
    assert naming_flags(same, {"eta": ("--eta", -1.0)}) is same


def test_naming_flags_leaves_an_examples_code_alone_and_echoes_the_value_as_typed():
    """The review: 'Budget(avg_bits=3)' became 'Budget(--budget-avg-bits 3)', and 1.9999999 was echoed as 2."""
    from gmpq_core.errors import ConfigError
    from orchestrator.common_args import naming_flags

    err = ConfigError("budget avg_bits must be a positive number of bits, but got avg_bits=0.0 (e.g. "
                      "Budget(avg_bits=3)). Use e.g. avg_bits=3.")
    text = str(naming_flags(err, {"avg_bits": ("--budget-avg-bits", 0.0)}))
    assert "but got --budget-avg-bits 0 (e.g. Budget(avg_bits=3)). Use e.g. --budget-avg-bits 3." in text
    err = ConfigError("The budget avg_bits=1.9999999 is outside the feasible range 2 .. 6")
    assert str(naming_flags(err, {"avg_bits": ("--budget-avg-bits", 1.9999999)})).startswith(
        "The budget --budget-avg-bits 1.9999999 is outside")
