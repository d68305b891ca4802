"""Headless PNG plots of a sweep: the Pareto plot, the selected policies' per-layer bits and the final
accuracy-vs-BitOPs plot.

Uses matplotlib's object API with the Agg canvas (no pyplot state, no display needed). Files are
written atomically. x axis: GBitOPs of the quantized layers (``bitops / 1e9``); y axis: top-1 (%).
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator
from matplotlib.transforms import Bbox, blended_transform_factory

from gmpq_core.fileio import atomic_write

__all__ = ["plot_pareto", "plot_final", "plot_policies", "policy_rows", "trial_gbitops", "pareto_figure",
           "final_figure"]

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
    """A trial id as the plots label it: whole up to 14 characters, else its start (``gmpq pareto --pick`` takes a
    unique prefix)."""
    t = str(trial_id)
    return t if len(t) <= 14 else t[:11] + "..."


def _new_figure(title: str) -> tuple[Figure, object]:
    """A fixed-size figure with one axes. Constrained layout: the legend and captions outside the axes get their
    own room instead of squeezing the axes (as tight_layout + a long legend at the right did)."""
    fig = Figure(figsize=(8.0, 5.6), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel("top-1 (%)")
    fig.suptitle(title, fontsize=12)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _legend_outside(ax) -> None:
    """The legend right of the axes (short labels only): inside, it can hide points wherever it goes."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8)


def _legend_below(fig: Figure, ax) -> None:
    """The legend under the axes (and their x label), in columns: room for its labels without narrowing the axes."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8,
                   frameon=False)


class _StepDecimals(Formatter):
    """Tick labels with the fewest decimals that tell the ticks apart exactly (no offset text, no "0.30.4")."""

    def __init__(self) -> None:
        self._ticks: list[float] = []

    def set_locs(self, locs) -> None:          # (Formatter.locs is deprecated in Matplotlib 3.11: kept here)
        self._ticks = [float(v) for v in locs]
        super().set_locs(locs)

    def __call__(self, x, pos=None):
        locs = np.asarray(self._ticks if self._ticks else [x], dtype=float)
        span = float(np.ptp(locs)) if len(locs) > 1 else abs(float(x))
        tol = max(span, 1e-12) * 1e-6
        digits = next((d for d in range(10) if np.all(np.abs(np.round(locs, d) - locs) <= tol)), 10)
        return f"{x:.{digits}f}"


def _gbitops_axis(ax) -> None:
    """Few x ticks (about 5, on round steps) with enough digits, however close the GBitOPs are."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10], min_n_ticks=3))
    ax.xaxis.set_major_formatter(_StepDecimals())


def _caption(ax, text: str, width: int = 100) -> None:
    """A long description as a small wrapped subtitle over the axes (rather than a long legend label)."""
    if text:
        ax.set_title("\n".join(textwrap.wrap(text, width)), fontsize=8, color="0.3", loc="left")


def _overlap(a: Bbox, b: Bbox) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


# label offsets (points) tried in turn: right/left of the point, below/above it, then further out
_LABEL_SPOTS = [(dx, dy, ha, va) for level in range(8)
                for dy, va in ((-(8 + 11 * level), "top"), (8 + 11 * level, "bottom"))
                for dx, ha in ((6, "left"), (-6, "right"))]


