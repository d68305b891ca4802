"""CLI foundation: `gmpq bitops` contract, exit-2 errors without tracebacks, train-fp / finetune on real data."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from gmpq_core.bitops import count_bitops
from gmpq_core.fileio import load_checkpoint, read_json
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main
from orchestrator.progress import BarProgress, ProgressReporter

GMPQ = Path(sys.executable).with_name("gmpq")


def run_json(capsys, argv: list[str]) -> dict:
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object on one line
    return json.loads(out)


def resnet18_hand_macs(classes: int) -> int:
    """torchvision ResNet-18 at 224x224: stem 7x7/2 -> 112, max-pool -> 56, four stages of 3x3 convs."""
    stem = 7 * 7 * 3 * 64 * 112 * 112
    layer1 = 4 * (3 * 3 * 64 * 64 * 56 * 56)
    total = stem + layer1
    for c_in, c, s in ((64, 128, 28), (128, 256, 14), (256, 512, 7)):
        total += 3 * 3 * c_in * c * s * s + 3 * (3 * 3 * c * c * s * s) + c_in * c * s * s  # + 1x1 shortcut
    return total + 512 * classes


def test_bitops_json_matches_hand_count_and_count_bitops_for_resnet18(capsys):
    d = run_json(capsys, ["bitops", "--model", "resnet18", "--input-size", "224", "--num-classes", "1000",
                          "--w-bits", "4", "--a-bits", "3", "--json"])
    assert d["macs"] == resnet18_hand_macs(1000) == 1_814_073_344  # the published 1.814 GMACs
    model = build_model("resnet18", num_classes=1000)
    ref = count_bitops(model, BitPolicy.uniform(model, 4, 3), 224, 3)
    assert (d["bitops_quantized"], d["bitops_total"]) == (ref.bitops_quantized, ref.bitops_total)
    stem_fc = 7 * 7 * 3 * 64 * 112 * 112 + 512 * 1000
    assert d["bitops_quantized"] == (d["macs"] - stem_fc) * 4 * 3
    assert d["bitops_total"] == d["bitops_quantized"] + stem_fc * 32 * 32
    assert len(d["layers"]) == 21 and {"name", "macs", "w_bits", "a_bits"} <= set(d["layers"][0])
    assert d["layers"][0] == {**d["layers"][0], "name": "conv1", "w_bits": 32, "a_bits": 32}


def test_bitops_with_a_policy_file_reads_model_options_from_its_meta(tmp_path, capsys):
    model = build_model("resnet20", num_classes=10, in_channels=1)
    uni = BitPolicy.uniform(model, 4, 4)
    layers = {n: {"w_bits": 2 + i % 3, "a_bits": 8 - i % 4} for i, n in enumerate(uni.layers)}
    pol = BitPolicy(layers=layers, fingerprint=uni.fingerprint,
                    meta={"model": "resnet20", "in_channels": 1, "num_classes": 10, "input_size": 28})
    path = pol.save(tmp_path / "policy.json")
    d = run_json(capsys, ["bitops", "--policy", str(path), "--json"])
    ref = count_bitops(model, pol, 28, 1)
    assert d["macs"] == ref.macs and d["bitops_quantized"] == ref.bitops_quantized
    assert d["bitops_total"] == ref.bitops_total
    assert {x["name"]: (x["w_bits"], x["a_bits"]) for x in d["layers"] if x["name"] in layers} == \
        {n: (s["w_bits"], s["a_bits"]) for n, s in layers.items()}
    assert main(["bitops", "--policy", str(path)]) == 0
    table = capsys.readouterr().out
    assert "quantized layers only" in table and f"{ref.bitops_quantized:,}" in table


@pytest.fixture
def resnet20_policy(tmp_path) -> Path:
    return BitPolicy.uniform(build_model("resnet20", in_channels=1), 4, 4).save(tmp_path / "r20.json")


@pytest.mark.parametrize("argv,needle", [
    (["--model", "resnet99", "--input-size", "32", "--w-bits", "4", "--a-bits", "4"], "resnet99"),
    (["--model", "resnet20", "--input-size", "32", "--w-bits", "9", "--a-bits", "4"], "--w-bits 9"),
    (["--model", "resnet20", "--input-size", "32", "--w-bits", "4", "--a-bits", "0"], "--a-bits 0"),
    (["--model", "resnet20", "--input-size", "32", "--policy", "/no/such/policy.json"], "/no/such/policy.json"),
    (["--model", "resnet18", "--input-size", "224", "--policy", "POLICY"], "does not fit"),
    (["--model", "resnet20", "--input-size", "32"], "--w-bits W --a-bits A"),
    (["--model", "resnet20", "--input-size", "32", "--w-bits", "4"], "--a-bits is missing"),
    (["--model", "resnet20", "--w-bits", "4", "--a-bits", "4", "--input-size", "0"], "--input-size"),
])
def test_bitops_bad_input_exits_2_with_one_paragraph_and_no_traceback(argv, needle, resnet20_policy, capsys):
    argv = [str(resnet20_policy) if a == "POLICY" else a for a in argv]
    assert main(["bitops", *argv, "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert err.startswith("gmpq: error:") and needle in err.replace("\n", " ")


def test_installed_gmpq_command_exits_2_without_traceback():
    proc = subprocess.run([str(GMPQ), "bitops", "--model", "resnet20", "--input-size", "32", "--w-bits", "9",
                           "--a-bits", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "--w-bits 9" in proc.stderr and proc.stdout == ""


def test_progress_reporter_prints_one_line_per_epoch_and_forwards():
    from gmpq_core.reporting import ListReporter
    stream, inner = io.StringIO(), ListReporter(stop_after=1)
    rep = ProgressReporter("train-fp", total_epochs=3, stream=stream, inner=inner)
    assert not rep.should_stop()
    rep.report(1, {"top1": 91.234, "loss": 0.25})
    assert stream.getvalue() == "[train-fp] epoch 1/3: top1 91.23  loss 0.25\n"
    assert inner.records == [(1, {"top1": 91.234, "loss": 0.25})] and rep.should_stop()
    rep.report(2, {"top1": 14.8, "train_top1": 14.8, "loss": 2.3, "train_loss": 2.1, "seconds": 130.94})
    assert stream.getvalue().splitlines()[1] == "[train-fp] epoch 2/3: top1 14.80  loss 2.3  train_loss 2.1  elapsed 130.9 s"


def test_bar_progress_draws_one_bar_per_pass_and_is_off_when_not_a_tty():
    stream = io.StringIO()
    bar = BarProgress("epoch", stream=stream, enabled=True)
    for _ in range(2):
        for done in (1, 2, 3):
            bar(done, 3)
    assert bar.passes == 2 and "epoch 2" in stream.getvalue()
    quiet = io.StringIO()
    off = BarProgress("epoch", stream=quiet)  # StringIO is not a terminal
    off(1, 3)
    assert not off.enabled and quiet.getvalue() == ""



def test_off_a_terminal_a_long_pass_prints_a_plain_line_at_the_interval(monkeypatch):
    clock = iter([0.0, 10.0, 30.0, 40.0, 62.0, 70.0, 100.0, 101.0]).__next__
    log = io.StringIO()                                   # a log file: no bar, and no line for a short pass
    bar = BarProgress("finetune epoch", stream=log, every=30, clock=clock)
    for done in (1, 2, 3, 4, 5, 6):
        bar(done, 10)
    lines = log.getvalue().splitlines()
    assert lines == ["[finetune epoch] batch 3/10 (30 %), 30 s elapsed, ~105 s left",   # 15 s a batch after the 1st
                     "[finetune epoch] batch 5/10 (50 %), 62 s elapsed, ~78 s left"]
    bar(1, 10)                                            # the next epoch starts its own clock
    bar(2, 10)
    assert len(log.getvalue().splitlines()) == 2
    monkeypatch.setenv("GMPQ_PROGRESS_SECONDS", "0")      # switched off
    assert BarProgress("x", stream=io.StringIO()).every == 0
    monkeypatch.setenv("GMPQ_PROGRESS_SECONDS", "soon")   # not a number: the default, not an error
    assert BarProgress("x", stream=io.StringIO()).every == 30
    assert BarProgress("x", stream=io.StringIO(), enabled=False).every == 0   # asked for silence

# -- train-fp and finetune on real (small) data: the digits set, 8x8, so each run takes seconds --
TINY = ["--dataset", "digits", "--test-size", "50", "--batch-size", "16", "--max-steps-per-epoch", "1"]


def test_train_fp_then_finetune_write_their_files_and_resume(tmp_path, capsys):
    fp_dir, q_dir = tmp_path / "fp", tmp_path / "q"
    assert main(["train-fp", "--model", "resnet20", "--proxy-size", "100", "--epochs", "1", *TINY,
                 "--out", str(fp_dir)]) == 0
    out, err = capsys.readouterr()
    assert "test top-1" in out and "[train-fp] epoch 1/1:" in err
    fp = read_json(fp_dir / "fp_result.json")
    assert (fp["model"], fp["in_channels"], fp["input_size"], fp["train_size"]) == ("resnet20", 1, 8, 100)
    assert fp["precision"] == "fp32"                          # auto on the CPU
    assert set(load_checkpoint(fp_dir / "fp.pt")) == set(build_model("resnet20", in_channels=1).state_dict())

    argv = ["finetune", "--uniform", "4", "4", "--fp-checkpoint", str(fp_dir / "fp.pt"), "--train-size", "100",
            "--epochs", "2", "--distill", *TINY, "--out", str(q_dir)]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "BitOPs" in out and "[finetune] epoch 2/2:" in err
    res = read_json(q_dir / "finetune_result.json")
    model = build_model("resnet20", in_channels=1)
    ref = count_bitops(model, BitPolicy.uniform(model, 4, 4), 8, 1)
    assert res["bitops"]["bitops_quantized"] == ref.bitops_quantized
    assert res["bitops"]["bitops_total"] == ref.bitops_total
    assert res["epochs_run"] == 2 and res["dataset"] == "digits" and res["policy"]["avg_w_bits"] == 4.0
    assert res["precision"] == "fp32"
    assert 0.0 <= res["top1"] <= 100.0 and "fp_top1" in res
    assert (q_dir / "quantized.pt").is_file() and BitPolicy.load(q_dir / "policy.json").layers

    # a rerun with the same settings resumes at the end (no new epoch); fewer epochs are refused (more continue:
    # test_finetune_continue.py)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "[finetune] epoch" not in err and read_json(q_dir / "finetune_result.json")["epochs_run"] == 2
    assert main([*argv[:-2], "--epochs", "1", "--out", str(q_dir)]) == 2
    assert "holds a 2-epoch fine-tune, but this run has --epochs 1" in " ".join(capsys.readouterr().err.split())

    # a policy that names another target dataset than the FP checkpoint's is refused, naming both and the fixes
    policy = BitPolicy.load(q_dir / "policy.json")
    other = BitPolicy(layers=policy.layers, fingerprint=policy.fingerprint,
                      meta={**policy.meta, "target_dataset": "fashion_mnist"})
    other.save(tmp_path / "other.json")
    assert main(["finetune", "--policy", str(tmp_path / "other.json"), "--fp-checkpoint", str(fp_dir / "fp.pt"),
                 "--test-size", "50", "--out", str(tmp_path / "q2")]) == 2
    err = capsys.readouterr().err
    assert "target dataset 'fashion_mnist'" in err and "trained on 'digits'" in err and "--dataset digits" in err


def test_finetune_without_fp_checkpoint_trains_fp_first(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["finetune", "--uniform", "2", "3", "--fp-epochs", "1", "--train-size", "100", *TINY,
                 "--out", str(out_dir)]) == 0
    err = capsys.readouterr().err
    assert "training the FP model first" in err and "[train-fp] epoch 1/1:" in err
    assert (out_dir / "fp.pt").is_file() and (out_dir / "finetune_result.json").is_file()
    from gmpq_core.export import load_quantized_model
    loaded = load_quantized_model(out_dir / "quantized.pt")       # self-contained: no policy file or flags needed
    result = json.loads((out_dir / "finetune_result.json").read_text())
    assert loaded.results["top1"] == result["top1"] and loaded.arch["model"] == result["model"]
    assert loaded.preprocess["dataset"] == "digits" and len(loaded.preprocess["mean"]) == loaded.arch["in_channels"]
    assert {(s.w_bits, s.a_bits) for s in loaded.quantized.values()} == {(2, 3)} and not loaded.model.training


@pytest.mark.parametrize("extra,needle", [
    ([], "neither"),
    (["--uniform", "4", "4", "--policy", "p.json"], "both"),
    (["--uniform", "4", "12"], "got --uniform 4 12: its A (activation bits) 12"),
    (["--policy", "/no/such.json"], "/no/such.json"),
])
def test_finetune_bad_input_exits_2(extra, needle, tmp_path, capsys):
    assert main(["finetune", *extra, "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err.replace("\n", " ")


def test_finetune_refuses_a_policy_for_another_model_before_training(tmp_path, capsys):
    pol = BitPolicy.uniform(build_model("resnet18"), 4, 4).save(tmp_path / "r18.json")
    assert main(["finetune", "--policy", str(pol), "--model", "resnet20", *TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "[train-fp]" not in err and not (tmp_path / "o" / "fp.pt").exists()
