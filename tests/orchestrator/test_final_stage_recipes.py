"""The final stage's recipes (``orchestrator.kept_finetunes``) when a fine-tune is stopped part way, and the stage's
bookkeeping around it: a fine-tune stopped before its row is written stays known by its recipe (its Ray Train
checkpoint is kept aside as that recipe's unfinished fine-tune, and asking for the recipe again continues it);
the kept manifests are read once per call; after Ctrl-C the stage plots and logs a consistent snapshot of what
the fine-tune threads recorded. (A final stage refused while another process runs one:
test_final_stage_other_process.py.)

Mostly without Ray: the fake Ray Train run (``final_sweep.checkpointing_stage``) checkpoints each epoch into
``<storage>/finetune-<tid>`` and continues a checkpoint of its recipe (lr) as Ray Train does; MLflow and the files
are real. The last test runs real Ray Train (slow)."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import load_checkpoint
from final_sweep import checkpointing_stage, make_fp32_sweep   # same folder (pytest puts it on sys.path)


def _storage(sweep: Path) -> Path:
    from orchestrator.final_results import finetune_storage
    from orchestrator.results import load_resolved_config

    return finetune_storage(load_resolved_config(sweep), sweep)


def _ckpt(folder: Path) -> dict:
    return load_checkpoint(folder / "checkpoint" / "state.pt")


def test_a_recipe_stopped_part_way_is_kept_by_its_recipe_and_continues_from_its_checkpoint_when_asked_again(
        tmp_path, monkeypatch):
    """The audit: recipe A fine-tuned; recipe B stopped (Ctrl-C) in epoch 2 left its epoch-1 checkpoint and no
    row; going back to A parked B's checkpoint as "unrecorded", and asking for B again trained it from scratch.
    Now B's checkpoint is kept aside as B's unfinished fine-tune, and B continues from its epoch 1."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    storage = _storage(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 2)})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                            # A: lr 0.01
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=3, workers=1, lr=0.05)              # B: stopped in epoch 2
    assert _ckpt(storage / "finetune-t1") == {"lr": 0.05, "epoch": 1} and final_stage.read_final(sweep).empty

    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)          # back to A: untrained
    assert len(runs) == 2 and final_stage.read_final(sweep).loc[0, "final_top1"] == pytest.approx(52.0)
    assert not list(storage.glob("*unrecorded*")) and not list((sweep / "models" / "kept").glob("*unrecorded*"))
    (kept_b,) = [p for p in storage.glob("finetune-t1.*") if _ckpt(p)["lr"] == 0.05]
    assert _ckpt(kept_b) == {"lr": 0.05, "epoch": 1}
    text = "\n".join(said)
    assert "[1/1] t1: its unfinished fine-tune with other settings (lr 0.05 -> 0.01), stopped after epoch 1 of 3 " \
           "before its row was written, is kept aside" in text, said       # (M2: which settings it had)
    assert f"Ray Train checkpoint {kept_b}" in text and "Rerun with its settings to continue it" in text
    assert "has no row in final.parquet" not in text
    assert "restored its earlier fine-tune with these settings (1 epoch(s), top1 52.00%" in text

    said.clear()
    final_stage.finetune_selected(sweep, epochs=3, workers=1, lr=0.05, say=said.append)   # B again: continued
    assert len(runs) == 3 and runs[-1].lr == 0.05
    row = final_stage.read_final(sweep).iloc[0].to_dict()
    assert row["resumed_from_epoch"] == 1 and row["epochs"] == 3 and row["final_top1"] == pytest.approx(58.0)
    assert _ckpt(storage / "finetune-t1") == {"lr": 0.05, "epoch": 3} and not kept_b.exists()
    text = "\n".join(said)
    assert "fine-tuned before with other settings (lr 0.01 -> 0.05); continuing its unfinished fine-tune with these " \
           "settings, kept earlier" in text, said
    assert f"[1/1] t1: restored its unfinished fine-tune with these settings: Ray Train checkpoint " \
           f"{storage / 'finetune-t1'} (1 epoch(s) done); it continues from there" in text, said
    assert "afresh" not in text
    kept = sorted(p.name for p in (sweep / "models" / "kept").iterdir())       # A kept aside; no stray manifest
    assert len(kept) == 2 and kept[0].endswith(".json") and kept[1].endswith(".pt")
    assert _ckpt(storage / f"finetune-{kept[0].removesuffix('.json')}")["lr"] == 0.01


