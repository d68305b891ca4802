import json

import pytest
import torch

from gmpq_core import BitCandidates, BitPolicy, ConfigError, PolicyMismatchError, QuantSpec, build_model
from gmpq_core.layers import searchable_layers, stem_and_classifier


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("resnet20", in_channels=1)


def test_quantspec_rejects_bits_outside_range():
    with pytest.raises(ConfigError, match="w_bits=9"):
        QuantSpec(w_bits=9, a_bits=4)
    with pytest.raises(ConfigError, match="a_bits=0"):
        QuantSpec(w_bits=4, a_bits=0)


def test_candidates_sorted_and_validated():
    assert BitCandidates(w_bits=(6, 2, 4)).w_bits == (2, 4, 6)
    with pytest.raises(ConfigError):
        BitCandidates(w_bits=())
    with pytest.raises(ConfigError):
        BitCandidates(a_bits=(2, 2))
    assert BitCandidates.from_any([1, 8]).a_bits == (1, 8)


def test_stem_and_classifier_are_not_searchable(net):
    stem, cls = stem_and_classifier(net)
    assert (stem, cls) == ("conv1", "fc")
    names = searchable_layers(net)
    assert "conv1" not in names and "fc" not in names and len(names) == 20


def test_a_convolutional_classifier_stays_out_of_the_search_too():
    """A network without a Linear (SqueezeNet's 1x1-convolution classifier, a user's all-convolutional CNN) had its
    classifier searched and quantized (a review): the last Conv2d is the classifier there."""
    from torch import nn
    from torchvision.models import squeezenet1_1

    assert stem_and_classifier(squeezenet1_1(num_classes=10)) == ("features.0", "classifier.1")
    assert "classifier.1" not in searchable_layers(squeezenet1_1(num_classes=10))
    allconv = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 10, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert stem_and_classifier(allconv) == ("0", "4") and list(searchable_layers(allconv)) == ["2"]
    assert list(searchable_layers(allconv, include_classifier=True)) == ["2", "4"]
    assert stem_and_classifier(nn.Sequential(nn.Conv2d(1, 8, 3))) == ("0", None)     # one conv: the stem only
    old = BitPolicy(layers={"2": (4, 4), "4": (4, 4)})           # searched before: it named the classifier
    with pytest.raises(PolicyMismatchError, match="'4' is this network's classifier .*include_classifier"):
        old.check_fits(allconv)


def test_policy_json_round_trip(tmp_path, net):
    pol = BitPolicy.uniform(net, 3, 4)
    path = pol.save(tmp_path / "p.json")
    back = BitPolicy.load(path)
    assert back == pol and back.to_dict()["version"] == 1
    assert json.loads(path.read_text())["fingerprint"] == pol.fingerprint
    back.check_fits(net)


def test_policy_missing_layer_is_named(net):
    d = BitPolicy.uniform(net, 4, 4).to_dict()
    del d["layers"]["layer2.0.conv1"]
    with pytest.raises(PolicyMismatchError, match="layer2.0.conv1"):
        BitPolicy.from_dict(d).check_fits(net)


def test_policy_extra_layer_is_named(net):
    d = BitPolicy.uniform(net, 4, 4).to_dict()
    d["layers"]["layer9.conv"] = {"w_bits": 4, "a_bits": 4}
    with pytest.raises(PolicyMismatchError, match="layer9.conv"):
        BitPolicy.from_dict(d).check_fits(net)


def test_policy_shape_mismatch_detected(net):
    pol = BitPolicy.uniform(build_model("resnet20", in_channels=1, width=8), 4, 4)
    with pytest.raises(PolicyMismatchError, match="fingerprint"):
        pol.check_fits(net)


def test_policy_bits_out_of_range_rejected(net):
    d = BitPolicy.uniform(net, 4, 4).to_dict()
    d["layers"]["layer1.0.conv1"]["w_bits"] = 12
    with pytest.raises(PolicyMismatchError, match="w_bits=12"):
        BitPolicy.from_dict(d)


def test_policy_bad_json_and_missing_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyMismatchError, match="bad.json"):
        BitPolicy.load(bad)
    with pytest.raises(PolicyMismatchError, match="nope.json"):
        BitPolicy.load(tmp_path / "nope.json")
    with pytest.raises(PolicyMismatchError, match="version"):
        BitPolicy.from_dict({"version": 99, "layers": {}})


def test_the_meta_says_how_the_stem_and_classifier_are_quantized():
    net = build_model("resnet20", in_channels=1)
    plain = BitPolicy.uniform(net, 4, 4)
    assert plain.quant_scope() == {"include_stem": False, "include_classifier": False, "stem_bits": 8}
    assert plain.quantized_specs(net) == plain.layers
    stem = BitPolicy(layers=plain.layers, meta={"include_stem": True, "stem_bits": 2})
    assert set(stem.quantized_specs(net)) == {*plain.layers, "conv1"} and stem.quantized_specs(net)["conv1"].a_bits == 2
    with pytest.raises(PolicyMismatchError, match=r"meta gives stem_bits=12, but .* 1\.\.8"):
        BitPolicy(layers=plain.layers, meta={"include_stem": True, "stem_bits": 12}).quant_scope()


@pytest.mark.parametrize("value", [[], {"w_bits": [], "a_bits": [4]}])
def test_empty_candidates_say_the_yaml_to_write(value):
    with pytest.raises(ConfigError) as e:
        BitCandidates.from_any(value)
    said = str(e.value)
    assert "w_bits is empty" in said and "'candidates: [2, 3, 4, 6]'" in said and "(2, 3" not in said


def test_repeated_candidates_are_listed_as_written():
    with pytest.raises(ConfigError, match=r"a_bits: \[4, 4\]\. List each bitwidth once"):
        BitCandidates.from_any({"a_bits": [4, 4]})
