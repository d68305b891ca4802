"""The final / Pareto plots stay readable with a long capped-fine-tune description and points at nearly equal
GBitOPs: wide axes, the legend and caption off the axes, no overlapping tick labels or point labels (window
extents after a draw; hand-made tables, no Ray)."""
from __future__ import annotations

import json
from itertools import combinations

import numpy as np
import pandas as pd
import pytest

from orchestrator import plots

RECIPE = json.dumps({"batch_size": 128, "dataset": "fashion_mnist", "lr": 0.01, "max_steps_per_epoch": 4,
                     "precision": "fp32", "seed": 0, "test_size": 200, "train_size": 1000})
IDS = ["512a10e3", "8bc6ef87", "488d2ce7", "7d38e28b", "c0ffee12"]
COSTS = [300_100_000, 300_200_000, 300_300_000, 300_350_000, 400_000_000]      # four within 0.1% of each other


def _final() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": IDS, "bitops": COSTS, "final_top1": [10.0, 10.0, 10.05, 10.0, 11.0],
                         "transfer_top1": [12.7, 20.3, 15.3, 18.0, 19.0], "recipe_json": RECIPE,
                         "train_images": 1000, "images_per_epoch": 512, "workers": 1})


def _trials() -> pd.DataFrame:
    return pd.DataFrame({"trial_id": IDS + ["x1"], "status": ["completed"] * 5 + ["pruned"],
                         "bitops": COSTS + [350_000_000], "transfer_top1": [12.7, 20.3, 15.3, 18.0, 19.0, np.nan]})


def _boxes(fig, artists):
    r = fig.canvas.get_renderer()
    return [a.get_window_extent(r) for a in artists if a.get_visible() and a.get_text()]


def _overlapping_pairs(boxes):
    return [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


def _check_layout(fig, ax, point_labels):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fw = fig.bbox.width
    axbox = ax.get_window_extent(r)
    assert axbox.width >= 0.6 * fw                               # the legend / caption do not squeeze the axes
    assert axbox.height >= 0.45 * fig.bbox.height
    for legend in [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]:
        assert not legend.get_window_extent(r).overlaps(axbox)
    ticks = _boxes(fig, ax.get_xticklabels())
    assert 3 <= len(ticks) <= 7 and not _overlapping_pairs(ticks)
    assert len({t.get_text() for t in ax.get_xticklabels()}) == len(ax.get_xticklabels())   # told apart
    labels = [t for t in ax.texts if t.get_text() in point_labels]
    assert sorted(t.get_text() for t in labels) == sorted(point_labels)
    boxes = _boxes(fig, labels)
    assert not _overlapping_pairs(boxes)
    assert all(axbox.x0 - 1 <= b.x0 and b.x1 <= axbox.x1 + 1 for b in boxes)   # inside the axes, not over the legend
    return axbox


@pytest.fixture
def saved(monkeypatch):
    """The figures the plot functions save (as they are when written), the PNGs still written."""
    from matplotlib.figure import Figure

    figs, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self) or savefig(self, *a, **k))
    return figs


def test_the_final_plot_keeps_wide_axes_and_apart_labels_with_a_capped_fine_tune(saved, tmp_path):
    path = plots.plot_final(_final(), _trials(), tmp_path / "final.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fig = saved[-1]
    ax = fig.axes[0]
    wanted = [f"{t}: {a:.2f}%" for t, a in zip(IDS, [10.0, 10.0, 10.05, 10.0, 11.0])]
    axbox = _check_layout(fig, ax, wanted)
    r = fig.canvas.get_renderer()
    # the long description is a wrapped caption over the axes, not a legend label
    caption = " ".join(ax.get_title("left").split("\n"))
    assert "at most 4 steps per epoch: 512 of a stratified subset of 1000" in caption
    cap_box = ax._left_title.get_window_extent(r)                # (the title at loc="left")
    assert not cap_box.overlaps(axbox) and fig.bbox.x0 <= cap_box.x0 and cap_box.x1 <= fig.bbox.x1
    legends = [*fig.legends, *([ax.get_legend()] if ax.get_legend() else [])]
    assert legends and all(len(t.get_text()) < 60 for lg in legends for t in lg.get_texts())


def test_the_pareto_plot_keeps_apart_labels_for_close_selected_points(saved, tmp_path):
    front = pd.DataFrame({"trial_id": IDS[:4], "bitops": COSTS[:4], "transfer_top1": [12.7, 12.8, 12.75, 12.9],
                          "selected": True})
    plots.plot_pareto(_trials(), front, tmp_path / "pareto.png", buckets=[3.25, 4.25])
    _check_layout(saved[-1], saved[-1].axes[0], IDS[:4])


@pytest.mark.parametrize("locs,want", [([0.3, 0.35, 0.4], ["0.30", "0.35", "0.40"]),
                                      ([0.3001, 0.3002, 0.3003], ["0.3001", "0.3002", "0.3003"]),
                                      ([0.0, 5.0, 10.0], ["0", "5", "10"])])
def test_gbitops_ticks_have_just_enough_digits(locs, want):
    f = plots._StepDecimals()
    f.set_locs(locs)
    assert [f(x) for x in locs] == want
