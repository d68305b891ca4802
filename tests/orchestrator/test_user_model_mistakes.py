"""Mistakes in a user's model builder (README "Your own model") are one ``gmpq: error:`` paragraph, exit 2, before any
work in every command: a ``gradcam_layer`` attribute naming no module (``gmpq search`` trained and cached the FP
teacher first, then said less than ``gmpq sweep``), and a builder that raises (a traceback, exit 1). No Ray starts."""
from __future__ import annotations

import pytest

from orchestrator.cli import main

EXTRA = '''


def badcam(*, num_classes, in_channels, small_input):
    return build(num_classes=num_classes, in_channels=in_channels, small_input=small_input)


badcam.gradcam_layer = "layer9"


def boom(*, num_classes, in_channels, small_input):
    raise RuntimeError("boom inside builder")
'''

SEARCH = ["search", "--dataset", "digits", "--proxy-size", "100", "--teacher-epochs", "1", "--epochs", "1",
          "--batch-size", "32", "--max-steps-per-epoch", "1", "--eval-size", "50"]


@pytest.fixture
def nets(tmp_path, user_cnn) -> str:
    """The user's model file; ``{nets}:FUNC`` names a builder in it."""
    path = tmp_path / "nets" / "my_cnn.py"
    path.parent.mkdir()
    path.write_text(user_cnn + EXTRA)
    return str(path)


def _fails(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and err.count("gmpq: error:") == 1
    return " ".join(err.split())


def test_search_checks_the_builders_gradcam_layer_before_training_with_the_sweeps_words(tmp_path, capsys, nets):
    cache, out = tmp_path / "cache", tmp_path / "out"
    err = _fails([*SEARCH, "--model", f"{nets}:badcam", "--cache-dir", str(cache), "--out", str(out)], capsys)
    assert "gradcam_layer 'layer9' is not a module of Sequential" in err
    assert f"It is the 'gradcam_layer' attribute of the model builder {nets}:badcam. Nothing has been trained yet." \
        in err
    assert not cache.exists() and not out.exists()          # no teacher trained (nor cached)


def test_search_checks_a_gradcam_layer_of_its_config_before_training(tmp_path, capsys, nets):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("search: {gradcam_layer: '99'}\n")
    cache = tmp_path / "cache"
    err = _fails([*SEARCH, "--model", f"{nets}:build", "--config", str(cfg), "--cache-dir", str(cache), "--out",
                  str(tmp_path / "out")], capsys)
    assert "gradcam_layer '99' is not a module" in err and "Nothing has been trained yet" in err
    assert f"search.gradcam_layer of the --config file {cfg}" in err and not cache.exists()


def _boom_named(err: str, nets: str) -> None:
    assert f"The model builder '{nets}:boom' raised RuntimeError: boom inside builder" in err
    assert "the builder's own error" in err


def test_a_raising_builder_in_bitops_is_one_paragraph(capsys, nets):
    _boom_named(_fails(["bitops", "--model", f"{nets}:boom", "--input-size", "28", "--w-bits", "4", "--a-bits", "4"],
                       capsys), nets)


def test_a_raising_builder_in_search_is_one_paragraph_before_any_training(tmp_path, capsys, nets):
    cache = tmp_path / "cache"
    _boom_named(_fails([*SEARCH, "--model", f"{nets}:boom", "--cache-dir", str(cache), "--out", str(tmp_path / "o")],
                       capsys), nets)
    assert not cache.exists()


def test_a_raising_builder_in_sweep_is_one_paragraph_before_ray(tmp_path, capsys, nets):
    import ray

    out = tmp_path / "out"
    _boom_named(_fails(["sweep", "--preset", "demo", "--model", f"{nets}:boom", "--out", str(out)], capsys), nets)
    assert not ray.is_initialized() and not out.exists()
