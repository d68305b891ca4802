"""How the CLI reads its arguments: a sweep folder given as ``--sweep DIR`` or as the one positional DIR (``gmpq
status runs/demo`` failed with "the following arguments are required: --sweep"), and argparse's own errors as one
paragraph naming the command's --help (they printed the command's whole usage block first, up to 11 lines)."""
from __future__ import annotations

import pytest
from final_sweep import make_sweep

from orchestrator.cli import main


def _err(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


@pytest.mark.parametrize("command", ["status", "pareto", "sync-mlflow"])
def test_the_sweep_folder_may_be_given_without_sweep(tmp_path, capsys, command):
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    extra = ["--no-mlflow"] if command == "pareto" else []
    assert main([command, str(sweep), *extra]) == 0
    positional = capsys.readouterr().out
    assert main([command, "--sweep", str(sweep), *extra]) == 0
    again = capsys.readouterr().out
    if command == "sync-mlflow":            # the same store: the second sync finds the runs the first made
        assert "(created)" in positional and "(reused)" in again
    else:
        assert again == positional and str(sweep) in positional
    assert main([command, "--sweep", str(sweep), f"{sweep}/", *extra]) == 0     # the same folder twice: fine
    capsys.readouterr()
    err = _err(capsys, [command, "--sweep", str(sweep), str(tmp_path / "other")])
    assert f"Two sweep folders were given: --sweep {sweep} and {tmp_path / 'other'}." in err
    assert f"gmpq {command} --sweep DIR (or gmpq {command} DIR)" in err
    err = _err(capsys, [command])
    assert err == f"gmpq: error: gmpq {command} needs the sweep folder (the --out of gmpq sweep or gmpq run): " \
                  f"gmpq {command} --sweep DIR, or gmpq {command} DIR."


@pytest.mark.parametrize("argv, says", [
    (["sweep", "--precision", "fp16"], "argument --precision: invalid choice: 'fp16' (choose from 'auto', 'fp32', "
                                       "'bf16'). 'gmpq sweep --help' lists the options."),
    (["status", "--bogus"], "unrecognized arguments: --bogus. 'gmpq status --help' lists the options."),
    (["search", "--epochs"], "argument --epochs: expected one argument. 'gmpq search --help' lists the options."),
    (["nosuch"], "argument COMMAND: invalid choice: 'nosuch' (choose from 'bitops',"),
])
def test_argparse_errors_are_one_paragraph_without_the_usage_block(capsys, argv, says):
    with pytest.raises(SystemExit) as e:                   # argparse's own exit, status 2
        main(argv)
    out, err = capsys.readouterr()
    err = " ".join(err.split())
    assert e.value.code == 2 and out == "" and err.count("gmpq: error:") == 1
    assert err.startswith(f"gmpq: error: {says}") and "usage:" not in err