def _place_labels(ax, xy: np.ndarray, texts: Sequence[str], *, obstacles: Sequence[Bbox] = (),
                  fontsize: float = 7) -> list:
    """One annotation per point (``xy``: data coordinates), each put at the first of ``_LABEL_SPOTS`` where it
    overlaps no label placed before, no obstacle (display boxes: markers, arrows) and stays inside the axes; else
    at the least bad one. Call it once the layout is final (after a draw); the labels take no part in the layout,
    so they do not move it afterwards."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    placed: list[Bbox] = []
    anns = []
    for i in (np.lexsort((xy[:, 1], xy[:, 0])) if len(xy) else []):
        ann = ax.annotate(texts[i], tuple(xy[i]), textcoords="offset points", xytext=(6, -8), fontsize=fontsize,
                          ha="left", va="top", zorder=6)
        ann.set_in_layout(False)
        best, best_score = _LABEL_SPOTS[0], math.inf
        for spot in _LABEL_SPOTS:
            dx, dy, ha, va = spot
            ann.set_position((dx, dy))
            ann.set_ha(ha)
            ann.set_va(va)
            box = ann.get_window_extent(renderer)
            outside = box.width * box.height - _overlap(box, axbox)
            score = (10.0 * sum(_overlap(box, b) for b in placed) + sum(_overlap(box, b) for b in obstacles)
                     + 5.0 * outside)
            if score < best_score:
                best, best_score = spot, score
            if score == 0.0:
                break
        dx, dy, ha, va = best
        ann.set_position((dx, dy))
        ann.set_ha(ha)
        ann.set_va(va)
        placed.append(ann.get_window_extent(renderer))
        anns.append(ann)
    return anns


def _marker_boxes(ax, xy: np.ndarray, size_pt: float) -> list[Bbox]:
    """Display boxes of markers ``size_pt`` points across at ``xy`` (data coordinates)."""
    r = size_pt / 2 * ax.figure.dpi / 72.0
    return [Bbox.from_bounds(px - r, py - r, 2 * r, 2 * r) for px, py in ax.transData.transform(xy)] if len(xy) else []


def _save(fig: Figure, path: str | Path) -> Path:
    if fig.get_layout_engine() is None:          # (constrained-layout figures lay themselves out)
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
                buckets: Sequence[float] = (), title: str | None = None, max_gbitops: float | None = None) -> Path:
    """All completed trials (grey), pruned/failed (bottom rug), the front (step line), selected (highlighted),
    the BitOPs limit of the selection (``max_gbitops``, GBitOPs: a dashed vertical line) when one applied."""
    return _save(pareto_figure(trials, pareto, buckets=buckets, title=title, max_gbitops=max_gbitops), path)


def _limit_line(ax, limit: float, x: np.ndarray) -> None:
    """The selection's BitOPs limit as a labelled dashed vertical line; far right of every point (every policy
    fits), a note at the right edge instead, so that the points keep the width of the plot."""
    x = x[~np.isnan(x)]
    hi, span = (float(x.max()), float(np.ptp(x))) if len(x) else (limit, 0.0)
    label = f"limit {limit:g} GBitOPs"
    if limit <= hi + max(0.25 * span, 0.05 * abs(hi)):
        ax.axvline(limit, color="tab:red", ls="--", lw=1.2, label=label, zorder=1)
    else:
        ax.text(0.99, 0.97, f"{label} (beyond the plot: every policy fits)", transform=ax.transAxes, ha="right",
                va="top", fontsize=7, color="tab:red")


def _selected_label(pareto: pd.DataFrame, sel: np.ndarray) -> str:
    """The legend's words for the highlighted policies: ``picked by hand`` when every one was."""
    from .pareto_pick import PICK_REASON

    reasons = pareto["selection_reason"].to_numpy()[sel] if "selection_reason" in pareto else []
    picked = len(reasons) and all(str(r) == PICK_REASON for r in reasons)
    return f"{'picked by hand' if picked else 'selected'} ({int(sel.sum())})"


def pareto_figure(trials: pd.DataFrame, pareto: pd.DataFrame, *, buckets: Sequence[float] = (),
                  title: str | None = None, max_gbitops: float | None = None) -> Figure:
    """The figure ``plot_pareto`` writes."""
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
    _gbitops_axis(ax)
    labels = None
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
                       label=_selected_label(pareto, sel), zorder=5)
        # every front point named (what gmpq pareto --pick takes), not only the selected ones
        labels = (np.column_stack([fx, fy]), [_short(t) for t in pareto["trial_id"].to_numpy()])
    if max_gbitops is not None:
        _limit_line(ax, float(max_gbitops), x_all[done])
    if buckets and len(x_all) and not np.isnan(x_all).all():
        ax.text(1.02, 0.0, "budget buckets (avg bits):\n" + ", ".join(f"{b:g}" for b in buckets),
                transform=ax.transAxes, ha="left", va="bottom", fontsize=7, color="0.4")   # beside the rug: not on it
    _legend_outside(ax)                              # lower right is where dominated trials lie (short labels)
    if labels is not None:                           # once laid out: each where it overlaps no label or marker
        fig.canvas.draw()
        _place_labels(ax, labels[0], labels[1], obstacles=_marker_boxes(ax, np.column_stack([fx, fy]), 13.0))
    return fig


