"""Policies picked by hand from the Pareto front (``gmpq pareto DIR --pick ID[,ID...]``) and a BitOPs limit on the
automatic selection (``--max-gbitops G``, ``finetune.max_gbitops``): on hand-made tables and a tiny sweep folder
(no Ray); every refusal leaves pareto.parquet, the plots and policies/ as they were."""
from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import yaml

from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.pareto import read_pareto, select_policies, write_pareto
from orchestrator.results import trial_row, write_results

# (trial_id, transfer_top1, bitops, status): the front is 5e1ec7ed, 0f9336b8, a1fa4126 (by GBitOPs)
POINTS = [("5e1ec7ed", 76.00, 250_000_000, "completed"), ("0f9336b8", 78.15, 356_450_304, "completed"),
          ("0250109e", 78.10, 498_548_736, "completed"), ("a1fa4126", 79.85, 460_314_624, "completed"),
          ("a1c0ffee", 79.30, 475_066_368, "completed"), ("e61a2ec8", 79.20, 575_619_072, "completed"),
          ("b0a7f00d", None, 200_000_000, "pruned")]
FRONT = ["5e1ec7ed", "0f9336b8", "a1fa4126"]
POLICY = json.dumps({"version": 1, "fingerprint": None, "layers": {"l1": {"w_bits": 4, "a_bits": 4}}, "meta": {}})


def frame(points=POINTS):
    return pd.DataFrame({"trial_id": [p[0] for p in points], "transfer_top1": [p[1] for p in points],
                         "bitops": [p[2] for p in points], "status": [p[3] for p in points],
                         "budget_bucket": [0] * len(points)}).astype({"transfer_top1": float})


def chosen(sel: pd.DataFrame) -> dict[str, str]:
    return dict(zip(sel.loc[sel["selected"], "trial_id"], sel.loc[sel["selected"], "selection_reason"]))


def make_sweep(d, points=POINTS, finetune: str = "{top_k: 2}"):
    d.mkdir(parents=True, exist_ok=True)
    rows = []
    for tid, acc, cost, status in points:
        layers = [{"name": "l1", "macs": 1000, "w_bits": 4, "a_bits": 4}]
        res = {"transfer_top1": acc, "bitops": cost, "gbitops": cost / 1e9, "proxy_top1": acc - 1,
               "budget_avg_bits": 3.0, "budget_bucket": 0, "layers_json": json.dumps(layers),
               "policy_json": POLICY} if acc is not None else {"proxy_top1": 30.0, "expected_gbitops": cost / 1e9}
        rows.append(trial_row(trial_id=tid, config={"eta": 40.0}, last_result=res, status=status))
    write_results(d, rows, [])
    (d / "sweep_config.yaml").write_text(f"name: tiny\nbudget_buckets: [3.25, 4.25]\nfinetune: {finetune}\n")
    return d


def snapshot(d) -> dict[str, bytes]:
    files = [d / "pareto.parquet", d / "pareto.png", d / "policies.png", *sorted((d / "policies").glob("*"))]
    return {str(p.relative_to(d)): p.read_bytes() for p in files if p.is_file()}


# --- the limit ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("limit", [0.3, 0.4, 0.47, 10.0])
def test_a_limit_selects_as_if_the_front_held_only_the_policies_within_it(limit):
    df = frame()
    sel = select_policies(df, 2, max_gbitops=limit)
    assert list(sel["trial_id"]) == FRONT                                   # the front stays whole
    # reference: the selection among the trials within the limit (their front is the front's part within it)
    ref = select_policies(df[df["bitops"] <= limit * 1e9], 2)
    assert chosen(sel).keys() == chosen(ref).keys()
    for tid, reason in chosen(sel).items():
        assert reason == f"{chosen(ref)[tid]}; within the {limit:g} GBitOPs limit"
    over = sel[sel["bitops"] > limit * 1e9]
    assert not over["selected"].any() and (over["selection_reason"] == f"over the {limit:g} GBitOPs limit").all()


def test_a_limit_no_front_policy_fits_is_refused_naming_it_the_cheapest_and_the_fix():
    with pytest.raises(ConfigError) as e:
        select_policies(frame(), 2, max_gbitops=0.2)
    text = str(e.value)
    assert "limit of 0.2 GBitOPs" in text and "5e1ec7ed (76.00%, 0.2500 GBitOPs)" in text   # (not the pruned one)
    assert "Raise the limit to 0.2500 or more" in text and "sweep lower budgets" in text


