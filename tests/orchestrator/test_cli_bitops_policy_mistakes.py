"""``gmpq bitops --policy`` on hand-written policies with mistakes and on a sweep's other files: each refusal names
what is wrong with the file and where the right one is (walkthrough)."""
from __future__ import annotations

import json

from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main

META = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "small_input": True, "input_size": 28}


def _policy(path, edit=None):
    """A uniform 4/3-bit resnet20 policy at ``path``, its JSON changed by ``edit(dict)``; returns the path."""
    pol = BitPolicy.uniform(build_model("resnet20", in_channels=1), 4, 3)
    d = BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint, meta=dict(META)).to_dict()
    if edit:
        edit(d)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(d))
    return str(path)


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1, err
    return " ".join(err.split())


def test_a_policy_naming_the_classifier_or_stem_is_told_they_are_fixed_precision_not_missing(tmp_path, capsys):
    path = _policy(tmp_path / "p.json", lambda d: d["layers"].update(fc={"w_bits": 4, "a_bits": 4}))
    err = _refused(capsys, ["bitops", "--policy", path])
    assert "'fc' (its classifier) is in the network but never among a policy's layers" in err
    assert "set include_stem / include_classifier and stem_bits in 'meta'" in err
    assert "layers not in the model" not in err and "Use a policy searched for the same model" not in err
    path = _policy(tmp_path / "q.json", lambda d: d["layers"].update(conv1={"w_bits": 8, "a_bits": 8},
                                                                     fc={"w_bits": 8, "a_bits": 8}))
    assert "'conv1' (its stem) and 'fc' (its classifier) are in the network" in _refused(capsys, ["bitops", "--policy",
                                                                                                  path])


def test_a_policy_whose_meta_names_another_model_says_which_model_was_built_from_it(tmp_path, capsys):
    path = _policy(tmp_path / "p.json", lambda d: d["meta"].update(model="resnet18"))
    err = _refused(capsys, ["bitops", "--policy", path])
    assert ("resnet18 for 10 classes of 1-channel images is built here (as the policy's meta names it); a policy "
            "gives each of its searchable layers bits, and no other layer") in err
    assert "see the policy's meta" not in err
    path = _policy(tmp_path / "q.json", lambda d: d["layers"].pop("layer2.1.conv1"))
    err = _refused(capsys, ["bitops", "--policy", path])
    assert "missing layers ['layer2.1.conv1']. resnet20 for 10 classes of 1-channel images is built here" in err


def test_a_sweeps_binary_files_given_as_a_policy_name_its_policies_folder(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    _policy(sweep / "policies" / "6f11f2b1.json")
    (sweep / "models").mkdir()
    (sweep / "models" / "6f11f2b1.pt").write_bytes(b"PK\x03\x04\x00\x00\xff\xfe binary")
    (sweep / "pareto.parquet").write_bytes(b"PAR1\x00\xff\xfe binary")
    err = _refused(capsys, ["bitops", "--policy", str(sweep / "models" / "6f11f2b1.pt")])
    assert ("or a sweep's DIR/policies/<trial_id>.json (one per policy on the front, written by 'gmpq pareto'): "
            f"here, {sweep / 'policies' / '6f11f2b1.json'}.") in err
    err = _refused(capsys, ["bitops", "--policy", str(sweep / "pareto.parquet")])
    assert f"here, {sweep / 'policies' / '<trial_id>.json'}." in err


def test_a_model_flag_that_contradicts_the_policys_meta_is_warned_about_and_the_flags_network_counted(tmp_path, capsys):
    path = _policy(tmp_path / "p.json")                  # searched for resnet20, 1 channel, 10 classes, 28 px
    assert main(["bitops", "--policy", path, "--num-classes", "100"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("resnet20 at 28x28, 1 input channel(s), 100 classes")     # the flags' network
    err = " ".join(err.split())
    assert err.count("gmpq bitops: warning:") == 1
    assert "--num-classes 100 differs from the policy's meta, which records num_classes 10" in err
    assert "Pass --num-classes 10, or leave it out" in err
    assert main(["bitops", "--policy", path, "--num-classes", "10", "--in-channels", "1"]) == 0
    assert "warning" not in capsys.readouterr().err                  # flags that agree with the meta: no word
    assert main(["bitops", "--policy", path, "--json", "--in-channels", "3", "--input-size", "32"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["in_channels"] == 3 and err.count("gmpq bitops: warning:") == 2
    assert "--in-channels 3 differs" in err and "--input-size 32 differs" in err


def test_a_flag_that_says_what_the_target_dataset_has_is_no_contradiction():
    # finetune --policy: a policy searched on a 10-class proxy deployed on a 100-class target (its --num-classes)
    from argparse import Namespace

    from orchestrator.common_args import ModelOptions, contradicted_meta

    opts = ModelOptions(model="resnet20", input_size=28, in_channels=1, num_classes=100, small_input=True)
    args = Namespace(model=None, in_channels=None, num_classes=100, input_size=None)
    assert contradicted_meta(META, opts, args, {"num_classes": 100, "in_channels": 1, "input_size": 28}) == []
    assert len(contradicted_meta(META, opts, args)) == 1 and contradicted_meta(META, opts, None) == []


def test_a_policy_counted_on_the_target_dataset_its_meta_names_is_no_contradiction(tmp_path, capsys):
    # searched on Fashion-MNIST for CIFAR-10 (gmpq search --target-dataset cifar10): counted there, 3 channels, 32 px
    path = _policy(tmp_path / "p.json", lambda d: d["meta"].update(dataset="fashion_mnist", target_dataset="cifar10"))
    assert main(["bitops", "--policy", path, "--json", "--in-channels", "3", "--input-size", "32"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["in_channels"] == 3 and "warning" not in err
