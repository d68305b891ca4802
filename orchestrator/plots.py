"""Headless PNG plots of a sweep: the Pareto plot and the final accuracy-vs-BitOPs plot.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed). Files are
written atomically. x axis: GBitOPs of the quantized layers (``bitops / 1e9``); y axis: top-1 (%).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from gmpq_core.fileio import atomic_write

__all__ = ["plot_pareto", "plot_final", "trial_gbitops"]

X_LABEL = "GBitOPs (quantized layers)"


def trial_gbitops(df: pd.DataFrame) -> np.ndarray:
    """Best-known GBitOPs per trial: final ``bitops``, else the last expected GBitOPs, else the budget."""
    n = len(df)
    out = np.full(n, np.nan)
    for col, scale in (("bitops", 1e-9), ("gbitops", 1.0), ("expected_gbitops", 1.0), ("budget_bitops", 1e-9)):
        if col in df:
            vals = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=float) * scale
            out = np.where(np.isnan(out), vals, out)
    return out


def _short(trial_id: object) -> str:
    t = str(trial_id)
    return t if len(t) <= 14 else "..." + t[-10:]


def _new_figure(title: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _legend_outside(ax) -> None:
    """The legend right of the axes: inside, it can hide points wherever it goes."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def _save(fig: Figure, path: str | Path) -> Path:
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight"))


def _rug(ax, x: np.ndarray, marker: str, color: str, label: str) -> None:
    """Trials without a transfer accuracy, drawn along the bottom edge at their GBitOPs."""
    x = x[~np.isnan(x)]
    if len(x):
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        ax.scatter(x, np.full(len(x), 0.03), transform=tr, marker=marker, color=color, s=36, label=label,
                   zorder=3, clip_on=False)


def plot_pareto(trials: pd.DataFrame, pareto: pd.DataFrame, path: str | Path, *,
                buckets: Sequence[float] = (), title: str | None = None) -> Path:
    """All completed trials (grey), pruned/failed (bottom rug), the front (step line), selected (highlighted)."""
    fig, ax = _new_figure(title or "Pareto front: transfer top-1 vs BitOPs")
    ax.set_ylabel("transfer top-1 (%)")
    status = trials["status"] if "status" in trials else pd.Series([], dtype=str)
    x_all = trial_gbitops(trials)
    acc = pd.to_numeric(trials.get("transfer_top1", pd.Series(np.nan, index=trials.index)), errors="coerce")
    done = (status == "completed").to_numpy() & acc.notna().to_numpy()
    ax.scatter(x_all[done], acc.to_numpy()[done], color="0.6", s=22, label=f"completed trials ({int(done.sum())})",
               zorder=2)
    ax.margins(y=0.12)                               # room for the pruned/failed rug at the bottom
    pruned = (status == "pruned").to_numpy()
    failed = (status == "failed").to_numpy()
    _rug(ax, x_all[pruned], "x", "tab:orange", f"pruned ({int(pruned.sum())}, at target GBitOPs)")
    _rug(ax, x_all[failed], "v", "tab:red", f"failed ({int(failed.sum())})")
    if not done.any():                               # the rug (axes coordinates) sets no limits of its own
        xs = x_all[(pruned | failed) & ~np.isnan(x_all)]
        if len(xs):
            lo, hi = float(xs.min()), float(xs.max())
            pad = 0.1 * (hi - lo) if hi > lo else 0.1 * max(abs(hi), 1e-3)
            ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(0, 100)
        ax.text(0.5, 0.5, "no completed trial: nothing on the front", transform=ax.transAxes, ha="center",
                va="center", fontsize=10, color="0.4")
    if len(pareto):
        fx = pareto["bitops"].to_numpy(dtype=float) / 1e9
        fy = pareto["transfer_top1"].to_numpy(dtype=float)
        order = np.argsort(fx, kind="stable")
        ax.step(fx[order], fy[order], where="post", color="tab:blue", lw=1.5, label=f"Pareto front ({len(pareto)})",
                zorder=3)
        ax.scatter(fx, fy, color="tab:blue", s=28, zorder=4)
        sel = pareto["selected"].to_numpy(dtype=bool) if "selected" in pareto else np.zeros(len(pareto), bool)
        if sel.any():
            ax.scatter(fx[sel], fy[sel], s=150, facecolors="none", edgecolors="tab:green", linewidths=2.0,
                       label=f"selected ({int(sel.sum())})", zorder=5)
            for x, y, t in zip(fx[sel], fy[sel], pareto["trial_id"].to_numpy()[sel]):
                ax.annotate(_short(t), (x, y), textcoords="offset points", xytext=(6, 6), fontsize=7)
    if buckets and len(x_all) and not np.isnan(x_all).all():
        ax.text(0.99, 0.01, "budget buckets (avg bits): " + ", ".join(f"{b:g}" for b in buckets),
                transform=ax.transAxes, ha="right", va="bottom", fontsize=7, color="0.4")
    _legend_outside(ax)                              # lower right is where dominated trials lie
    return _save(fig, path)


def plot_final(final: pd.DataFrame, trials: pd.DataFrame | None, path: str | Path, *,
               title: str | None = None) -> Path:
    """Fine-tuned top-1 of the selected policies vs GBitOPs, with each one's transfer-check accuracy."""
    fig, ax = _new_figure(title or "Final fine-tune: top-1 vs BitOPs")
    if trials is not None and len(trials) and "transfer_top1" in trials:
        done = (trials["status"] == "completed") & trials["transfer_top1"].notna() & trials["bitops"].notna()
        ax.scatter(trials.loc[done, "bitops"].to_numpy(dtype=float) / 1e9,
                   trials.loc[done, "transfer_top1"].to_numpy(dtype=float), color="0.7", s=18,
                   label="sweep trials (transfer check)", zorder=2)
    if len(final):
        x = final["bitops"].to_numpy(dtype=float) / 1e9
        y = final["final_top1"].to_numpy(dtype=float)
        order = np.argsort(x, kind="stable")
        ax.plot(x[order], y[order], "-*", color="tab:purple", ms=12, label="fine-tuned (full target data)", zorder=4)
        if "transfer_top1" in final:
            t = final["transfer_top1"].to_numpy(dtype=float)
            ax.plot(x, t, "_", color="tab:purple", ms=12, alpha=0.6, zorder=3)   # the arrows' starts, in the limits
            for xi, t0, t1 in zip(x, t, y):
                if not math.isnan(t0):
                    ax.annotate("", xy=(xi, t1), xytext=(xi, t0),
                                arrowprops=dict(arrowstyle="->", color="tab:purple", alpha=0.5))
        ax.margins(x=0.08)
        lo, hi = ax.get_xlim()
        for xi, yi, t in zip(x, y, final["trial_id"].to_numpy()):
            right = hi > lo and (xi - lo) / (hi - lo) > 0.75   # near the right edge: the label goes left
            ax.annotate(f"{_short(t)}: {yi:.2f}%", (xi, yi), textcoords="offset points", fontsize=7,
                        xytext=(-6, -10) if right else (6, -10), ha="right" if right else "left")
    _legend_outside(ax)
    return _save(fig, path)