@pytest.mark.parametrize("bad", [0, -1.5, "0.4", True, float("nan"), float("inf")])
def test_a_bad_limit_is_a_config_error_echoing_it(bad):
    with pytest.raises(ConfigError, match=r"max_gbitops must be a number > 0 .* or null for no limit, but got"):
        select_policies(frame(), 2, max_gbitops=bad)


@pytest.mark.parametrize("bad, shown", [(0, "max_gbitops=0."), (-2, "max_gbitops=-2."), ("0.4", "max_gbitops='0.4' "
                                        "(a quoted number is text"), ([1], "max_gbitops=[1].")])
def test_the_config_key_is_checked_as_the_config_loads(bad, shown):
    from orchestrator.sweep_config import load_sweep_config

    assert load_sweep_config(None, preset="demo").finetune.max_gbitops is None
    assert load_sweep_config(None, preset="demo", overrides={"finetune.max_gbitops": 0.4}).finetune.max_gbitops == 0.4
    with pytest.raises(ConfigError) as e:
        load_sweep_config(None, preset="demo", overrides={"finetune.max_gbitops": bad})
    assert "finetune.max_gbitops must be a number > 0" in str(e.value) and shown in str(e.value)


def test_write_pareto_takes_the_limit_from_the_config_and_a_given_one_or_none_overrides_it(tmp_path):
    """gmpq finetune --sweep DIR --top-k K and gmpq run select through write_pareto with the config's limit."""
    d = make_sweep(tmp_path / "s", finetune="{top_k: 3, max_gbitops: 0.4}")
    df = write_pareto(d, 3)
    assert set(df.loc[df["selected"], "trial_id"]) == {"5e1ec7ed", "0f9336b8"}
    assert list(read_pareto(d)["trial_id"]) == FRONT
    assert set(write_pareto(d, 3, max_gbitops=0.3).query("selected")["trial_id"]) == {"5e1ec7ed"}
    assert set(write_pareto(d, 3, max_gbitops="none").query("selected")["trial_id"]) == set(FRONT)
    (d / "sweep_config.yaml").write_text("finetune: {top_k: 2, max_gbitops: '0.4'}\n")       # edited by hand
    with pytest.raises(ConfigError, match=r"finetune.max_gbitops must be a number > 0 .* but got "
                                          r"finetune.max_gbitops='0.4' in .*sweep_config.yaml \(a quoted number"):
        write_pareto(d)


# --- picks -------------------------------------------------------------------------------------------------------

def test_picks_select_exactly_those_by_id_or_prefix_whatever_top_k():
    sel = select_policies(frame(), 1, picks=["A1FA", "5e1ec7ed"])
    assert chosen(sel) == {"5e1ec7ed": "picked by hand", "a1fa4126": "picked by hand"}
    assert list(sel["trial_id"]) == FRONT and (sel.loc[~sel["selected"], "selection_reason"] == "").all()


@pytest.mark.parametrize("picks, words", [
    (["ff"], ["--pick ff: no trial of the sweep has an id starting with 'ff' (7 trials)"]),
    (["a1"], ["--pick a1: the prefix 'a1' matches 2 trials", "a1c0ffee, a1fa4126", "Give more of the id"]),
    (["a1c0"], ["--pick a1c0: trial a1c0ffee (79.30%, 0.4751 GBitOPs) is not on the Pareto front: "
                "a1fa4126 (79.85%, 0.4603 GBitOPs) is at least as accurate for at most its BitOPs"]),
    (["b0a7"], ["--pick b0a7: trial b0a7f00d did not complete (status pruned)"]),
    (["a1fa", "A1FA4126"], ["--pick names trial a1fa4126 twice (a1fa, A1FA4126): give each trial once."]),
    ([], ["--pick names no trial"]),
])
def test_a_bad_pick_is_refused_naming_it_and_listing_the_front(picks, words):
    with pytest.raises(ConfigError) as e:
        select_policies(frame(), 2, picks=picks)
    text = str(e.value)
    assert all(w in text for w in words), text
    if "twice" not in text:
        assert ("The front, by GBitOPs: 5e1ec7ed (76.00%, 0.2500 GBitOPs), 0f9336b8 (78.15%, 0.3565 GBitOPs), "
                "a1fa4126 (79.85%, 0.4603 GBitOPs). Pick among those") in text


