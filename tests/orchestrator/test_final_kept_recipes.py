"""A policy fine-tuned again with other settings keeps its earlier fine-tune aside (row, model files, Ray Train
run: ``orchestrator.kept_finetunes``) and gets it back, without retraining, when those settings are asked for
again; a model file the stage writes never leaves gmpq export's integer file of the old model beside it. The
stage without Ray (``final_sweep.checkpointing_stage``): the fake run writes a Ray Train run folder (top1 = 50 +
100 * lr + epochs) and the model file is a small stand-in naming its lr, so moves and contents can be checked."""
from __future__ import annotations

import argparse

import pytest

from gmpq_core.errors import ConfigError
from gmpq_core.fileio import load_checkpoint
from final_sweep import checkpointing_stage, make_sweep   # same folder (pytest puts it on sys.path)


def _lr_of(path) -> float:
    return load_checkpoint(path)["lr"]


def test_another_recipe_keeps_the_earlier_fine_tune_aside_and_asking_for_it_again_restores_it_untrained(
        tmp_path, monkeypatch):
    """The audit: a quick check with other settings replaced the 83 % model, its row and its Ray Train checkpoint,
    and going back retrained it. Now each recipe's result is kept; going back trains nothing."""
    from orchestrator.final_results import finetune_storage
    from orchestrator.results import load_resolved_config

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    storage = finetune_storage(load_resolved_config(sweep), sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)                     # recipe A: lr 0.01
    row_a = final_stage.read_final(sweep).iloc[0].to_dict()
    (sweep / "models" / "t1.int.pt").write_bytes(b"gmpq export of A")             # gmpq export DIR
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05, say=said.append)   # recipe B
    assert len(runs) == 2
    row_b = final_stage.read_final(sweep).iloc[0].to_dict()
    assert row_b["final_top1"] == pytest.approx(56.0) and row_b["model_path"] == "models/t1.pt"
    assert _lr_of(sweep / "models" / "t1.pt") == 0.05
    assert not (sweep / "models" / "t1.int.pt").exists()                          # A's export went with A
    kept = sorted(p.name for p in (sweep / "models" / "kept").iterdir())
    digest = kept[0].split(".")[1]
    assert kept == [f"t1.{digest}.int.pt", f"t1.{digest}.json", f"t1.{digest}.pt"]
    assert _lr_of(sweep / "models" / "kept" / f"t1.{digest}.pt") == 0.01
    assert load_checkpoint(storage / f"finetune-t1.{digest}" / "checkpoint" / "state.pt")["lr"] == 0.01
    assert load_checkpoint(storage / "finetune-t1" / "checkpoint" / "state.pt")["lr"] == 0.05
    text = "\n".join(said)
    assert "starting afresh" in text and f"kept aside: row {sweep / 'models' / 'kept' / f't1.{digest}.json'}" in text
    assert f"Ray Train checkpoint {storage / f'finetune-t1.{digest}'}" in text

    said.clear()
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)   # back to A: nothing trains
    assert len(runs) == 2
    back = final_stage.read_final(sweep).iloc[0].to_dict()
    assert back["final_top1"] == row_a["final_top1"] and back["recipe_json"] == row_a["recipe_json"]
    assert back["model_path"] == "models/t1.pt" and back["finished_at"] == row_a["finished_at"]
    assert _lr_of(sweep / "models" / "t1.pt") == 0.01
    assert (sweep / "models" / "t1.int.pt").read_bytes() == b"gmpq export of A"  # its export came back with it
    assert load_checkpoint(storage / "finetune-t1" / "checkpoint" / "state.pt")["lr"] == 0.01
    assert not (storage / f"finetune-t1.{digest}").exists()
    assert "restored its earlier fine-tune with these settings (1 epoch(s), top1 52.00%, no retraining)" in "\n".join(said)
    kept_b = [p for p in (sweep / "models" / "kept").glob("t1.*.pt")]
    assert len(kept_b) == 1 and _lr_of(kept_b[0]) == 0.05                       # B is the one kept aside now

    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)           # and B comes back the same way
    assert len(runs) == 2 and final_stage.read_final(sweep).loc[0, "final_top1"] == pytest.approx(56.0)


