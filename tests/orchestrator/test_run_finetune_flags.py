"""``gmpq run``'s caps on the final fine-tune's data (--finetune-train-size, --finetune-test-size,
--finetune-max-steps-per-epoch): parsed into the config's ``finetune:`` section (nothing run), kept through the
saved ``sweep_config.yaml`` on --resume, and bad values refused as one paragraph naming the flag (exit 2)."""
from __future__ import annotations

import pytest

from orchestrator.cli import main


class _Parsed(Exception):
    pass


@pytest.fixture
def parsed(monkeypatch):
    """The SweepConfig ``gmpq run`` builds from its flags; the run stops right there (no Ray, no sweep)."""
    import orchestrator.commands.sweep as sweep_cmd

    seen, real = {}, sweep_cmd.config_from_args

    def capture(args, extra=None):
        seen["cfg"] = real(args, extra)
        raise _Parsed

    monkeypatch.setattr(sweep_cmd, "config_from_args", capture)
    return seen


def _run(argv, parsed):
    with pytest.raises(_Parsed):
        main(["run", *argv])
    return parsed["cfg"]


def test_the_fine_tune_caps_go_to_the_finetune_section_and_survive_a_resume(parsed, tmp_path):
    from orchestrator.sweep_config import save_resolved_config

    out = tmp_path / "demo"
    cfg = _run(["--preset", "demo", "--out", str(out), "--finetune-train-size", "500", "--finetune-test-size", "200",
                "--finetune-max-steps-per-epoch", "4", "--finetune-epochs", "2"], parsed)
    ft = cfg.finetune
    assert (ft.train_size, ft.test_size, ft.max_steps_per_epoch, ft.epochs) == (500, 200, 4, 2)
    save_resolved_config(cfg)                                     # what the sweep saves in its folder
    resumed = _run(["--out", str(out), "--resume"], parsed).finetune           # the folder's saved config
    assert (resumed.train_size, resumed.test_size, resumed.max_steps_per_epoch, resumed.epochs) == (500, 200, 4, 2)
    again = _run(["--out", str(out), "--resume", "--finetune-test-size", "300"], parsed).finetune   # a flag wins
    assert (again.train_size, again.test_size) == (500, 300)
    legacy = _run(["--preset", "demo", "--out", str(out), "--finetune-max-steps", "3"], parsed).finetune
    assert legacy.max_steps_per_epoch == 3 and legacy.train_size is None    # the old spelling still works


@pytest.mark.parametrize("flag, value, says", [
    ("--finetune-train-size", "0",
     "--finetune-train-size must be a whole number >= 1, but got --finetune-train-size 0."),
    ("--finetune-test-size", "-5", "--finetune-test-size must be a whole number >= 1"),
    ("--finetune-max-steps-per-epoch", "0", "--finetune-max-steps-per-epoch must be a whole number >= 1"),
    ("--finetune-train-size", "1.5", "argument --finetune-train-size: invalid int value: '1.5'")])
def test_a_bad_fine_tune_cap_is_refused_naming_the_flag(capsys, tmp_path, flag, value, says):
    try:                                       # argparse's own exit (not an int), or main's exit status
        code = main(["run", "--preset", "demo", "--out", str(tmp_path / "x"), flag, value])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert code == 2 and out == "" and err.count("gmpq: error:") == 1 and "usage:" not in err
    assert err.startswith(f"gmpq: error: {says}") and not (tmp_path / "x").exists()
