import pytest
from torch import nn

from gmpq_core import BitPolicy, build_model, count_bitops, layer_macs


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)               # 8x8 out: 3*9*8*64
        self.dw = nn.Conv2d(8, 8, 3, 2, 1, groups=8)        # 4x4 out: 1*9*8*16
        self.pw = nn.Conv2d(8, 16, 1)                       # 4x4 out: 8*16*16
        self.fc = nn.Linear(16, 5)                          # 16*5

    def forward(self, x):
        x = self.pw(self.dw(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_macs_match_hand_count_including_depthwise():
    macs = layer_macs(Tiny(), 8, 3)
    assert macs == {"stem": 3 * 9 * 8 * 64, "dw": 9 * 8 * 16, "pw": 8 * 16 * 16, "fc": 16 * 5}


def test_bitops_conventions_on_tiny_net():
    net = Tiny()
    pol = BitPolicy.uniform(net, 2, 3)
    r = count_bitops(net, pol, 8, 3)
    assert set(pol.layers) == {"dw", "pw"}
    q = (9 * 8 * 16 + 8 * 16 * 16) * 2 * 3
    assert r.bitops_quantized == q
    assert r.bitops_total == q + (3 * 9 * 8 * 64 + 16 * 5) * 32 * 32


@pytest.mark.parametrize("name,gmacs", [("resnet18", 1.814), ("resnet50", 4.089), ("mobilenet_v2", 0.3008)])
def test_published_mac_counts_at_224(name, gmacs):
    r = count_bitops(build_model(name, num_classes=1000), None, 224, 3)
    assert r.macs / 1e9 == pytest.approx(gmacs, rel=2e-3)


def test_fp_resnet18_whole_model_bitops_reference():
    # METHOD.md 4.1: FP ResNet-18 at 224 is 1853 GBitOPs (32x32) whole-model.
    r = count_bitops(build_model("resnet18", num_classes=1000), None, 224, 3)
    assert r.bitops_total / 1e9 == pytest.approx(1853, rel=5e-3)  # 1.81 G x 1024, rounded and r.bitops_quantized == 0


def test_small_input_resnet18_any_size():
    net = build_model("resnet18", in_channels=1, small_input=True)
    assert count_bitops(net, None, 28, 1).macs > count_bitops(build_model("resnet18", in_channels=1), None, 28, 1).macs


def test_bitops_unchanged_after_policy_applied():
    from gmpq_core import apply_policy_
    net = build_model("resnet20", in_channels=1)
    pol = BitPolicy.uniform(net, 4, 4)
    before = count_bitops(net, pol, 28, 1)
    apply_policy_(net, pol)
    assert count_bitops(net, pol, 28, 1) == before


def _with_meta(pol: BitPolicy, **meta) -> BitPolicy:
    return BitPolicy(layers=pol.layers, fingerprint=pol.fingerprint, meta={**pol.meta, **meta})


@pytest.mark.parametrize("meta, stem_bits, fc_bits", [
    ({"include_stem": True, "stem_bits": 1}, 1, None),
    ({"include_stem": True, "include_classifier": True}, 8, 8),      # stem_bits left out: 8, as the search's default
    ({"include_classifier": True, "stem_bits": 4}, None, 4),
])
def test_a_policy_whose_meta_quantizes_the_stem_counts_it_at_stem_bits(meta, stem_bits, fc_bits):
    # the meta of a 'gmpq search --include-stem' policy carries the switch: every count of it quantizes the same way
    r = count_bitops(Tiny(), _with_meta(BitPolicy.uniform(Tiny(), 2, 3), **meta), 8, 3)
    hand = {"stem": 3 * 9 * 8 * 64, "dw": 9 * 8 * 16, "pw": 8 * 16 * 16, "fc": 16 * 5}
    bits = {"stem": stem_bits, "dw": 2 * 3, "pw": 2 * 3, "fc": fc_bits}
    bits = {n: (b * b if n in ("stem", "fc") else b) if b is not None else None for n, b in bits.items()}
    assert r.bitops_quantized == sum(hand[n] * b for n, b in bits.items() if b is not None)
    assert r.bitops_total == r.bitops_quantized + sum(hand[n] * 32 * 32 for n, b in bits.items() if b is None)
    stem = next(c for c in r.layers if c.name == "stem")
    assert stem.quantized is (stem_bits is not None) and stem.w_bits == stem.a_bits == (stem_bits or 32)


def test_a_policy_naming_its_stem_keeps_those_bits_over_the_meta():
    net = Tiny()
    pol = BitPolicy(layers={"stem": {"w_bits": 5, "a_bits": 6}, "dw": (2, 2), "pw": (2, 2)},
                    meta={"include_stem": True, "stem_bits": 1})
    assert pol.quantized_specs(net)["stem"].w_bits == 5
    assert next(c for c in count_bitops(net, pol, 8, 3).layers if c.name == "stem").a_bits == 6
