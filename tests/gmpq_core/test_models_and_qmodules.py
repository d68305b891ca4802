import subprocess
import sys

import pytest
import torch

from gmpq_core import (BitPolicy, ConfigError, QuantConv2d, apply_policy_, build_model, calibrate_, searchable_layers)
from gmpq_core.models import gradcam_layer_name


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError, match="resnet20"):
        build_model("resnet19")


def test_the_torch_free_model_names_are_the_registered_ones():
    # gmpq_core/names.py feeds the help of gmpq without importing torch; the registry is the source of truth
    from gmpq_core.models import list_models
    from gmpq_core.names import BUILTIN_MODELS

    assert tuple(list_models()) == BUILTIN_MODELS


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "resnet20"])
@pytest.mark.parametrize("size,small", [(28, True), (64, False)])
def test_every_model_any_input_size_channels_classes(name, size, small):
    torch.manual_seed(0)
    net = build_model(name, num_classes=7, in_channels=1, small_input=small)
    out = net(torch.randn(2, 1, size, size))
    assert out.shape == (2, 7)
    assert dict(net.named_modules())[gradcam_layer_name(name)] is not None


def test_searchable_layer_counts_match_method():
    assert len(searchable_layers(build_model("resnet18"))) == 19
    assert len(searchable_layers(build_model("resnet50"))) == 52


def test_apply_policy_swaps_searchable_layers_only():
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1)
    x = torch.randn(4, 1, 28, 28)
    apply_policy_(net, BitPolicy.uniform(net, 4, 4))
    assert not isinstance(net.conv1, QuantConv2d) and isinstance(net.layer1[0].conv1, QuantConv2d)
    calibrate_(net, x)
    out = net(x)
    out.sum().backward()
    assert net.layer1[0].conv1.act.clip.grad is not None and net.layer1[0].conv1.weight.grad is not None


def test_apply_policy_quantizes_stem_when_asked():
    net = build_model("resnet20", in_channels=1)
    apply_policy_(net, BitPolicy.uniform(net, 4, 4), include_stem=True, include_classifier=True, stem_bits=8)
    assert isinstance(net.conv1, QuantConv2d) and net.conv1.w_bits == 8 and net.fc.w_bits == 8


def test_8bit_quantized_model_stays_close_to_fp():
    torch.manual_seed(0)
    net = build_model("resnet20", in_channels=1).eval()
    x = torch.randn(8, 1, 28, 28)
    ref = net(x)
    import copy
    q = apply_policy_(copy.deepcopy(net), BitPolicy.uniform(net, 8, 8))
    calibrate_(q, x)
    out = q.eval()(x)
    assert torch.allclose(out, ref, atol=0.05 * ref.abs().max().item())


def test_mobilenet_signed_inputs_detected():
    torch.manual_seed(0)
    net = build_model("mobilenet_v2", in_channels=3, small_input=True)
    apply_policy_(net, BitPolicy.uniform(net, 8, 8))
    calibrate_(net, torch.randn(4, 3, 32, 32))
    signed = [n for n, m in net.named_modules() if isinstance(m, QuantConv2d) and bool(m.act.signed)]
    assert signed  # block inputs after linear bottlenecks are signed


def test_core_does_not_import_orchestration_packages():
    code = ("import sys, gmpq_core, gmpq_core.models, gmpq_core.bitops, gmpq_core.qmodules\n"
            "import pkgutil, importlib\n"
            "for m in pkgutil.walk_packages(gmpq_core.__path__, 'gmpq_core.'):\n"
            "    importlib.import_module(m.name)\n"
            "bad = [m for m in ('ray', 'optuna', 'mlflow', 'pyarrow') if m in sys.modules]\n"
            "print(','.join(bad))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


def test_torchvision_is_imported_only_to_build_a_torchvision_model():
    """Its import costs 1-2 s in every trial actor and CLI call that never builds one."""
    code = ("import sys, gmpq_core.models as m; m.build_model('resnet20', num_classes=10, in_channels=1, small_input=True); "
            "a = 'torchvision' in sys.modules; m.build_model('resnet18', num_classes=10, in_channels=1, small_input=True); "
            "print(a, 'torchvision' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=120).stdout.split()
    assert out == ["False", "True"]
