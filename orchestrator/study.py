"""Analysis of the generalization study: table, Kendall tau, reading, results.md (the plot: ``study_plot``).

The study tests the claim of GMPQ (Wang et al., ICCV 2021, "Generalizable Mixed-Precision Quantization via
Attribution Rank Preservation"): a bit policy searched on a small proxy dataset, with the quantized network keeping
the full-precision network's attribution ranking, does as well on the large target as one searched on the target.

Input: the rows of ``study.parquet`` (one per cell: method, proxy, budget, seed, target_top1,
gbitops_quantized, gbitops_total, search_seconds, proxy_top1, proxy_ard, target_ard, status, ...).

- ``aggregate(df)``: one row per (method, proxy, budget): n seeds, target top-1 mean and sample std
  (ddof=1; NaN with one seed), mean GBitOPs in both conventions, search seconds, ARDs, proxy top-1.
- ``kendall_tau(x, y)``: Kendall's tau-b, ``(C - D) / sqrt((n0 - n1)(n0 - n2))`` with n0 = n(n-1)/2
  and n1, n2 the pairs tied in x, in y (equal to scipy.stats.kendalltau's default).
- ``rank_agreement(df)``: tau between the proxy-side top-1 and the target-side top-1 of the searched
  policies, per proxy within each budget (across budgets the bits alone would order both sides),
  with the std tau would have by chance.
- ``comparisons(agg)`` + ``reading(...)``: method differences against their standard error over
  seeds (win / loss only beyond 2 SE, tie within; no verdict where a side has under ``MIN_SEEDS`` seeds, or where
  ``chance_caution`` finds the target FP model, or every cell, near chance), in words.
- ``write_results_md(...)``; the page's first line stamps it as this generator's,
  with a digest of the rest, and ``check_page_replaceable(path)`` refuses to replace a file without a matching
  stamp (hand-written, or edited since: ``docs/results.md`` collects several studies and hand-written sections).
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import atomic_write_text

from .text import fmt

__all__ = ["METHOD_ORDER", "NO_SE", "FEW_SEEDS", "NEAR_CHANCE", "MIN_SEEDS", "MIN_POLICIES", "chance_caution",
           "aggregate", "kendall_tau", "rank_agreement", "comparisons",
           "reading", "format_table", "write_results_md", "tau_null_std", "diff_se", "PAGE_STAMP",
           "page_written_unchanged", "check_page_replaceable"]

METHOD_ORDER = ("gmpq", "gmpq_fixed_p3", "eta0", "target_search", "uniform", "random")
SEARCHED = ("gmpq", "gmpq_fixed_p3", "eta0", "target_search")
NO_SE = "n/a (one seed)"    # the verdict of a difference with no standard error: a side has one seed
MIN_SEEDS = 3               # a verdict needs this many seeds on each side: 2 give an SE too rough to judge by
FEW_SEEDS = f"n/a (under {MIN_SEEDS} seeds)"    # the verdict where a side has 2 (1: ``NO_SE``)
NEAR_CHANCE = "n/a (FP model near chance)"      # every verdict where ``chance_caution`` speaks
WHY_NO_VERDICT = {NO_SE: "one seed: no standard error, so a difference cannot be told from seed noise",
                  FEW_SEEDS: f"under {MIN_SEEDS} seeds on a side: too few to tell a difference from seed noise",
                  NEAR_CHANCE: "the numbers are near chance, see the caution above the results"}
MIN_POLICIES = 3            # rank_agreement: fewer searched policies in a (proxy, budget) group give no tau
PAGE_STAMP = "<!-- written by 'gmpq study'"    # the first line of a page it wrote (``_stamp``)
# What each method's policy is (experiments/generalization.py), said under the results table of the page.
METHOD_TEXT = {
    "gmpq": "the GMPQ search on the proxy with the capacity-aware attribution power p (the paper's method)",
    "gmpq_fixed_p3": "the same search with p fixed at 3 (the official code's default)",
    "eta0": "the same search without the attribution loss (eta = 0: EdMIPS on the proxy)",
    "target_search": "the gmpq search on the whole target training set instead of a proxy (proxy column 'target')",
    "uniform": "no search: the largest uniform WbAb whose BitOPs fit the budget (it may spend less; proxy 'none')",
    "random": "no search: random per-layer bit probabilities, argmax and budget repair (a sanity floor; proxy 'none')",
}


def _completed(df: pd.DataFrame) -> pd.DataFrame:
    if "status" in df:
        df = df[df["status"].fillna("completed") == "completed"]
    return df[np.isfinite(pd.to_numeric(df["target_top1"], errors="coerce"))]


def _order(df: pd.DataFrame) -> pd.DataFrame:
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    key = df["method"].map(lambda m: rank.get(m, len(rank)))
    return df.assign(_k=key).sort_values(["budget", "_k", "proxy"]).drop(columns="_k").reset_index(drop=True)


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per (method, proxy, budget) of the completed cells."""
    d = _completed(df)
    cols = {"top1_mean": ("target_top1", "mean"), "top1_std": ("target_top1", "std"), "n": ("seed", "count"),
            "gbitops_quantized": ("gbitops_quantized", "mean"), "gbitops_total": ("gbitops_total", "mean"),
            "search_seconds": ("search_seconds", "mean"), "proxy_top1": ("proxy_top1", "mean"),
            "proxy_ard": ("proxy_ard", "mean"), "target_ard": ("target_ard", "mean")}
    cols = {k: v for k, v in cols.items() if v[0] in d}
    if d.empty:
        return pd.DataFrame(columns=["method", "proxy", "budget", *cols])
    out = d.groupby(["method", "proxy", "budget"], as_index=False).agg(**cols)
    return _order(out)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two equal-length sequences (NaN with < 2 points or a constant side)."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"kendall_tau needs equal lengths, but got {a.shape} and {b.shape}.")
    n = a.size
    if n < 2:
        return math.nan
    i, j = np.triu_indices(n, k=1)
    sx, sy = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    n0 = n * (n - 1) / 2
    n1, n2 = float((sx == 0).sum()), float((sy == 0).sum())
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float((sx * sy).sum() / denom) if denom > 0 else math.nan


