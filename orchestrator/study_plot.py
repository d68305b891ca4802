"""The generalization study's plots: target top-1 vs GBitOPs, one panel per method (``plot_study``); beside it the
methods side by side, one panel per budget (``budget_figure``, in ``companion_path``: the comparison the verdicts
make, seen); and the check that a plot path holds no one else's image (``check_plot_replaceable``).

Layout rules: near-equal costs look near-equal (the x axis spans at least ``MIN_X_SPAN`` of the mean GBitOPs: with
``fill_budget`` every policy of a budget sits at the budget, and a 0.1% spread stretched over the panel would read
as a difference), and the proxies' legend sits in the figure's right margin, outside every panel, where it covers
no point or error bar.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import atomic_write

__all__ = ["PLOT_STAMP", "MIN_X_SPAN", "plot_study", "plot_title", "study_figure", "budget_figure", "companion_path",
           "check_plot_replaceable"]

PLOT_STAMP = "gmpq study"     # the plot's PNG "Software" text: ``check_plot_replaceable``
MIN_X_SPAN = 0.10             # the x axis spans at least this fraction of the mean GBitOPs (±5% around the data)


def x_limits(values: pd.Series, min_span: float = MIN_X_SPAN) -> tuple[float, float] | None:
    """The x limits for GBitOPs ``values``: centred on the data, at least ``min_span`` x their mean wide (None: no
    finite positive value, matplotlib's own limits). A wider spread keeps its own range plus a 5% margin."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[v.notna() & (v > 0)]
    if v.empty:
        return None
    lo, hi, mean = float(v.min()), float(v.max()), float(v.mean())
    half = max((hi - lo) / 2 * 1.1, min_span * mean / 2)
    mid = (lo + hi) / 2
    return mid - half, mid + half


def _legend_in_margin(fig, handles: dict) -> None:
    """The proxies' legend in the figure's right margin, outside every panel, and the panels laid out beside it."""
    right = 1.0
    if handles:
        legend = fig.legend(list(handles.values()), list(handles), title="proxy", fontsize=7, title_fontsize=8,
                            loc="center right", bbox_to_anchor=(0.995, 0.5))
        fig.canvas.draw()
        right = 0.985 - legend.get_window_extent().width / fig.bbox.width
    fig.tight_layout(rect=(0, 0, right, 1))


def study_figure(df: pd.DataFrame, *, title: str = ""):
    """The plot's matplotlib Figure (see the module docstring); the caller saves and closes it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .study import METHOD_ORDER, _completed, aggregate

    d = _completed(df)
    agg = aggregate(df)
    methods = [m for m in METHOD_ORDER if m in set(d["method"])] or ["(none)"]
    proxies = sorted(set(d["proxy"]))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(proxies)}
    ncol = min(3, len(methods))
    nrow = math.ceil(len(methods) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol + 1.4, 3.4 * nrow), sharex=True, sharey=True,
                             squeeze=False)
    handles: dict[str, object] = {}
    for ax, m in zip(axes.flat, methods):
        for p in proxies:
            cells = d[(d["method"] == m) & (d["proxy"] == p)]
            if cells.empty:
                continue
            ax.scatter(cells["gbitops_quantized"], cells["target_top1"], s=10, alpha=0.35, color=colors[p])
            a = agg[(agg["method"] == m) & (agg["proxy"] == p)].sort_values("gbitops_quantized")
            handles[p] = ax.errorbar(a["gbitops_quantized"], a["top1_mean"], yerr=a["top1_std"].fillna(0), fmt="o-",
                                     ms=4, capsize=3, color=colors[p], label=p)
        ax.set_title(m)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(methods):]:
        ax.axis("off")
    limits = x_limits(d["gbitops_quantized"]) if "gbitops_quantized" in d else None
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))   # one budget spans a narrow range: few, readable ticks
        if limits is not None:
            ax.set_xlim(*limits)
    for ax in axes[-1]:
        ax.set_xlabel("GBitOPs (quantized layers)")
    for ax in axes[:, 0]:
        ax.set_ylabel("target top-1 (%)")
    if title:
        fig.suptitle(title, fontsize=10)
    _legend_in_margin(fig, handles)      # one legend for every panel (a proxy has one colour throughout)
    return fig


def plot_title(name: str, df: pd.DataFrame, *, fp_top1: float | None, num_classes: int | None, smoke: bool) -> str:
    """The plot's title, with the page's warnings when it has them: a plot copied alone (into slides, a chat)
    still says that a smoke run's numbers are a plumbing check, or that the FP model was near chance."""
    from orchestrator.study import aggregate, chance_caution

    title = f"{name}: target top-1 vs BitOPs (mean ± std over seeds)"
    if smoke:
        title += "\nsmoke run: a plumbing check, not a result"
    elif chance_caution(aggregate(df), fp_top1=fp_top1, num_classes=num_classes):
        title += "\ncaution: the target FP model is near chance, so differences say little about the methods"
    return title


def companion_path(path: str | Path) -> Path:
    """Where ``plot_study`` puts the per-budget comparison beside the plot at ``path``: ``<stem>_by_budget.png``."""
    path = Path(path)
    return path.with_name(f"{path.stem}_by_budget.png")


def budget_figure(df: pd.DataFrame, *, title: str = "", fp_top1: float | None = None):
    """One panel per budget, the methods side by side on the x axis (each proxy beside the next, in the colours of
    ``study_figure``): every seed a faint dot, mean ± std a marker with a bar; ``fp_top1``: the target FP model's
    top-1 as a dashed line. The caller saves and closes the Figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .study import METHOD_ORDER, _completed, aggregate

    d, agg = _completed(df), aggregate(df)
    budgets = sorted(set(d["budget"])) or [None]
    methods = [m for m in METHOD_ORDER if m in set(d["method"])] + sorted(set(d["method"]) - set(METHOD_ORDER))
    proxies = sorted(set(d["proxy"]))
    colors = {p: plt.cm.tab10(i % 10) for i, p in enumerate(proxies)}
    fig, axes = plt.subplots(1, len(budgets), figsize=(max(7.0, 0.9 * max(len(methods), 3) * len(budgets) + 1.6), 4.2),
                             squeeze=False)      # each budget its own y range: its differences, not another's
    handles: dict[str, object] = {}
    for ax, budget in zip(axes[0], budgets):
        cells_at, means_at = d[d["budget"] == budget], agg[agg["budget"] == budget]
        for x, m in enumerate(methods):
            groups = list(cells_at[cells_at["method"] == m].groupby("proxy", sort=True))   # each proxy's seeds
            for k, (p, cells) in enumerate(groups):
                dx = (k - (len(groups) - 1) / 2) * min(0.18, 0.7 / len(groups))
                ax.scatter([x + dx] * len(cells), cells["target_top1"], s=10, alpha=0.35, color=colors[p])
                a = means_at[(means_at["method"] == m) & (means_at["proxy"] == p)]
                handles[p] = ax.errorbar([x + dx], a["top1_mean"], yerr=a["top1_std"].fillna(0), fmt="o", ms=5,
                                         capsize=3, color=colors[p], label=p)
        ax.set_ylabel("target top-1 (%)")
        if fp_top1 is not None:
            handles["FP target model"] = ax.axhline(fp_top1, color="0.4", ls="--", lw=1, label="FP target model")
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(f"budget {budget:g} average bits" if budget is not None else "(no completed cell)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    _legend_in_margin(fig, handles)
    return fig


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, metadata={"Software": PLOT_STAMP}))
    plt.close(fig)


def plot_study(df: pd.DataFrame, path: str | Path, *, title: str = "", fp_top1: float | None = None) -> Path:
    """Target top-1 vs GBitOPs (quantized layers), one panel per method, mean ± std over seeds, one
    colour per proxy; single cells as faint dots. Written to ``path`` (PNG, stamped ``PLOT_STAMP``), and the
    per-budget comparison (``budget_figure``) to ``companion_path(path)`` first."""
    path = Path(path)
    first, *warnings = title.split("\n") if title else [""]
    name = first.split(": target top-1")[0] if first else ""
    side = "\n".join([*([name] if name else []), "the methods side by side at each budget (dots: seeds; bars: "
                      "mean ± std)", *warnings])
    _save(budget_figure(df, title=side, fp_top1=fp_top1), companion_path(path))
    _save(study_figure(df, title=title), path)
    return path


def check_plot_replaceable(path: str | Path, flag: str = "--png") -> None:
    """ConfigError when ``path`` or its companion (``companion_path``) holds a file that is not a plot
    ``plot_study`` wrote (its PNG text "Software" says so): writing the plot there would replace someone's image.
    No file there: nothing to check."""
    _check_one(Path(path), flag)
    _check_one(companion_path(path), flag)


def _check_one(path: Path, flag: str) -> None:
    if not path.exists() or path.is_dir():      # (a folder: the caller's own error names it)
        return
    try:
        from PIL import Image

        with Image.open(path) as image:
            if getattr(image, "text", {}).get("Software") == PLOT_STAMP:
                return
    except Exception:  # noqa: BLE001 - not an image PIL reads: not known to be ours either
        pass
    raise ConfigError(f"The plot '{path}' already exists and is not a plot 'gmpq study' wrote, so writing the study's "
                      f"plot there would replace it. Pass {flag} another file, or move or delete '{path}' first if it "
                      "may go (a plot an earlier gmpq wrote carries no mark of it: delete it).")
