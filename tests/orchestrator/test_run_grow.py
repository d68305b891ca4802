"""``gmpq run --out DIR --resume --n-trials N`` on a run whose final stage finished: the sweep grows, the Pareto front
and its selection are made again from all the trials, and the final stage fine-tunes that selection (a policy
fine-tuned before with the same settings is not trained again)."""
from __future__ import annotations

import pandas as pd
import pytest

from orchestrator.cli import main
from test_run import TINY  # same folder (pytest puts it on sys.path)


@pytest.mark.ray
@pytest.mark.slow
def test_gmpq_run_given_more_trials_selects_and_fine_tunes_from_all_of_them(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", "--config", str(cfg), "--out", str(out), "--quiet"]) == 0
    first = pd.read_parquet(out / "final.parquet")
    capsys.readouterr()

    assert main(["run", "--out", str(out), "--resume", "--n-trials", "3", "--quiet"]) == 0
    said = capsys.readouterr()
    text = " ".join((said.out + said.err).split())
    assert "1/3 sweep: 3 trials (1 new) ->" in text and "the sweep grows from 2 to 3 trials (1 new; 2 ended so far)" in text
    assert "The sweep grew from 2 to 3 trials: the Pareto front and its selection are made again" in text
    assert "Pareto front of 3 trials" in text
    assert len(pd.read_parquet(out / "trials.parquet")) == 3
    selected = pd.read_parquet(out / "pareto.parquet").query("selected")["trial_id"].tolist()
    final = pd.read_parquet(out / "final.parquet").set_index("trial_id")
    assert len(selected) == 1 and selected[0] in final.index                 # the new selection, fine-tuned
    for tid, row in first.set_index("trial_id").iterrows():                  # the earlier fine-tune kept as it was
        assert final.loc[tid, "seconds"] == row["seconds"]
