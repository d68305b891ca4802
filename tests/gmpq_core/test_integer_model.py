"""gmpq_core.integer_model: packed integer weights that rebuild the fine-tuned model."""
from __future__ import annotations

import pytest
import torch

from gmpq_core.errors import CheckpointError, ConfigError
from gmpq_core.export import load_quantized_model, save_quantized_model
from gmpq_core.finetune import prepare_quantized
from gmpq_core.integer_model import (dequantize, integer_sizes, load_integer_model, pack_codes,
                                     save_integer_model, unpack_codes, weight_codes)
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy, QuantSpec
from gmpq_core.quantizers import quantize_weight

ARCH = {"model": "resnet20", "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_round_trip_through_the_packed_stream_bit_for_bit(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (1001,), generator=g)           # 1001: the last byte is partly filled
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(packed, bits, 1001), codes)


def test_the_stream_layout_is_little_endian_by_value():
    # values 1, 2, 3 at 2 bits: bits 01 | 10 | 11 from the least significant bit of byte 0 -> 0b00111001
    assert pack_codes(torch.tensor([1, 2, 3]), 2).tolist() == [0b00111001]
    with pytest.raises(ConfigError, match="0..3"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(CheckpointError, match="truncated"):
        unpack_codes(torch.zeros(1, dtype=torch.uint8), 3, 5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6, 8])
def test_codes_times_step_is_the_fake_quantized_weight(bits):
    w = torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0))
    w[0, 0, 0, 0] = 0.0                                   # a binary layer keeps an exact zero at 0
    q, step = weight_codes(w, bits)
    n = 1 if bits == 1 else 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= n and q.dtype == torch.int64
    torch.testing.assert_close(q.float() * step, quantize_weight(w, bits), rtol=0, atol=1e-6)


def _requantized(w, bits):
    """The codes and step a layer's quantizer takes from weight ``w`` (METHOD.md 3)."""
    if bits == 1:
        return torch.sign(w).long(), float(w.abs().mean())
    step = torch.clamp(w.abs().amax(), min=1e-8) / (2 ** (bits - 1) - 1)
    return torch.round(w / step).long(), float(step)


@pytest.mark.parametrize("bits", range(2, 9))
def test_unpacked_weights_give_the_layer_its_codes_and_step_back_exactly(bits):
    # the layer quantizes its loaded weight again: t = max|q * step| must give the same step and codes
    for seed in range(40):
        w = torch.randn(37, 23, generator=torch.Generator().manual_seed(seed)) * (0.01 + seed / 7)
        q, step = weight_codes(w, bits)
        entry = {"step": step}
        q2, step2 = _requantized(dequantize(q, bits, entry), bits)
        assert torch.equal(q2, q) and step2 == step, seed


def _final_model(tmp_path, include_stem=False, bits=(1, 2, 3, 4, 6)):
    torch.manual_seed(0)
    fp = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    names = searchable_layers(fp)
    meta = {**ARCH, "include_stem": include_stem, "stem_bits": 8} if include_stem else dict(ARCH)
    policy = BitPolicy(layers={n: QuantSpec(w_bits=bits[i % len(bits)], a_bits=4) for i, n in enumerate(names)},
                       meta=meta)
    x = torch.randn(8, 1, 28, 28)
    q = prepare_quantized(fp, policy, x).eval()
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_quantized_model(tmp_path / "m.pt", q, policy, arch=ARCH, results={"top1": 80.0},
                                preprocess={"dataset": "fashion_mnist", "image_size": 28, "mean": [0.29],
                                            "std": [0.35]}), x


@pytest.mark.parametrize("include_stem", [False, True])
def test_the_integer_file_rebuilds_the_model_smaller_with_the_same_predictions(tmp_path, include_stem):
    path, x = _final_model(tmp_path, include_stem)
    model = load_quantized_model(path)
    out = save_integer_model(tmp_path / "m.int.pt", model)
    again = load_integer_model(out)
    with torch.no_grad():
        ref, got = model.model(x), again.model(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)   # 2..8 bits: bit for bit; this policy has 1-bit layers
    assert torch.equal(got.argmax(1), ref.argmax(1))
    assert again.policy.layers == model.policy.layers and again.quantized == model.quantized
    assert again.results == {"top1": 80.0} and again.preprocess == model.preprocess and not again.model.training
    # every quantized layer's weight is stored as codes, not as float32
    blob = torch.load(out, weights_only=True)
    assert set(blob["packed"]) == set(model.quantized)
    assert not any(k.endswith(".weight") and k.rsplit(".", 1)[0] in model.quantized for k in blob["float_state"])
    sizes = integer_sizes(model)
    # ~3 bits average over the searchable layers; the FP classifier (and stem) stay float32
    assert sizes["ratio"] > 4 and out.stat().st_size < 0.4 * path.stat().st_size


def test_a_float_model_file_is_not_taken_for_an_integer_one(tmp_path):
    path, _ = _final_model(tmp_path)
    with pytest.raises(CheckpointError, match="gmpq export"):
        load_integer_model(path)


def test_without_binary_layers_the_integer_file_gives_the_same_outputs_bit_for_bit(tmp_path):
    path, x = _final_model(tmp_path, bits=(2, 3, 4, 5, 6, 7, 8))
    model = load_quantized_model(path)
    again = load_integer_model(save_integer_model(tmp_path / "m.int.pt", model))
    with torch.no_grad():
        assert torch.equal(again.model(x), model.model(x))


def test_binary_layers_with_zero_weights_come_back_to_the_same_outputs(tmp_path):
    # a 1-bit layer quantizes with mean|W|: zeros (pruned filters) make q * step's mean smaller than step
    path, x = _final_model(tmp_path, bits=(1,))
    model = load_quantized_model(path)
    with torch.no_grad():
        for name, spec in model.quantized.items():
            if spec.w_bits == 1:
                w = model.model.get_submodule(name).weight
                w[: max(1, w.shape[0] // 4)] = 0.0
        again = load_integer_model(save_integer_model(tmp_path / "z.int.pt", model))
        torch.testing.assert_close(again.model(x), model.model(x), rtol=0, atol=1e-5)


def test_damaged_or_newer_integer_files_are_named(tmp_path):
    from gmpq_core.fileio import save_checkpoint

    save_checkpoint(tmp_path / "new.pt", {"format": "gmpq-integer-model/2"})
    with pytest.raises(CheckpointError, match="of another version"):
        load_integer_model(tmp_path / "new.pt")
    save_checkpoint(tmp_path / "cut.pt", {"format": "gmpq-integer-model/1", "arch": {}})
    with pytest.raises(CheckpointError, match=r"lacks \['policy_json'"):
        load_integer_model(tmp_path / "cut.pt")