def test_another_recipe_after_a_stopped_one_keeps_the_stopped_ones_checkpoint_aside_instead_of_replacing_it(
        tmp_path, monkeypatch):
    """A, then B stopped in epoch 2, then C: C's fine-tune ran in B's Ray Train run folder, which dropped B's
    checkpoint. Now it is kept aside as B's before C trains, and B continues from it later."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    storage = _storage(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 2)})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                            # A
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)              # B: stopped
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.1, say=said.append)  # C
    assert runs[-1].lr == 0.1 and final_stage.read_final(sweep).loc[0, "resumed_from_epoch"] == 0
    kept = sorted((_ckpt(p)["lr"], _ckpt(p)["epoch"]) for p in storage.glob("finetune-t1.*"))
    assert kept == [(0.01, 1), (0.05, 1)]                                  # A's and B's (its epoch 1), kept
    assert any(m.startswith("[1/1] t1: its unfinished fine-tune with other settings (lr 0.05 -> 0.1), stopped after "
                            "epoch 1 of 2 before its row was written, is kept aside") for m in said), said   # (M2)
    final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)                  # B again
    row = final_stage.read_final(sweep).iloc[0].to_dict()
    assert runs[-1].lr == 0.05 and row["resumed_from_epoch"] == 1 and row["epochs"] == 2
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                            # A and C: kept
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.1)
    assert len(runs) == 4 and final_stage.read_final(sweep).loc[0, "final_top1"] == pytest.approx(61.0)


def test_a_stopped_recipe_asked_for_again_at_once_continues_in_place_as_before(tmp_path, monkeypatch):
    """Unchanged: the recipe stopped is the one asked for next: its checkpoint continues where it is; once its row
    is written nothing of the stop is left in models/kept (but the earlier recipe kept aside)."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 2)})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)
    final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05, say=said.append)
    assert final_stage.read_final(sweep).loc[0, "resumed_from_epoch"] == 1 and len(runs) == 3
    assert not any("kept aside" in m or "restored" in m for m in said), said
    assert len(list((sweep / "models" / "kept").glob("t1.*.json"))) == 1                # A's only


def test_an_unfinished_recipe_asked_for_with_fewer_epochs_than_it_did_is_refused_before_any_work(
        tmp_path, monkeypatch):
    """The review (M1): A finished; B (--epochs 5) stopped after 3 epochs; A again (B kept aside); B with --epochs 2
    said "restored ...; it continues from there", then "fine-tuned afresh from epoch 1, not continued: its
    checkpoint has 3 epochs, more than 2", and the fresh run replaced B's 3-epoch checkpoint. Now it is refused
    before any work, in the words used for a finished fine-tune, and nothing is lost: --epochs 5 continues it."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    storage = _storage(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 4)})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                            # A: lr 0.01
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=5, workers=1, lr=0.05)              # B: stopped after 3
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)          # A back; B kept aside
    assert any("stopped after epoch 3 of 5 before its row was written, is kept aside" in m for m in said), said
    (manifest,) = [p for p in (sweep / "models" / "kept").glob("t1.*.json") if json.loads(p.read_text())["unfinished"]]
    assert json.loads(manifest.read_text())["epochs_done"] == 3
    (kept_b,) = [p for p in storage.glob("finetune-t1.*") if _ckpt(p)["lr"] == 0.05]
    before = (len(runs), (sweep / "final.parquet").read_bytes(), sorted(p.name for p in storage.iterdir()))
    said.clear()
    with pytest.raises(ConfigError, match=r"--epochs 2 is fewer than these policies were already fine-tuned for with "
                                          r"the same settings: t1 \(3 epochs, unfinished, kept aside in .*kept\)\. "
                                          r"A fine-tune continues from its checkpoint and cannot go back\. Pass "
                                          r"--epochs 3 \(or more\)"):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05, say=said.append)
    after = (len(runs), (sweep / "final.parquet").read_bytes(), sorted(p.name for p in storage.iterdir()))
    assert after == before and manifest.is_file() and _ckpt(kept_b) == {"lr": 0.05, "epoch": 3}, said
    assert not any("restored" in m or "afresh" in m for m in said), said

    record = json.loads(manifest.read_text())                  # a manifest from before epochs_done was recorded:
    del record["epochs_done"]                                   # its kept checkpoint's epochs are read
    manifest.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=r"t1 \(3 epochs, unfinished, kept aside in"):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)
    assert len(runs) == before[0] and _ckpt(kept_b) == {"lr": 0.05, "epoch": 3}

    final_stage.finetune_selected(sweep, epochs=5, workers=1, lr=0.05, say=said.append)   # enough: continued
    row = final_stage.read_final(sweep).iloc[0].to_dict()
    assert row["resumed_from_epoch"] == 3 and row["epochs"] == 5 and not any("afresh" in m for m in said), said


def test_a_stopped_recipe_asked_for_again_in_place_with_fewer_epochs_than_it_did_is_refused(tmp_path, monkeypatch):
    """The same loss without a recipe in between: B (--epochs 5) stopped after 3 epochs, its checkpoint still under
    the usual names; B with --epochs 2 made its workers start afresh and replace it, without a word. Refused now."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    storage = _storage(sweep)
    runs = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 4)})
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=5, workers=1, lr=0.05)
    with pytest.raises(ConfigError, match=r"t1 \(3 epochs, unfinished, in .*finetune-t1\)\. A fine-tune continues"):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)
    assert len(runs) == 1 and _ckpt(storage / "finetune-t1") == {"lr": 0.05, "epoch": 3}
    final_stage.finetune_selected(sweep, epochs=3, workers=1, lr=0.05)                 # as many: it is finished
    assert final_stage.read_final(sweep).loc[0, "resumed_from_epoch"] == 3