def tau_null_std(n: int) -> float:
    """Std of Kendall's tau of n untied points under independence, sqrt(2(2n+5) / (9n(n-1)))."""
    return math.sqrt(2 * (2 * n + 5) / (9 * n * (n - 1))) if n >= 2 else math.nan


def rank_agreement(df: pd.DataFrame, *, min_policies: int = MIN_POLICIES) -> pd.DataFrame:
    """Kendall tau (proxy-side top-1 vs target top-1) over the searched policies of each proxy at each
    budget (methods x seeds), with the tau std expected by chance (``tau_null_std``). Proxies are not
    pooled: their proxy-side top-1 is measured on different test data. Groups of fewer than
    ``min_policies`` policies (e.g. target_search alone: one method x seeds) are left out."""
    d = _completed(df)
    d = d[d["method"].isin(SEARCHED) & np.isfinite(pd.to_numeric(d["proxy_top1"], errors="coerce"))]
    rows = []
    for (budget, proxy), g in d.groupby(["budget", "proxy"]):
        if len(g) < min_policies:
            continue
        rows.append({"budget": budget, "proxy": proxy, "n_policies": len(g), "null_std": tau_null_std(len(g)),
                     "tau": kendall_tau(g["proxy_top1"].to_numpy(), g["target_top1"].to_numpy())})
    return pd.DataFrame(rows, columns=["budget", "proxy", "n_policies", "null_std", "tau"])


def diff_se(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """Standard error of a difference of two means, sqrt(s_a^2 / n_a + s_b^2 / n_b) (NaN without stds)."""
    if not (np.isfinite(std_a) and np.isfinite(std_b)) or n_a < 2 or n_b < 2:
        return math.nan
    return float(math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b))


