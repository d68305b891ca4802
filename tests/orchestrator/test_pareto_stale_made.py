"""How a stale Pareto selection was made (``orchestrator.pareto_stale.made_with``): pareto.parquet records the
settings it was selected with (``gmpq.selected_with``), so ``gmpq finetune --sweep`` selects a stale selection again
only when those are the sweep config's, not when a --top-k or --max-gbitops of the user's happened to select the
same trials as the config's would (the review's cases: a small front); an older file without the record is judged by
its reasons, and kept where it cannot tell. Real Parquet files."""
from __future__ import annotations

import pyarrow.parquet as pq

from orchestrator.cli import main
from orchestrator.final_inputs import selected_policies
from orchestrator.pareto import write_pareto
from orchestrator.pareto_stale import CONFIG, HAND, PICKED, SELECTED_WITH, UNKNOWN, config_made, made_with
from orchestrator.results import PARETO_FILE, load_resolved_config
from stale_sweeps import selected, sweep_with  # same folder (pytest puts it on sys.path)

_POINTS = {f"t{i}": (50.0 + 5 * i, (i + 1) * 1e8) for i in range(8)}     # a front: accuracy up with the cost
_ALL = list(_POINTS)


def _sweep(d, ids, finetune: dict | None = None) -> None:
    """The demo config (finetune.top_k 2, no GBitOPs limit unless ``finetune`` says) and these trials completed."""
    sweep_with(d, ids, _POINTS, n_trials=8, finetune=finetune)


def _finetune_inputs(d) -> tuple[list[str], str]:
    said: list[str] = []
    chosen = selected_policies(d, load_resolved_config(d), None, None, said.append)
    return sorted(chosen["trial_id"]), " ".join(" ".join(said).split())


def _as_older_file(d) -> None:
    """pareto.parquet as the version before the record wrote it (the trials it selected from, not how)."""
    table = pq.read_table(d / PARETO_FILE)
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != SELECTED_WITH}
    pq.write_table(table.replace_schema_metadata(meta), d / PARETO_FILE)


def test_a_top_k_of_the_users_that_selects_the_config_trials_on_a_small_front_is_kept(tmp_path):
    _sweep(tmp_path, ["t0", "t1"])
    write_pareto(tmp_path, plot=False, top_k=6)                       # gmpq pareto --top-k 6: both of 2
    assert selected(tmp_path) == ["t0", "t1"]
    assert not config_made(tmp_path, load_resolved_config(tmp_path))  # (the config's top_k 2 selects them too)
    _sweep(tmp_path, _ALL)                                            # grown to 8
    chosen, said = _finetune_inputs(tmp_path)
    assert chosen == ["t0", "t1"] and selected(tmp_path) == ["t0", "t1"]     # not replaced by the config's 2
    assert (f"select again as it was made with: gmpq pareto {tmp_path} --top-k 6 (or without --top-k for the sweep "
            "config's settings). Not selected again here: it was made by hand") in said


def test_a_limit_of_the_users_that_all_fit_is_kept(tmp_path):
    _sweep(tmp_path, ["t0", "t1"])
    write_pareto(tmp_path, plot=False, max_gbitops=0.25)              # gmpq pareto --max-gbitops 0.25: both fit
    assert made_with(tmp_path, load_resolved_config(tmp_path)).how == HAND
    _sweep(tmp_path, _ALL)
    chosen, said = _finetune_inputs(tmp_path)
    assert chosen == ["t0", "t1"]                                     # within 0.25 still (t2 on costs 0.3)
    assert f"gmpq pareto {tmp_path} --max-gbitops 0.25 (or without --max-gbitops for the sweep config's" in said


def test_no_limit_given_over_a_config_limit_is_kept(tmp_path):
    _sweep(tmp_path, ["t0", "t1"], finetune={"max_gbitops": 0.5})
    write_pareto(tmp_path, plot=False, max_gbitops="none")            # gmpq pareto --max-gbitops none
    _sweep(tmp_path, _ALL, finetune={"max_gbitops": 0.5})
    chosen, said = _finetune_inputs(tmp_path)
    assert chosen == ["t0", "t1"] and f"gmpq pareto {tmp_path} --max-gbitops none (or without" in said


def test_the_configs_own_values_given_count_as_the_configs_and_a_changed_config_as_by_hand(tmp_path):
    _sweep(tmp_path, ["t0", "t1"], finetune={"max_gbitops": 0.5})
    write_pareto(tmp_path, plot=False, top_k=2, max_gbitops=0.5)      # the config's values, typed
    assert made_with(tmp_path, load_resolved_config(tmp_path)).how == CONFIG
    _sweep(tmp_path, _ALL, finetune={"max_gbitops": 0.5})
    chosen, said = _finetune_inputs(tmp_path)
    assert len(chosen) == 2 and chosen != ["t0", "t1"] and "selected again from all of them" in said

    _sweep(tmp_path, ["t0", "t1"])
    write_pareto(tmp_path, plot=False)                                # the config's top_k 2 then
    _sweep(tmp_path, _ALL, finetune={"top_k": 3})                     # a config changed since
    how = made_with(tmp_path, load_resolved_config(tmp_path))
    assert (how.how, how.flags) == (HAND, " --top-k 2")
    chosen, said = _finetune_inputs(tmp_path)
    assert chosen == ["t0", "t1"] and "or with a config changed since" in said


def test_a_stale_pick_says_to_give_pick_again(tmp_path, capsys):
    _sweep(tmp_path, ["t0", "t1"])
    write_pareto(tmp_path, plot=False, picks=["t1"])
    _sweep(tmp_path, _ALL)
    assert made_with(tmp_path, load_resolved_config(tmp_path)).how == PICKED
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert (f"pick again with: gmpq pareto {tmp_path} --pick ID[,ID...] (it was picked by hand: t1; without --pick, "
            "gmpq pareto selects automatically).") in out


def test_an_older_file_is_judged_by_its_reasons_and_kept_where_it_cannot_tell(tmp_path):
    _sweep(tmp_path, ["t0", "t1"])
    write_pareto(tmp_path, plot=False, max_gbitops=0.25)              # a limit: its reasons say it
    _as_older_file(tmp_path)
    how = made_with(tmp_path, load_resolved_config(tmp_path))
    assert (how.how, how.flags) == (HAND, " --max-gbitops 0.25")

    write_pareto(tmp_path, plot=False, top_k=6)                       # a front of 2, the config's top_k 2
    _as_older_file(tmp_path)
    assert made_with(tmp_path, load_resolved_config(tmp_path)).how == UNKNOWN
    _sweep(tmp_path, _ALL)
    chosen, said = _finetune_inputs(tmp_path)
    assert chosen == ["t0", "t1"] and "does not record how it was made" in said and "fine-tuned as it is" in said

    _sweep(tmp_path, ["t0", "t1", "t2"])
    write_pareto(tmp_path, plot=False)                                # a front of 3: the config's 2 tell
    _as_older_file(tmp_path)
    assert made_with(tmp_path, load_resolved_config(tmp_path)).how == CONFIG
    write_pareto(tmp_path, plot=False, top_k=3)
    _as_older_file(tmp_path)
    how = made_with(tmp_path, load_resolved_config(tmp_path))
    assert (how.how, how.flags) == (HAND, " --top-k 3")
