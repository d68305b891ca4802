"""Findings of a walkthrough of ``gmpq study --smoke``, each pinned: the page gave "win" verdicts on chance-level
numbers (target FP model 14% top-1 on 10 classes, cells 7.5-16.5%) and on two seeds a side; it said "1 wins", called
the CPU "none lent to the session that ran it", named the FP model's test slice without saying it is not the cells',
and the help cited METHOD.md, a file outside the repository; the study's MLflow parent run was tagged a sweep's.

In process on hand-made rows (no Ray); the MLflow test opens a SQLite store in tmp_path (a few seconds)."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import load_study_config  # noqa: E402
from experiments.generalization_ray import write_rows  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.study import write_results_md  # noqa: E402

SMOKE = REPO / "experiments" / "generalization_smoke.yaml"
CAUTION = "> **Caution: near chance.**"


def _row(method: str, proxy: str, seed: int, top1: float, budget: float = 3.0) -> dict:
    searched = method not in ("uniform", "random")
    return {"cell_id": f"{method}|{proxy}|b{budget:g}|s{seed}", "method": method, "proxy": proxy, "budget": budget,
            "seed": seed, "target_top1": top1, "gbitops_quantized": 0.278, "gbitops_total": 0.394, "cell_seconds": 1.0,
            "search_seconds": 5.0 if searched else 0.0, "proxy_top1": 12.0 if searched else math.nan,
            "proxy_ard": 0.6 if searched else math.nan, "target_ard": 0.5, "status": "completed", "error": None}


def _rows(gmpq=(13.5, 16.0, 14.75), eta0=(7.5, 10.0, 8.75), uniform=(10.0, 10.0, 10.0)) -> pd.DataFrame:
    """The walkthrough's mnist5k numbers (gmpq 14.75 vs eta0 8.75 and uniform 10.00), with a third seed each."""
    rows = [_row("gmpq", "mnist5k", s, a) for s, a in enumerate(gmpq)]
    rows += [_row("eta0", "mnist5k", s, a) for s, a in enumerate(eta0)]
    rows += [_row("uniform", "none", s, a) for s, a in enumerate(uniform)]
    return pd.DataFrame(rows)


