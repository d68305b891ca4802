"""Findings of a new-user walk through the single-run commands (``gmpq search``, ``train-fp``, ``finetune --policy``):
a kept fine-tune evaluated again on this run's test images, output and cache paths of the wrong kind refused before
any work, Ctrl-C and SIGTERM lines that say what is kept and what a rerun does, honest labels and flag names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parents[2]

# UCI digits (8x8, in scikit-learn): a whole run takes a second or two
TINY = ["--dataset", "digits", "--train-size", "100", "--test-size", "40", "--batch-size", "16",
        "--max-steps-per-epoch", "1"]
FINETUNE = ["finetune", "--uniform", "4", "4", "--fp-epochs", "1", *TINY]
TRAIN_FP = ["train-fp", "--dataset", "digits", "--proxy-size", "100", "--test-size", "40", "--batch-size", "16",
            "--max-steps-per-epoch", "1", "--epochs", "1"]
SEARCH = ["search", "--dataset", "digits", "--proxy-size", "100", "--eval-size", "40", "--epochs", "1",
          "--teacher-epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "1"]


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())        # undo the line wrapping


# -- 1: a kept fine-tune rerun with another --test-size is evaluated again on it --------------------------------------

def test_a_kept_fine_tune_rerun_with_another_test_size_records_its_new_measurement(tmp_path, capsys):
    import torch

    out = tmp_path / "ft"
    sized = ["finetune", "--uniform", "4", "4", "--fp-epochs", "2", "--dataset", "digits", "--train-size", "400",
             "--batch-size", "32", "--epochs", "2", "--out", str(out)]
    assert main([*sized, "--test-size", "40"]) == 0
    old = json.loads((out / "finetune_result.json").read_text())
    capsys.readouterr()
    assert main([*sized, "--test-size", "97"]) == 0            # nothing left to train: evaluated again on 97 images
    assert "evaluating it again" in capsys.readouterr().err
    new = json.loads((out / "finetune_result.json").read_text())
    assert new["test_size"] == 97 and new["history"] == old["history"]     # the epochs' own figures stay
    assert main(["evaluate", str(out), "--test-size", "97", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["test_images"] == 97
    assert (new["top1"], new["top5"]) == pytest.approx((measured["top1"], measured["top5"]))
    assert (new["top1"], new["top5"]) != (old["top1"], old["top5"])   # 40 vs 97 images: other fractions
    results = torch.load(out / "quantized.pt", weights_only=True)["results"]
    assert results["test_images"] == 97 and (results["top1"], results["top5"]) == (new["top1"], new["top5"])
    assert measured["recorded_top1"] == pytest.approx(new["top1"])


# -- 4: --cache-dir checked up front ---------------------------------------------------------------------------------

def test_search_with_a_cache_dir_that_is_a_file_is_refused_before_the_teacher_trains(tmp_path, capsys, monkeypatch):
    import gmpq_core.jobs as jobs

    monkeypatch.setattr(jobs, "load_teacher", lambda *a, **k: pytest.fail("the teacher was trained"))
    afile = tmp_path / "afile"
    afile.write_text("")
    assert main([*SEARCH, "--cache-dir", str(afile), "--out", str(tmp_path / "s")]) == 2
    err = _err(capsys)
    assert f"The teacher cache folder '{afile / 'teachers'}' cannot be written" in err
    assert "pass --cache-dir a folder you can write" in err and "Traceback" not in err
    assert not (tmp_path / "s").exists()


# -- 5: the files each command writes in --out checked up front -----------------------------------------------------

@pytest.mark.parametrize("argv, path, kind", [
    (SEARCH, "policy.json", "folder"), (TRAIN_FP, "fp.pt", "folder"), (FINETUNE, "checkpoints", "file"),
    (FINETUNE, "quantized.pt", "folder")], ids=["search-policy", "train-fp-fp.pt", "finetune-checkpoints",
                                                 "finetune-quantized"])
def test_an_output_path_of_the_wrong_kind_in_out_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                                             path, kind):
    import gmpq_core.jobs as jobs
    import gmpq_core.train as train

    monkeypatch.setattr(jobs, "load_teacher", lambda *a, **k: pytest.fail("the teacher was trained"))
    monkeypatch.setattr(train, "train_fp", lambda *a, **k: pytest.fail("a model was trained"))
    out = tmp_path / "out"
    blocked = out / path
    if kind == "folder":
        blocked.mkdir(parents=True)
    else:
        out.mkdir()
        blocked.write_text("")
    cache = ["--cache-dir", str(tmp_path / "c")] if argv is SEARCH else []
    assert main([*argv, *cache, "--out", str(out)]) == 2
    err = _err(capsys)
    assert f"'{blocked}' is a {kind}, but gmpq {argv[0]}" in err and "Traceback" not in err
    assert "Remove or rename that" in err and "pass --out another folder" in err


# -- 6 / 13: Ctrl-C and SIGTERM say what is kept and what rerunning the same command does ----------------------------

def test_an_interrupted_search_says_only_the_cached_teacher_is_kept(tmp_path, capsys, monkeypatch):
    import gmpq_core.jobs as jobs

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(jobs, "run_search_job", interrupted)
    out = tmp_path / "s"
    assert main([*SEARCH, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 130
    err = _err(capsys)
    assert "finished work is kept on disk" not in err
    assert "gmpq search: interrupted; a search keeps no checkpoint, so nothing of this search is kept." in err
    assert f"The FP teacher is kept in the cache ({tmp_path / 'c' / 'teachers'})" in err
    assert "rerunning the same command reuses it and starts the search again at epoch 1" in err
    assert not out.exists()


def test_an_interrupted_fine_tune_names_its_checkpoint_and_the_rerun_resumes_it(tmp_path, capsys, monkeypatch):
    import gmpq_core.finetune as core

    real = core.run_epochs

    def stop_after_epoch_1(*a, after_epoch, **k):
        def save_then_stop(epoch):
            after_epoch(epoch)
            raise KeyboardInterrupt
        return real(*a, after_epoch=save_then_stop, **k)
    monkeypatch.setattr(core, "run_epochs", stop_after_epoch_1)
    out = tmp_path / "ft"
    argv = [*FINETUNE, "--epochs", "2", "--out", str(out)]
    assert main(argv) == 130
    err = _err(capsys)
    assert "finished work is kept on disk" not in err
    assert (f"gmpq finetune: interrupted; the fine-tune's checkpoint after epoch 1 of 2 is kept in "
            f"{out / 'checkpoints' / 'last.pt'}. The FP model it trained first is kept as {out / 'fp.pt'} and reused "
            "by a rerun. Rerunning the same command resumes it after epoch 1.") in err
    monkeypatch.setattr(core, "run_epochs", real)
    assert main(argv) == 0
    err = _err(capsys)
    assert "resuming the fine-tune" in err and "after epoch 1 of 2" in err


def test_a_fine_tune_interrupted_in_its_own_fp_training_says_nothing_is_kept(tmp_path, capsys, monkeypatch):
    import gmpq_core.train as train

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_fp", interrupted)
    out = tmp_path / "ft"
    assert main([*FINETUNE, "--out", str(out)]) == 130
    err = _err(capsys)
    assert "finished work is kept on disk" not in err
    assert "nothing of this run is kept" in err and "trains it again from epoch 1, then fine-tunes" in err
    assert not (out / "fp.pt").exists() and not (out / "checkpoints").exists()


_SIGTERM_IN = """
import os, signal, sys, time
import gmpq_core.jobs as jobs, gmpq_core.train as train
def term(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
jobs.load_teacher = train.train_fp = term
from orchestrator.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("argv, says", [
    (TRAIN_FP, "gmpq train-fp: terminated (SIGTERM); train-fp keeps no checkpoint"),
    (SEARCH, "gmpq search: terminated (SIGTERM); a search keeps no checkpoint"),
    (FINETUNE, "gmpq finetune: terminated (SIGTERM); no fine-tune epoch had started")],
    ids=["train-fp", "search", "finetune"])
def test_sigterm_ends_a_single_run_with_143_and_says_what_is_kept(tmp_path, argv, says):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GMPQ_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", _SIGTERM_IN, *argv, "--out", str(tmp_path / "out")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    err = " ".join(p.stderr.split())
    assert p.returncode == 143, p.stderr[-2000:]
    assert says in err and "rerunning the same command" in err.lower() and "Traceback" not in err


# -- 8: --eval-size 0 labelled honestly -------------------------------------------------------------------------------

def test_search_summary_says_proxy_top1_is_on_training_images_with_eval_size_0(tmp_path):
    from gmpq_core.policy import BitPolicy, QuantSpec
    from orchestrator.cli import build_parser
    from orchestrator.commands.search import format_summary

    result = types.SimpleNamespace(policy=BitPolicy(layers={"a": QuantSpec(w_bits=4, a_bits=4)}),
                                   budget_bitops=None, bitops_quantized=10**9, bitops_total=2 * 10**9,
                                   proxy_top1=17.19, ard=0.5, p=1.5, epochs_run=1, search_seconds=2.9)
    text = " ".join(format_summary(result, tmp_path, eval_size=0).split())
    assert "proxy top-1 17.19% (on the proxy's own training images: no held-out images, --eval-size 0;" in text
    assert "1 epoch in 2.9 s" in text
    held_out = format_summary(result, tmp_path, eval_size=1000)
    assert "training images" not in held_out
    helps = " ".join(build_parser("search")._subparsers._group_actions[0].choices["search"].format_help().split())
    said = "0: none, and the summary's proxy top-1 is then measured on the proxy's own training images"
    assert "".join(said.split()) in "".join(helps.split())      # (argparse may wrap at a hyphen: top-1)


# -- 14 / 15: train-fp's messages name the flags, give the fix, and come before any notice --------------------------

@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "-1", "--lr must be a finite number > 0, but got --lr -1. Use e.g. --lr 0.1."),
    ("--weight-decay", "-1", "but got --weight-decay -1. Use e.g. --weight-decay 5e-4 (0: none), or leave it out."),
    ("--seed", "-1", "--seed must be a non-negative integer, but got --seed -1. Use e.g. --seed 0")])
