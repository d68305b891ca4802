"""The generalization study: analysis functions on hand-made rows, the grid and policies, and (slow,
real Ray + SQLite MLflow + real Fashion-MNIST/MNIST-5k) the smoke study end to end through the CLI."""
from __future__ import annotations

import math
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import (StudyConfig, expand_grid, load_study_config, smoke_version,  # noqa: E402
                                        uniform_bits)
from gmpq_core.errors import BudgetInfeasibleError, ConfigError  # noqa: E402
from gmpq_core.policy import BitCandidates  # noqa: E402
from orchestrator.study import aggregate, comparisons, kendall_tau, rank_agreement, write_results_md  # noqa: E402


def _rows() -> pd.DataFrame:
    rows = []
    top1 = {("gmpq", "p500"): (80.0, 82.0), ("eta0", "p500"): (78.0, 78.5), ("uniform", "none"): (70.0, 71.0)}
    for (method, proxy), accs in top1.items():
        for seed, acc in enumerate(accs):
            rows.append({"cell_id": f"{method}|{proxy}|b3|s{seed}", "method": method, "proxy": proxy, "budget": 3.0,
                         "seed": seed, "target_top1": acc, "gbitops_quantized": 0.1 + seed * 0.01,
                         "gbitops_total": 1.0, "search_seconds": 10.0 if proxy != "none" else 0.0,
                         "proxy_top1": acc - 5 if proxy != "none" else math.nan, "proxy_ard": 0.3,
                         "target_ard": 0.2, "status": "completed"})
    rows.append({**rows[0], "cell_id": "gmpq|p500|b3|s9", "seed": 9, "target_top1": math.nan, "status": "failed"})
    return pd.DataFrame(rows)


def test_aggregate_gives_mean_and_sample_std_over_completed_seeds():
    agg = aggregate(_rows()).set_index("method")
    assert agg.loc["gmpq", "n"] == 2                                 # the failed seed is left out
    assert agg.loc["gmpq", "top1_mean"] == pytest.approx(81.0)
    assert agg.loc["gmpq", "top1_std"] == pytest.approx(np.std([80.0, 82.0], ddof=1))
    assert agg.loc["gmpq", "gbitops_quantized"] == pytest.approx(0.105)
    assert list(agg.index) == ["gmpq", "eta0", "uniform"]            # METHOD_ORDER


@pytest.mark.parametrize("x,y", [([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]), ([1, 1, 2, 3, 3, 4], [2, 1, 2, 4, 3, 3]),
                                 (list(range(9)), [3, 1, 4, 1, 5, 9, 2, 6, 5])])
def test_kendall_tau_equals_scipy_tau_b(x, y):
    assert kendall_tau(x, y) == pytest.approx(scipy.stats.kendalltau(x, y).statistic)


def test_kendall_tau_is_nan_without_a_ranking():
    assert math.isnan(kendall_tau([1.0], [2.0]))
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))


def test_rank_agreement_is_per_proxy_within_each_budget():
    df = _rows()
    taus = rank_agreement(df)
    row = taus[(taus["proxy"] == "p500")].iloc[0]
    assert row["n_policies"] == 4 and row["budget"] == 3.0        # gmpq + eta0, 2 seeds; uniform has no proxy side
    d = df[df["proxy"] == "p500"].dropna(subset=["target_top1"])
    assert row["tau"] == pytest.approx(scipy.stats.kendalltau(d["proxy_top1"], d["target_top1"]).statistic)
    assert row["null_std"] == pytest.approx(math.sqrt(2 * 13 / (9 * 4 * 3)))
    assert set(taus["proxy"]) == {"p500"}                          # proxies are never pooled
    assert rank_agreement(df, min_policies=5).empty                 # too few policies: no tau


