"""The final stage's table says what the fine-tunes trained on: "full target data" only when they did, else the
cap on steps per epoch (its images per epoch) and the --train-size subset. ``gmpq finetune --sweep`` through the
CLI with the stage's fake Ray Train run (``final_sweep._stage_without_ray``); ``gmpq run`` prints the same heading."""
from __future__ import annotations

import json

import pandas as pd

from final_sweep import METRICS, _stage_without_ray, make_sweep   # same folder (pytest puts it on sys.path)


def _row(**recipe) -> dict:
    r = {"max_steps_per_epoch": None, "train_size": None, "batch_size": 128, **recipe}
    return {"recipe_json": json.dumps(r, sort_keys=True)}


def test_the_heading_names_the_cap_and_the_subset_and_says_full_data_only_without_them():
    from orchestrator.final_results import final_table_heading

    full = pd.DataFrame([{**_row(), "train_images": 60000, "images_per_epoch": 59904}])
    assert final_table_heading(full) == "Final fine-tune (full target data):"
    capped = pd.DataFrame([{**_row(max_steps_per_epoch=3), "train_images": 60000, "images_per_epoch": 384}] * 2)
    heading = final_table_heading(capped)
    assert "full target data" not in heading
    assert heading == ("Final fine-tune (at most 3 steps per epoch: 384 of the 60000 target training images per "
                       "epoch):")
    subset = pd.DataFrame([{**_row(train_size=5000), "train_images": 5000, "images_per_epoch": 4992}])
    assert final_table_heading(subset) == "Final fine-tune (a stratified subset of 5000 target training images):"
    both = pd.DataFrame([{**_row(train_size=5000, max_steps_per_epoch=3), "train_images": 5000,
                          "images_per_epoch": 384}])
    assert final_table_heading(both) == ("Final fine-tune (at most 3 steps per epoch: 384 of a stratified subset of "
                                         "5000 target training images per epoch):")
    # a cap above the steps an epoch has trained on all the data
    loose = pd.DataFrame([{**_row(max_steps_per_epoch=1000), "train_images": 60000, "images_per_epoch": 59904}])
    assert final_table_heading(loose) == "Final fine-tune (full target data):"


def test_finetune_sweep_prints_a_capped_heading_over_its_table(tmp_path, monkeypatch, capsys):
    from orchestrator.cli import main

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    _stage_without_ray(monkeypatch, tmp_path, lambda tid: {**METRICS, "train_images": 5000, "images_per_epoch": 96},
                       slots=1)
    assert main(["finetune", "--sweep", str(sweep), "--max-steps-per-epoch", "3", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "Final fine-tune (at most 3 steps per epoch: 96 of the 5000 target training images per epoch):" in out
    assert "full target data" not in out