def _page(tmp_path: Path, df: pd.DataFrame, **kw) -> str:
    return write_results_md(df, tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"}, **kw)


def test_an_fp_model_near_chance_withholds_every_verdict_and_count_but_keeps_the_numbers(tmp_path):
    text = _page(tmp_path, _rows(), fp_top1=14.0, num_classes=10)
    results = text.index("## Results")
    caution = text.index(CAUTION)
    assert results < caution < text.index("| budget (avg bits) |")        # at the top of the results
    line = text[caution:].splitlines()[0]
    assert "14.00% top-1" in line and "below 55% (halfway between chance, 10%, and 100%)" in line
    assert "| 3 | mnist5k | eta0 | +6.00 |" in text and "| n/a (FP model near chance) |" in text   # the number stays
    assert "| win |" not in text and "| tie |" not in text
    assert "GMPQ vs eta0: no verdict on any of 1 (proxy, budget) pairs (the numbers are near chance" in text
    assert " wins" not in text and "1 win" not in text
    assert "| 3 | gmpq | mnist5k | 3 | 14.75 ± 1.25 |" in text


def test_without_the_fp_models_top1_cells_all_near_chance_also_withhold_verdicts(tmp_path):
    text = _page(tmp_path, _rows(), num_classes=10)
    assert CAUTION in text and "Every cell's mean target top-1 is at most 14.75%" in text
    assert "| win |" not in text
    good = _rows(gmpq=(80.0, 81.0, 82.0), eta0=(70.0, 71.0, 72.0), uniform=(60.0, 61.0, 62.0))
    text = _page(tmp_path, good, num_classes=10)
    assert CAUTION not in text and "GMPQ vs eta0: 1 win, 0 ties, 0 losses over 1" in text


def test_a_good_fp_model_keeps_the_verdicts_even_where_quantized_cells_are_low(tmp_path):
    low = _rows(gmpq=(40.0, 41.0, 42.0), eta0=(20.0, 21.0, 22.0), uniform=(45.0, 46.0, 47.0))
    text = _page(tmp_path, low, fp_top1=82.2, num_classes=10)
    assert CAUTION not in text
    assert "GMPQ vs eta0: 1 win, 0 ties, 0 losses over 1" in text
    assert "GMPQ vs uniform: 0 wins, 0 ties, 1 loss over 1" in text


def test_two_seeds_on_a_side_give_no_verdict(tmp_path):
    """The walkthrough's 'mnist5k | uniform | +4.75 | 1.25 | win': 2 seeds each, uniform's std 0."""
    df = _rows(gmpq=(80.0, 83.5), eta0=(60.0, 61.0, 62.0), uniform=(70.0, 70.0))
    text = _page(tmp_path, df, fp_top1=90.0, num_classes=10)
    assert "| 3 | mnist5k | uniform | +11.75 | 1.75 | n/a (under 3 seeds) |" in text
    assert "| 3 | mnist5k | eta0 | +20.75 | 1.84 | n/a (under 3 seeds) |" in text    # gmpq's side has 2
    assert "GMPQ vs uniform: no verdict on any of 1 (proxy, budget) pairs (under 3 seeds on a side" in text
    assert "a win or loss needs |diff| > 2 standard errors and 3 seeds on each side" in text


def test_a_smoke_page_says_at_its_top_that_its_numbers_are_a_plumbing_check(tmp_path):
    text = _page(tmp_path, _rows(gmpq=(80.0, 81.0, 82.0)), smoke=True)
    body = text.split("\n", 1)[1]
    assert body.index("plumbing check") < body.index("## Results")
    assert "plumbing check" not in _page(tmp_path, _rows(gmpq=(80.0, 81.0, 82.0)))


def _smoke_study(d: Path) -> None:
    """A smoke study folder as a lent machine leaves it: rows near chance, the FP model's top-1 in its timing."""
    d.mkdir(parents=True)
    cfg = load_study_config(SMOKE).to_dict()
    (d / "study_config.yaml").write_text(yaml.safe_dump({**cfg, "methods": ["gmpq", "eta0", "uniform"],
                                                         "proxies": cfg["proxies"][1:]}))
    write_rows(d, _rows().to_dict("records"))
    (d / "study_timing.json").write_text(json.dumps({"runs": [{
        "wall_seconds": 60.0, "prepare_seconds": 10.0, "cells_run": 9, "failed": 0,
        "shared_models": {"target": {"top1": 14.0, "steps": 8, "seconds": 1.0}}}]}))


def test_the_cli_page_of_a_smoke_study_near_chance_says_so_in_plain_words(tmp_path, capsys):
    d = tmp_path / "st"
    _smoke_study(d)
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    capsys.readouterr()
    text = (d / "results.md").read_text()
    assert "plumbing check" in text and CAUTION in text and "14.00% top-1" in text
    assert "| n/a (FP model near chance) |" in text and "| win |" not in text
    device = next(line for line in text.splitlines() if line.startswith("- **device**"))
    assert device.endswith("no GPU was used") and "lent" not in device and "session" not in device
    fp = next(line for line in text.splitlines() if line.startswith("- **target FP model**"))
    assert "stratified 100-image slice of the target test set" in fp
    assert "the cells' top-1 is on a stratified 200-image slice" in fp
    assert "METHOD.md" not in text


def test_the_help_cites_the_paper_not_a_file_outside_the_repository(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    assert "METHOD.md" not in text
    assert "Wang et al., ICCV 2021" in text and "Generalizable Mixed-Precision Quantization" in text
    assert "3 or more seeds on each side" in text


def test_the_studys_mlflow_parent_run_is_tagged_a_study(tmp_path):
    from mlflow.tracking import MlflowClient

    from experiments.generalization_ray import StudySink
    from orchestrator.mlflow_sink import PARENT_FILE

    d = tmp_path / "st"
    d.mkdir()
    uri = f"sqlite:///{d / 'mlflow.db'}"
    sink = StudySink(uri, d, experiment_name="study_x", resolved_config=load_study_config(SMOKE).to_dict())
    assert sink.connect()
    run = MlflowClient(tracking_uri=uri).get_run(sink.parent_run_id)
    assert run.data.tags["gmpq.role"] == "study"
    again = StudySink(uri, d, experiment_name="study_x", resolved_config=load_study_config(SMOKE).to_dict())
    (d / PARENT_FILE).unlink()                           # the id file lost: the role tag finds the parent again
    assert again.connect() and again.parent_run_id == sink.parent_run_id
