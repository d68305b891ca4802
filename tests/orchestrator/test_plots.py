"""The sweep's PNG plots drawn from hand-made tables (no Ray): the selected policies' per-layer bits."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from orchestrator import plots

LAYERS = [{"name": "conv1", "macs": 4000, "w_bits": 8, "a_bits": 6},
          {"name": "layer1.conv", "macs": 2000, "w_bits": 2, "a_bits": 4},
          {"name": "fc", "macs": 2000, "w_bits": 4, "a_bits": 3}]


def _front(rows):
    """rows: (trial_id, transfer_top1, bitops, selected, layers)."""
    return pd.DataFrame({"trial_id": [r[0] for r in rows], "transfer_top1": [r[1] for r in rows],
                         "bitops": [r[2] for r in rows], "selected": [r[3] for r in rows],
                         "layers_json": [json.dumps(r[4]) if r[4] is not None else None for r in rows]})


@pytest.fixture
def drawn(monkeypatch):
    """The figure plot_policies would save (its axes and title), not a file."""
    seen = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.update(fig=fig) or path)
    yield seen
    plt.close("all")


def test_each_selected_policy_gets_a_panel_of_its_bits_in_network_order(drawn, tmp_path):
    front = _front([("hi", 85.0, 9e9, True, LAYERS), ("mid", 80.0, 5e9, False, LAYERS),
                    ("lo", 70.0, 1e9, True, [dict(d, w_bits=2, a_bits=2) for d in LAYERS])])
    plots.plot_policies(front, tmp_path / "p.png")
    bars = [ax for ax in drawn["fig"].axes if ax.get_ylabel() == "bits"]
    assert len(bars) == 2                                       # the selected ones; "mid" is not
    assert "lo" in bars[0].get_title() and "hi" in bars[1].get_title()        # cheapest first
    heights = [p.get_height() for p in bars[1].patches]
    assert heights == [8, 2, 4, 6, 4, 3]                       # weight bars, then activation bars, layer order
    assert [t.get_text() for t in bars[1].get_xticklabels()] == ["conv1", "layer1.conv", "fc"]
    # MAC-weighted bits: w (8*4 + 2*2 + 4*2) / 8 = 5.50, a (6*4 + 4*2 + 3*2) / 8 = 4.75
    assert "85.00%" in bars[1].get_title() and "w 5.50 / a 4.75" in bars[1].get_title()
    share = [ax for ax in drawn["fig"].axes if ax.get_ylabel() == "MACs (%)"][1]
    assert list(share.lines[0].get_ydata()) == [50.0, 25.0, 25.0]


def test_without_a_selection_the_front_is_drawn_and_rows_without_layers_are_left_out(drawn, tmp_path):
    front = _front([("a", 70.0, 1e9, False, LAYERS), ("old", 75.0, 2e9, False, None), ("b", 80.0, 3e9, False, LAYERS)])
    plots.plot_policies(front, tmp_path / "p.png")
    titles = [ax.get_title() for ax in drawn["fig"].axes if ax.get_ylabel() == "bits"]
    assert [t.split(":")[0] for t in titles] == ["a", "b"]


def test_an_empty_front_says_so(drawn, tmp_path):
    plots.plot_policies(_front([]), tmp_path / "p.png")
    assert any("no policy on the front" in t.get_text() for ax in drawn["fig"].axes for t in ax.texts)


def test_write_pareto_writes_the_policies_png_and_gmpq_pareto_names_it(tmp_path, capsys):
    from orchestrator.cli import main
    from orchestrator.results import trial_row, write_results

    rows = [trial_row(trial_id=tid, config={"eta": 40.0}, status="completed",
                      last_result={"transfer_top1": acc, "bitops": cost, "proxy_top1": acc - 1,
                                   "budget_avg_bits": 3.0, "budget_bucket": 1, "layers_json": json.dumps(LAYERS),
                                   "policy_json": "{}"})
            for tid, acc, cost in [("a", 80.0, 5_000_000), ("c", 85.0, 9_000_000)]]
    write_results(tmp_path, rows, [])
    (tmp_path / "sweep_config.yaml").write_text("budget_buckets: [2.75, 3.5, 4.5]\nfinetune: {top_k: 2}\n")
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow"]) == 0
    png = (tmp_path / "policies.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert f"Bits per layer: {tmp_path / 'policies.png'}" in capsys.readouterr().out


def test_gmpq_pareto_logs_both_plots_to_the_parent_run(tmp_path):
    """On a real SQLite MLflow store: pareto.png and policies.png are the parent run's results/ artifacts."""
    import mlflow

    from orchestrator.cli import main
    from orchestrator.results import trial_row, write_results

    rows = [trial_row(trial_id=tid, config={"eta": 40.0}, status="completed",
                      last_result={"transfer_top1": acc, "bitops": cost, "budget_avg_bits": 3.0, "budget_bucket": 1,
                                   "layers_json": json.dumps(LAYERS), "policy_json": "{}"})
            for tid, acc, cost in [("a", 80.0, 5_000_000), ("c", 85.0, 9_000_000)]]
    write_results(tmp_path, rows, [])
    (tmp_path / "sweep_config.yaml").write_text("name: plotted\nfinetune: {top_k: 2}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["pareto", "--sweep", str(tmp_path), "--tracking-uri", uri]) == 0
    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.search_runs([client.get_experiment_by_name("plotted").experiment_id],
                                filter_string="tags.`gmpq.role` = 'sweep'")
    assert len(parent) == 1
    names = {a.path for a in client.list_artifacts(parent[0].info.run_id, "results")}
    assert {"results/pareto.png", "results/policies.png"} <= names
