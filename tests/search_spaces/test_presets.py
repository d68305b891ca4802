"""Bundled presets: every one loads into a valid SweepConfig; unknown names list the choices."""
from __future__ import annotations

import pytest

from gmpq_core.errors import ConfigError
from orchestrator.sweep_config import SweepConfig, load_sweep_config
from search_spaces.presets import list_presets, load_preset, parse_yaml


def test_the_three_presets_exist():
    assert {"demo", "resnet18_imagenet", "mobilenetv2"} <= set(list_presets())


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds_a_config_that_round_trips(name):
    cfg = load_sweep_config(preset=name)
    assert cfg.name == name and "budget_avg_bits" in cfg.space
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg


def test_demo_is_cpu_sized_and_paper_preset_is_gpu_sized():
    demo = load_sweep_config(preset="demo")
    assert demo.resources.gpu == 0 and demo.max_concurrent_trials == 2 and demo.n_trials == 6
    assert demo.proxy_sizes() == (500, 1000) and demo.transfer.train_size == 5000 and demo.transfer.test_size == 2000
    big = load_sweep_config(preset="resnet18_imagenet")
    assert big.resources.gpu == 0.25 and big.model == "resnet18" and big.candidates.w_bits == (2, 3, 4, 6)
    assert big.space.possible_values("search_epochs") == (25,)
    assert big.proxy_dataset.startswith("imagefolder:")


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="Unknown preset 'dmeo'.*demo.*resnet18_imagenet"):
        load_preset("dmeo")


def test_yaml_reads_exponent_floats_and_reports_syntax_errors_with_position():
    assert parse_yaml("lam: 1e-5\nx: 3E2\n") == {"lam": 1e-5, "x": 300.0}
    with pytest.raises(ConfigError, match="line 2, column 5"):
        parse_yaml("a: 1\nb: c: d\n", "bad.yaml")


def test_the_demo_presets_timing_comment_stays_within_the_readmes_measured_figures():
    """The demo preset's header says how long ``make demo`` takes: every figure in it lies between the README's warm
    run and its run from an empty model cache (it said "about 10 minutes" beside README's 5.1 and 7.7 min)."""
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    warm = float(re.search(r"\*\*([\d.]+)(?:-[\d.]+)? min with a warm model cache\*\*", readme).group(1))
    cold = float(re.search(r"\*\*[\d.]+-([\d.]+) min from an empty one\*\*", readme).group(1))
    header = "".join(line for line in (repo / "search_spaces" / "presets" / "demo.yaml").read_text().splitlines(True)
                     if line.startswith("#"))
    figures = [float(x) for x in re.findall(r"([\d.]+)(?=(?:-[\d.]+)? min)", header)]
    figures += [float(x) for x in re.findall(r"-([\d.]+) min", header)]
    figures += [float(x) for x in re.findall(r"([\d.]+) minutes", header)]
    assert figures and all(warm <= f <= cold for f in figures), (figures, warm, cold)
    assert f"{warm:g} min" in header
