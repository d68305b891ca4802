"""``gmpq pareto`` on a sweep none of whose trials completed refuses (one paragraph, exit 2) before it writes
anything: it used to draw an empty pareto.png and policies.png, then say "nothing to select" (exit 1)."""
from __future__ import annotations

import pytest

from gmpq_core.errors import GMPQError
from orchestrator.cli import main
from orchestrator.results import trial_row, write_results


def failed_sweep(d, rows=(("t1", "failed"), ("t2", "pruned"), ("t3", "failed"))):
    write_results(d, [trial_row(trial_id=t, config={"budget_avg_bits": 3.0}, status=s,
                                last_result={"proxy_top1": 12.0} if s == "pruned" else None,
                                error="ConfigError: boom" if s == "failed" else None) for t, s in rows], [])
    (d / "sweep_config.yaml").write_text("name: broken\nbudget_buckets: [3.25]\nfinetune: {top_k: 2}\n")
    return d


@pytest.mark.parametrize("extra", [["--no-mlflow"], ["--no-mlflow", "--top-k", "2"], []])
def test_pareto_without_a_completed_trial_refuses_before_writing_anything(tmp_path, capsys, extra):
    failed_sweep(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["pareto", "--sweep", str(tmp_path), *extra]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("gmpq: error:") == 1 and "Traceback" not in err
    assert "No trial of the sweep" in err and "(2 failed, 1 pruned)" in err and "gmpq pareto wrote nothing" in err
    assert f"gmpq sweep --out {tmp_path} --resume" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # no pareto.png / policies.png / parquet


def test_check_selectable_passes_a_sweep_with_a_completed_trial_and_names_an_empty_one(tmp_path):
    from orchestrator.pareto import check_selectable

    failed_sweep(tmp_path, rows=())
    with pytest.raises(GMPQError, match=r"completed \(no trial yet\)"):
        check_selectable(tmp_path)
    rows = [trial_row(trial_id="ok", config={"budget_avg_bits": 3.0}, status="completed",
                      last_result={"transfer_top1": 70.0, "bitops": 2_000_000})]
    write_results(tmp_path, rows, [])
    assert list(check_selectable(tmp_path)["trial_id"]) == ["ok"]
