"""The ``gmpq`` command's dispatch: only the named command's module is imported."""
from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.cli import _command_modules, _named_command, build_parser, main


def test_the_named_command_is_found_past_options_and_dashes():
    assert _named_command(["-v", "sync-mlflow", "--sweep", "x"]) == "sync_mlflow"
    assert _named_command(["train-fp", "--epochs", "1"]) == "train_fp"
    assert _named_command(["--help"]) is None and _named_command([]) is None
    assert _named_command(["no-such-command"]) is None          # argparse then names the choices
    assert _named_command(["sync_mlflow"]) is None              # not a command's name: all commands listed
    assert _named_command(["-h", "sweep"]) is None              # help first: the list of every command
    assert "_finetune_sweep" not in _command_modules()            # a helper of `gmpq finetune`, not a command


COMMANDS = ("bitops", "cluster", "finetune", "mlflow-server", "pareto", "run", "search", "study", "sweep",
            "sync-mlflow", "train-fp")


def test_the_full_parser_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_a_commands_help_shows_no_rest_markup(command, capsys):
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    assert "``" not in capsys.readouterr().out


HEAVY = ("torch", "torchvision", "ray", "mlflow", "optuna", "pyarrow")
HELP_ARGVS = ([["--help"]] + [[c.replace("_", "-"), "--help"] for c in _command_modules()]
              + [["cluster", "status", "--help"], ["--version"]])
ERROR_ARGVS = [[c.replace("_", "-"), "--no-such-flag"] for c in _command_modules()] + [
    ["train-fp", "--data-root", ""], ["search", "--data-root", "/etc/hostname/data"]]   # checked as parsed


@pytest.mark.parametrize("argv", HELP_ARGVS + ERROR_ARGVS, ids=" ".join)
def test_help_and_argparse_errors_import_no_heavy_library(argv):
    """'gmpq --help', 'gmpq COMMAND --help' and a misspelt flag are quick: no torch, Ray, MLflow, Optuna or pyarrow
    (each takes seconds to import); running the command imports what it needs."""
    code = ("import sys\nfrom orchestrator.cli import main\ntry:\n    rc = main(%r)\nexcept SystemExit as e:\n"
            "    rc = e.code\nprint('exit', rc)\nprint(sorted(m for m in %r if m in sys.modules))" % (argv, HEAVY))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    exit_line, heavy = proc.stdout.strip().splitlines()[-2:]
    assert exit_line == ("exit 0" if {"--help", "--version"} & set(argv) else "exit 2"), proc.stderr
    assert heavy == "[]", f"gmpq {' '.join(argv)} imported {heavy}"


def test_version_names_gmpq_and_the_libraries_it_runs_on_in_one_line(capsys):
    from importlib.metadata import version
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.count("\n") == 1, out          # one line, however narrow the terminal
    assert out.startswith(f"gmpq {version('gmpq-sweep')} (torch {version('torch')}, ") and f"ray {version('ray')}" in out