def plot_final(final: pd.DataFrame, trials: pd.DataFrame | None, path: str | Path, *,
               title: str | None = None) -> Path:
    """Fine-tuned top-1 of the selected policies vs GBitOPs, with each one's transfer-check accuracy."""
    return _save(final_figure(final, trials, title=title), path)


def final_figure(final: pd.DataFrame, trials: pd.DataFrame | None, *, title: str | None = None) -> Figure:
    """The figure ``plot_final`` writes. What the fine-tunes trained on (long when capped) is a wrapped caption
    over the axes, the legend (short labels) is under them, and each point's ``id: top-1`` label goes where it
    overlaps no other label, marker or arrow."""
    fig, ax = _new_figure(title or "Final fine-tune: top-1 vs BitOPs")
    if trials is not None and len(trials) and "transfer_top1" in trials:
        done = (trials["status"] == "completed") & trials["transfer_top1"].notna() & trials["bitops"].notna()
        ax.scatter(trials.loc[done, "bitops"].to_numpy(dtype=float) / 1e9,
                   trials.loc[done, "transfer_top1"].to_numpy(dtype=float), color="0.7", s=18,
                   label="sweep trials (transfer check)", zorder=2)
    _gbitops_axis(ax)
    if not len(final):
        _legend_below(fig, ax)
        return fig
    x = final["bitops"].to_numpy(dtype=float) / 1e9
    y = final["final_top1"].to_numpy(dtype=float)
    order = np.argsort(x, kind="stable")
    from .final_results import trained_on_text    # "full target data" only when it was: else the cap / subset

    trained = "; ".join(dict.fromkeys(trained_on_text(r) for r in final.to_dict("records")))
    _caption(ax, f"Fine-tuned on {trained}.")
    ax.plot(x[order], y[order], "-*", color="tab:purple", ms=12, label="fine-tuned", zorder=4)
    t = final["transfer_top1"].to_numpy(dtype=float) if "transfer_top1" in final else np.full(len(x), np.nan)
    if not np.isnan(t).all():
        ax.plot(x, t, "_", color="tab:purple", ms=12, alpha=0.6, zorder=3,     # the arrows' starts, in the limits
                label="its transfer check (arrow: to fine-tuned)")
        for xi, t0, t1 in zip(x, t, y):
            if not math.isnan(t0):
                ax.annotate("", xy=(xi, t1), xytext=(xi, t0),
                            arrowprops=dict(arrowstyle="->", color="tab:purple", alpha=0.5))
    ax.margins(x=0.08, y=0.12)
    _legend_below(fig, ax)
    fig.canvas.draw()                                # the final layout, before measuring where the labels fit
    xy = np.column_stack([x, y])
    obstacles = _marker_boxes(ax, xy, 12.0)
    for (px, p1), (_, p0) in zip(ax.transData.transform(xy), ax.transData.transform(np.column_stack([x, t]))):
        if not math.isnan(p0):
            obstacles.append(Bbox.from_extents(px - 3, min(p0, p1), px + 3, max(p0, p1)))
    _place_labels(ax, xy, [f"{_short(tid)}: {yi:.2f}%" for tid, yi in zip(final["trial_id"].to_numpy(), y)],
                  obstacles=obstacles)
    return fig


MAX_POLICY_PANELS = 8        # a front longer than this without a selection: the first 8 by BitOPs


def _policy_layers(row: dict) -> list[dict]:
    """A front row's layers in network order ([{name, macs, w_bits, a_bits}, ...]); [] without ``layers_json``."""
    import json

    try:
        layers = json.loads(row.get("layers_json") or "[]")
    except (TypeError, ValueError):
        return []
    return [d for d in layers if isinstance(d, dict) and {"name", "macs", "w_bits", "a_bits"} <= d.keys()]


