"""experiments.generalization_ray: a study whose Ray cluster is lost ends with what is kept and the command that
runs the rest (the watch itself: tests/orchestrator/test_cluster_watch.py)."""
from __future__ import annotations

import pytest

from experiments import generalization_ray as gr
from orchestrator import cluster_watch


def _said(monkeypatch, study_dir, *, local):
    said = []
    monkeypatch.setattr(cluster_watch, "exit_lost", lambda text, cleanup=None: said.append(text))
    gr._lost_handler(study_dir, local=local, callbacks=[])("192.0.2.2:6379", 10.2)
    return said[0]


def test_a_lost_study_keeps_its_completed_cells_and_says_to_rerun(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    pd.DataFrame({"cell_id": ["a", "b", "c"], "status": ["completed", "completed", "failed"]}).to_parquet(
        tmp_path / gr.STUDY_FILE)
    text = _said(monkeypatch, tmp_path, local=False)
    assert text.startswith("gmpq study: the Ray cluster at 192.0.2.2:6379 stopped answering 10 s ago")
    assert f"2 completed cell(s) are kept in {tmp_path / gr.STUDY_FILE}" in text
    assert f"the same --out {tmp_path}, and --address ADDRESS" in text
    assert "completed cells are skipped, failed ones run again" in text


def test_a_study_lost_before_any_cell_says_so(tmp_path, monkeypatch):
    text = _said(monkeypatch, tmp_path, local=True)
    assert "No cell had completed" in text and "--address" not in text and "this machine" in text