def test_an_unfinished_recipe_whose_checkpoint_is_gone_says_once_that_it_starts_afresh(tmp_path, monkeypatch):
    """The review (L5): a kept unfinished fine-tune whose Ray Train run folder was deleted said "no Ray Train
    checkpoint was kept; it starts afresh" and, after the run, "fine-tuned afresh ...: no checkpoint of it"."""
    import shutil

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    storage = _storage(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 2)})
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                            # A back; B kept aside
    (kept_b,) = [p for p in storage.glob("finetune-t1.*") if _ckpt(p)["lr"] == 0.05]
    shutil.rmtree(kept_b)
    final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05, say=said.append)
    assert final_stage.read_final(sweep).loc[0, "resumed_from_epoch"] == 0
    afresh = [m for m in said if "afresh" in m]
    assert afresh == ["[1/1] t1: restored its unfinished fine-tune with these settings: no Ray Train checkpoint of it "
                      "was kept; it is fine-tuned afresh from epoch 1"], said


def test_with_remote_storage_a_stopped_recipe_replaced_by_another_says_so(tmp_path, monkeypatch):
    """The review (L1): with a remote Ray Train storage (s3://: runs are not moved) the stopped run's recipe was
    forgotten and the new recipe replaced its run without a word; now said as set_aside says it."""
    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs, stop_at={("t1", 0.05, 2)})
    monkeypatch.setattr(final_stage, "local_storage", lambda storage: None)   # as for s3://...: nothing is moved
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    with pytest.raises(KeyboardInterrupt):
        final_stage.finetune_selected(sweep, epochs=2, workers=1, lr=0.05)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.1, say=said.append)
    assert "[1/1] t1: its unfinished fine-tune with other settings (lr 0.05 -> 0.1), stopped before its row was " \
           "written: its Ray Train checkpoint is not kept (remote storage: the new fine-tune replaces it)" in said, said
    assert not (sweep / "models" / "kept" / "t1.started.json").exists() and runs[-1].lr == 0.1


def test_the_kept_manifests_are_read_once_per_policy_and_call(tmp_path, monkeypatch):
    """check_not_shorter and the stage's loop each read a policy's kept manifests (``find_kept``): now once."""
    from orchestrator import kept_finetunes

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep, n=2)
    runs = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    reads: list[str] = []
    listed = kept_finetunes.kept_finetunes
    monkeypatch.setattr(kept_finetunes, "kept_finetunes",
                        lambda sweep_dir, tid: reads.append(tid) or listed(sweep_dir, tid))
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)         # another recipe: each looked up
    assert sorted(reads) == ["t1", "t2"] and len(runs) == 4
    reads.clear()
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                    # back: both restored, untrained
    assert sorted(reads) == ["t1", "t2"] and len(runs) == 4
    assert sorted(final_stage.read_final(sweep)["final_top1"]) == [pytest.approx(52.0)] * 2
    reads.clear()
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                    # done: nothing looked up
    assert reads == [] and len(runs) == 4


