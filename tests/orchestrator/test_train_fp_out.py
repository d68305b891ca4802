"""``gmpq train-fp --out DIR`` with a ``DIR/fp.pt`` of an earlier run: one trained for another model, dataset or
input size is refused before any work, naming what it was trained for and the fixes (it was overwritten silently);
one of the same model and data is replaced, as 'gmpq search --out' replaces an earlier search, saying so."""
from __future__ import annotations

import hashlib

import pytest
import torch

from gmpq_core.fileio import read_json, save_checkpoint
from gmpq_core.models import build_model
from orchestrator.cli import main

TINY = ["--proxy-size", "100", "--epochs", "1", "--test-size", "50", "--batch-size", "16", "--max-steps-per-epoch", "1"]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def earlier(tmp_path_factory):
    """A folder holding fp.pt + fp_result.json of resnet20 on digits (8 px, 1 channel)."""
    out = tmp_path_factory.mktemp("fp")
    assert main(["train-fp", "--model", "resnet20", "--dataset", "digits", *TINY, "--out", str(out)]) == 0
    return out


def _refused(capsys, out, *argv: str) -> str:
    before = _digest(out / "fp.pt")
    assert main(["train-fp", *argv, *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1 and "[train-fp] epoch" not in err
    assert _digest(out / "fp.pt") == before                                  # the earlier model is kept
    return " ".join(err.split())


@pytest.mark.parametrize("argv, now", [
    (("--model", "resnet18", "--dataset", "digits"), "this run trains --model resnet18"),
    (("--model", "resnet20", "--dataset", "digits", "--input-size", "16"), "this run trains --input-size 16"),
    (("--model", "resnet20", "--dataset", "digits", "--no-small-input"), "this run trains --no-small-input"),
])
def test_an_fp_model_trained_for_another_model_is_not_overwritten(earlier, capsys, argv, now):
    err = _refused(capsys, earlier, *argv)
    assert f"{earlier / 'fp.pt'}' holds the FP model of an earlier run, trained with --model resnet20 " \
           "--input-size 8 --in-channels 1 --num-classes 10 --small-input on 'digits'" in err
    assert now in err and "Pass another --out for this run, or delete" in err and "fp_result.json" in err


def test_an_fp_model_of_another_dataset_is_refused_before_the_data_is_loaded(earlier, capsys, monkeypatch):
    import orchestrator.commands.train_fp as train_fp

    def no_loading(*args, **kwargs):
        raise AssertionError("the dataset was loaded")
    monkeypatch.setattr(train_fp, "load_dataset", no_loading)
    err = _refused(capsys, earlier, "--dataset", "cifar10")
    assert "on 'digits'" in err and "this run trains on 'cifar10'" in err


def test_weights_without_a_record_that_do_not_fit_are_not_overwritten(tmp_path, capsys):
    save_checkpoint(tmp_path / "fp.pt", build_model("resnet20", in_channels=3).state_dict())
    err = _refused(capsys, tmp_path, "--model", "resnet20", "--dataset", "digits")
    assert "holds an FP model whose weights do not fit this run's resnet20" in err and "no fp_result.json" in err


def test_the_same_model_and_data_is_trained_again_and_replaced(earlier, capsys):
    first = read_json(earlier / "fp_result.json")
    assert main(["train-fp", "--model", "resnet20", "--dataset", "digits", *TINY, "--seed", "1",
                 "--out", str(earlier)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"{earlier} holds an earlier run's fp.pt and fp_result.json of this model and data; this run replaces "
            "them when it ends (pass another --out to keep them)") in err
    assert read_json(earlier / "fp_result.json")["config"]["seed"] == 1 != first["config"]["seed"]
    fresh = build_model("resnet20", in_channels=1).state_dict()
    assert set(torch.load(earlier / "fp.pt", weights_only=True)) == set(fresh)