def test_picks_and_a_limit_together_are_refused():
    with pytest.raises(ConfigError, match=r"max_gbitops=0.4\) does not apply to them"):
        select_policies(frame(), 2, picks=["a1fa"], max_gbitops=0.4)


# --- the command -------------------------------------------------------------------------------------------------

def test_gmpq_pareto_pick_writes_the_pick_and_says_what_to_run_next(tmp_path, capsys):
    d = make_sweep(tmp_path / "s", finetune="{top_k: 2, max_gbitops: 0.3}")       # the config's limit: not for picks
    assert main(["pareto", str(d), "--pick", "a1fa,0f93", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    back = read_pareto(d)
    assert set(back.loc[back["selected"], "trial_id"]) == {"a1fa4126", "0f9336b8"}
    assert set(back.loc[back["selected"], "selection_reason"]) == {"picked by hand"}
    assert "3 non-dominated, 2 picked by hand (*)" in out
    assert (f"Next: gmpq finetune --sweep {d} fine-tunes these 2 selected policies (pareto.parquet's selection: your "
            f"pick carries to it; 'gmpq pareto {d}' without --pick selects automatically again") in out
    assert main(["pareto", str(d), "--no-mlflow"]) == 0                        # automatic again, with the limit
    assert set(read_pareto(d).query("selected")["trial_id"]) == {"5e1ec7ed"}


def test_gmpq_pareto_max_gbitops_limits_the_selection_and_overrides_the_config(tmp_path, capsys):
    d = make_sweep(tmp_path / "s", finetune="{top_k: 3, max_gbitops: 0.3}")
    assert main(["pareto", str(d), "--max-gbitops", "0.4", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    back = read_pareto(d)
    assert set(back.loc[back["selected"], "trial_id"]) == {"5e1ec7ed", "0f9336b8"}
    assert list(back["trial_id"]) == FRONT
    assert "3 non-dominated, 2 within the 0.4 GBitOPs limit, 2 selected (*)" in out
    assert "(2 selected of the 3 asked for (top-k): only 2 of the 3 on the front within the 0.4 GBitOPs limit.)" in out
    assert "would select again with the sweep config's finetune.max_gbitops (0.3), not --max-gbitops 0.4" in out
    assert main(["pareto", str(d), "--max-gbitops", "none", "--no-mlflow"]) == 0
    assert read_pareto(d)["selected"].sum() == 3


@pytest.mark.parametrize("argv, words", [
    (["--pick", "ff"], ["--pick ff", "no trial", "The front, by GBitOPs:", "Pick among those"]),
    (["--pick", "a1"], ["--pick a1", "matches 2 trials", "a1c0ffee, a1fa4126", "Give more of the id"]),
    (["--pick", "e61a"], ["--pick e61a: trial e61a2ec8", "not on the Pareto front", "a1fa4126 (79.85%, 0.4603 GBitOPs) "
                                                                                     "is at least as accurate"]),
    (["--pick", "b0a7f00d"], ["--pick b0a7f00d: trial b0a7f00d did not complete (status pruned)"]),
    (["--pick", "a1fa", "--top-k", "2"], ["--pick selects exactly the trials it names (a1fa), so --top-k 2",
                                          "drop --top-k to select your pick, or drop --pick"]),
    (["--pick", "a1fa", "--max-gbitops", "0.4"], ["so --max-gbitops 0.4 does not apply", "drop --max-gbitops"]),
    (["--pick", ""], ["but got --pick '', which is empty", "leave --pick out"]),
    (["--pick", "a1fa,"], ["but got --pick 'a1fa,', with an empty id in it"]),
    (["--pick", "a1fa", "--pick", "a1fa4126"], ["--pick names trial a1fa4126 twice (a1fa, a1fa4126)"]),
    (["--max-gbitops", "0.2"], ["limit of 0.2 GBitOPs", "cheapest on it is trial 5e1ec7ed (76.00%, 0.2500 GBitOPs)",
                                "Raise the limit to 0.2500 or more", "--max-gbitops G", "sweep lower budgets"]),
    (["--max-gbitops", "0"], ["--max-gbitops takes the most GBitOPs", "but got --max-gbitops 0."]),
    (["--max-gbitops", "abc"], ["such as --max-gbitops 0.4", "but got --max-gbitops abc."]),
])
def test_every_refusal_names_the_value_and_the_fix_and_writes_nothing(tmp_path, capsys, argv, words):
    d = make_sweep(tmp_path / "s")
    assert main(["pareto", str(d), "--no-mlflow"]) == 0
    before = snapshot(d)
    capsys.readouterr()
    assert main(["pareto", str(d), "--no-mlflow", *argv]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err and err.count("gmpq: error:") == 1
    assert all(w in err for w in words), err
    assert snapshot(d) == before and len(before) >= 4


def test_the_plot_draws_the_limit_and_names_a_pick(tmp_path, monkeypatch):
    from orchestrator import plots

    seen = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: seen.append(fig) or path)
    d = make_sweep(tmp_path / "s")
    write_pareto(d, 2, max_gbitops=0.4)
    write_pareto(d, picks=["a1fa"])
    limited, picked = (fig.axes[0] for fig in seen[0::2])        # (pareto.png; then policies.png)
    labels = limited.get_legend_handles_labels()[1]
    assert "limit 0.4 GBitOPs" in labels and "selected (2)" in labels
    line = [ln for ln in limited.get_lines() if ln.get_label() == "limit 0.4 GBitOPs"][0]
    assert np.allclose(line.get_xdata(), 0.4) and line.get_linestyle() == "--"
    assert "picked by hand (1)" in picked.get_legend_handles_labels()[1]
    assert not any(lab.startswith("limit") for lab in picked.get_legend_handles_labels()[1])
    plt.close("all")


def test_the_final_stage_fine_tunes_exactly_the_picked_trials(tmp_path, monkeypatch):
    """gmpq finetune --sweep DIR (no --top-k) reads pareto.parquet: the jobs it builds are the pick's, no more."""
    from final_sweep import make_sweep as make_final_sweep
    from orchestrator import final_stage

    d = tmp_path / "sweep"
    make_final_sweep(d, bits=((3, 4), (4, 4), (6, 6)))        # t1, t2, t3: all on the front, top_k 3
    assert main(["pareto", str(d), "--pick", "t3,t1", "--no-mlflow"]) == 0
    built: list[str] = []

    class Built(Exception):
        pass

    def stop(jobs, *a, **k):
        raise Built

    monkeypatch.setattr(final_stage, "target_fp_checkpoint", lambda *a, **k: tmp_path / "fp.pt")
    monkeypatch.setattr(final_stage, "final_job", lambda cfg, row, *a, **k: built.append(row["trial_id"]))
    monkeypatch.setattr(final_stage, "check_not_shorter", stop)
    with pytest.raises(Built):
        final_stage.finetune_selected(d)
    assert sorted(built) == ["t1", "t3"]
    said: list[str] = []                                     # --top-k selects again, within the config's limit
    cfg = yaml.safe_load((d / "sweep_config.yaml").read_text())
    cfg["finetune"]["max_gbitops"] = float(read_pareto(d)["bitops"].iloc[1]) / 1e9 * 1.0001      # t1 and t2 fit
    (d / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    built.clear()
    with pytest.raises(Built):
        final_stage.finetune_selected(d, top_k=3, say=said.append)
    assert sorted(built) == ["t1", "t2"]
    assert any("2 selected of the 3 asked for (--top-k): only 2 of the 3 on the Pareto front within the" in s
               for s in said), said


def test_a_limit_typed_from_the_table_takes_the_policy_shown_at_it():
    """a1fa4126 costs 0.460314624 GBitOPs, shown as 0.4603: --max-gbitops 0.4603 takes it (the exact value used to
    put it 'over the 0.4603 GBitOPs limit' beside a table that showed it at 0.4603); 0.4602 does not."""
    assert "a1fa4126" in chosen(select_policies(frame(), 3, max_gbitops=0.4603))
    sel = select_policies(frame(), 3, max_gbitops=0.4602)
    assert "a1fa4126" not in chosen(sel)
    assert sel.set_index("trial_id").loc["a1fa4126", "selection_reason"] == "over the 0.4602 GBitOPs limit"


def test_the_plot_names_every_front_point_by_a_prefix_pick_takes(tmp_path):
    """--pick takes the ids pareto.png shows: every point of the front is labelled (not only the selected ones),
    and a long id by its start (a prefix --pick takes), not its end."""
    from orchestrator.plots import _short, pareto_figure

    sel = select_policies(frame(), 1)
    fig = pareto_figure(frame(), sel)
    texts = {t.get_text() for t in fig.axes[0].texts}
    plt.close(fig)
    assert set(FRONT) <= texts
    assert _short("0123456789abcdef0123") == "0123456789a..."
