"""The pruner's book (``trial_status.json``) is written only once a trial is pruned, as the README's table of a
sweep folder's files says."""
from __future__ import annotations

import re
from pathlib import Path

from orchestrator.trial_status import TrialStatusBook

REPO = Path(__file__).resolve().parents[2]


def test_the_book_is_written_only_once_a_trial_is_pruned_and_the_readme_says_so(tmp_path):
    path = tmp_path / "trial_status.json"
    book = TrialStatusBook(path)
    assert book.status_of("t1") == "completed" and not path.exists()       # no pruned trial: no file
    book.mark_pruned("t1", "below the median at epoch 1")
    assert path.is_file() and TrialStatusBook(path).is_pruned("t1")
    rows = [line for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("|") and "`trial_status.json`" in line.split("|")[1]]
    assert len(rows) == 1 and re.search(r"once .*prun", rows[0].split("|")[2]), rows