def test_train_fp_errors_name_the_flag_and_the_fix(tmp_path, capsys, flag, value, says):
    assert main([*TRAIN_FP, flag, value, "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert says in err and "lr=" not in err and "seed=" not in err and "weight_decay=" not in err


def test_train_fp_refuses_a_bad_value_before_saying_it_replaces_an_earlier_model(tmp_path, capsys):
    out = tmp_path / "fp"
    assert main([*TRAIN_FP, "--out", str(out)]) == 0
    capsys.readouterr()
    for bad in (["--device", "banana"], ["--seed", "-1"]):
        assert main([*TRAIN_FP, *bad, "--out", str(out)]) == 2
        err = _err(capsys)
        assert "replaces" not in err and err.startswith("gmpq: error:")


# -- 17: plurals, and what the fine-tune's top-1 comes from --------------------------------------------------------

def test_finetune_says_its_test_images_and_capped_steps_in_singular_where_one(tmp_path, capsys):
    assert main([*FINETUNE, "--out", str(tmp_path / "ft")]) == 0
    captured = capsys.readouterr()
    out, err = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert "training the FP model first (1 epoch)" in err
    assert "after 1 epoch" in out and "epoch(s)" not in out
    assert ("(top-1 on 40 test images of digits; the fine-tune on 100 training images, at most 1 batch of 16 per "
            "epoch)") in out
    from orchestrator.cli import build_parser
    helps = " ".join(build_parser("finetune")._subparsers._group_actions[0].choices["finetune"].format_help().split())
    said = ("epochs of the FP training, when it is trained here (default 2); that training uses the fine-tune's "
            "--train-size, --test-size, --batch-size and --max-steps-per-epoch too")
    assert "".join(said.split()) in "".join(helps.split())      # (argparse may wrap at a flag's hyphen)


# -- 19 and 11: refusals that name what is there --------------------------------------------------------------------

def test_another_policy_into_a_fine_tune_folder_names_both_and_offers_another_out(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main([*FINETUNE, "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["finetune", "--uniform", "3", "4", *FINETUNE[4:], "--out", str(out)]) == 2
    err = _err(capsys)
    assert "was written for the bit policy uniform W4A4 (mean bits per layer W 4.00 A 4.00" in err
    assert "this run fine-tunes the bit policy uniform W3A4 (mean bits per layer W 3.00 A 4.00" in err
    assert "Pass --uniform 4 4 to resume it, another --out for this run" in err


def test_train_fp_into_a_fine_tune_folder_built_on_its_fp_model_is_refused(tmp_path, capsys):
    out = tmp_path / "ft"
    assert main([*FINETUNE, "--out", str(out)]) == 0
    before = (out / "fp.pt").read_bytes()
    capsys.readouterr()
    assert main([*TRAIN_FP, "--out", str(out)]) == 2
    err = _err(capsys)
    assert f"'{out}' holds a 'gmpq finetune' run whose checkpoint" in err
    assert f"was started from the FP model '{out / 'fp.pt'}'" in err and "Pass another --out for this run" in err
    assert (out / "fp.pt").read_bytes() == before