def test_comparisons_call_a_difference_a_win_only_beyond_two_standard_errors():
    comp = comparisons(aggregate(_rows()), others=("eta0", "uniform"), min_seeds=2).set_index("versus")
    assert comp.loc["eta0", "diff"] == pytest.approx(81.0 - 78.25)
    se = math.sqrt(np.var([80.0, 82.0], ddof=1) / 2 + np.var([78.0, 78.5], ddof=1) / 2)
    assert comp.loc["eta0", "se"] == pytest.approx(se)
    assert comp.loc["eta0", "verdict"] == "win"                   # 2.75 > 2 SE ~ 2.06
    assert comp.loc["uniform", "proxy"] == "p500"                 # proxy-free methods compared at each proxy
    close = _rows().assign(target_top1=lambda d: np.where(d["method"] == "eta0", d["target_top1"] + 1.0,
                                                          d["target_top1"]))
    assert comparisons(aggregate(close), others=("eta0",), min_seeds=2)["verdict"].tolist() == ["tie"]


def test_uniform_bits_is_the_largest_uniform_policy_within_the_budget():
    c = BitCandidates()
    assert uniform_bits(c, 2.5) == (2, 2)
    assert uniform_bits(c, 3.0) == (3, 3)
    assert uniform_bits(c, 3.9) == (3, 3)
    assert uniform_bits(c, 4.0) == (4, 4)
    assert uniform_bits(BitCandidates(w_bits=(2, 4), a_bits=(4, 8)), 5.0) == (4, 4)
    with pytest.raises(BudgetInfeasibleError, match="1.5 average bits"):
        uniform_bits(c, 1.5)


def test_grid_has_per_proxy_methods_at_every_proxy_and_the_others_once():
    cfg = load_study_config(REPO / "experiments" / "generalization_cpu.yaml")
    cells = expand_grid(cfg)
    ids = [c["cell_id"] for c in cells]
    assert len(ids) == len(set(ids))
    n_b, n_s, n_p = len(cfg.budgets), len(cfg.seeds), len(cfg.proxies)
    assert len(cells) == n_b * n_s * (3 * n_p + 3)
    assert {c["proxy"] for c in cells if c["method"] == "target_search"} == {"target"}
    smoke = smoke_version(cfg)
    assert len(smoke.budgets) == 1 and smoke.finetune["max_steps_per_epoch"] == 2


def test_study_config_rejects_unknown_methods_and_grid_owned_keys():
    with pytest.raises(ConfigError, match="methods must be"):
        StudyConfig(proxies=[{"name": "a", "dataset": "fashion_mnist", "size": 500}], methods=("gmpq", "edmips"))
    with pytest.raises(ConfigError, match="search.budget"):
        StudyConfig(proxies=[{"name": "a", "dataset": "fashion_mnist"}], search={"budget": {"avg_bits": 3}})
    with pytest.raises(ConfigError, match="Unknown study config keys"):
        StudyConfig.from_dict({"budget": [3]})


