"""`gmpq finetune` given an FP checkpoint that does not belong to the run: another model (PyTorch's 2 KB list of
keys), another dataset (no word), and --fp-lr / --fp-epochs that configure an FP training that does not happen;
and an --out folder whose fine-tune checkpoint or fp_result.json belongs to another run."""
from __future__ import annotations

import json

import pytest
import torch

from gmpq_core.fileio import atomic_write_json, save_checkpoint
from gmpq_core.models import build_model
from orchestrator.cli import main

# UCI digits (8x8, in scikit-learn), one batch of everything: a whole fine-tune takes about a second
TINY = ["--dataset", "digits", "--train-size", "16", "--test-size", "10", "--batch-size", "16",
        "--max-steps-per-epoch", "1"]
FINETUNE = ["finetune", "--uniform", "4", "4", *TINY]


def refused(capsys, argv: list[str]) -> str:
    """The one-paragraph error of a command that must exit 2 without a traceback, unwrapped."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("gmpq: error: ") and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


def fp_dir(tmp_path, name: str = "fp", *, num_classes: int = 10, **recorded) -> str:
    """``name/fp.pt``: a resnet20 state dict for 8x8 grey digits; with ``recorded``, the fp_result.json that
    'gmpq train-fp' writes beside it (the model options, the dataset and the FP recipe it was trained with)."""
    d = tmp_path / name
    torch.manual_seed(0)
    save_checkpoint(d / "fp.pt", build_model("resnet20", num_classes=num_classes, in_channels=1).state_dict())
    if recorded:
        atomic_write_json(d / "fp_result.json", {
            "top1": 90.0, "model": "resnet20", "input_size": 8, "in_channels": 1, "num_classes": num_classes,
            "small_input": True, "config": {"epochs": 2, "lr": 0.1}, **recorded})
    return str(d / "fp.pt")


@pytest.mark.parametrize("flags, needle", [
    (["--model", "resnet18"], "holds a resnet20 (in_channels=1, num_classes=10), but a resnet18 (in_channels=1, "
                              "num_classes=10, small_input=True) is built here: missing keys ['layer4.0.conv1.weight', "),
    (["--num-classes", "100"], "holds a resnet20 (in_channels=1, num_classes=10), but a resnet20 (in_channels=1, "
                               "num_classes=100, small_input=True) is built here: other shapes: fc.weight [10, 64] in "
                               "the file vs [100, 64] here; fc.bias [10] in the file vs [100] here."),
])
def test_an_fp_checkpoint_of_another_model_is_named_in_one_short_paragraph(flags, needle, tmp_path, capsys):
    """It was PyTorch's load_state_dict text: every missing and unexpected key, about 2 KB."""
    ckpt = fp_dir(tmp_path)
    err = refused(capsys, [*FINETUNE, "--fp-checkpoint", ckpt, *flags, "--out", str(tmp_path / "out")])
    assert err.startswith(f"gmpq: error: The FP checkpoint '{ckpt}' ") and needle in err
    assert "Pass the --model, --in-channels, --num-classes and --small-input it was trained with" in err
    assert "Missing key(s)" not in err and len(err) < 1000
    assert not (tmp_path / "out").exists()


def test_a_quantized_model_given_as_the_fp_checkpoint_is_named_as_such(tmp_path, capsys):
    """It got PyTorch's list of every missing key and the unexpected 'format', 'arch', ... entries."""
    blob = {"format": "gmpq-quantized-model/1", "arch": {}, "policy_json": "{}", "quantized": {},
            "state_dict": build_model("resnet20", in_channels=1).state_dict()}
    save_checkpoint(tmp_path / "quantized.pt", blob)
    err = refused(capsys, [*FINETUNE, "--fp-checkpoint", str(tmp_path / "quantized.pt"), "--out", str(tmp_path / "o")])
    assert (f"The FP checkpoint '{tmp_path / 'quantized.pt'}' does not hold a model's state dict (parameter names -> "
            "tensors): it holds a 'gmpq-quantized-model/1' file: a dict of 5 entries") in err and len(err) < 600


