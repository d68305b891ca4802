"""What `gmpq evaluate`, `gmpq export`, `gmpq bitops` and `gmpq finetune` say about a file of the wrong kind: a
policy JSON where a quantized model is wanted (the quantized model files, not train-fp's fp.pt), an integer file to
export (its float file only when it is there), a policy searched for another model (named, with the fix), and a
--data-root that does not exist for a command that only reads a dataset."""
from __future__ import annotations

import pytest

from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main

META = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "small_input": True, "input_size": 28,
        "dataset": "mnist5k"}


def refused(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


def policy_file(tmp_path) -> str:
    pol = BitPolicy.uniform(build_model("resnet20", in_channels=1), 4, 3)
    path = tmp_path / "policies" / "947ce7f4.json"
    path.parent.mkdir()
    BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint, meta=META).save(path)
    return str(path)


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_policy_json_given_as_a_model_points_to_the_quantized_model_files(tmp_path, capsys, command):
    err = refused(capsys, [command, policy_file(tmp_path)])
    assert "is a text file, not a PyTorch checkpoint" in err
    assert "DIR/models/<trial_id>.pt of a sweep after 'gmpq finetune --sweep DIR'" in err
    assert "quantized.pt in the folder of 'gmpq finetune --policy FILE --out DIR'" in err
    assert "fp.pt" not in err and "fp_result.json" not in err
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_checkpoint

    with pytest.raises(CheckpointError, match="the fp.pt that 'gmpq train-fp' writes beside its fp_result.json"):
        load_checkpoint(tmp_path / "policies" / "947ce7f4.json")        # an FP checkpoint's reader keeps its hint


def test_an_integer_file_names_its_float_file_only_when_it_is_there(tmp_path, capsys):
    lone = tmp_path / "model.int.pt"             # written with --out: its float file was quantized.pt
    lone.write_bytes(b"not read")
    err = refused(capsys, ["export", str(lone)])
    assert err.endswith("is an integer model file already (written by 'gmpq export'); pass the float model file it "
                        "was exported from.")
    assert "model.pt" not in err.replace("model.int.pt", "")
    (tmp_path / "947ce7f4.pt").write_bytes(b"not read")
    beside = tmp_path / "947ce7f4.int.pt"
    beside.write_bytes(b"not read")
    err = refused(capsys, ["export", str(beside)])
    assert f"pass the float model file it was exported from (by its name, {tmp_path / '947ce7f4.pt'} beside it)." in err


def test_bitops_with_a_policy_of_another_model_names_both_and_the_fix(tmp_path, capsys):
    err = refused(capsys, ["bitops", "--policy", policy_file(tmp_path), "--model", "resnet18"])
    assert "The bit policy does not fit this model: missing layers" in err
    assert ("The policy was searched for resnet20 (its meta), but resnet18 is built here: pass --model resnet20, or "
            "use a policy searched for resnet18 (gmpq search --model resnet18).") in err
    assert "see the policy's meta" not in err and "...." not in err
    err = refused(capsys, ["bitops", "--policy", str(tmp_path / "policies" / "947ce7f4.json"), "--model", "resnet18",
                           "--num-classes", "5"])
    assert "searched for resnet20 for 10 classes (its meta), but resnet18 for 5 classes is built here: pass " \
           "--model resnet20 and --num-classes 10" in err


def test_finetune_with_a_policy_of_another_model_names_both_and_the_fix(tmp_path, capsys):
    err = refused(capsys, ["finetune", "--policy", policy_file(tmp_path), "--model", "resnet18",
                           "--out", str(tmp_path / "ft"), "--train-size", "100", "--test-size", "50"])
    assert "The policy was searched for resnet20 (its meta), but resnet18 is built here: pass --model resnet20" in err


def test_evaluate_refuses_a_data_root_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "nonexist"
    err = refused(capsys, ["evaluate", str(tmp_path / "model.pt"), "--data-root", str(missing)])
    assert err.endswith(f"--data-root '{missing}': no such folder ({missing}). Pass --data-root the folder that "
                        "holds the dataset files, or drop --data-root to use the dataset's default location.")


def test_a_fitting_policy_whose_meta_names_no_model_is_accepted():
    """The review: a meta with classes but no model name made the fix text fail (None + str) even for a policy that
    fits the model built."""
    from orchestrator.common_args import ModelOptions, check_policy_fits

    model = build_model("resnet20", in_channels=1)
    pol = BitPolicy.uniform(model, 4, 4)
    policy = BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint, meta={"num_classes": 100})
    check_policy_fits(policy, model, ModelOptions(model="resnet20", input_size=28, in_channels=1, num_classes=10,
                                                  small_input=True))


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_train_fp_folder_or_its_fp_pt_is_named_a_full_precision_model_with_the_commands_that_quantize_it(
        tmp_path, capsys, command):
    from gmpq_core.fileio import atomic_write_json, save_checkpoint

    folder = tmp_path / "fp"                       # what 'gmpq train-fp --out fp' writes
    save_checkpoint(folder / "fp.pt", build_model("resnet20", in_channels=1).state_dict())
    atomic_write_json(folder / "fp_result.json", {"top1": 10.0})
    for given in (folder, folder / "fp.pt"):
        err = refused(capsys, [command, str(given)])
        assert "full-precision model" in err and "'gmpq train-fp'" in err and "not a gmpq quantized model" in err
        assert "'gmpq search --out S'" in err and f"--fp-checkpoint {folder / 'fp.pt'}" in err, err
        assert "format None" not in err
    (folder / "checkpoints").mkdir()               # a 'gmpq finetune --policy' folder, interrupted before quantized.pt
    err = refused(capsys, [command, str(folder)])
    assert "fine-tune has not finished" in err and "Run the same 'gmpq finetune' command again" in err
