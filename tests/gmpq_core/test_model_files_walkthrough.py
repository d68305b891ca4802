"""The single-run walkthrough's findings about model files and users' builders (gmpq_core side):

- a builder that ignores ``num_classes`` is one ConfigError when it is built (it used to crash the first training
  step with ``IndexError: Target 7 is out of bounds``);
- a JSON with a ``layers`` list (finetune_result.json) is refused as a policy with the clean message, naming the
  policy.json beside it (it raised ``ValueError: dictionary update sequence element ...``);
- ``QuantizedModel.normalize`` refuses integer images and images of another size, and takes one [C, H, W] image
  (returned as one image);
- a model file of a user's builder records the builder file's digest: an edited builder warns on load, a
  shape-changed one says the builder changed (not "load it with the gmpq version that wrote it");
- ``./my_cnn:build`` with my_cnn.py there names ``my_cnn.py``; ``device="cuda"`` without a GPU is a ConfigError.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from gmpq_core.errors import CheckpointError, ConfigError, PolicyMismatchError
from gmpq_core.export import load_quantized_model, save_quantized_model
from gmpq_core.finetune import prepare_quantized
from gmpq_core.integer_model import load_integer_model, save_integer_model
from gmpq_core.layers import searchable_layers
from gmpq_core.models import build_model, check_model_output
from gmpq_core.policy import BitPolicy, QuantSpec

WRONG_CLASSES = USER = '''from torch import nn


def build(*, num_classes, in_channels, small_input):
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, {classes}))
'''
PREPROCESS = {"dataset": "fashion_mnist", "image_size": 28, "mean": [0.286], "std": [0.353]}


def _edit(path, text: str | None) -> None:
    """Rewrite a builder file (None: leave it), and forget its imported module, as the next process (a new gmpq
    command) would."""
    import sys

    from gmpq_core.models import imported

    if text is not None:
        path.write_text(text)
    imported._LOADED.clear()
    for key in [k for k in sys.modules if k.startswith("gmpq_user_model_")]:
        del sys.modules[key]


def _builder(tmp_path, classes: str = "num_classes", name: str = "net.py", source: str = USER) -> str:
    path = tmp_path / name
    path.write_text(source.format(classes=classes))
    return f"{path}:build"


# -- 2: a builder that ignores num_classes ----------------------------------------------------------------------
def test_a_builder_that_ignores_num_classes_is_one_config_error_naming_the_counts_and_the_fix(tmp_path):
    spec = _builder(tmp_path, classes="7")
    with pytest.raises(ConfigError) as e:
        build_model(spec, num_classes=10, in_channels=1, small_input=True)
    msg = str(e.value)
    assert "7 outputs (logits) per image" in msg and "num_classes=10" in msg
    assert "Use the builder's num_classes argument" in msg and spec in msg
    with pytest.raises(ConfigError, match=r"\[1, 1, 28, 28\] input"):       # the exact size, when the caller knows it
        build_model(spec, num_classes=10, in_channels=1, small_input=True, input_size=28)
    assert build_model(spec, num_classes=7, in_channels=1) is not None        # 7 classes asked: fine


def test_a_fixed_size_builder_is_checked_at_a_size_it_runs_at_and_a_good_one_passes(tmp_path):
    fixed = '''from torch import nn


def build(*, num_classes, in_channels, small_input):     # runs at 28 px only
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 28 * 28, {classes}))
'''
    with pytest.raises(ConfigError, match=r"3 outputs .*\[1, 1, 28, 28\] input"):
        build_model(_builder(tmp_path, "3", "fixed.py", fixed), num_classes=10, in_channels=1)
    net = build_model(_builder(tmp_path, "num_classes", "fixed_ok.py", fixed), num_classes=10, in_channels=1)
    assert net.training                                         # the probe leaves the mode as it was
    check_model_output(net, "x", num_classes=10, in_channels=1, input_size=13)     # cannot run at 13: not judged


def test_the_output_check_leaves_the_random_state_and_the_init_as_they_were(tmp_path):
    spec = _builder(tmp_path)
    torch.manual_seed(3)
    net = build_model(spec, num_classes=10, in_channels=1)
    after = torch.rand(3)
    import importlib.util
    mod_spec = importlib.util.spec_from_file_location("plain_net", tmp_path / "net.py")
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    torch.manual_seed(3)
    ref = mod.build(num_classes=10, in_channels=1, small_input=False)
    assert torch.equal(torch.rand(3), after)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))


# -- 3: a result JSON given as a policy -------------------------------------------------------------------------
def test_a_json_with_a_layers_list_is_refused_as_a_policy_naming_the_policy_beside_it(tmp_path):
    result = {"top1": 45.3, "policy": "runs/search/policy.json", "layers": [
        {"name": "conv1", "macs": 1, "w_bits": 32, "a_bits": 32, "quantized": False, "bitops": 1024}]}
    with pytest.raises(PolicyMismatchError, match=r"must be a JSON object with 'version' and 'layers'.*'layers' is a "
                                                  r"list of 1 entries.*result file of gmpq, not a policy"):
        BitPolicy.from_dict(result)
    folder = tmp_path / "ft"
    folder.mkdir()
    (folder / "finetune_result.json").write_text(json.dumps(result))
    with pytest.raises(PolicyMismatchError, match="pass the policy.json of the same folder"):
        BitPolicy.load(folder / "finetune_result.json")          # no policy.json there: the general hint
    model = build_model("resnet20", in_channels=1)
    BitPolicy.uniform(model, 4, 4).save(folder / "policy.json")
    with pytest.raises(PolicyMismatchError) as e:
        BitPolicy.load(folder / "finetune_result.json")
    assert str(e.value).startswith(f"Policy file '{folder / 'finetune_result.json'}'")
    assert f"pass {folder / 'policy.json'}, beside it" in str(e.value)
    with pytest.raises(PolicyMismatchError, match="'layers' must map each layer name"):
        BitPolicy(layers=[("conv1", 4)])
    with pytest.raises(PolicyMismatchError, match="'meta' is a list"):
        BitPolicy.from_dict({"version": 1, "layers": {}, "meta": []})


# -- 9 / 7 / 21: model files -----------------------------------------------------------------------------------
def _saved(tmp_path, spec: str, name: str = "m.pt"):
    torch.manual_seed(0)
    fp = build_model(spec, num_classes=10, in_channels=1, small_input=True)
    arch = {"model": spec, "num_classes": 10, "in_channels": 1, "small_input": True, "input_size": 28}
    policy = BitPolicy(layers={n: QuantSpec(w_bits=4, a_bits=4) for n in searchable_layers(fp)}, meta=arch)
    q = prepare_quantized(fp, policy, torch.rand(4, 1, 28, 28)).eval()
    return save_quantized_model(tmp_path / name, q, policy, arch=arch, results={"top1": 50.0},
                                preprocess=PREPROCESS)


def test_normalize_refuses_integer_images_and_other_sizes_and_takes_one_image(tmp_path):
    q = load_quantized_model(_saved(tmp_path, _builder(tmp_path)))
    images = torch.rand(2, 1, 28, 28)
    with pytest.raises(ConfigError, match=r"float images in \[0, 1\], but got torch.uint8.*images.float\(\) / 255"):
        q.normalize((images * 255).to(torch.uint8))
    with pytest.raises(ConfigError, match="trained on 28x28 images, but these are 32x32; resize them"):
        q.normalize(torch.rand(2, 1, 32, 32))
    with pytest.raises(ConfigError, match=r"shape \[N, 1, H, W\] or \[1, H, W\]"):
        q.normalize(torch.rand(2, 3, 28, 28))
    one = q.normalize(images[0])                            # [C, H, W]: one image, as given (a review: per-image
    assert one.shape == (1, 28, 28) and torch.equal(one, q.normalize(images)[0])   # code stacks them afterwards)
    with torch.no_grad():
        assert q.model(torch.stack([one, q.normalize(images[1])])).shape == (2, 10)


def test_an_edited_builder_warns_on_load_and_a_reshaped_one_names_the_builder_not_gmpq(tmp_path, caplog):
    spec = _builder(tmp_path)
    path = _saved(tmp_path, spec)
    blob = torch.load(path, weights_only=True)
    assert len(blob["model_source"]) == 16
    with caplog.at_level(logging.WARNING):
        q = load_quantized_model(path)
    assert q.model_source == blob["model_source"] and not caplog.records
    int_path = save_integer_model(tmp_path / "m.int.pt", q)               # the integer file keeps the digest
    assert torch.load(int_path, weights_only=True)["model_source"] == blob["model_source"]

    _edit(tmp_path / "net.py", USER.format(classes="num_classes").replace("nn.ReLU()", "nn.ReLU6()"))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_quantized_model(path)
        load_integer_model(int_path)
    warned = [r.getMessage() for r in caplog.records if "another version of its builder's file" in r.getMessage()]
    assert len(warned) == 2 and "Restore the builder file" in warned[0] and str(tmp_path / "net.py") in warned[0]

    _edit(tmp_path / "net.py", USER.format(classes="num_classes").replace(", 3, padding=1", ", 5, padding=2"))
    with pytest.raises(CheckpointError) as e:
        load_quantized_model(path)
    msg = " ".join(str(e.value).split())
    assert f"the builder {tmp_path / 'net.py'} changed since the model was saved" in msg
    assert "gmpq version that wrote it" not in msg


def test_a_model_file_without_a_digest_still_loads_without_a_warning(tmp_path, caplog):
    spec = _builder(tmp_path)
    path = _saved(tmp_path, spec)
    blob = torch.load(path, weights_only=True)
    del blob["model_source"]                                    # as written before the digest was kept
    torch.save(blob, path)
    _edit(tmp_path / "net.py", USER.format(classes="num_classes") + "\n# a comment\n")
    with caplog.at_level(logging.WARNING):
        q = load_quantized_model(path)
    assert q.model_source is None and not caplog.records


def test_a_registered_models_file_records_no_digest(tmp_path):
    path = _saved(tmp_path, "resnet20")
    assert "model_source" not in torch.load(path, weights_only=True)


def test_a_moved_builder_names_the_model_file_and_that_the_builder_must_be_there(tmp_path):
    path = _saved(tmp_path, _builder(tmp_path))
    (tmp_path / "net.py").rename(tmp_path / "moved.py")
    _edit(tmp_path / "net.py", None)
    with pytest.raises(ConfigError, match=r"Loading '.*m.pt', a model of your own builder .*must still be there.* "
                                          r"which does not exist"):
        load_quantized_model(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_loading_on_cuda_without_a_gpu_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="asks for CUDA, but this machine has no usable GPU; .*device='cpu'"):
        load_quantized_model(tmp_path / "whatever.pt", device="cuda")


def test_a_file_builder_named_without_py_hints_at_the_py_file(tmp_path, monkeypatch):
    _builder(tmp_path, name="my_cnn.py")
    with pytest.raises(ConfigError, match=r"did you mean '.*my_cnn.py:build'"):
        build_model(f"{tmp_path}/my_cnn:build")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"There is a file my_cnn.py here: .*'./my_cnn.py:build'"):
        build_model("my_cnn:build")