def chance_caution(agg: pd.DataFrame, *, fp_top1: float | None, num_classes: int | None) -> str | None:
    """A warning when the numbers are near chance, by the rule a sweep uses for a weak FP model
    (``gmpq_core.jobs.weak_below``: below halfway between chance and 100%): the target FP model's top-1 below it,
    or (its top-1 unknown) every cell's mean target top-1 below it. None when they are not, or without
    ``num_classes`` (no chance level to judge by)."""
    from gmpq_core.jobs import weak_below, weak_rule

    if not num_classes or num_classes < 2:
        return None
    rule = weak_rule(num_classes)
    tail = (f" Differences between methods then say little about the methods, so no comparison below gets a "
            f"win/loss verdict ('{NEAR_CHANCE}'); the tables keep the numbers.")
    if fp_top1 is not None and np.isfinite(fp_top1):
        if fp_top1 < weak_below(num_classes):
            return (f"the target FP model, which every policy is fine-tuned from, reaches {fp_top1:.2f}% top-1, "
                    f"{rule}: the rule a sweep uses for a weak FP model." + tail)
        return None
    best = pd.to_numeric(agg.get("top1_mean", pd.Series(dtype=float)), errors="coerce").max()
    if np.isfinite(best) and best < weak_below(num_classes):
        return (f"every cell's mean target top-1 is at most {best:.2f}%, {rule}: the rule a sweep uses for a weak "
                "FP model (this study's FP model top-1 is not known here)." + tail)
    return None


def comparisons(agg: pd.DataFrame, *, base: str = "gmpq",
                others: Iterable[str] = ("eta0", "gmpq_fixed_p3", "target_search", "uniform", "random"),
                near_chance: bool = False, min_seeds: int = MIN_SEEDS) -> pd.DataFrame:
    """``base`` minus each other method's mean target top-1, per proxy and budget, with the standard
    error of that difference over seeds (``diff_se``) and a verdict: 'win' / 'loss' when |diff| > 2 SE,
    else 'tie'; ``NO_SE`` when a side has one seed (no SE: the data cannot tell a difference from seed noise),
    ``FEW_SEEDS`` when a side has under ``min_seeds``, ``NEAR_CHANCE`` for all when ``near_chance`` (see
    ``chance_caution``). Proxy-free methods (target_search, uniform, random) are compared at every proxy."""
    rows = []
    key = {(r.method, r.proxy, r.budget): r for r in agg.itertuples(index=False)}
    for r in agg[agg["method"] == base].itertuples(index=False):
        for m in others:
            o = key.get((m, r.proxy, r.budget)) or next((v for (mm, _, bb), v in key.items()
                                                         if mm == m and bb == r.budget), None)
            if o is None:
                continue
            diff = r.top1_mean - o.top1_mean
            se = diff_se(r.top1_std, r.n, o.top1_std, o.n)
            verdict = (NEAR_CHANCE if near_chance else NO_SE if not np.isfinite(se)
                       else FEW_SEEDS if min(r.n, o.n) < min_seeds else "tie" if abs(diff) <= 2 * se
                       else "win" if diff > 0 else "loss")
            rows.append({"proxy": r.proxy, "budget": r.budget, "versus": m, "diff": diff, "se": se,
                         "verdict": verdict})
    return pd.DataFrame(rows, columns=["proxy", "budget", "versus", "diff", "se", "verdict"])


def reading(agg: pd.DataFrame, comp: pd.DataFrame, taus: pd.DataFrame) -> list[str]:
    """Sentences generated from the numbers (no judgement beyond 'larger than the seed std')."""
    out = []
    if not comp.empty:
        for m, g in comp.groupby("versus", sort=False):
            counts = g["verdict"].value_counts().to_dict()
            se = g["se"][np.isfinite(g["se"])]
            none = {v: counts[v] for v in WHY_NO_VERDICT if counts.get(v)}
            why = "; ".join(WHY_NO_VERDICT[v] for v in none)
            no_verdict = sum(none.values())
            verdicts = (f"no verdict on any of {len(g)} (proxy, budget) pairs ({why})" if no_verdict == len(g) else
                        f"{_count(counts.get('win', 0), 'win')}, {_count(counts.get('tie', 0), 'tie')}, "
                        f"{_count(counts.get('loss', 0), 'loss', 'losses')}"
                        + (f", {no_verdict} without a verdict ({why})" if no_verdict else "")
                        + f" over {len(g)} (proxy, budget) pairs")
            typical = f"{se.median():.2f} points" if len(se) else NO_SE
            out.append(f"GMPQ vs {m}: {verdicts}; mean difference {g['diff'].mean():+.2f} points (a win or loss needs "
                       f"|diff| > 2 standard errors and {MIN_SEEDS} seeds on each side; the typical SE of one "
                       f"difference is {typical}).")
    std = agg["top1_std"].dropna() if "top1_std" in agg else pd.Series(dtype=float)
    if len(std):
        out.append(f"Seed noise: the std of target top-1 over seeds is {std.median():.2f} points (median over "
                   f"rows; range {std.min():.2f}-{std.max():.2f}).")
    t = taus[np.isfinite(taus["tau"])] if not taus.empty else taus
    if len(t):
        out.append(f"Proxy-to-target ranking: Kendall tau {t['tau'].mean():+.2f} on average over "
                   f"{len(t)} (proxy, budget) groups (range {t['tau'].min():+.2f} to {t['tau'].max():+.2f}); "
                   f"by chance alone a group's tau has a std of about {t['null_std'].mean():.2f}, the mean of "
                   f"{len(t)} independent groups about {t['null_std'].mean() / math.sqrt(len(t)):.2f}.")
    if "search_seconds" in agg:
        s = agg[agg["method"].isin(SEARCHED)].groupby("method")["search_seconds"].mean()
        if len(s):
            out.append("Mean search wall-seconds: " + ", ".join(f"{m} {v:.0f} s" for m, v in s.items()) + ".")
    return out


