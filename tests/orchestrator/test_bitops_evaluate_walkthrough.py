"""The single-run walkthrough's findings about the small commands (CLI side):

- a builder that ignores ``num_classes`` fails search, train-fp, finetune, bitops and the sweep's preflight with one
  ``gmpq: error:`` paragraph before any training (it was an IndexError traceback after the teacher started);
- ``--policy finetune_result.json`` (it has a ``layers`` list) is exit 2 naming the policy.json beside it;
- ``gmpq bitops``: model flags left out take the default's values (the header says which), ``--model resnet20``
  alone is the default model, ``--no-small-input`` on resnet20 is said to change nothing, ``--num-classes 0`` is
  named first;
- ``gmpq evaluate`` evaluates a file given twice once and notes another dataset's classes.
"""
from __future__ import annotations

import json
import shutil

import pytest
from final_model_files import sweep_with_models

from orchestrator.cli import main

WRONG = '''from torch import nn


def build(*, num_classes, in_channels, small_input):
    return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 7))
'''


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


@pytest.fixture
def wrong_builder(tmp_path) -> str:
    path = tmp_path / "wrongclasses.py"
    path.write_text(WRONG)
    return f"{path}:build"


@pytest.mark.parametrize("argv", [
    ["search", "--proxy-size", "300", "--eval-size", "100", "--epochs", "1", "--teacher-epochs", "1"],
    ["train-fp", "--proxy-size", "300", "--test-size", "100", "--epochs", "1"],
    ["finetune", "--uniform", "4", "4", "--train-size", "300", "--test-size", "100", "--epochs", "1"],
])
def test_a_builder_ignoring_num_classes_fails_before_training(tmp_path, capsys, wrong_builder, argv):
    out = tmp_path / "out"
    assert main([*argv, "--model", wrong_builder, "--out", str(out)]) == 2
    err = _err(capsys)
    assert "7 outputs (logits) per image" in err and "num_classes=10" in err and "num_classes argument" in err
    assert not out.exists() or not any(out.rglob("*.pt"))


def test_a_builder_ignoring_num_classes_fails_bitops_and_the_sweep_preflight(tmp_path, capsys, wrong_builder):
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep_checks import check_sweep_config
    from orchestrator.sweep_config import load_sweep_config

    assert main(["bitops", "--model", wrong_builder, "--w-bits", "4", "--a-bits", "4"]) == 2
    assert "7 outputs (logits) per image" in _err(capsys)
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "model": wrong_builder})
    with pytest.raises(ConfigError, match="7 outputs"):
        check_sweep_config(cfg)


def test_a_finetune_result_given_as_policy_is_exit_2_naming_the_policy_beside_it(tmp_path, capsys):
    from gmpq_core.models import build_model
    from gmpq_core.policy import BitPolicy

    folder = tmp_path / "ft"
    folder.mkdir()
    pol = BitPolicy.uniform(build_model("resnet20", in_channels=1), 4, 4)
    BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint,
              meta={"model": "resnet20", "in_channels": 1, "num_classes": 10, "small_input": True,
                    "input_size": 28}).save(folder / "policy.json")
    (folder / "finetune_result.json").write_text(json.dumps(
        {"top1": 45.0, "layers": [{"name": "conv1", "macs": 1, "w_bits": 32, "a_bits": 32, "quantized": False,
                                   "bitops": 1024}]}))
    bad = str(folder / "finetune_result.json")
    for argv in (["bitops", "--policy", bad],
                 ["finetune", "--policy", bad, "--train-size", "300", "--test-size", "100", "--epochs", "1",
                  "--out", str(tmp_path / "out")]):
        assert main(argv) == 2
        err = _err(capsys)
        assert "must be a JSON object with 'version' and 'layers'" in err and "'layers' is a list" in err
        assert f"pass {folder / 'policy.json'}, beside it" in err


def _bitops(capsys, *argv) -> dict:
    assert main(["bitops", *argv, "--w-bits", "4", "--a-bits", "4", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _header(capsys, *argv) -> str:
    assert main(["bitops", *argv, "--w-bits", "4", "--a-bits", "4"]) == 0
    return capsys.readouterr().out.splitlines()[0]


def test_bitops_model_flags_left_out_take_the_defaults_values_and_the_header_says_so(capsys):
    default = _bitops(capsys)
    named = _bitops(capsys, "--model", "resnet20")            # "No input size given"
    sized = _bitops(capsys, "--model", "resnet20", "--input-size", "28")      # counted 3 channels
    assert named["bitops_quantized"] == sized["bitops_quantized"] == default["bitops_quantized"]
    assert sized["in_channels"] == 1 and sized["defaults"] == ["in_channels", "num_classes"]
    only_size = _bitops(capsys, "--input-size", "32")          # "No model given"
    assert (only_size["model"], only_size["input_size"], only_size["in_channels"]) == ("resnet20", 32, 1)
    header = _header(capsys, "--model", "resnet20", "--input-size", "28")
    assert "--in-channels 1, --num-classes 10: not given, so as the other commands' default" in header
    big = _bitops(capsys, "--model", "resnet18", "--input-size", "224", "--in-channels", "3")
    assert big["small_input"] is False and big["defaults"] == ["num_classes"]      # a large input: the usual stem


def test_bitops_no_small_input_on_resnet20_changes_nothing_and_says_so(capsys):
    plain, asked = _bitops(capsys, "--model", "resnet20"), _bitops(capsys, "--model", "resnet20", "--no-small-input")
    assert plain["bitops_quantized"] == asked["bitops_quantized"] and asked["small_input"] is True
    assert "--no-small-input changes nothing for resnet20" in _header(capsys, "--model", "resnet20",
                                                                      "--no-small-input")


@pytest.mark.parametrize("flag", ["--num-classes", "--in-channels", "--input-size"])
def test_bitops_names_a_zero_model_number_first(capsys, flag):
    assert main(["bitops", "--model", "resnet20", flag, "0", "--w-bits", "4", "--a-bits", "4"]) == 2
    assert f"but got {flag} 0" in _err(capsys)


def test_evaluate_a_file_given_twice_once_and_note_another_datasets_classes(tmp_path, capsys, monkeypatch):
    sweep = sweep_with_models(tmp_path / "sweep", n=1)
    path = sweep / "models" / "t0.pt"
    monkeypatch.chdir(sweep)
    assert main(["evaluate", str(path), "models/t0.pt", str(path), "--test-size", "100", "--json"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) == 1 and "note:" not in out.err
    assert main(["evaluate", str(path), "--dataset", "mnist5k", "--test-size", "100", "--json"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)
    assert row["dataset"] == "mnist5k" and row["recorded_top1"] is None
    err = " ".join(out.err.split())
    assert "was fine-tuned on fashion_mnist; mnist5k has as many classes (10)" in err
    assert "label i is read as the model's class i" in err
    shutil.rmtree(sweep)