def test_an_fp_checkpoint_of_a_dataset_with_other_classes_is_refused_before_loading(tmp_path, capsys):
    """A 26-class letters model fine-tuned on 10-class digits ran to the end: labels 0..9 on a 26-way classifier."""
    ckpt = fp_dir(tmp_path, num_classes=26, dataset="emnist_letters")
    err = refused(capsys, [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(tmp_path / "out")])
    assert (f"The FP checkpoint '{ckpt}' was trained on 'emnist_letters' (26 classes, 1-channel images, per the "
            "fp_result.json beside it), but 'digits' has 10 classes of 1-channel images") in err
    assert "'gmpq train-fp --dataset digits'" in err and "--dataset emnist_letters" in err
    assert not (tmp_path / "out").exists()


def test_an_fp_checkpoint_of_a_dataset_labelled_alike_is_fine_tuned_with_a_note(tmp_path, capsys):
    """MNIST digits -> UCI digits may be meant (same 10 labels); it is said, not refused, and was not said at all."""
    ckpt = fp_dir(tmp_path, dataset="mnist5k")
    assert main([*FINETUNE, "--fp-checkpoint", ckpt, "--distill", "--out", str(tmp_path / "out")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"the FP checkpoint {ckpt} was trained on 'mnist5k' (per the fp_result.json beside it), not on 'digits': "
            "fine-tuning it on digits assumes both label their 10 classes alike") in err
    assert "(and --distill distils from it)" in err and "pass --dataset mnist5k" in err
    assert json.loads((tmp_path / "out" / "finetune_result.json").read_text())["dataset"] == "digits"


def test_the_same_dataset_or_an_fp_checkpoint_that_records_none_gets_no_note(tmp_path, capsys):
    for ckpt in (fp_dir(tmp_path, "same", dataset="digits"), fp_dir(tmp_path, "old")):   # old: no fp_result.json
        assert main([*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(tmp_path / "out" / ckpt.split("/")[-2])]) == 0
        assert "was trained on" not in capsys.readouterr().err


def test_an_fp_model_kept_from_a_run_on_another_dataset_is_not_reused(tmp_path, capsys):
    """A rerun into the same --out with another --dataset silently fine-tuned the earlier run's FP model."""
    kept = fp_dir(tmp_path, "out", dataset="mnist5k")
    err = refused(capsys, [*FINETUNE, "--out", str(tmp_path / "out")])
    assert (f"The FP model '{kept}', kept from an earlier run in this --out folder, was trained on 'mnist5k', but "
            "this run fine-tunes on 'digits'. Pass another --out for the digits run") in err
    assert f"add --fp-checkpoint {kept} there to fine-tune that FP model on digits on purpose." in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["fp.pt", "fp_result.json"]


@pytest.mark.parametrize("value", ["0", "nan"])
def test_fp_lr_is_not_checked_when_the_fp_model_is_loaded_and_is_said_to_be_ignored(value, tmp_path, capsys):
    """'--fp-lr must be a finite number > 0' refused a run that trains no FP model (--fp-checkpoint given)."""
    ckpt = fp_dir(tmp_path, dataset="digits")
    assert main([*FINETUNE, "--fp-checkpoint", ckpt, "--fp-lr", value, "--fp-epochs", "3",
                 "--out", str(tmp_path / "out")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"--fp-epochs 3 and --fp-lr {float(value)} are ignored: the FP model is loaded from --fp-checkpoint "
            f"{ckpt}, not trained") in err
    assert "must be a finite number" not in err


def test_fp_lr_is_not_checked_when_the_fp_model_of_an_earlier_run_is_reused(tmp_path, capsys):
    kept = fp_dir(tmp_path, "out", dataset="digits")          # trained with --fp-epochs 2 --fp-lr 0.1
    assert main([*FINETUNE, "--fp-lr", "0", "--out", str(tmp_path / "out")]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"reusing the FP model {kept} from an earlier run (trained with --fp-epochs 2 --fp-lr 0.1; the --fp-epochs "
            "2 --fp-lr 0.0 given now apply only when it is trained") in err
    assert main([*FINETUNE, "--out", str(tmp_path / "out")]) == 0     # the same recipe: no note
    assert "trained with" not in capsys.readouterr().err


def image_folders(root, *names: str) -> list[str]:
    """Tiny ``imagefolder:`` datasets (2 classes of four random 8x8 RGB images per split) named ``names``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in names:
        for split in ("train", "val"):
            for c in ("a", "b"):
                d = root / name / split / c
                d.mkdir(parents=True)
                for i in range(4):
                    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return [f"imagefolder:{root / name}" for name in names]


def test_a_fine_tune_checkpoint_of_a_run_on_another_dataset_is_refused_not_resumed(tmp_path, capsys):
    """A rerun into the same --out (with --fp-checkpoint, so no kept fp.pt says so) on another dataset resumed the
    earlier run's fine-tune and reported its model as this dataset's."""
    a, b = image_folders(tmp_path, "setA", "setB")
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "fp.pt", build_model("resnet20", num_classes=2, in_channels=3).state_dict())
    out = tmp_path / "out"
    run = ["finetune", "--uniform", "4", "4", "--input-size", "8", "--batch-size", "8", "--max-steps-per-epoch", "1",
           "--epochs", "2", "--fp-checkpoint", str(tmp_path / "fp.pt"), "--out", str(out)]
    assert main([*run, "--dataset", a]) == 0
    capsys.readouterr()
    before = (out / "checkpoints" / "last.pt").read_bytes()
    err = refused(capsys, [*run, "--dataset", b])
    assert (f"The fine-tune checkpoint '{out / 'checkpoints' / 'last.pt'}', kept from an earlier run in this --out "
            f"folder, was written by a fine-tune on '{a}', but this run fine-tunes on '{b}'. Pass another --out for "
            f"the {b} run (this folder's fine-tune checkpoints belong to the {a} run), or delete "
            f"'{out / 'checkpoints'}' to start this folder's fine-tune afresh.") in err
    assert (out / "checkpoints" / "last.pt").read_bytes() == before
    assert main([*run, "--dataset", f"imagefolder:{tmp_path}/./setA"]) == 0       # the same folder, spelt otherwise


def test_a_fine_tune_checkpoint_of_another_input_size_is_refused_and_one_from_before_the_record_resumes(tmp_path,
                                                                                                      capsys):
    """resnet20 takes any input size, so a checkpoint trained at 8 px resumed silently at 16 px."""
    ckpt, out = fp_dir(tmp_path), tmp_path / "out"
    run = [*FINETUNE, "--epochs", "2", "--fp-checkpoint", ckpt, "--out", str(out)]
    assert main(run) == 0
    capsys.readouterr()
    err = refused(capsys, [*run, "--input-size", "16"])
    assert (f"The fine-tune checkpoint '{out / 'checkpoints' / 'last.pt'}', kept from an earlier run in this --out "
            "folder, was written with --input-size 8, but this run has --input-size 16. Pass --input-size 8 to "
            "resume it, another --out for this run, or delete") in err
    path = out / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state["run"] == {"dataset": "digits", "model": "resnet20", "input_size": 8, "in_channels": 1,
                            "num_classes": 10, "small_input": True, "train_size": 16}
    del state["run"]                              # a checkpoint written before the record: resumed as before
    torch.save(state, path)
    assert main(run) == 0
    assert len(json.loads((out / "finetune_result.json").read_text())["history"]) == 2   # resumed, none re-run


def test_an_fp_result_left_without_its_fp_model_does_not_steer_the_model(tmp_path, capsys):
    """DIR/fp_result.json of a 26-class 16 px model, its fp.pt gone: the FP model trained here took 26 classes and
    16 px from it."""
    out = tmp_path / "out"
    out.mkdir()
    atomic_write_json(out / "fp_result.json", {"model": "resnet20", "input_size": 16, "in_channels": 1,
                                               "num_classes": 26, "small_input": False, "dataset": "digits"})
    assert main([*FINETUNE, "--fp-epochs", "1", "--out", str(out)]) == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert (result["num_classes"], result["input_size"], result["small_input"]) == (10, 8, True)
    err = " ".join(capsys.readouterr().err.split())
    assert (f"no --fp-checkpoint: training the FP model first (1 epoch); the fp_result.json left in {out} without "
            "its fp.pt is not used and is replaced") in err
    assert json.loads((out / "fp_result.json").read_text())["num_classes"] == 10        # rewritten with fp.pt


def test_a_missing_fp_checkpoint_is_named_before_its_fp_result_is_read(tmp_path, capsys):
    """--fp-checkpoint DIR/fp.pt gone but DIR/fp_result.json there (of a 26-class model): it was refused as a model
    of another label space, not as missing."""
    ckpt = fp_dir(tmp_path, num_classes=26, dataset="emnist_letters")
    (tmp_path / "fp" / "fp.pt").unlink()
    err = refused(capsys, [*FINETUNE, "--fp-checkpoint", ckpt, "--out", str(tmp_path / "out")])
    assert f"Checkpoint not found: '{ckpt}'." in err and "emnist_letters" not in err
    assert not (tmp_path / "out").exists()