def _count(n: int, one: str, many: str | None = None) -> str:
    """'1 win', '2 wins', '0 losses'."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def format_table(agg: pd.DataFrame) -> str:
    """Markdown table of ``aggregate``'s output."""
    head = ("| budget (avg bits) | method | proxy | seeds | target top-1 (%) | GBitOPs quantized layers | "
            "GBitOPs whole model (FP layers at 32x32 bits) | search s | proxy top-1 (%) | proxy ARD | target ARD |")
    lines = [head, "|" + "|".join(["---"] * 11) + "|"]
    for r in agg.itertuples(index=False):
        std = f" ± {r.top1_std:.2f}" if np.isfinite(r.top1_std) else ""
        lines.append(f"| {r.budget:g} | {r.method} | {r.proxy} | {r.n} | {r.top1_mean:.2f}{std} | "
                     f"{fmt(r.gbitops_quantized, '.4f')} | {fmt(r.gbitops_total, '.3f')} | "
                     f"{fmt(r.search_seconds, '.0f')} | {fmt(r.proxy_top1, '.1f')} | {fmt(r.proxy_ard, '.3f')} | "
                     f"{fmt(r.target_ard, '.3f')} |")
    return "\n".join(lines)


def _tau_table(taus: pd.DataFrame) -> list[str]:
    if taus.empty:
        return [f"No tau: it needs at least {MIN_POLICIES} searched policies with a proxy-side top-1 for one proxy at "
                f"one budget (searched methods x completed seeds), and no (proxy, budget) group of this study has "
                f"that many."]
    return ["| budget | proxy | policies | tau | std of tau by chance |", "|---|---|---|---|---|",
            *[f"| {r.budget:g} | {r.proxy} | {r.n_policies} | {fmt(r.tau, '+.2f')} | {fmt(r.null_std, '.2f')} |"
              for r in taus.itertuples()]]


def _methods_legend(agg: pd.DataFrame) -> list[str]:
    """What the page's methods are, those of its table only; every policy gets the same fine-tune."""
    shown = [m for m in METHOD_ORDER if m in set(agg["method"])] + sorted(set(agg["method"]) - set(METHOD_ORDER))
    other = "a method of another version of the study"
    return ["Methods (every policy then gets the same fine-tune from the target FP model):", "",
            *[f"- **{m}**: {METHOD_TEXT.get(m, other)}" for m in shown]]


