"""gmpq_core.export: a quantized model written to one file and rebuilt from it alone."""
from __future__ import annotations

import pytest
import torch

from gmpq_core.errors import CheckpointError, ConfigError
from gmpq_core.export import load_quantized_model, save_quantized_model, save_quantized_state
from gmpq_core.fileio import save_checkpoint
from gmpq_core.finetune import prepare_quantized
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy, QuantSpec

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}


def _quantized(include_stem: bool):
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    names = searchable_layers(fp)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=2 + i % 3, a_bits=6 - i % 4) for i, n in enumerate(names)},
                       meta={**ARCH, "include_stem": include_stem, "stem_bits": 6} if include_stem else dict(ARCH))
    x = torch.randn(8, 1, 28, 28)
    q = prepare_quantized(fp, policy, x).eval()
    with torch.no_grad():                                   # weights that differ from the FP ones, as after QAT
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return q, policy, x


@pytest.mark.parametrize("include_stem", [False, True])
def test_a_saved_quantized_model_rebuilds_to_the_same_outputs_from_its_file_alone(tmp_path, include_stem):
    q, policy, x = _quantized(include_stem)
    path = save_quantized_model(tmp_path / "m.pt", q, policy, arch=ARCH, results={"top1": 81.5})
    loaded = load_quantized_model(path)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))
    assert not loaded.model.training and loaded.results == {"top1": 81.5} and loaded.arch == ARCH
    assert loaded.policy.layers == policy.layers and loaded.policy.meta == policy.meta
    extra = set(loaded.quantized) - set(policy.layers)      # the fixed-bit stem travels with the file
    assert (extra == {"conv1"}) == include_stem and all(loaded.quantized[n] == QuantSpec(w_bits=6, a_bits=6) for n in extra)
    # a training checkpoint's state dict: the quantized layers follow from the policy's meta
    again = load_quantized_model(save_quantized_state(tmp_path / "s.pt", q.state_dict(), policy, arch=policy.meta))
    with torch.no_grad():
        assert torch.equal(again.model(x), q(x))


def test_files_of_another_kind_and_missing_architecture_are_named(tmp_path):
    save_checkpoint(tmp_path / "sd.pt", build_model("resnet20", in_channels=1).state_dict())
    with pytest.raises(CheckpointError, match="is not a gmpq quantized model"):
        load_quantized_model(tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="is a folder; pass a model file"):
        load_quantized_model(tmp_path)
    q, policy, _ = _quantized(False)
    with pytest.raises(ConfigError, match=r"lacks \['num_classes', 'in_channels', 'small_input'\]"):
        save_quantized_model(tmp_path / "m.pt", q, policy, arch={"model": "resnet20"})
    with pytest.raises(ConfigError, match="without quantized layers"):
        save_quantized_model(tmp_path / "m.pt", build_model("resnet20", in_channels=1), policy, arch=ARCH)


def test_a_file_that_does_not_fit_names_the_keys_and_results_must_be_plain_values(tmp_path):
    import numpy as np

    q, policy, x = _quantized(False)
    path = save_quantized_model(tmp_path / "m.pt", q, policy, arch=ARCH,
                                results={"top1": np.float64(81.5), "n": torch.tensor(3)})
    assert load_quantized_model(path).results == {"top1": 81.5, "n": 3}     # unwrapped: weights_only can read them
    with pytest.raises(ConfigError, match=r"results\['bad'\] must be a number"):
        save_quantized_model(tmp_path / "b.pt", q, policy, arch=ARCH, results={"bad": [1, 2]})
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["module.fc.weight"] = blob["state_dict"].pop("fc.weight")     # a DDP-prefixed key, say
    torch.save(blob, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['fc.weight'\].*unexpected keys \['module.fc.weight'\]"):
        load_quantized_model(tmp_path / "odd.pt")
    blob["quantized"]["no.such.layer"] = [4, 4]
    torch.save(blob, tmp_path / "odd2.pt")
    with pytest.raises(CheckpointError, match="quantizes layer 'no.such.layer'"):
        load_quantized_model(tmp_path / "odd2.pt")


def test_a_quantized_classifier_travels_with_the_file(tmp_path):
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=4, a_bits=4) for n in searchable_layers(fp)},
                       meta={**ARCH, "include_classifier": True, "stem_bits": 5})
    x = torch.randn(4, 1, 28, 28)
    q = prepare_quantized(fp, policy, x).eval()
    loaded = load_quantized_model(save_quantized_state(tmp_path / "c.pt", q.state_dict(), policy, arch=ARCH))
    assert loaded.quantized["fc"].w_bits == 5 and "conv1" not in loaded.quantized
    with torch.no_grad():
        assert torch.equal(loaded.model(x), q(x))
