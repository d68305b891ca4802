"""A Grad-CAM layer that no trial can use (``search: {gradcam_layer: layer9}``, or a user's builder whose
``gradcam_layer`` attribute names no module) fails the sweep's preflight (``check_sweep_config``) with one
ConfigError paragraph, exit 2, before Ray starts: it used to fail every trial inside Ray after the shared FP models
had trained. No Ray in these tests: the point is that it is never started."""
from __future__ import annotations

import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import load_sweep_config


def _own_model(tmp_path, user_cnn, layer: str | None) -> str:
    """``PATH.py:build`` of the user's CNN (conftest), its builder's ``gradcam_layer`` set to ``layer``."""
    path = tmp_path / "nets" / "my_cnn.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(user_cnn + ("" if layer is None else f"\n\nbuild.gradcam_layer = {layer!r}\n"))
    return f"{path}:build"


def _config(tmp_path, **overrides):
    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "out"), **overrides})


def _sweep_fails(argv, capsys, tmp_path) -> str:
    import ray

    code = main(["sweep", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1
    assert not ray.is_initialized() and not (tmp_path / "out").exists()     # nothing trained, nothing written
    return " ".join(err.split())


@pytest.mark.parametrize("layer, match", [
    ("layer9", r"gradcam_layer 'layer9' is not a module of ResNetCifar.* Did you mean 'layer3' \(not 'layer9'\)\? "
               r"It is search.gradcam_layer of the sweep config \(leave it out to use the model's, 'layer3'\)"),
    ("fc", r"gradcam_layer 'fc' must output a 4-D feature map"),
])
def test_a_bad_search_gradcam_layer_fails_the_preflight(tmp_path, layer, match):
    with pytest.raises(ConfigError, match=match):
        check_sweep_config(_config(tmp_path, **{"search.gradcam_layer": layer}))


def test_a_bad_search_gradcam_layer_in_the_yaml_exits_2_before_ray(tmp_path, capsys):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"preset": "demo", "search": {"gradcam_layer": "layer9"}}))
    err = _sweep_fails(["--config", str(path)], capsys, tmp_path)
    assert "gradcam_layer 'layer9' is not a module" in err and "Nothing has been trained yet" in err


@pytest.mark.parametrize("layer, match", [
    ("features.9", r"gradcam_layer 'features.9' is not a module of Sequential"),
    ("11", r"gradcam_layer '11' must output a 4-D feature map"),            # the Linear classifier
    ("99", r"gradcam_layer '99' is not a module"),
])
def test_a_user_builders_bad_gradcam_layer_attribute_fails_the_preflight(tmp_path, user_cnn, layer, match):
    model = _own_model(tmp_path, user_cnn, layer)
    with pytest.raises(ConfigError, match=match) as e:
        check_sweep_config(_config(tmp_path, model=model))
    assert f"It is the 'gradcam_layer' attribute of the model builder {model}" in str(e.value)


def test_a_user_builders_bad_gradcam_layer_exits_2_before_ray(tmp_path, capsys, user_cnn):
    err = _sweep_fails(["--preset", "demo", "--model", _own_model(tmp_path, user_cnn, "layer9")], capsys, tmp_path)
    assert "gradcam_layer 'layer9' is not a module of Sequential" in err
    assert "'gradcam_layer' attribute of the model builder" in err


@pytest.mark.parametrize("layer", [None, "8"])
def test_a_user_builders_usable_gradcam_layer_passes(tmp_path, user_cnn, layer):
    """No attribute (found by a forward pass, as the trials do) or a conv stage's name: the preflight passes."""
    facts = check_sweep_config(_config(tmp_path, model=_own_model(tmp_path, user_cnn, layer)))
    assert facts.in_channels == 1


def test_an_explicit_search_gradcam_layer_that_exists_passes(tmp_path):
    check_sweep_config(_config(tmp_path, **{"search.gradcam_layer": "layer2"}))
