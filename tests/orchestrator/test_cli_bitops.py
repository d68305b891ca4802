"""``gmpq bitops --policy FILE`` counts the policy as every other use of it quantizes: a stem / classifier its meta
quantizes (``gmpq search --include-stem --stem-bits B``) counts at B x B bits, as the search's result.json does."""
from __future__ import annotations

import json

from gmpq_core.bitops import layer_macs
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main

META = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "small_input": True, "input_size": 28}


def _policy(tmp_path, **meta) -> tuple[str, dict[str, int]]:
    model = build_model("resnet20", in_channels=1)
    pol = BitPolicy.uniform(model, 4, 3)
    path = tmp_path / "policy.json"
    BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint, meta={**META, **meta}).save(path)
    return str(path), layer_macs(model, 28, 1)


def test_bitops_counts_the_stem_a_policys_meta_quantizes(tmp_path, capsys):
    path, macs = _policy(tmp_path, include_stem=True, stem_bits=1)
    assert main(["bitops", "--policy", path, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    conv1 = next(layer for layer in d["layers"] if layer["name"] == "conv1")
    assert (conv1["w_bits"], conv1["a_bits"], conv1["quantized"]) == (1, 1, True)
    searched = sum(m for n, m in macs.items() if n not in ("conv1", "fc"))
    assert d["bitops_quantized"] == searched * 4 * 3 + macs["conv1"] * 1 * 1
    assert d["bitops_total"] == d["bitops_quantized"] + macs["fc"] * 32 * 32
    assert main(["bitops", "--policy", path]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("conv1 "))
    assert row.split()[2:4] == ["1", "1"] and row.endswith("yes")


def test_bitops_counts_the_classifier_a_policys_meta_quantizes_at_8_bits_by_default(tmp_path, capsys):
    path, macs = _policy(tmp_path, include_classifier=True)
    assert main(["bitops", "--policy", path, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    fc = next(layer for layer in d["layers"] if layer["name"] == "fc")
    assert (fc["w_bits"], fc["a_bits"], fc["quantized"]) == (8, 8, True)
    assert d["bitops_total"] == d["bitops_quantized"] + macs["conv1"] * 32 * 32


def test_uniform_bits_without_a_model_count_the_default_model_and_say_so(capsys):
    """The walkthrough: 'gmpq bitops --w-bits 4 --a-bits 4' said "No model given", then "No input size given",
    while every other command defaults to resnet20 on Fashion-MNIST."""
    assert main(["bitops", "--w-bits", "4", "--a-bits", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["model"], out["input_size"], out["in_channels"], out["num_classes"]) == ("resnet20", 28, 1, 10)
    assert out["default_model"] is True
    assert main(["bitops", "--w-bits", "4", "--a-bits", "4"]) == 0
    assert "(the default model" in capsys.readouterr().out.splitlines()[0]
    # a model named: the flags left out take the default's values (the walkthrough: "No input size given"), and
    # the header says which
    assert main(["bitops", "--w-bits", "4", "--a-bits", "4", "--model", "resnet18"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header.startswith("resnet18 at 28x28, 1 input channel(s), 10 classes, small-input stem")
    assert "--input-size 28, --in-channels 1, --num-classes 10: not given" in header
