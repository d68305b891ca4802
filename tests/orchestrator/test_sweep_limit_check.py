"""finetune.max_gbitops checked against the model before the sweep: a limit no policy can meet is refused before any
training (it used to surface only at the final stage, after the whole sweep), one below the lowest budget warns."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import load_sweep_config


def _cfg(tmp_path: Path, limit: float | None):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "name": "mine",
                                                       "cache_dir": str(tmp_path / "cache"),
                                                       "finetune.max_gbitops": limit})


def test_a_limit_below_the_cheapest_policy_is_refused_before_any_work(tmp_path):
    facts = check_sweep_config(_cfg(tmp_path, None))
    cheapest = facts.feasible_gbitops[0]
    with pytest.raises(ConfigError) as e:
        check_sweep_config(_cfg(tmp_path, cheapest / 2))
    said = " ".join(str(e.value).split())
    assert f"finetune.max_gbitops {cheapest / 2:g} is below the cheapest policy resnet20 can have" in said
    least = math.ceil(round(cheapest * 1e4, 6)) / 1e4                   # rounded up: the value it names is accepted
    assert f"Raise it to {least:.4f} or more (gmpq run --max-gbitops G, or finetune.max_gbitops in the config)" in said
    check_sweep_config(_cfg(tmp_path, least))
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def test_a_limit_below_the_lowest_budget_warns_and_one_above_says_nothing(tmp_path, caplog):
    cfg = _cfg(tmp_path, None)
    low = cfg.space.bounds("budget_avg_bits")[0]
    facts = check_sweep_config(cfg)
    b_lo = facts.feasible_avg_bits[0]
    cheapest = facts.feasible_gbitops[0]
    at_low = cheapest * (low / b_lo) ** 2            # GBitOPs of the lowest budget (BitOPs grow with bits squared)
    with caplog.at_level(logging.WARNING, logger="orchestrator.pareto_pick"):
        check_sweep_config(_cfg(tmp_path, (cheapest + at_low) / 2))
    assert "below the cost of the lowest budget the sweep samples" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="orchestrator.pareto_pick"):
        check_sweep_config(_cfg(tmp_path, at_low * 1.5))
    assert "max_gbitops" not in caplog.text


def test_check_names_the_limit_in_the_final_fine_tune_line(tmp_path, capsys):
    from orchestrator.cli import main

    config = tmp_path / "limit.yaml"
    config.write_text("preset: demo\nfinetune:\n  max_gbitops: 0.4\n")
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
                 "--check"]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "the top 2 policies of at most 0.4 GBitOPs (finetune.max_gbitops), 1 epoch" in said and not out.exists()


def test_run_takes_the_limit_as_a_flag_and_checks_it_before_any_work(tmp_path, capsys):
    from orchestrator.cli import main

    argv = ["run", "--preset", "demo", "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
            "--check"]
    assert main([*argv, "--max-gbitops", "0.4"]) == 0, capsys.readouterr().err
    assert "the top 2 policies of at most 0.4 GBitOPs (finetune.max_gbitops)" in capsys.readouterr().out
    assert main([*argv, "--max-gbitops", "0.001"]) == 2                  # no policy of the model is that cheap
    assert "finetune.max_gbitops 0.001 is below the cheapest policy resnet20 can have" in \
        " ".join(capsys.readouterr().err.split())
    assert main([*argv, "--max-gbitops", "-1"]) == 2                    # named as the flag it came from
    assert "--max-gbitops takes the most GBitOPs a selected policy may cost, a number > 0" in \
        " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "run").exists()


def test_a_finished_sweep_resumed_with_a_limit_its_front_cannot_meet_is_refused_before_the_config_is_saved(
        tmp_path, capsys, monkeypatch):
    import orchestrator.sweep as sweep
    from orchestrator.cli import main
    from tests.orchestrator.final_sweep import make_sweep

    out = tmp_path / "s"
    make_sweep(out, bits=((2, 2), (4, 4)))
    saved = (out / "sweep_config.yaml").read_bytes()
    monkeypatch.setattr(sweep, "_finished_summary", lambda cfg, t0: object())    # every trial ended
    argv = ["run", "--out", str(out), "--resume", "--check"]
    assert main([*argv, "--max-gbitops", "0.0001"]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "No policy of the Pareto front fits the limit of 0.0001 GBitOPs" in said
    assert f"gmpq run --out {out} --resume --max-gbitops G" in said and "Nothing was written" in said
    assert (out / "sweep_config.yaml").read_bytes() == saved
    assert main([*argv, "--max-gbitops", "none"]) == 0, capsys.readouterr().err      # lifting it is accepted
