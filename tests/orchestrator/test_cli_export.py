"""``gmpq export``: final models rewritten with packed integer weights, checked against their float files."""
from __future__ import annotations

import json

import torch
from final_model_files import sweep_with_models as _sweep_with_models

from gmpq_core.export import load_quantized_model
from orchestrator.cli import main


def test_export_writes_each_sweep_model_beside_it_smaller_and_readable_by_the_one_loader(tmp_path, capsys):
    sweep = _sweep_with_models(tmp_path / "sweep")
    assert main(["export", str(sweep), "--json", "--layers"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["out"] for r in rows] == [str(sweep / "models" / f"t{i}.int.pt") for i in range(2)]
    for i, r in enumerate(rows):
        assert r["check_same_top1"] == r["check_inputs"] == 16 and r["top1"] == 70.0 + i
        assert r["out_bytes"] < 0.35 * r["source_bytes"] and r["weight_ratio"] > 7
        assert {row["layer"] for row in r["layers"]} >= {"conv1", "fc", "layer3.2.conv2"}
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():   # the integer file through the same call that reads the float one
            ref = load_quantized_model(r["source"]).model(x)
            torch.testing.assert_close(load_quantized_model(r["out"]).model(x), ref, rtol=1e-4, atol=1e-4)
    # exporting again skips the integer files already there (they are not float models)
    assert main(["export", str(sweep)]) == 0
    assert capsys.readouterr().out.count(".int.pt:") == 2


def test_export_one_model_with_out_prints_its_sizes(tmp_path, capsys):
    sweep = _sweep_with_models(tmp_path / "sweep", n=1)
    out = tmp_path / "deploy" / "m.int.pt"
    assert main(["export", str(sweep / "models" / "t0.pt"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and f"{out}:" in text and "smaller" in text and "same top-1 on 16/16" in text


def test_export_bad_input_is_one_paragraph_before_any_file_is_written(tmp_path, capsys):
    sweep = _sweep_with_models(tmp_path / "sweep")

    def err():                                    # the paragraph unwrapped
        return " ".join(capsys.readouterr().err.split())
    assert main(["export", str(sweep), "--out", str(tmp_path / "x.int.pt")]) == 2
    assert "--out names one file, but 2 models" in err()
    assert main(["export", str(tmp_path / "nope")]) == 2
    assert "does not exist" in err()
    (tmp_path / "empty").mkdir()
    assert main(["export", str(tmp_path / "empty")]) == 2
    assert "holds no final model" in err()
    assert main(["export", str(sweep / "models" / "t0.pt"), "--out", str(tmp_path)]) == 2
    assert "is a folder" in err()
    assert main(["export", str(sweep / "models" / "t0.pt"), "--out", f"{tmp_path / 'outdir'}/"]) == 2   # not there yet
    assert "is a folder name (it ends with a '/')" in err() and not (tmp_path / "outdir").exists()
    assert not list((sweep / "models").glob("*.int.pt")) and not (tmp_path / "x.int.pt").exists()


def test_export_never_overwrites_the_float_model_or_exports_an_integer_file(tmp_path, capsys):
    sweep = _sweep_with_models(tmp_path / "sweep", n=1)
    src = sweep / "models" / "t0.pt"
    before = src.read_bytes()
    assert main(["export", str(src), "--out", str(src)]) == 2
    assert "is the model file itself" in " ".join(capsys.readouterr().err.split())
    assert main(["export", str(src)]) == 0
    capsys.readouterr()
    assert main(["export", str(sweep / "models" / "t0.int.pt")]) == 2
    assert "is an integer model file already" in " ".join(capsys.readouterr().err.split())
    renamed = sweep / "int_renamed.pt"                       # named like a float file: told by its format
    renamed.write_bytes((sweep / "models" / "t0.int.pt").read_bytes())
    assert main(["export", str(renamed), "--out", str(tmp_path / "x.int.pt")]) == 2
    assert "is an integer model file already" in " ".join(capsys.readouterr().err.split())
    assert src.read_bytes() == before and not (tmp_path / "x.int.pt").exists()
    assert not list(sweep.rglob("*.partial"))