def test_a_restored_recipe_continues_with_more_epochs_and_refuses_fewer(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=2, workers=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)     # B: 1 epoch, A kept with 2
    with pytest.raises(ConfigError, match=r"--epochs 1 is fewer .* t1 \(2 epochs, kept aside in .*kept\)"):
        final_stage.finetune_selected(sweep, epochs=1, workers=1)          # A with fewer epochs: refused, untouched
    assert final_stage.read_final(sweep).loc[0, "final_top1"] == pytest.approx(56.0) and len(runs) == 2
    final_stage.finetune_selected(sweep, epochs=3, workers=1, say=said.append)
    assert len(runs) == 3 and runs[-1].lr == 0.01 and runs[-1].epochs == 3
    assert any("restored its earlier fine-tune" in m for m in said)
    assert any("continuing its 2-epoch fine-tune to 3 epochs" in m for m in said), said


def test_a_model_file_written_by_the_stage_removes_the_stale_integer_file_and_says_so(tmp_path, monkeypatch):
    """evaluate showed 84 % for models/<tid>.int.pt beside a 74.6 % models/<tid>.pt: the export of the model the
    stage had replaced (here: continued with more epochs)."""
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    said = []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, [])
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    stale = sweep / "models" / "t1.int.pt"
    stale.write_bytes(b"gmpq export of the 1-epoch model")
    final_stage.finetune_selected(sweep, epochs=2, workers=1, say=said.append)
    assert not stale.exists()
    assert any(f"removed {stale}" in m and f"run 'gmpq export {sweep}' again" in m for m in said), said
    from gmpq_core.fileio import integer_path
    assert integer_path(sweep / "models" / "t1.pt") == sweep / "models" / "t1.int.pt"     # gmpq export's file


def test_a_fine_tune_stopped_before_it_finished_is_moved_aside_not_overwritten_by_a_restore(tmp_path, monkeypatch):
    from orchestrator.final_results import finetune_storage, write_final
    from orchestrator.results import load_resolved_config

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    storage = finetune_storage(load_resolved_config(sweep), sweep)
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, lr=0.05)
    write_final(sweep, {})                                 # as if B's run had been stopped before its row
    final_stage.finetune_selected(sweep, epochs=1, workers=1, say=said.append)
    assert len(runs) == 2 and _lr_of(sweep / "models" / "t1.pt") == 0.01
    parked = list(storage.glob("finetune-t1.unrecorded-*"))
    assert len(parked) == 1 and load_checkpoint(parked[0] / "checkpoint" / "state.pt")["lr"] == 0.05
    assert any("has no row in final.parquet" in m and str(parked[0]) in m for m in said), said


def test_precision_is_a_recipe_setting_of_the_sweeps_fine_tunes(tmp_path, monkeypatch):
    """--precision in sweep mode: another precision is another recipe (the earlier one kept aside); a bad value
    is refused naming it; the command line passes it once gmpq finetune takes it in sweep mode."""
    from orchestrator.commands import _finetune_sweep, finetune

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    runs, said = [], []
    final_stage = checkpointing_stage(monkeypatch, tmp_path, runs)
    final_stage.finetune_selected(sweep, epochs=1, workers=1)
    final_stage.finetune_selected(sweep, epochs=1, workers=1, precision="bf16", say=said.append)
    assert [j.precision for j in runs] == ["fp32", "bf16"]
    assert any("(precision fp32 -> bf16); starting afresh" in m for m in said), said
    assert '"precision": "bf16"' in final_stage.read_final(sweep).loc[0, "recipe_json"]
    with pytest.raises(ConfigError, match="bf15"):
        final_stage.finetune_selected(sweep, epochs=1, workers=1, precision="bf15")
    from orchestrator.cli import build_parser

    parse = build_parser("finetune").parse_args
    given = parse(["finetune", "--sweep", str(sweep), "--precision", "bf16"])
    assert finetune._single_mode_options_given(given) == [] and _finetune_sweep._precision_arg(given) == "bf16"
    assert _finetune_sweep._precision_arg(parse(["finetune", "--sweep", str(sweep)])) is None   # the sweep's own
    assert _finetune_sweep._precision_arg(argparse.Namespace()) is None      # gmpq run's stage: the sweep's