def _comparison_table(comp: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    if comp.empty:
        why = ("no completed gmpq cell" if not (agg["method"] == "gmpq").any()
               else "no completed cell of another method at a budget of gmpq's")
        return [f"No comparison: the study has {why}."]
    return [f"diff: gmpq's mean target top-1 minus the other method's (positive: GMPQ higher). Verdict: **win** "
            f"(GMPQ higher) or **loss** (lower) when |diff| is over 2 standard errors, **tie** within, with {MIN_SEEDS} "
            "or more seeds on each side; **n/a**: no verdict, the reason in brackets. target_search, uniform and random have "
            "no proxy: their cells are compared with gmpq's at every proxy.", "",
            "| budget | proxy | versus | diff | SE of diff (seeds) | verdict (2 SE) |", "|---|---|---|---|---|---|",
            *[f"| {r.budget:g} | {r.proxy} | {r.versus} | {r.diff:+.2f} | {fmt(r.se, '.2f')} | {r.verdict} |"
              for r in comp.itertuples()]]


def write_results_md(df: pd.DataFrame, path: str | Path, *, png_path: str | Path, header: Mapping[str, Any],
                     notes: str = "", target: str = "Fashion-MNIST", fp_top1: float | None = None,
                     num_classes: int | None = None, smoke: bool = False) -> str:
    """Write the results page (table, plot, rank agreement, generated reading, hand-written notes); ``target``
    names the target dataset in the table's title. ``fp_top1`` (the target FP model's top-1) and ``num_classes``
    feed ``chance_caution``: near chance, the page says so above the results and gives no verdict; ``smoke``: the
    page says at its top that its numbers are a plumbing check."""
    from .study_plot import companion_path

    path = Path(path)
    agg = aggregate(df)
    taus = rank_agreement(df)
    caution = chance_caution(agg, fp_top1=fp_top1, num_classes=num_classes)
    comp = comparisons(agg, near_chance=caution is not None)
    png = Path(png_path)
    rel = png.name if png.parent.resolve() == path.parent.resolve() else str(png)
    companion = companion_path(png)                                # the per-budget plot, written beside it
    lines = [f"# {header.get('title', 'Generalization study')}", ""]
    if smoke:
        lines += ["> **Smoke run**: a few training steps everywhere, to check that every part of the study runs; its "
                  "numbers are a plumbing check, not a result.", ""]
    lines += [f"- **{k}**: {v}" for k, v in header.items() if k != "title"]
    lines += ["", f"## Results (target = {target} test set; mean ± std over seeds)", ""]
    if caution:
        lines += [f"> **Caution: near chance.** {caution[0].upper()}{caution[1:]}", ""]
    lines += [format_table(agg), "", *_methods_legend(agg), "",
              f"![accuracy vs BitOPs per method]({rel})", "",
              *([f"![the methods side by side at each budget]({companion.name if rel == png.name else companion})",
                 ""] if companion.is_file() else []),
              "## Proxy-side vs target-side ranking of the searched policies (Kendall tau-b)", "",
              *_tau_table(taus), "", "## GMPQ against the other methods (difference of mean target top-1, points)", "",
              *_comparison_table(comp, agg)]
    said = reading(agg, comp, taus) or ["Nothing to read: the completed cells give no comparison, seed std or tau."]
    lines += ["", "## Reading (generated from the numbers)", ""] + [f"- {s}" for s in said]
    if notes.strip():
        lines += ["", "## Reading (by hand, checked against the tables above)", "", notes.strip()]
    body = "\n".join(lines) + "\n"
    text = _stamp(body) + "\n" + body
    atomic_write_text(path, text)
    return text


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]


def _stamp(body: str) -> str:
    """The page's first line: whose it is and a digest of the rest (an HTML comment: markdown does not show it)."""
    return (f"{PAGE_STAMP} (sha256 {_digest(body)} of the lines below); it rewrites this page only while they are "
            "unchanged: put hand-written reading in a --notes file -->")


def page_written_unchanged(text: str) -> bool:
    """Whether ``text`` is a page ``write_results_md`` wrote, unchanged since (its stamp's digest matches)."""
    first, _, body = text.partition("\n")
    found = re.match(re.escape(PAGE_STAMP) + r" \(sha256 ([0-9a-f]{16}) ", first)
    return found is not None and found.group(1) == _digest(body)


def check_page_replaceable(path: str | Path, flag: str = "--report") -> None:
    """ConfigError when ``path`` holds a file that is not a page ``write_results_md`` wrote as it stands (no stamp,
    or edited since): writing the page there would lose its text. No file there: nothing to check."""
    path = Path(path)
    if not path.exists() or path.is_dir():      # (a folder: the caller's own error names it)
        return
    try:
        if page_written_unchanged(path.read_text()):
            return
    except (OSError, UnicodeDecodeError):
        pass                                    # unreadable: not known to be ours either
    raise ConfigError(f"The results page '{path}' already exists and is not a page 'gmpq study' wrote, or was edited "
                      "since (its first line's digest no longer matches), so writing the page there would replace "
                      f"its text. Pass {flag} another file (or none: the page then goes inside the study folder, "
                      f"DIR/results.md, which is always rewritten), or move or delete '{path}' first if its text may "
                      "go.")

