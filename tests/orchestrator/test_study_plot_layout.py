"""The study plot's layout: near-equal costs look near-equal (with fill_budget every policy sits at the budget; the
x axis spanned 0.2779-0.2782 GBitOPs, 0.1%, and the points spread over the panel as if they differed), and the legend
covers no panel (it sat inside one, over an error bar). The figure is caught as ``plot_study`` closes it."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from orchestrator.study_plot import plot_study

METHODS = ("gmpq", "gmpq_fixed_p3", "eta0", "target_search", "uniform", "random")


def _rows(costs: dict[float, float]) -> pd.DataFrame:
    """Two seeds of every method at each budget, GBitOPs ``costs[budget]`` plus a 0.1% spread between methods."""
    rows = []
    for budget, cost in costs.items():
        for i, m in enumerate(METHODS):
            for proxy in (("target",) if m == "target_search" else ("none",) if m in ("uniform", "random")
                          else ("fmnist500", "mnist5k")):
                for seed in (0, 1):
                    rows.append({"method": m, "proxy": proxy, "budget": budget, "seed": seed,
                                 "target_top1": 10.0 + 3 * seed + i, "gbitops_quantized": cost * (1 + 0.0002 * i),
                                 "gbitops_total": 0.394, "status": "completed"})
    return pd.DataFrame(rows)


def _figure(df: pd.DataFrame, tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    caught = []
    monkeypatch.setattr(plt, "close", caught.append)     # kept open to measure (closed after the test)
    plot_study(df, tmp_path / "p.png", title="t")
    monkeypatch.undo()
    fig = caught[-1]
    fig.canvas.draw()
    return fig


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt
    plt.close("all")


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_near_equal_costs_get_an_x_range_of_at_least_ten_percent_of_their_mean(tmp_path, monkeypatch):
    df = _rows({3.0: 0.2779})
    fig = _figure(df, tmp_path, monkeypatch)
    mean = df["gbitops_quantized"].mean()
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    assert len(panels) == 6
    for ax in panels:
        lo, hi = ax.get_xlim()
        assert hi - lo >= 0.1 * mean * (1 - 1e-9), (lo, hi)
        assert lo < df["gbitops_quantized"].min() and df["gbitops_quantized"].max() < hi
        assert lo < mean < hi and math.isclose((lo + hi) / 2, mean, rel_tol=0.01)
    wide = _figure(_rows({2.5: 0.20, 4.0: 0.35}), tmp_path, monkeypatch)     # a real spread: every point in view
    for ax in (ax for ax in wide.axes if ax.axison):
        lo, hi = ax.get_xlim()
        assert lo < 0.20 and 0.35 * 1.001 < hi


@pytest.mark.parametrize("n_methods", [6, 2])
def test_the_legend_covers_no_panel(tmp_path, monkeypatch, n_methods):
    df = _rows({3.0: 0.2779})
    df = df[df["method"].isin(METHODS[:n_methods])]
    fig = _figure(df, tmp_path, monkeypatch)
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert legends, "no legend"
    labels = {t.get_text() for leg in legends for t in leg.get_texts()}
    assert labels == set(df["proxy"])
    panels = [ax for ax in fig.axes if ax.axison]
    for leg in legends:
        box = leg.get_window_extent(renderer)
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 + 0.5         # inside the figure, not cut off
        for ax in panels:
            assert not _overlaps(box, ax.get_window_extent(renderer)), ax.get_title()


def test_the_budget_plot_beside_it_puts_the_methods_side_by_side_per_budget(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from PIL import Image

    from orchestrator.study_plot import companion_path

    caught = []
    monkeypatch.setattr(plt, "close", caught.append)
    df = _rows({2.5: 0.19, 3.0: 0.2779})
    plot_study(df, tmp_path / "p.png", title="mine: target top-1 vs BitOPs (mean ± std over seeds)\nsmoke run: x",
               fp_top1=82.0)
    monkeypatch.undo()
    side = companion_path(tmp_path / "p.png")
    assert side == tmp_path / "p_by_budget.png" and side.is_file()
    with Image.open(side) as image:
        assert image.text.get("Software") == "gmpq study"
    fig = caught[0]                                          # written first; the per-method plot last
    fig.canvas.draw()
    panels = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in panels] == ["budget 2.5 average bits", "budget 3 average bits"]
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == list(METHODS)
        assert any(line.get_linestyle() == "--" and list(line.get_ydata()) == [82.0, 82.0] for line in ax.lines)
        panel = ax.get_window_extent()
        legend = fig.legends[0].get_window_extent()
        assert not _overlaps(panel, legend)
    title = fig._suptitle.get_text()
    assert title.startswith("mine\nthe methods side by side at each budget") and "smoke run: x" in title
    text = fig._suptitle.get_window_extent()
    assert 0 <= text.x0 and text.x1 <= fig.bbox.width                     # the whole title on the figure
    # each proxy of a method at its own x, around the method's tick: fmnist500 and mnist5k of gmpq
    from matplotlib.collections import PathCollection

    xs = sorted({round(float(c.get_offsets()[0][0]), 3) for c in panels[0].collections
                 if isinstance(c, PathCollection)})
    assert -0.5 < xs[0] < 0 < xs[1] < 0.5 and len(xs) == 1 + 2 * 3 + 2     # gmpq, p3, eta0: 2 proxies each


def test_a_foreign_file_where_the_budget_plot_goes_is_refused(tmp_path):
    from gmpq_core.errors import ConfigError
    from orchestrator.study_plot import check_plot_replaceable

    (tmp_path / "p_by_budget.png").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="p_by_budget.png' already exists and is not a plot 'gmpq study' wrote"):
        check_plot_replaceable(tmp_path / "p.png")


def test_the_page_shows_the_budget_plot_when_it_was_written(tmp_path):
    from orchestrator.study import write_results_md

    df = _rows({3.0: 0.2779}).assign(proxy_top1=50.0, proxy_ard=0.3, target_ard=0.2, search_seconds=1.0)
    without = write_results_md(df, tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"})
    assert "p_by_budget.png" not in without
    plot_study(df, tmp_path / "p.png", title="t")
    page = write_results_md(df, tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"})
    assert "![accuracy vs BitOPs per method](p.png)" in page
    assert "![the methods side by side at each budget](p_by_budget.png)" in page