def test_a_second_kept_fine_tune_of_one_recipe_keeps_a_name_that_is_still_found(tmp_path):
    """Two rows of one recipe set aside (a stage stopped between a restore and its final.parquet write): the second
    was written as <tid>.<recipe>.json-2, which the glob for kept manifests never found again."""
    from orchestrator.kept_finetunes import find_kept, kept_finetunes, set_aside

    sweep = tmp_path / "sweep"
    (sweep / "models").mkdir(parents=True)
    row = {"trial_id": "t1", "recipe_json": '{"lr": 0.01}', "epochs": 1, "final_top1": 50.0}
    for k in range(2):
        (sweep / "models" / "t1.pt").write_bytes(b"model %d" % k)
        set_aside(sweep, None, {**row, "finished_at": f"2026-11-28T00:0{k}:00"}, lambda m: None, "[1/1] t1:")
    kept = kept_finetunes(sweep, "t1")
    assert len(kept) == 2 and all(k.manifest.suffix == ".json" for k in kept)
    newest = find_kept(sweep, "t1", '{"lr": 0.01}')
    assert (sweep / newest.row["model_path"]).read_bytes() == b"model 1"

@pytest.mark.ray
@pytest.mark.slow
def test_ray_train_continues_a_kept_recipes_checkpoint_after_it_is_restored(tmp_path):
    """Real Ray Train: a kept run folder (``finetune-t1.<recipe>``) renamed back to ``finetune-t1`` is resumed by
    name + storage path, so more epochs of a restored recipe continue it instead of redoing epoch 1."""
    import ray

    from orchestrator.final_stage import finetune_selected, read_final
    from orchestrator.pareto import write_pareto
    from orchestrator.ray_env import init_ray
    from orchestrator.train_stage import STATE_FILE

    sweep = tmp_path / "sweep"
    make_sweep(sweep, precision="fp32")
    write_pareto(sweep)
    knobs = dict(workers=1, max_steps_per_epoch=2, test_size=50, batch_size=32)
    said: list[str] = []
    started = init_ray(num_cpus=2)
    try:
        first = finetune_selected(sweep, epochs=1, **knobs).iloc[0].to_dict()
        finetune_selected(sweep, epochs=1, lr=0.05, **knobs)
        assert len(list((sweep / "ray_results").glob("finetune-t1.*/checkpoint_20*"))) == 1     # A's, kept
        again = finetune_selected(sweep, epochs=2, say=said.append, **knobs).iloc[0].to_dict()
    finally:
        if started:
            ray.shutdown()
    assert any("restored its earlier fine-tune" in m for m in said), said
    assert again["resumed_from_epoch"] == 1 and again["epochs"] == 2
    assert not any("fine-tuned afresh from epoch 1" in m for m in said), said
    (ckpt,) = sorted((sweep / "ray_results" / "finetune-t1").glob("checkpoint_20*"))
    history = load_checkpoint(ckpt / STATE_FILE)["history"]
    assert [h["epoch"] for h in history] == [1, 2] and history[0]["top1"] == pytest.approx(first["final_top1"])
    assert read_final(sweep).loc[0, "recipe_json"] == first["recipe_json"]
    (kept,) = (sweep / "models" / "kept").glob("t1.*.pt")                  # lr 0.05's, kept aside in its turn
    assert load_checkpoint(kept)["results"]["top1"] is not None
