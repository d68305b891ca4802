import pytest
import torch
import torchvision
from torch import nn

from gmpq_core.attribution import capture_features, find_feature_layer, gradcam
from gmpq_core.errors import ConfigError
from gmpq_core.losses import generalization_loss
from gmpq_core.models import build_model
from gmpq_core.policy import BitCandidates
from gmpq_core.supernet import build_supernet, calibrate_supernet_, mixed_layers


class Tiny(nn.Module):
    """stem (FP) -> body (feature layer) -> relu -> head -> relu -> mean -> fc (FP)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 5, 1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        f = self.body(torch.relu(self.stem(x)))
        h = torch.relu(self.head(torch.relu(f)))
        return self.fc(h.mean((2, 3)))


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _all_hooks(model):
    return [h for m in model.modules() for h in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks) if h]


def test_hooks_never_stay_behind_even_after_an_exception():
    model = build_model("resnet20", in_channels=1)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_features(model, "layer3"):
            raise RuntimeError("boom")
    assert _all_hooks(model) == []
    with pytest.raises(RuntimeError):  # wrong input channels fail inside the forward
        gradcam(model, torch.randn(2, 3, 8, 8), "layer3")
    assert _all_hooks(model) == []
    gradcam(model, torch.randn(2, 1, 8, 8), "layer3", mode="detached")
    assert _all_hooks(model) == []


@pytest.mark.parametrize("name,expected", [("resnet20", "layer3"), ("resnet18", "layer4"),
                                           ("mobilenet_v2", "features.18")])
def test_feature_layer_from_registry(name, expected):
    assert find_feature_layer(build_model(name), model_name=name) == expected


@pytest.mark.parametrize("builder,expected", [
    (lambda: build_model("resnet20", in_channels=1), "layer3"),
    (lambda: torchvision.models.resnet18(num_classes=3), "layer4"),
    (lambda: torchvision.models.mobilenet_v2(num_classes=3), "features"),
    # squeeze-and-excitation blocks pool inside the trunk: the classifier's pooling is the last one
    (lambda: torchvision.models.efficientnet_b0(num_classes=3), "features"),
    (lambda: torchvision.models.mobilenet_v3_small(num_classes=3), "features")])
@pytest.mark.parametrize("size", [32, 96])
def test_feature_layer_autodetected_before_global_pooling(builder, expected, size):
    model = builder()
    in_ch = model.conv1.in_channels if hasattr(model, "conv1") else 3
    assert find_feature_layer(model, input_size=size, in_channels=in_ch) == expected
    assert _all_hooks(model) == []


class _SELinear(torch.nn.Module):
    """The classic hand-written squeeze-and-excitation: pool -> view -> Linear (non-map outputs in the trunk)."""

    def __init__(self, c):
        super().__init__()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Sequential(torch.nn.Linear(c, c // 2), torch.nn.ReLU(), torch.nn.Linear(c // 2, c),
                                      torch.nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        return x * self.fc(self.pool(x).view(b, c)).view(b, c, 1, 1)


class _SENet(torch.nn.Module):
    def __init__(self, se, functional_head):
        super().__init__()
        self.stem, self.functional_head = torch.nn.Conv2d(3, 8, 3, padding=1), functional_head
        self.layers = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), se(8))
                                            for _ in range(3)])
        self.avgpool, self.fc = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Linear(8, 3)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(x.mean((2, 3)) if self.functional_head else self.avgpool(x).flatten(1))


@pytest.mark.parametrize("se", [_SELinear, lambda c: torchvision.ops.SqueezeExcitation(c, c // 2)])
@pytest.mark.parametrize("functional_head", [False, True])
def test_squeeze_and_excitation_blocks_do_not_end_the_trunk(se, functional_head):
    assert find_feature_layer(_SENet(se, functional_head), input_size=16) == "layers"


def test_without_a_pooling_module_the_feature_layer_is_the_last_map():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    assert find_feature_layer(model, input_size=8, in_channels=1) == "1"


def test_feature_layer_override_is_checked():
    model = build_model("resnet20")
    assert find_feature_layer(model, model_name="resnet20", override="layer2") == "layer2"
    with pytest.raises(ConfigError, match="not a module"):
        find_feature_layer(model, override="layer9")


def test_gradcam_matches_a_per_image_hand_computation():
    torch.manual_seed(0)
    model = Tiny().double().eval()
    x = torch.randn(3, 1, 6, 6, generator=_gen(), dtype=torch.float64)
    logits, maps = gradcam(model, x, "body", mode="detached")
    assert not maps.requires_grad and maps.shape == (3, 6, 6)
    for i in range(3):
        xi = x[i:i + 1]
        f = model.body(torch.relu(model.stem(xi))).detach().requires_grad_(True)
        z = model.fc(torch.relu(model.head(torch.relu(f))).mean((2, 3)))
        c = int(z.argmax())
        (g,) = torch.autograd.grad(z[0, c], f)
        ref = torch.relu((g.mean((2, 3), keepdim=True) * f).sum(1))[0]
        assert torch.allclose(maps[i], ref, atol=1e-12)
    labels = torch.tensor([0, 1, 2])
    _, by_label = gradcam(model, x, "body", target="label", labels=labels, mode="detached")
    assert by_label.shape == maps.shape


def test_teacher_mode_builds_no_graph_below_the_features():
    model = build_model("resnet20", in_channels=1).eval()
    logits, maps = gradcam(model, torch.randn(2, 1, 8, 8), "layer3", mode="detached")
    assert not logits.requires_grad and not maps.requires_grad
    assert all(p.grad is None for p in model.parameters())


def _tiny_supernet():
    torch.manual_seed(0)
    net = build_supernet(Tiny().double(), BitCandidates(w_bits=(2, 3, 4), a_bits=(2, 4, 8)))
    x = torch.randn(4, 1, 6, 6, generator=_gen(1), dtype=torch.float64)
    calibrate_supernet_(net, x)
    g = _gen(2)
    for m in mixed_layers(net).values():
        with torch.no_grad():
            m.alpha_w.copy_(torch.randn(3, generator=g, dtype=torch.float64))
            m.alpha_a.copy_(torch.randn(3, generator=g, dtype=torch.float64))
            m.clips.mul_(torch.tensor([0.3, 0.6, 1.2], dtype=torch.float64))  # distinct STE masks per candidate
    teacher_maps = torch.rand(4, 6, 6, generator=g, dtype=torch.float64)
    return net.eval(), x, torch.tensor([0, 1, 2, 0]), teacher_maps


def _l_gen(net, x, y, t_maps, mode):
    _, maps = gradcam(net, x, "body", target="label", labels=y, mode=mode)
    return generalization_loss(maps, t_maps, 2.0)


def test_arch_gradient_through_the_second_order_attribution_term_matches_finite_differences():
    # head's logits change the Grad-CAM channel weights g only (F does not depend on them): a pure
    # second-order path. float64 central differences against autograd through create_graph=True.
    net, x, y, t_maps = _tiny_supernet()
    head = net.head
    for alpha in (head.alpha_w, head.alpha_a):
        (grad,) = torch.autograd.grad(_l_gen(net, x, y, t_maps, "second_order"), alpha)
        assert float(grad.abs().max()) > 1e-6
        eps = 1e-6
        fd = torch.zeros_like(alpha)
        for k in range(alpha.numel()):
            with torch.no_grad():
                alpha[k] += eps
            up = float(_l_gen(net, x, y, t_maps, "second_order").detach())
            with torch.no_grad():
                alpha[k] -= 2 * eps
            down = float(_l_gen(net, x, y, t_maps, "second_order").detach())
            with torch.no_grad():
                alpha[k] += eps
            fd[k] = (up - down) / (2 * eps)
        assert torch.allclose(grad, fd, rtol=1e-4, atol=1e-9), (grad, fd)


def test_first_order_switch_cuts_the_second_order_path():
    net, x, y, t_maps = _tiny_supernet()
    loss = _l_gen(net, x, y, t_maps, "first_order")
    grads = torch.autograd.grad(loss, [net.head.alpha_w, net.body.alpha_w], allow_unused=True)
    assert grads[0] is None or float(grads[0].abs().max()) == 0.0
    assert grads[1] is not None and float(grads[1].abs().max()) > 0
