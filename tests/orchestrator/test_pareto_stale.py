"""A Pareto selection made before the sweep ran on (``orchestrator.pareto_stale``): pareto.parquet records the completed
trials it selected from; once others have completed (a sweep grown with --resume --n-trials, however many commands it
took), ``gmpq sweep``'s summary, ``gmpq status`` and ``gmpq finetune --sweep`` say so naming ``gmpq pareto DIR``, and
``gmpq finetune --sweep`` selects again itself unless the selection was made by hand. Real Parquet files."""
from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from orchestrator.cli import main
from orchestrator.final_inputs import selected_policies
from orchestrator.pareto import write_pareto
from orchestrator.pareto_stale import stale_selection
from orchestrator.results import PARETO_FILE, load_resolved_config
from stale_sweeps import selected, sweep_with  # same folder (pytest puts it on sys.path)

_POINTS = {"t1": (70.0, 4e8), "t2": (60.0, 2e8), "t3": (80.0, 1e8), "t4": (50.0, 9e8)}


def _sweep(d, ids, n_trials: int = 4) -> None:
    sweep_with(d, ids, _POINTS, n_trials=n_trials)


def test_a_selection_made_before_more_trials_completed_is_said_to_be_stale(tmp_path, capsys):
    _sweep(tmp_path, ["t1", "t2"])
    write_pareto(tmp_path, plot=False)
    assert stale_selection(tmp_path) is None                          # made from the trials there are
    _sweep(tmp_path, ["t1", "t2", "t4"])                              # t4 completed off the front: the front is the same
    stale = stale_selection(tmp_path)
    assert (stale.made_from, stale.completed, stale.late) == (2, 3, [])
    _sweep(tmp_path, ["t1", "t2", "t3", "t4"])                        # t3 dominates both
    stale = stale_selection(tmp_path)
    assert (stale.made_from, stale.completed, stale.late) == (2, 4, ["t3"])

    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"The Pareto selection (pareto.parquet) was made from 2 completed trials, and 4 trials have completed now; "
            f"1 trial(s) now on the Pareto front are not in it (t3): select again with: gmpq pareto {tmp_path}.") in out
    assert "Next: gmpq finetune" not in out

    from orchestrator.commands.sweep import format_summary
    summary = SimpleNamespace(rows=[], n_completed=4, n_pruned=0, n_failed=0, wall_seconds=60, sweep_dir=tmp_path,
                              interrupted=False, n_planned=4, grown_from=None)    # grown by an earlier command
    said = " ".join(format_summary(summary).split())
    assert f"select again with: gmpq pareto {tmp_path}." in said

    write_pareto(tmp_path, plot=False)                                # selected again: nothing said
    assert stale_selection(tmp_path) is None
    assert "select again" not in " ".join(format_summary(summary).split())


def test_an_older_pareto_file_without_the_record_is_judged_by_its_front(tmp_path):
    _sweep(tmp_path, ["t1", "t2"])
    write_pareto(tmp_path, plot=False)
    table = pd.read_parquet(tmp_path / PARETO_FILE)
    table.to_parquet(tmp_path / PARETO_FILE)                          # (pandas writes no gmpq record)
    _sweep(tmp_path, ["t1", "t2", "t4"])
    assert stale_selection(tmp_path) is None                          # the same front: nothing to claim
    _sweep(tmp_path, ["t1", "t2", "t3"])
    stale = stale_selection(tmp_path)
    assert (stale.made_from, stale.late) == (None, ["t3"])


def test_finetune_sweep_selects_again_a_stale_automatic_selection(tmp_path):
    _sweep(tmp_path, ["t1", "t2"])
    write_pareto(tmp_path, plot=False)
    _sweep(tmp_path, ["t1", "t2", "t3"])
    said: list[str] = []
    chosen = selected_policies(tmp_path, load_resolved_config(tmp_path), None, None, said.append)
    assert list(chosen["trial_id"]) == ["t3"] and selected(tmp_path) == ["t3"]     # the front now is t3 alone
    text = " ".join(" ".join(said).split())
    assert "selection was made from 2 completed trials, and 3 trials have completed now: selected again from all of " \
           "them with the sweep config's settings (finetune.top_k, budget_buckets, finetune.max_gbitops)" in text
    assert stale_selection(tmp_path) is None


def test_finetune_sweep_keeps_a_stale_selection_made_by_hand_and_says_so(tmp_path):
    _sweep(tmp_path, ["t1", "t2"])
    write_pareto(tmp_path, plot=False, picks=["t2"])                  # gmpq pareto --pick t2
    _sweep(tmp_path, ["t1", "t2", "t4"])
    said: list[str] = []
    chosen = selected_policies(tmp_path, load_resolved_config(tmp_path), None, None, said.append)
    assert list(chosen["trial_id"]) == ["t2"] and selected(tmp_path) == ["t2"]     # not replaced
    text = " ".join(" ".join(said).split())
    assert (f"pick again with: gmpq pareto {tmp_path} --pick ID[,ID...] (it was picked by hand: t2; without --pick, "
            "gmpq pareto selects automatically). Not selected again here: it was picked by hand (gmpq pareto --pick), "
            "so it is fine-tuned as it is") in text

    _sweep(tmp_path, ["t1", "t2"])
    write_pareto(tmp_path, plot=False, top_k=1)                        # another --top-k than the config's 3
    _sweep(tmp_path, ["t1", "t2", "t4"])
    said.clear()
    chosen = selected_policies(tmp_path, load_resolved_config(tmp_path), None, None, said.append)
    assert len(chosen) == 1 and "made by hand" in " ".join(said)
