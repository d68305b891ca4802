"""A user's own model named MODULE:FUNCTION or PATH.py:FUNCTION (gmpq_core/models/imported.py): built, searched,
cached by its source, and every mistake named in one paragraph (no Ray)."""
from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from gmpq_core.errors import ConfigError
from gmpq_core.models import build_model, canonical_model_name, check_model, model_file_tag, model_source_key

EXTRA = textwrap.dedent('''


    def with_layer(*, num_classes, in_channels, small_input):
        return build(num_classes=num_classes, in_channels=in_channels, small_input=small_input)


    with_layer.gradcam_layer = "3"


    def positional(n, c):
        return build(num_classes=n, in_channels=c, small_input=True)


    def not_a_module(**kwargs):
        return "a string"
''')


@pytest.fixture
def cnn_file(tmp_path, monkeypatch, user_cnn):
    path = tmp_path / "my_cnn.py"
    path.write_text(user_cnn + EXTRA)
    monkeypatch.chdir(tmp_path)
    return path


def test_a_file_builder_is_built_and_its_path_made_absolute(cnn_file):
    name = check_model("./my_cnn.py:build")
    assert name == f"{cnn_file}:build" and canonical_model_name(name) == name
    net = build_model("my_cnn.py:build", num_classes=7, in_channels=1)
    assert isinstance(net, nn.Sequential) and net(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    assert check_model("resnet20") == "resnet20" and canonical_model_name("resnet20") == "resnet20"
    assert model_file_tag(name) == "build" and model_file_tag("resnet20") == "resnet20"


def test_a_module_builder_is_imported_by_name(cnn_file, monkeypatch):
    monkeypatch.syspath_prepend(str(cnn_file.parent))
    monkeypatch.delitem(sys.modules, "my_cnn", raising=False)
    assert check_model("my_cnn:build") == "my_cnn:build"          # a module name stays as given
    assert build_model("my_cnn:build", num_classes=3, in_channels=3)(torch.zeros(1, 3, 8, 8)).shape == (1, 3)


@pytest.mark.parametrize("name, match", [
    ("./missing.py:build", "does not exist"),
    ("./my_cnn.py:buld", r"has no function 'buld' \(its functions: build, not_a_module, positional, with_layer\)"),
    ("no_such_pkg_gmpq.nets:build", "cannot be imported .*PYTHONPATH"),
    ("my cnn:build", "neither a registered model nor"),
    ("./my_cnn.py:", "neither a registered model nor"),
    ("./my_cnn.py:positional", "does not take num_classes, in_channels, small_input"),
    ("resnet21", "Unknown model 'resnet21'.*MODULE:FUNCTION"),
])
def test_a_bad_model_name_is_one_paragraph_naming_it_and_the_fix(cnn_file, name, match):
    with pytest.raises(ConfigError, match=match):
        check_model(name)


def test_a_builder_returning_no_module_and_a_file_that_fails_to_run_are_named(cnn_file, tmp_path):
    with pytest.raises(ConfigError, match="returned str, not a torch.nn.Module"):
        build_model("./my_cnn.py:not_a_module")
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('no GPU here')\ndef build(**kw): pass\n")
    with pytest.raises(ConfigError, match=r"Running the model file .*broken.py .* RuntimeError: no GPU here"):
        check_model("./broken.py:build")
    with pytest.raises(ConfigError, match="must be a model name"):
        check_model(None, "--model")


def test_a_builder_that_raises_is_one_paragraph_naming_it_and_its_error(cnn_file, caplog):
    # the builder's own error, not gmpq's: named with the builder, no traceback unless logging at DEBUG (gmpq -v)
    cnn_file.write_text(cnn_file.read_text() + "\n\ndef boom(**kw):\n    raise RuntimeError('boom inside builder')\n")
    caplog.set_level("DEBUG", logger="gmpq_core.models")
    with pytest.raises(ConfigError) as e:
        build_model("./my_cnn.py:boom", num_classes=10, in_channels=1)
    msg = str(e.value)
    assert f"The model builder '{cnn_file}:boom' raised RuntimeError: boom inside builder" in msg
    assert "the builder's own error" in msg and "gmpq -v" in msg
    assert "boom inside builder" in caplog.text and any(r.exc_info for r in caplog.records)


def test_the_gradcam_layer_is_the_builders_attribute_else_found(cnn_file):
    from gmpq_core.attribution import find_feature_layer

    net = build_model("./my_cnn.py:with_layer", num_classes=10, in_channels=1)
    assert find_feature_layer(net, model_name=check_model("./my_cnn.py:with_layer")) == "3"
    found = find_feature_layer(net, model_name=check_model("./my_cnn.py:build"), input_size=16, in_channels=1)
    assert found in ("6", "7", "8")                      # the last 4-D map before pooling (conv, BN or ReLU)


def test_editing_the_builders_file_changes_the_cache_key(cnn_file):
    name = check_model("./my_cnn.py:build")
    first = model_source_key(name)
    assert set(first) == {"model_source"} and model_source_key("resnet20") == {}
    cnn_file.write_text(cnn_file.read_text() + "\n# wider next time\n")
    assert model_source_key(name) != first


def test_a_search_runs_on_a_users_model(cnn_file, tmp_path):
    """The whole core path: SearchJob (model checked and made absolute), teacher cache named by the builder,
    search, derived policy over the model's own layers."""
    from gmpq_core.jobs import SearchJob, run_search_job, teacher_cache_path
    from gmpq_core.data import load_dataset

    job = SearchJob.from_dict({"model": "my_cnn.py:build", "dataset": "fashion_mnist", "proxy_size": 100,
                               "teacher_epochs": 1, "eval_size": 100, "cache_dir": str(tmp_path / "cache"),
                               "epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2,
                               "budget": {"avg_bits": 4.0}})
    assert job.model == f"{cnn_file}:build"
    result = run_search_job(job)
    assert set(result.policy.layers) == {"3", "6"}       # stem and classifier stay FP by default
    path = teacher_cache_path(job, load_dataset("fashion_mnist").info)
    assert path.is_file() and path.name.startswith("build-fashion_mnist-")
