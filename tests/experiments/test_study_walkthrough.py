"""A new user's own study config and the page it gives: the grid axes written wrong (a scalar where a list belongs, a
proxy field misspelt, a seed or budget listed twice, a method name with an O for a 0) are one ``gmpq: error:``
paragraph (exit 2) before any work, never a traceback nor cells counted twice; the page says what each method is
and what a verdict means."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import StudyConfig  # noqa: E402
from gmpq_core.errors import ConfigError  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.study import write_results_md  # noqa: E402

SMOKE = yaml.safe_load((REPO / "experiments" / "generalization_smoke.yaml").read_text())


def _error(**changes) -> str:
    with pytest.raises(ConfigError) as e:
        StudyConfig.from_dict({**SMOKE, **changes})
    return " ".join(str(e.value).split())


@pytest.mark.parametrize("key,value", [("seeds", [0, 1, 0]), ("budgets", [3.0, 3]), ("methods", ["gmpq", "gmpq"])])
def test_a_grid_value_listed_twice_is_refused(key, value):
    # a repeated seed ran its cells twice and counted as another seed in every std, SE and verdict
    said = _error(**{key: value})
    assert f"'{key}' lists" in said and "more than once" in said and "count twice" in said


@pytest.mark.parametrize("key,value,expected", [
    ("budgets", 3.0, "'budgets' must be a list, e.g. budgets: [2.5, 3.0], but got budgets: 3.0."),
    ("seeds", 0, "'seeds' must be a list, e.g. seeds: [0, 1, 2], but got seeds: 0."),
    ("proxies", {"name": "a"}, "'proxies' must be a list"),
    ("proxies", ["fmnist500"], "proxies: entry 1 must be a mapping such as {name: fmnist500"),
    ("proxies", [{"name": "a", "dataset": "fashion_mnist", "sizee": 500}],
     "has unknown field(s) ['sizee']. Did you mean 'size' (not 'sizee')?"),
    ("budgets", [None], "budgets must be numbers (average bits, e.g. 3.0), but got None"),
    ("budgets", [40.0], "but got 40.0 in budgets: [40.0]."),
    ("seeds", ["0"], "seeds must be integers >= 0, but got '0' in seeds: ['0'] (write it without quotes)."),
    ("methods", ["gmpq", "etaO"], "but got unknown ['etaO'] in methods: ['gmpq', 'etaO']. Did you mean 'eta0'"),
    ("resources", "cpu", "resources must be {cpu: N, gpu: G}"),
])
def test_grid_axes_written_wrong_are_named_with_the_fix(key, value, expected):
    assert expected in _error(**{key: value})


def test_the_cli_refuses_a_proxy_typo_without_a_traceback(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"name": "mine", "proxies": [{"name": "a", "dataset": "fashion_mnist",
                                                                 "sizee": 500}]}))
    rc = main(["study", "--config", str(path), "--out", str(tmp_path / "out")])
    err = " ".join(capsys.readouterr().err.split())
    assert rc == 2 and err.startswith("gmpq: error: proxies: entry 1") and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _rows(seeds: int) -> pd.DataFrame:
    rows = []
    for method, proxy, top1 in (("gmpq", "p", 80.0), ("eta0", "p", 78.0), ("uniform", "none", 70.0)):
        for s in range(seeds):
            rows.append({"method": method, "proxy": proxy, "budget": 3.0, "seed": s, "status": "completed",
                         "target_top1": top1 + 0.1 * s, "gbitops_quantized": 0.28, "gbitops_total": 0.39,
                         "search_seconds": 5.0, "proxy_top1": 50.0, "proxy_ard": 0.3, "target_ard": 0.2})
    return pd.DataFrame(rows)


def test_the_page_says_what_each_method_is_and_what_a_verdict_means(tmp_path):
    text = write_results_md(_rows(3), tmp_path / "results.md", png_path=tmp_path / "p.png", header={"title": "t"})
    flat = " ".join(text.split())
    assert "- **eta0**: the same search without the attribution loss (eta = 0: EdMIPS on the proxy)" in text
    assert "- **uniform**: no search: the largest uniform WbAb whose BitOPs fit the budget" in text
    assert "**random**" not in text                                   # only the methods the study ran
    assert "diff: gmpq's mean target top-1 minus the other method's (positive: GMPQ higher)" in flat
    assert "**win** (GMPQ higher) or **loss** (lower) when |diff| is over 2 standard errors" in flat
    assert "| 3 | p | eta0 | +2.00 |" in text and "| win |" in text
    assert "GBitOPs whole model (FP layers at 32x32 bits)" in text    # bits, not the image size


def test_a_sweep_config_given_to_gmpq_study_is_named_as_one():
    with pytest.raises(ConfigError, match=r"This is a sweep config \(it has \['n_trials', 'space'\]\), not a study "
                                          r"config: run it with gmpq sweep --config FILE"):
        StudyConfig.from_dict({"name": "mine", "n_trials": 2, "space": {"budget_avg_bits": 3.0}})


def test_the_plot_title_carries_the_pages_warnings():
    from orchestrator.study_plot import plot_title

    good, weak = _rows(3), _rows(3).assign(target_top1=12.0)
    assert plot_title("s", good, fp_top1=85.0, num_classes=10, smoke=False) == \
        "s: target top-1 vs BitOPs (mean ± std over seeds)"
    assert plot_title("s", good, fp_top1=85.0, num_classes=10, smoke=True).endswith(
        "\nsmoke run: a plumbing check, not a result")
    assert "\ncaution: the target FP model is near chance" in plot_title("s", weak, fp_top1=14.0, num_classes=10,
                                                                          smoke=False)


@pytest.mark.parametrize("budget", [1.5, 7.0])
def test_a_budget_the_candidates_cannot_reach_is_refused_for_unsearched_methods_too(budget):
    # uniform / random cells at such a budget failed one by one after the FP models had trained
    said = _error(methods=["uniform", "random"], budgets=[budget])
    assert f"budgets: {budget!r} cannot be reached" in said and "outside the feasible range 2 .. 6" in said


def test_the_grid_line_says_which_cells_have_no_row_yet(tmp_path):
    # a study stopped midway wrote a page that read like a finished one
    from experiments.generalization import expand_grid
    from orchestrator.commands.study import _header

    cfg = StudyConfig.from_dict({**SMOKE, "methods": ["gmpq", "uniform", "random"], "seeds": [0]})
    cells = expand_grid(cfg)
    one = pd.DataFrame([{"cell_id": cells[0]["cell_id"], "method": cells[0]["method"]}])
    grid = _header(cfg, tmp_path, "x.yaml", {"runs": []}, one)["grid"]
    assert f"(1 rows in study.parquet; **{len(cells) - 1} of the {len(cells)} cells not run yet**" in grid
    every = pd.DataFrame([{"cell_id": c["cell_id"], "method": c["method"]} for c in cells])
    assert _header(cfg, tmp_path, "x.yaml", {"runs": []}, every)["grid"].endswith(f"({len(cells)} rows in study.parquet)")


@pytest.mark.slow
def test_a_study_stopped_midway_says_so_and_how_to_continue(tmp_path):
    # SIGTERM after the first cell: the study used to end like a finished one (exit 0, "N cells completed")
    import os
    import signal
    import subprocess
    import time

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = tmp_path / "study"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "study", "--smoke", "--out", str(out)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "study.parquet").is_file():
        time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-2000:]
    said = " ".join(stderr.split())
    assert "gmpq study: the study was terminated (SIGTERM):" in said and "cells did not run" in said
    assert f"Continue with: gmpq study --smoke --out {out}" in said
    assert "cells not run yet**" in (out / "results.md").read_text()
