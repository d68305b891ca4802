"""Review 18 (b): a sweep whose trials completed without transfer_top1/BitOPs (non-finite results stored as null)."""
from __future__ import annotations

import pytest

from gmpq_core.errors import GMPQError
from orchestrator.cli import main
from orchestrator.results import read_trials, trial_row, write_results


def _sweep(d, rows):
    write_results(d, [trial_row(trial_id=t, config={"budget_avg_bits": 3.0}, status=s, last_result=r)
                      for t, s, r in rows], [])
    (d / "sweep_config.yaml").write_text(f"name: nf\nn_trials: {len(rows)}\nbudget_buckets: [3.25]\n")
    return d


NULL_ACC = {"transfer_top1": None, "bitops": 2_000_000}
NULL_COST = {"transfer_top1": 70.0, "bitops": None}


def test_no_completed_text_names_completed_trials_without_results_and_does_not_suggest_resume_for_them(tmp_path):
    from orchestrator.pareto import check_selectable, no_completed_text

    _sweep(tmp_path, [("t1", "completed", NULL_ACC), ("t2", "completed", NULL_COST)])
    text = " ".join(no_completed_text(tmp_path, read_trials(tmp_path)).split())
    assert "completed with transfer_top1 and BitOPs (2 completed)" in text
    assert "2 completed without transfer_top1/BitOPs (non-finite results)" in text
    assert "--resume (failed" not in text and "continue the sweep" not in text
    with pytest.raises(GMPQError, match="without transfer_top1/BitOPs"):
        check_selectable(tmp_path)


def test_no_completed_text_with_a_pruned_trial_too_suggests_resume_and_none_when_one_is_selectable(tmp_path):
    from orchestrator.pareto import no_completed_text

    _sweep(tmp_path, [("t1", "completed", NULL_ACC), ("t2", "pruned", {"proxy_top1": 12.0})])
    text = " ".join(no_completed_text(tmp_path, read_trials(tmp_path)).split())
    assert "(1 completed, 1 pruned)" in text and "1 completed without transfer_top1/BitOPs" in text
    assert f"gmpq sweep --out {tmp_path} --resume" in text
    _sweep(tmp_path, [("t1", "completed", NULL_ACC), ("ok", "completed", {"transfer_top1": 70.0, "bitops": 10})])
    assert no_completed_text(tmp_path, read_trials(tmp_path)) is None


def test_status_does_not_send_a_sweep_without_selectable_trials_to_gmpq_pareto(tmp_path, capsys):
    _sweep(tmp_path, [("t1", "completed", NULL_ACC), ("t2", "pruned", {"proxy_top1": 12.0})])
    assert main(["status", "--sweep", str(tmp_path)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "Next: gmpq pareto" not in out and "1 completed without transfer_top1/BitOPs" in out
    assert main(["pareto", "--sweep", str(tmp_path), "--no-mlflow"]) == 2
    assert "1 completed without transfer_top1/BitOPs" in " ".join(capsys.readouterr().err.split())


@pytest.mark.parametrize("outside", [True, False])
def test_a_read_only_ray_train_storage_hint_fits_where_it_lies(tmp_path, monkeypatch, outside):
    import gmpq_core.fileio
    from orchestrator.commands._finetune_sweep import check_sweep_folder

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    storage = tmp_path / "elsewhere" if outside else sweep / "ray_results"
    storage.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: s\n" + (f"storage_path: {storage}\n" if outside else ""))
    seen = {}

    def fake(path, **kw):
        if "Ray Train" in kw.get("what", ""):
            seen.update(kw, path=path)
    monkeypatch.setattr(gmpq_core.fileio, "check_writable_dir", fake)
    check_sweep_folder(sweep)
    assert seen["path"] == storage
    if outside:
        assert "cp -r" not in seen["hint"] and "set storage_path in" in seen["hint"]
    else:
        assert f"cp -r {sweep} NEW_DIR" in seen["hint"]


@pytest.mark.parametrize("layer, checks", [(None, 0), ("8", 1)])
def test_the_preflight_runs_a_second_forward_pass_only_for_a_named_gradcam_layer(tmp_path, user_cnn, monkeypatch,
                                                                                 layer, checks):
    """An auto-detected layer was found by a forward pass that picked a 4-D output: no second pass to check it."""
    import inspect

    import gmpq_core.attribution as attribution
    from orchestrator.sweep_checks import check_sweep_config
    from orchestrator.sweep_config import load_sweep_config

    real, calls = attribution.capture_features, []

    def counting(*a, **kw):
        calls.append(inspect.stack()[1].function)
        return real(*a, **kw)
    monkeypatch.setattr(attribution, "capture_features", counting)
    path = tmp_path / "nets" / "my_cnn.py"
    path.parent.mkdir()
    path.write_text(user_cnn + ("" if layer is None else f"\n\nbuild.gradcam_layer = {layer!r}\n"))
    check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "out"),
                                                                   "model": f"{path}:build"}))
    assert calls.count("check_gradcam_layer") == checks       # (the preflight's check, shared with gmpq search)
