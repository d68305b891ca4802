import copy

import pytest
import torch
from torch import nn

from gmpq_core.attribution import gradcam
from gmpq_core.bn_fold import fold_batchnorm_
from gmpq_core.models import build_model


def _trained_eval(model, x):
    """``model`` with BatchNorm statistics that are not the identity (a few training-mode batches), in eval mode."""
    with torch.no_grad():
        model.train()
        for s in range(3):
            model(x * (1 + s) + s)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _n_bn(model):
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("name,ch,px,layer", [("resnet20", 1, 16, "layer3"), ("resnet18", 3, 32, "layer4"),
                                               ("mobilenet_v2", 3, 32, "features.18")])
def test_every_batchnorm_of_the_registry_models_folds_and_outputs_and_gradcam_stay(name, ch, px, layer):
    torch.manual_seed(0)
    x = torch.randn(4, ch, px, px, dtype=torch.float64)
    model = _trained_eval(build_model(name, num_classes=5, in_channels=ch).double(), x)
    folded = copy.deepcopy(model)
    n = fold_batchnorm_(folded)
    assert n == _n_bn(model) > 0 and _n_bn(folded) == 0
    assert {k for k, _ in folded.named_modules()} == {k for k, _ in model.named_modules()}   # names kept
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-10)
    (z0, a0), (z1, a1) = (gradcam(m, x, layer, mode="detached") for m in (model, folded))
    torch.testing.assert_close(a1, a0, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(z1, z0, rtol=1e-10, atol=1e-10)


def test_folded_weights_keep_their_layout_dtype_and_requires_grad():
    x = torch.randn(2, 1, 12, 12)
    model = _trained_eval(build_model("resnet20", num_classes=3, in_channels=1, width=4), x)
    model.requires_grad_(False).to(memory_format=torch.channels_last)
    fold_batchnorm_(model)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is not None and c.weight.dtype == torch.float32 for c in convs)
    assert not any(p.requires_grad for p in model.parameters())
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)


class _Branchy(nn.Module):
    """conv a feeds its BN and a second use; conv b runs twice; bn c follows a ReLU; d -> bn d folds."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.b, self.bn_b = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.bn_c = nn.BatchNorm2d(2)
        self.d, self.bn_d = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)

    def forward(self, x):
        ya = self.a(x)
        y = self.bn_a(ya) + ya
        y = self.bn_b(self.b(y)) + self.b(x)
        y = self.bn_c(torch.relu(y))
        return self.bn_d(self.d(y))


def test_only_pairs_whose_data_flow_allows_it_are_folded():
    x = torch.randn(3, 2, 5, 5)
    model = _trained_eval(_Branchy(), x)
    folded = copy.deepcopy(model)
    assert fold_batchnorm_(folded) == 1
    assert isinstance(folded.bn_d, nn.Identity) and folded.d.bias is not None
    assert all(isinstance(getattr(folded, k), nn.BatchNorm2d) for k in ("bn_a", "bn_b", "bn_c"))
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-6)


class _Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        if x.sum() > 0:          # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_model_or_batch_statistics_stay_unfolded_and_a_training_model_is_refused():
    model = _Untraceable().eval()
    assert fold_batchnorm_(model) == 0 and isinstance(model.bn, nn.BatchNorm2d)
    batch_stats = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2, track_running_stats=False)).eval()
    assert fold_batchnorm_(batch_stats) == 0 and isinstance(batch_stats[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm_(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)).train())


class _Watched(nn.Module):
    """Four conv -> BatchNorm pairs, none foldable: a BatchNorm under two names, a conv whose weight the
    forward reads, a hooked conv, and a conv kept by name (a Grad-CAM layer)."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.alias = self.bn1
        self.c2, self.bn2 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.c3, self.bn3 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.c4, self.bn4 = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.alias(self.c1(x))
        y = self.bn2(self.c2(y)) + torch.nn.functional.conv2d(y, self.c2.weight)
        return self.bn4(self.c4(self.bn3(self.c3(y))))


def test_aliases_direct_parameter_reads_hooks_and_kept_convs_stay_unfolded():
    x = torch.randn(3, 2, 4, 4)
    model = _trained_eval(_Watched(), x)
    seen = []
    model.c3.register_forward_hook(lambda m, i, o: seen.append(o))
    ref = model(x)
    assert fold_batchnorm_(model, keep=("c4",)) == 0
    assert all(isinstance(getattr(model, f"bn{i}"), nn.BatchNorm2d) for i in range(1, 5))
    torch.testing.assert_close(model(x), ref)
    torch.testing.assert_close(seen[-1], seen[0])        # the hooked conv's output is still its own
    assert fold_batchnorm_(model) == 1 and isinstance(model.bn4, nn.Identity)    # c4 once not kept


class _Container(nn.Module):
    """``features`` ends in a conv whose BatchNorm sits outside it; ``block`` holds a conv and its BatchNorm."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU(), nn.Conv2d(2, 2, 1))
        self.bn = nn.BatchNorm2d(2)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        return self.block(self.bn(self.features(x)))


def test_a_kept_container_keeps_its_output_and_pairs_inside_it_still_fold():
    x = torch.randn(3, 2, 4, 4)
    model = _trained_eval(_Container(), x)
    before = model.features(x)
    assert fold_batchnorm_(model, keep=("features", "block")) == 1        # only block's own pair
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.block[1], nn.Identity)
    torch.testing.assert_close(model.features(x), before)