def test_an_unknown_command_gets_argparse_error_naming_the_choices(capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2 and "sweep" in capsys.readouterr().err


def test_output_piped_into_a_reader_that_leaves_ends_quietly():
    """'gmpq status --sweep DIR | head -3' ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "bitops", "--model", "resnet20",
                             "--input-size", "32", "--w-bits", "4", "--a-bits", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                        # the reader is gone before the first line is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_a_broken_pipe_that_is_not_stdouts_is_still_an_error(monkeypatch):
    import argparse

    from orchestrator import cli

    def boom(args):
        raise BrokenPipeError("a subprocess's pipe")
    parsed = argparse.Namespace(func=boom, verbose=False)
    monkeypatch.setattr(cli, "build_parser", lambda *a: argparse.Namespace(parse_args=lambda argv: parsed))
    with pytest.raises(BrokenPipeError):
        cli.main(["status"])


def test_an_error_paragraph_starts_with_its_prefix_even_before_a_very_long_path():
    """textwrap put a first word too long for the line (a deep path) below 'gmpq: error:'."""
    from orchestrator.cli import error_paragraph

    path = "/tmp/" + "deep/" * 25 + "cfg.yaml"
    text = error_paragraph(ValueError(f"'{path}' must contain a YAML mapping at the top level."))
    assert text.startswith(f"gmpq: error: '{path}'") and text.endswith("top level.")
    assert all(len(line) <= 100 for line in error_paragraph(ValueError("word " * 60)).splitlines())


def test_the_projects_own_warnings_print_as_one_gmpq_paragraph():
    import orchestrator.cli as cli
    import orchestrator.mlflow_sink as sink

    err = cli.format_warning(RuntimeWarning("MLflow logging disabled: connecting failed"), RuntimeWarning,
                             sink.__file__, 183)
    assert err.startswith("gmpq: warning: MLflow logging disabled: connecting failed")
    assert "RuntimeWarning" not in err and sink.__file__ not in err and err.count("\n") == 1


def test_a_librarys_warnings_keep_pythons_format():
    import numpy

    import orchestrator.cli as cli

    err = cli.format_warning(UserWarning("from a library"), UserWarning, numpy.__file__, 3)
    assert "UserWarning: from a library" in err and numpy.__file__ in err and not err.startswith("gmpq:")


def test_no_command_is_a_usage_error_listing_the_commands_on_stderr(capsys):
    """'gmpq' alone printed the help to stdout and exited 0, as if something had run."""
    from orchestrator.cli import main

    for argv in ([], ["-v"]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("usage: gmpq") and all(c in err for c in COMMANDS)
        assert "gmpq: error: no command given; pick one of the commands listed above" in " ".join(err.split())
    with pytest.raises(SystemExit) as e:
        main(["--help"])                                       # asked for: stdout, exit 0
    assert e.value.code == 0 and "sweep" in capsys.readouterr().out


def test_quiet_libraries_silences_deprecation_notices_of_mlflows_database_code(monkeypatch):
    """SQLAlchemy's notice about MLflow's store ('The noload loader strategy is deprecated') opened an error."""
    import os
    import warnings

    from orchestrator.commands import quiet_libraries

    monkeypatch.setattr(os, "environ", os.environ.copy())     # quiet_libraries sets MLflow's variables
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        for module in ("mlflow.store.tracking.sqlalchemy_store", "sqlalchemy.orm.strategy_options", "orchestrator.sync"):
            warnings.warn_explicit(f"deprecated in {module}", DeprecationWarning, "x.py", 1, module=module)
        warnings.warn_explicit("a real problem", RuntimeWarning, "x.py", 1, module="mlflow.store")
    assert [str(w.message) for w in caught] == ["deprecated in orchestrator.sync", "a real problem"]


def test_verbose_output_is_not_buried_under_matplotlibs_debug_lines(tmp_path):
    """gmpq -v pareto drew its plots under 440 'DEBUG matplotlib.font_manager' lines; the command's own DEBUG
    lines stay."""
    import subprocess
    import sys

    from test_run import hand_made_sweep                      # same folder (pytest puts it on sys.path)

    hand_made_sweep(tmp_path)
    env = {**__import__("os").environ, "MPLCONFIGDIR": str(tmp_path / "mpl")}   # a cold font cache logs the most
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "-v", "pareto", "--sweep", str(tmp_path),
                           "--no-mlflow"], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "DEBUG matplotlib" not in done.stderr and "DEBUG PIL" not in done.stderr
    assert (tmp_path / "pareto.png").is_file()


def _help(command: str, capsys) -> str:
    """``gmpq COMMAND --help`` as printed."""
    with pytest.raises(SystemExit):
        build_parser(command).parse_args([command, "--help"])
    return capsys.readouterr().out


def _option_help(text: str, flag: str) -> str:
    """The help of ``flag`` in a help text (its entry's lines, up to the next entry), whitespace collapsed."""
    import re

    entry = re.search(rf"^  {re.escape(flag)}\b.*?(?=^  \S|^\S|\Z)", text, re.M | re.S).group(0)
    return " ".join(entry.split()[2:])            # without the flag and its metavar


def test_search_names_the_models_and_datasets_as_the_other_commands_do(capsys):
    """gmpq search said only "model name (default resnet20)" and "proxy dataset (default fashion_mnist)"."""
    search, finetune = _help("search", capsys), _help("finetune", capsys)
    assert _option_help(search, "--model") == _option_help(finetune, "--model")     # both default to resnet20
    assert "or your own as MODULE:FUNCTION or PATH.py:FUNCTION" in _option_help(search, "--model")
    assert _option_help(search, "--dataset") == ("proxy dataset (fashion_mnist, mnist5k, digits, cifar10, "
                                                 "imagefolder:PATH); default fashion_mnist")


@pytest.mark.parametrize("flag", ["--batch-size", "--test-size", "--train-size", "--epochs", "--lr",
                                  "--max-steps-per-epoch", "--precision"])
def test_finetune_help_says_where_sweep_mode_takes_an_unset_value(flag, capsys):
    """Their defaults are the single-policy ones; with --sweep an unset value is the sweep config's finetune: one."""
    assert "with --sweep: the sweep config's" in _option_help(_help("finetune", capsys), flag)


def test_pareto_help_names_the_policy_files_it_writes_for_finetune(capsys):
    text = " ".join(_help("pareto", capsys).split())
    assert "DIR/policies/<trial_id>.json" in text and "gmpq finetune --policy" in text


def test_cluster_status_says_each_alive_nodes_resources():
    from orchestrator.commands.cluster import node_line

    node = {"node_id": "ab12cd34ef56789", "ip": "10.0.0.7", "resources": {"CPU": 8.0, "GPU": 1.0, "memory": 2**34}}
    assert node_line(node) == "ab12cd34ef56 at 10.0.0.7: 8 CPU, 1 GPU, 16.0 GiB memory"
    assert node_line({"node_id": "x", "ip": "h", "resources": {"CPU": 2.0}}) == "x at h: 2 CPU, 0 GPU"
