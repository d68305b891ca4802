"""Pareto front and policy selection on hand-made points (no Ray)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from gmpq_core.errors import CheckpointError, ConfigError
from orchestrator.pareto import (bucket_index, dominated_mask, format_pareto_table, pareto_front, read_pareto,
                                 select_policies, write_pareto)
from orchestrator.results import PARETO_FILE, read_trials, trial_row, write_results


def frame(points, status=None, buckets=None):
    """points: list of (trial_id, transfer_top1, bitops)."""
    return pd.DataFrame({
        "trial_id": [p[0] for p in points], "transfer_top1": [p[1] for p in points],
        "bitops": [p[2] for p in points],
        "status": status or ["completed"] * len(points),
        "budget_bucket": buckets if buckets is not None else [0] * len(points)})


def brute_force_front(points):
    keep = []
    for t, a, c in points:
        if not any((a2 >= a and c2 <= c and (a2 > a or c2 < c)) for _, a2, c2 in points):
            keep.append(t)
    return sorted(keep)


def test_dominated_points_are_excluded_and_front_is_sorted_by_bitops():
    pts = [("a", 90.0, 100), ("b", 85.0, 50), ("c", 80.0, 60), ("d", 70.0, 20), ("e", 89.0, 100), ("f", 60.0, 30)]
    front = pareto_front(frame(pts))
    assert list(front["trial_id"]) == ["d", "b", "a"]       # c, e, f are dominated
    assert sorted(front["trial_id"]) == brute_force_front(pts)


def test_front_matches_brute_force_on_random_points():
    rng = np.random.default_rng(3)
    pts = [(f"t{i:02d}", float(rng.integers(50, 60)), int(rng.integers(1, 12))) for i in range(40)]
    assert sorted(pareto_front(frame(pts))["trial_id"]) == brute_force_front(pts)


def test_identical_points_both_stay_on_the_front_and_equal_accuracy_cheaper_wins():
    pts = [("x", 80.0, 40), ("y", 80.0, 40), ("z", 80.0, 50)]
    assert list(pareto_front(frame(pts))["trial_id"]) == ["x", "y"]
    assert dominated_mask([80.0, 80.0, 80.0], [40, 40, 50]).tolist() == [False, False, True]


def test_only_completed_trials_with_both_objectives_count():
    df = frame([("a", 95.0, 10), ("b", 70.0, 20), ("c", 60.0, 5)], status=["pruned", "completed", "failed"])
    df.loc[2, "transfer_top1"] = np.nan
    assert list(pareto_front(df)["trial_id"]) == ["b"]


def test_knee_is_the_point_farthest_from_the_end_point_line():
    # normalised: ends (0,0) and (1,1); "k" at (0.2, 0.9) is farthest from the diagonal
    pts = [("lo", 50.0, 0), ("k", 86.0, 20), ("m", 92.0, 60), ("hi", 90.0 + 0, 100)]
    pts[3] = ("hi", 95.0, 100)
    sel = select_policies(frame(pts), top_k=1)
    assert list(sel.loc[sel["selected"], "trial_id"]) == ["k"]
    assert sel.loc[sel["selected"], "selection_reason"].item().startswith("knee of the front")


def test_best_per_bucket_then_knee_reasons_and_k_limit():
    pts = [("a", 60.0, 10), ("b", 70.0, 20), ("c", 80.0, 40), ("d", 84.0, 80), ("e", 85.0, 160)]
    sel = select_policies(frame(pts, buckets=[0, 0, 1, 1, 2]), top_k=4, buckets=[3.0, 4.0])
    chosen = dict(zip(sel.loc[sel["selected"], "trial_id"], sel.loc[sel["selected"], "selection_reason"]))
    assert set(chosen) >= {"b", "d", "e"}                    # best of buckets 0, 1, 2
    assert "best in bucket 0 (< 3 avg bits)" in chosen["b"]
    assert "best in bucket 2 (>= 4 avg bits)" in chosen["e"]
    assert sum("knee of the front" in r for r in chosen.values()) == 1
    assert sel["selected"].sum() == 4
    assert (sel.loc[~sel["selected"], "selection_reason"] == "").all()


def test_fewer_k_than_buckets_spreads_and_fills_when_buckets_are_few():
    pts = [(f"t{i}", 50.0 + 5 * i, 10 * (i + 1)) for i in range(6)]   # collinear: no knee
    two = select_policies(frame(pts, buckets=[0, 0, 1, 1, 2, 2]), top_k=2, buckets=[3, 4])
    assert list(two.loc[two["selected"], "trial_id"]) == ["t1", "t5"]    # bucket bests: the best overall, then the farthest
    five = select_policies(frame(pts), top_k=5)
    assert five["selected"].sum() == 5
    assert (five.loc[five["selected"], "selection_reason"] != "").all()
    assert select_policies(frame(pts), top_k=10)["selected"].all()


def test_selection_is_deterministic_under_row_order():
    rng = np.random.default_rng(0)
    pts = [(f"t{i:02d}", float(rng.uniform(60, 90)), int(rng.integers(5, 200))) for i in range(30)]
    df = frame(pts, buckets=[int(rng.integers(0, 3)) for _ in pts])
    a = select_policies(df, 3, [3.0, 4.0])
    b = select_policies(df.sample(frac=1.0, random_state=1), 3, [3.0, 4.0])
    pd.testing.assert_frame_equal(a[["trial_id", "selected", "selection_reason"]],
                                  b[["trial_id", "selected", "selection_reason"]])


def test_bucket_from_avg_bits_when_not_reported():
    df = pd.DataFrame({"budget_bucket": [None, 2, None, None], "budget_avg_bits": [2.5, 9.0, 3.5, 5.0]})
    assert bucket_index(df, [2.75, 3.5, 4.5]).tolist() == [0, 2, 2, 3]


def test_bad_top_k_is_a_config_error():
    with pytest.raises(ConfigError, match="top_k=0"):
        select_policies(frame([("a", 1.0, 1)]), top_k=0)


def _write_sweep(tmp_path, points):
    rows = []
    for tid, acc, cost, status in points:
        layers = [{"name": "l1", "macs": 1000, "w_bits": 4, "a_bits": 4}]
        res = {"transfer_top1": acc, "bitops": cost, "proxy_top1": acc - 1, "budget_avg_bits": 3.0,
               "budget_bucket": 1, "layers_json": json.dumps(layers), "policy_json": "{}"} if acc is not None else \
              {"proxy_top1": 30.0, "epoch": 1, "expected_gbitops": cost / 1e9}
        rows.append(trial_row(trial_id=tid, config={"eta": 40.0, "epochs": 2}, last_result=res, status=status))
    write_results(tmp_path, rows, [])
    (tmp_path / "sweep_config.yaml").write_text("budget_buckets: [2.75, 3.5, 4.5]\nfinetune: {top_k: 2}\n")


def test_write_pareto_keeps_trial_columns_and_types_and_plots(tmp_path):
    _write_sweep(tmp_path, [("a", 80.0, 5_000_000, "completed"), ("b", 70.0, 9_000_000, "completed"),
                            ("c", 85.0, 9_000_000, "completed"), ("d", None, 1_000_000, "pruned")])
    df = write_pareto(tmp_path)
    assert list(df["trial_id"]) == ["a", "c"] and df["selected"].all()       # top_k=2 from the config
    trials = read_trials(tmp_path)
    assert list(df.columns) == list(trials.columns) + ["selected", "selection_reason"]
    back = read_pareto(tmp_path)
    assert back["bitops"].dtype == np.int64 and back["param_epochs"].dtype == np.int64
    png = (tmp_path / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = format_pareto_table(df, [2.75, 3.5, 4.5])
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["sel", "trial_id", "transfer_top1"] and len(lines) == 4
    end = lines[0].index("transfer_top1") + len("transfer_top1")
    assert [ln[end - 5:end] for ln in lines[2:]] == ["80.00", "85.00"]     # right-aligned numbers


def test_the_front_policies_are_exported_for_gmpq_finetune(tmp_path, capsys):
    """policies/<trial_id>.json: each Pareto policy as a file gmpq finetune --policy takes (it lived only in a
    Parquet column and MLflow artifacts)."""
    from gmpq_core.models import build_model
    from gmpq_core.policy import BitPolicy
    from orchestrator.cli import main

    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    policy = BitPolicy.uniform(model, 4, 4)
    _write_sweep(tmp_path, [("a", 80.0, 5_000_000, "completed"), ("b", 70.0, 9_000_000, "completed"),
                            ("c", 85.0, 9_000_000, "completed")])
    rows = read_trials(tmp_path)
    rows["policy_json"] = policy.to_json()
    write_results(tmp_path, rows.to_dict("records"), [])
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "gone.json").write_text("{}")                # from an earlier front
    write_pareto(tmp_path)
    files = sorted(p.name for p in (tmp_path / "policies").glob("*.json"))
    assert files == ["a.json", "c.json"]                                   # the front only ("b" is dominated)
    back = BitPolicy.from_json((tmp_path / "policies" / "c.json").read_text())
    assert back.layers == policy.layers and back.meta["trial_id"] == "c" and back.meta["transfer_top1"] == 85.0
    back.check_fits(model)
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow"]) == 0
    assert f"Policies: {tmp_path / 'policies'}/<trial_id>.json" in capsys.readouterr().out


def test_write_pareto_with_no_completed_trials_writes_an_empty_file(tmp_path):
    _write_sweep(tmp_path, [("d", None, 1_000_000, "pruned")])
    assert write_pareto(tmp_path, 3).empty
    assert read_pareto(tmp_path).empty
    (tmp_path / PARETO_FILE).write_bytes(b"PAR1 broken")
    with pytest.raises(CheckpointError, match="pareto.parquet"):
        read_pareto(tmp_path)


def test_a_pareto_plot_without_completed_trials_shows_the_pruned_ones_and_says_so(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from orchestrator import plots

    _write_sweep(tmp_path, [("d", None, 1_000_000, "pruned"), ("e", None, 3_000_000, "pruned")])
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(ax=fig.axes[0]) or path)
    plots.plot_pareto(read_trials(tmp_path), pd.DataFrame(), tmp_path / "p.png")
    ax = seen["ax"]
    lo, hi = ax.get_xlim()
    assert lo < 0.001 and hi > 0.003 and lo > 0.0005                    # the pruned trials' GBitOPs, padded
    assert any("no completed trial" in t.get_text() for t in ax.texts)
    plt.close("all")