def policy_rows(front: pd.DataFrame) -> list[dict]:
    """The front rows ``plot_policies`` draws: the selected policies, else the whole front (at most
    ``MAX_POLICY_PANELS``), cheapest first; rows without layers are left out."""
    if not len(front):
        return []
    rows = front.to_dict("records")
    chosen = [r for r in rows if r.get("selected")] or rows[:MAX_POLICY_PANELS]
    chosen = [r for r in chosen if _policy_layers(r)]
    return sorted(chosen, key=lambda r: (float(r.get("bitops") or 0), str(r["trial_id"])))


def _policy_title(row: dict, layers: list[dict]) -> str:
    macs = sum(int(d["macs"]) for d in layers) or 1
    avg = [sum(int(d["macs"]) * int(d[k]) for d in layers) / macs for k in ("w_bits", "a_bits")]
    acc = pd.to_numeric(pd.Series([row.get("transfer_top1")]), errors="coerce").iloc[0]
    acc_text = "no transfer top-1" if math.isnan(acc) else f"transfer top-1 {acc:.2f}%"
    return (f"{_short(row['trial_id'])}: {acc_text}, {float(row.get('bitops') or 0) / 1e9:.4f} GBitOPs, "
            f"MAC-weighted bits w {avg[0]:.2f} / a {avg[1]:.2f}")


def plot_policies(front: pd.DataFrame, path: str | Path, *, title: str | None = None) -> Path:
    """Per-layer bit-widths of the selected policies (``policy_rows``): one panel per policy, weight and
    activation bits as bars in network order, each layer's share of the quantized layers' MACs as a line
    (the cost a bit saves there)."""
    rows = [(row, _policy_layers(row)) for row in policy_rows(front)]      # each row's layers_json parsed once
    n_layers = max((len(layers) for _, layers in rows), default=0)
    width = max(7.5, 2.0 + 0.28 * n_layers)
    fig = Figure(figsize=(width, 1.2 + 2.6 * max(len(rows), 1)), dpi=120)
    FigureCanvasAgg(fig)
    fig.suptitle(title or "Per-layer bit-widths of the selected policies", fontsize=11)
    if not rows:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no policy on the front (no completed trial with per-layer bits)", ha="center",
                va="center", fontsize=10, color="0.4", transform=ax.transAxes)
        return _save(fig, path)
    for k, (row, layers) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, k + 1)
        x = np.arange(len(layers))
        w = np.array([int(d["w_bits"]) for d in layers])
        a = np.array([int(d["a_bits"]) for d in layers])
        ax.bar(x - 0.2, w, width=0.4, color="tab:blue", label="weight bits", zorder=2)
        ax.bar(x + 0.2, a, width=0.4, color="tab:orange", label="activation bits", zorder=2)
        ax.set_ylim(0, max(8, int(max(w.max(), a.max()))) + 0.5)
        ax.set_ylabel("bits")
        ax.grid(True, axis="y", alpha=0.3, zorder=0)
        ax.set_title(_policy_title(row, layers), fontsize=9)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        share = ax.twinx()
        macs = np.array([int(d["macs"]) for d in layers], dtype=float)
        share.plot(x, 100.0 * macs / max(macs.sum(), 1.0), "o--", color="0.3", ms=3, lw=1, alpha=0.6,
                   label="MACs (% of total)")
        share.set_ylim(0, None)
        share.set_ylabel("MACs (%)", fontsize=8, color="0.35")
        ax.set_xticks(x)
        ax.set_xticklabels([str(d["name"]) for d in layers] if k == len(rows) - 1 else [], rotation=90, fontsize=7)
        if k == 0:
            handles = ax.get_legend_handles_labels()
            extra = share.get_legend_handles_labels()
            ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper left", bbox_to_anchor=(1.08, 1.0),
                      borderaxespad=0.0, fontsize=8)
    return _save(fig, path)
