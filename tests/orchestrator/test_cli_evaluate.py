"""``gmpq evaluate``: final models (float and integer files) on a real test split, beside their recorded top-1."""
from __future__ import annotations

import json

from final_model_files import sweep_with_models

from orchestrator.cli import main


def test_evaluate_a_sweep_gives_the_same_accuracy_for_a_model_and_its_integer_file(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep")
    assert main(["export", str(sweep / "models" / "t0.pt")]) == 0          # t0 gets its .int.pt, t1 not
    capsys.readouterr()
    assert main(["evaluate", str(sweep), "--test-size", "300", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["t0.pt", "t0.int.pt", "t1.pt"]
    assert all(r["dataset"] == "fashion_mnist" and r["test_images"] == 300 for r in rows)
    assert rows[0]["top1"] == rows[1]["top1"] and rows[0]["loss"] == rows[1]["loss"]
    assert rows[0]["recorded_top1"] == 70.0 and rows[2]["gbitops"] == 0.2 and 0 <= rows[2]["top1"] <= 100
    assert main(["evaluate", str(sweep / "models" / "t1.pt"), "--test-size", "300"]) == 0
    table = capsys.readouterr().out
    assert "recorded top-1" in table and "t1.pt" in table and "fashion_mnist" in table


def test_evaluate_refuses_a_dataset_of_other_channels_and_a_path_without_models(tmp_path, capsys):
    sweep = sweep_with_models(tmp_path / "sweep", n=1, in_channels=3)
    assert main(["evaluate", str(sweep), "--test-size", "100"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "for 10 classes of 3-channel images, but fashion_mnist has 10 classes of 1-channel images" in err
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_models_of_the_same_file_name_get_rows_that_tell_them_apart(tmp_path, capsys, monkeypatch):
    # gmpq finetune writes DIR/quantized.pt: three fine-tunes gave three rows all named quantized.pt
    import shutil

    sweep = sweep_with_models(tmp_path / "sweep", n=1)
    monkeypatch.chdir(tmp_path)
    for d in ("runs/ft1", "runs/ft2", "runs/ft"):
        (tmp_path / d).mkdir(parents=True)
        shutil.copy(sweep / "models" / "t0.pt", tmp_path / d / "quantized.pt")
    given = ["runs/ft1", "runs/ft2/quantized.pt", "runs/ft"]
    assert main(["evaluate", *given, "--test-size", "100"]) == 0
    table = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in table[1:]]
    assert names == ["ft1/quantized.pt", "ft2/quantized.pt", "ft/quantized.pt"], table
    assert main(["evaluate", *given, "--test-size", "100", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["name"] for r in rows] == names                # --json names each row as the table does
    assert [r["path"] for r in rows] == ["runs/ft1/quantized.pt", "runs/ft2/quantized.pt", "runs/ft/quantized.pt"]


def test_a_recorded_top1_measured_on_other_test_images_says_on_how_many(tmp_path, capsys):
    """The walkthrough: a fine-tune capped by --test-size 500 recorded 23.60; evaluate on 10000 images showed 24.00
    beside it, and the help called the difference float-level."""
    import torch

    sweep = sweep_with_models(tmp_path / "sweep", n=1)
    path = sweep / "models" / "t0.pt"
    blob = torch.load(path, weights_only=False)
    blob["results"]["test_images"] = 500
    torch.save(blob, path)
    assert main(["evaluate", str(path), "--test-size", "100", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recorded_test_images"] == 500
    assert main(["evaluate", str(path), "--test-size", "100"]) == 0
    assert "70.00 (on 500 images)" in capsys.readouterr().out
    assert main(["evaluate", str(path), "--test-size", "500"]) == 0
    assert "(on 500 images)" not in capsys.readouterr().out            # the same number of images: no note


def test_the_table_names_its_bit_columns_as_plain_means():
    from orchestrator.commands.evaluate import format_table
    row = {"name": "t1.pt", "path": "t1.pt", "dataset": "fashion_mnist", "test_images": 100, "avg_w_bits": 4.15,
           "avg_a_bits": 3.2, "gbitops": 0.35, "top1": 80.0, "top5": 99.0, "recorded_top1": None}
    head, line = format_table([row]).splitlines()
    assert head.split()[4:8] == ["avg", "W", "avg", "A"] and " 4.15   3.20 " in line