def test_after_ctrl_c_a_policy_being_recorded_is_logged_with_its_row_or_left_for_the_next_run(tmp_path, monkeypatch):
    """Ctrl-C while a fine-tune thread records its policy (row written, not yet counted as done): the stage read
    final.parquet (with the row) and the done policies (without it) unlocked, so the row was plotted but not
    logged. Now it reads both under the lock the threads record under: the two agree."""
    from orchestrator import final_stage as stage

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep, n=2)
    final_stage = checkpointing_stage(monkeypatch, tmp_path, [], slots=2)
    record, written, go_on = stage.record_final_run, threading.Event(), threading.Event()

    def record_final_run(sweep_dir, rows, pareto_row, run, job, say):
        path = record(sweep_dir, rows, pareto_row, run, job, say)
        if job.trial_id == "t2":                 # its row is in final.parquet: the driver is stopped now
            written.set()
            go_on.wait(timeout=3)                # until the stage logs (unlocked reads), else 3 s
        return path

    def run_side_by_side(items, fn, slots):      # t1 finishes; Ctrl-C while t2's thread records it
        fn(items[0])
        threading.Thread(target=fn, args=(items[1],), daemon=True).start()
        assert written.wait(timeout=60)
        raise KeyboardInterrupt

    seen: dict = {}

    def log_final(tracking_uri, sweep_dir, final_df, *, histories=None, png_path=None, fresh=None, **_kept):
        seen.update(logged=sorted(final_df["trial_id"]), fresh=set(fresh or ()), histories=set(histories or {}))
        go_on.set()
        return True
    monkeypatch.setattr(stage, "record_final_run", record_final_run)
    monkeypatch.setattr(stage, "run_side_by_side", run_side_by_side)
    monkeypatch.setattr("orchestrator.mlflow_stages.log_final", log_final)
    monkeypatch.setattr("orchestrator.plots.plot_final",
                        lambda final, trials, path: seen.update(plotted=sorted(final["trial_id"])))
    try:
        with pytest.raises(KeyboardInterrupt):
            final_stage.finetune_selected(sweep, epochs=1, workers=1)
    finally:
        go_on.set()
    assert seen["plotted"] == ["t1", "t2"]
    assert seen["logged"] == seen["plotted"] and seen["fresh"] == seen["histories"] == {"t1", "t2"}, seen


@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_continues_a_stopped_recipes_checkpoint_after_it_was_kept_aside(tmp_path, monkeypatch):
    """Real Ray Train: recipe B stopped after its first epoch's checkpoint (before its row) is kept aside when A
    comes back, and asking for B again resumes that checkpoint (epoch 2 only) instead of redoing epoch 1."""
    from dataclasses import replace

    import ray

    from orchestrator import final_stage
    from orchestrator.pareto import write_pareto
    from orchestrator.ray_env import init_ray
    from orchestrator.train_stage import STATE_FILE

    sweep = tmp_path / "sweep"
    make_fp32_sweep(sweep)
    write_pareto(sweep)
    knobs = dict(workers=1, max_steps_per_epoch=2, test_size=50, batch_size=32)
    real = final_stage.run_final_job

    def stopped_after_epoch_1(job, **kw):     # B's run stopped in epoch 2: its epoch-1 checkpoint, no row
        real(replace(job, epochs=1), **kw)
        raise KeyboardInterrupt
    said: list[str] = []
    started = init_ray(num_cpus=2)
    try:
        final_stage.finetune_selected(sweep, epochs=1, **knobs)                        # A
        monkeypatch.setattr(final_stage, "run_final_job", stopped_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            final_stage.finetune_selected(sweep, epochs=2, lr=0.05, **knobs)           # B, stopped
        monkeypatch.setattr(final_stage, "run_final_job", real)
        final_stage.finetune_selected(sweep, epochs=1, say=said.append, **knobs)      # A back, untrained
        again = final_stage.finetune_selected(sweep, epochs=2, lr=0.05, say=said.append, **knobs).iloc[0].to_dict()
    finally:
        if started:
            ray.shutdown()
    assert any("its unfinished fine-tune with other settings (lr 0.05 -> 0.01), stopped after epoch 1 of 2 before its "
               "row was written, is kept aside" in m for m in said), said   # (its epoch: the real checkpoint's)
    assert again["resumed_from_epoch"] == 1 and again["epochs"] == 2
    assert not any("afresh" in m for m in said), said
    (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
    assert [h["epoch"] for h in load_checkpoint(ckpt / STATE_FILE)["history"]] == [1, 2]
