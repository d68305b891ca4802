"""``mlflow_notes.noting_mlflow_off``: the sink's "logging disabled" paragraph noted for a command's last lines, and
shown once for a command whose stages each connect again (``gmpq run``, ``finetune --sweep`` selecting again)."""
from __future__ import annotations

import warnings

from orchestrator.mlflow_keys import DISABLED
from orchestrator.mlflow_notes import noting_mlflow_off


def _warn_twice_and_other() -> None:
    warnings.warn(f"{DISABLED}: connecting failed on tracking URI 'http://127.0.0.1:9' (refused).", RuntimeWarning)
    warnings.warn("something else", RuntimeWarning)
    warnings.warn(f"{DISABLED}: logging the Pareto front failed on tracking URI 'http://127.0.0.1:9' (refused).",
                  RuntimeWarning)


def _shown(once: bool) -> tuple[list[str], list[str]]:
    seen: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: seen.append(str(message))
        with noting_mlflow_off(once=once) as noted:
            _warn_twice_and_other()
    return seen, noted


def test_each_paragraph_is_shown_and_noted_by_default():
    seen, noted = _shown(once=False)
    assert [s.startswith(DISABLED) for s in seen] == [True, False, True] and seen[1] == "something else"
    assert len(noted) == 2


def test_once_shows_the_first_paragraph_only_and_notes_both():
    seen, noted = _shown(once=True)
    assert len([s for s in seen if s.startswith(DISABLED)]) == 1 and "something else" in seen
    assert "connecting failed" in seen[0] and len(noted) == 2