def test_study_config_file_errors_name_the_file_and_place_and_exponents_are_floats(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nproxies: [\n  - {name: a\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml' is not valid YAML at line \d+, column \d+"):
        load_study_config(bad)
    with pytest.raises(ConfigError, match="Cannot read the config file.*missing\\.yaml"):
        load_study_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("name: s\nproxies: [{name: a, dataset: fashion_mnist, size: 500}]\nsearch: {lam: 1e-5}\n")
    assert load_study_config(good).search["lam"] == 1e-5


def test_random_policy_is_seeded_and_never_exceeds_the_budget():
    from experiments.generalization_cells import random_policy
    from gmpq_core.bitops import count_bitops, layer_macs
    from gmpq_core.layers import searchable_layers
    from gmpq_core.models import build_model

    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    all_macs = layer_macs(model, 28, 1)
    macs = {n: all_macs[n] for n in searchable_layers(model)}
    budget = int(sum(macs.values()) * 2.5 ** 2)
    a, b, c = (random_policy(model, macs, BitCandidates(), budget, s, fill=True) for s in (0, 0, 1))
    assert a.layers == b.layers and a.layers != c.layers
    for p in (a, c):
        assert count_bitops(model, p, 28, 1, macs=all_macs).bitops_quantized <= budget


def test_write_rows_merges_by_cell_id(tmp_path):
    from experiments.generalization_ray import read_study, write_rows

    rows = _rows().to_dict("records")
    write_rows(tmp_path, rows[:3])
    df = write_rows(tmp_path, [{**rows[0], "target_top1": 99.0}, rows[3]])
    assert len(df) == 4 and len(read_study(tmp_path)) == 4
    assert read_study(tmp_path).set_index("cell_id").loc[rows[0]["cell_id"], "target_top1"] == 99.0


def test_results_page_has_the_table_taus_and_reading(tmp_path):
    text = write_results_md(_rows(), tmp_path / "r.md", png_path=tmp_path / "p.png",
                            header={"title": "T", "device": "CPU"}, notes="Hand notes.")
    assert "| 3 | gmpq | p500 | 2 | 81.00 ± 1.41 |" in text
    assert "Kendall tau" in text and "Hand notes." in text
    assert "GMPQ vs eta0: no verdict on any of 1 (proxy, budget) pairs (under 3 seeds on a side" in text


@pytest.mark.slow
@pytest.mark.ray
def test_smoke_study_runs_end_to_end_on_ray_and_resumes(tmp_path):
    out, report = tmp_path / "study", tmp_path / "docs" / "results.md"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "orchestrator.cli", "study", "--smoke", "--out", str(out), "--report", str(report)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    df = pd.read_parquet(out / "study.parquet")
    cfg = load_study_config(REPO / "experiments" / "generalization_smoke.yaml")
    assert sorted(df["cell_id"]) == sorted(c["cell_id"] for c in expand_grid(cfg))
    assert (df["status"] == "completed").all()
    assert df["target_top1"].between(0, 100).all()
    assert (df["bitops_quantized"] <= df["budget_bitops"]).all()
    assert (df["bitops_total"] > df["bitops_quantized"]).all()
    searched = df[df["method"].isin(["gmpq", "gmpq_fixed_p3", "eta0", "target_search"])]
    assert searched["proxy_top1"].notna().all() and (searched["search_seconds"] > 0).all()
    text = report.read_text()
    for method in ("gmpq", "gmpq_fixed_p3", "eta0", "target_search", "uniform", "random"):
        assert f"| {method} |" in text
    png = report.parent / "study_generalization_smoke.png"
    assert png.stat().st_size > 5000 and f"]({png.name})" in text
    side = report.parent / "study_generalization_smoke_by_budget.png"
    assert side.stat().st_size > 5000 and f"]({side.name})" in text
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("generalization_smoke")
    children = client.search_runs([exp.experiment_id], "tags.`gmpq.role` = 'study-cell'")
    assert len(children) == len(df)
    assert f"[1/{len(df)}] " in first.stdout and f"[{len(df)}/{len(df)}] " in first.stdout   # a line per cell
    assert "INFO mlflow" not in first.stdout + first.stderr and "Creating initial MLflow" not in first.stderr
    timing = json.loads((out / "study_timing.json").read_text())      # where the cells ran, for a later page
    assert timing["device"].startswith("CPU") and timing["runs"][-1]["runner"] == "gmpq study"
    assert "(rows computed by gmpq study); no GPU was used" in text
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(df)} already done, 0 to run" in second.stdout
    assert len(pd.read_parquet(out / "study.parquet")) == len(df)


def test_the_page_header_names_the_shared_models_a_run_elsewhere_recorded(tmp_path):
    # rows from a lent GPU machine come back without its model cache: the page uses what the run recorded
    from orchestrator.commands.study import _header
    cfg = load_study_config(REPO / "experiments" / "generalization_gpu_short.yaml")
    timing = {"device": "NVIDIA H200", "runs": [{"runner": "experiments.generalization_local", "shared_models": {
        "target": {"top1": 91.25, "steps": 1000, "seconds": 20.0}, "fmnist500": {"top1": 74.5, "steps": 200},
        "fmnist2000": {"top1": 80.0, "steps": 200}}}]}
    head = _header(cfg, tmp_path, "experiments/generalization_gpu_short.yaml", timing, _rows())
    assert head["target FP model"] == ("91.25% top-1 on a stratified 1000-image slice of the target test set (the "
                                       "quick check every FP model of the study gets when trained, proxy_eval_size; "
                                       "the cells' top-1 is on the whole test set, see 'evaluation') after 1000 SGD "
                                       "steps of batch 256")
    assert head["teachers"] == "200 SGD steps on each proxy (top-1: fmnist500 74.5%, fmnist2000 80.0%)"
    assert _header(cfg, tmp_path, "x.yaml", {"runs": []}, _rows())["target FP model"] == "-"


def test_the_page_names_the_machine_a_gmpq_study_run_recorded_not_the_one_writing_the_page(tmp_path):
    """The device line described the machine that wrote the page (a page rewritten with --analyze-only on a laptop
    named the laptop's CPU for rows a GPU machine computed); ``gmpq study`` now records where its cells ran."""
    from orchestrator.commands.study import _header
    from experiments.generalization_local import device_name
    from experiments.generalization_ray import study_device

    cfg = load_study_config(REPO / "experiments" / "generalization_smoke.yaml")
    assert study_device(cfg, local=True) == device_name(cfg)
    for recorded, line in (("NVIDIA H200", "NVIDIA H200 (rows computed by gmpq study)"),
                           ("CPU (x86_64)", "CPU (x86_64) (rows computed by gmpq study); no GPU was used"),
                           ("a Ray cluster of 3 node(s), 4 GPU(s) (H100); cells on GPU",
                            "a Ray cluster of 3 node(s), 4 GPU(s) (H100); cells on GPU (rows computed by gmpq study)")):
        timing = {"device": recorded, "runs": [{"wall_seconds": 1.0, "prepare_seconds": 0.0, "device": recorded,
                                                "runner": "gmpq study"}, {"wall_seconds": 1.0, "prepare_seconds": 0.0}]}
        assert _header(cfg, tmp_path, "x.yaml", timing, _rows())["device"] == line


def test_each_finished_cell_is_a_progress_line():
    """A study ran for up to an hour with no line between 'shared FP models ready' and its summary."""
    from experiments.generalization_ray import cell_line

    row = {"method": "gmpq", "proxy": "fmnist500", "budget": 3.0, "seed": 1, "status": "completed",
           "target_top1": 81.234, "gbitops_quantized": 0.4123, "cell_seconds": 12.4}
    assert cell_line(row, 3, 18, 90.0) == ("[3/18] gmpq proxy fmnist500 budget 3.0 seed 1: target top-1 81.23 %, "
                                           "0.412 GBitOPs (12 s); 1.5 min so far")
    failed = {**row, "status": "failed", "error": "Traceback ...\nValueError: the budget is infeasible\n"}
    assert cell_line(failed, 4, 18, 96.0) == ("[4/18] gmpq proxy fmnist500 budget 3.0 seed 1: FAILED (ValueError: "
                                              "the budget is infeasible); 1.6 min so far")


def test_every_budget_is_checked_against_the_candidates_when_the_config_loads(tmp_path):
    """The review: only the first budget was checked; a later one outside the candidates' range failed in each of its
    cells, after the shared FP models had trained."""
    import yaml

    d = yaml.safe_load((REPO / "experiments" / "generalization_smoke.yaml").read_text())
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**d, "budgets": [3.0, 7.0]}))
    with pytest.raises(ConfigError, match=r"budgets: 7\.0 cannot be searched: .*feasible range 2 \.\. 6.*top-level "
                                          r"'candidates:' key"):
        load_study_config(path)
