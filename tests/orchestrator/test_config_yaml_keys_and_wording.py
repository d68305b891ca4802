"""Config files and flags as the user wrote them: a key given twice in a YAML config is refused with its lines (the
sweep config, `gmpq search --config`, the study config: one loader), a syntax error at the end of a file names its
last line, a bad `search:` value names `search.KEY` and YAML's `null`, and a bad flag value echoes the flag's form."""
from __future__ import annotations

import pytest

from orchestrator.cli import main


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


def written(tmp_path, text: str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("command", [["sweep", "--out", "{tmp}/out", "--config"], ["search", "--out", "{tmp}/out",
                                                                                    "--config"]])
def test_a_key_given_twice_is_refused_with_its_lines(tmp_path, capsys, command):
    path = written(tmp_path, "preset: demo\nn_trials: 2\nn_trials: 0\n")
    err = refused(capsys, [a.format(tmp=tmp_path) for a in command] + [path])
    assert (f"'{path}' gives the key 'n_trials' twice (lines 2 and 3); YAML would keep only the last one silently. "
            "Keep one n_trials: line there and delete the others.") in err
    assert not (tmp_path / "out").exists()


def test_a_key_given_twice_in_a_section_or_a_study_config_is_refused_too(tmp_path):
    from experiments.generalization import load_study_config
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep_config import load_sweep_config

    path = written(tmp_path, "preset: demo\nsearch:\n  batch_size: 32\n  lr: 0.1\n  batch_size: 64\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"gives the key 'batch_size' 3 times \(lines 3, 5 and 6\)"):
        load_sweep_config(path)
    study = written(tmp_path, "name: s\nname: t\n", "study.yaml")
    with pytest.raises(ConfigError, match=r"study\.yaml' gives the key 'name' twice \(lines 1 and 2\)"):
        load_study_config(study)
    from search_spaces.presets import parse_yaml      # a '<<' merge may repeat a key the mapping sets: no duplicate

    assert parse_yaml("base: &b {k: 1, j: 2}\nmine: {<<: *b, k: 3}\n")["mine"] == {"k": 3, "j": 2}


def test_a_file_cut_short_names_its_last_line_not_the_one_after(tmp_path, capsys):
    path = written(tmp_path, "preset: demo\nn_trials: 4\nspace: {proxy_size: [300]\n")
    err = refused(capsys, ["sweep", "--config", path, "--out", str(tmp_path / "out")])
    assert (f"'{path}' is not valid YAML at line 3, column 26 (the end of the file): expected ',' or '}}', but got "
            "'<stream end>' (while parsing a flow mapping that starts at line 3, column 8)") in err
    assert "line 4" not in err


@pytest.mark.parametrize("command", [["sweep", "--out", "{tmp}/out", "--config"], ["search", "--out", "{tmp}/out",
                                                                                    "--config"]])
def test_a_bad_search_value_in_a_config_names_its_section_and_yaml_null(tmp_path, capsys, command):
    path = written(tmp_path, "preset: demo\nsearch: {max_steps_per_epoch: -4}\n" if command[0] == "sweep" else
                   "search: {max_steps_per_epoch: -4}\n")
    err = refused(capsys, [a.format(tmp=tmp_path) for a in command] + [path])
    assert ("search.max_steps_per_epoch must be an integer > 0, but got search.max_steps_per_epoch=-4. Use null for "
            "whole epochs.") in err


def test_a_bad_budget_flag_names_the_flag_in_its_example(capsys):
    err = refused(capsys, ["search", "--budget-avg-bits", "0"])
    assert err.endswith("but got --budget-avg-bits 0 (e.g. --budget-avg-bits 3).")
    assert "Budget(" not in err


@pytest.mark.parametrize("w, a, which", [(9, 4, "W (weight bits) 9"), (4, 0, "A (activation bits) 0")])
def test_uniform_bits_out_of_range_echo_the_flag_as_typed(tmp_path, capsys, w, a, which):
    err = refused(capsys, ["finetune", "--uniform", str(w), str(a), "--out", str(tmp_path / "x")])
    assert (f"--uniform W A takes two bitwidths in 1..8, but got --uniform {w} {a}: its {which} is outside. Give "
            "e.g. --uniform 4 4;") in err
    assert "--uniform W 4" not in err


def test_a_second_yaml_document_reads_as_one_sentence():
    """The review: "... (expected a single document in the stream that starts at line 1, column 1)"."""
    from gmpq_core.errors import ConfigError
    from search_spaces.presets import parse_yaml

    with pytest.raises(ConfigError) as e:
        parse_yaml("a: 1\n---\nb: 2\n", "x.yaml")
    assert ("'x.yaml' is not valid YAML at line 2, column 1: expected a single document in the stream, but found "
            "another document.") in str(e.value)
