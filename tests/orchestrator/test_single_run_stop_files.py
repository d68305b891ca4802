"""A Ctrl-C while ``gmpq train-fp`` / ``gmpq search`` write their result files says what is on disk: the files the
run had replaced by then are its own (``_single_run.file_marks`` / ``replaced_since``), not "nothing is kept". The
decision is tested on files replaced as the commands replace them, and end to end with the stop raised between two
writes (no timing race). Tiny digits runs, a second or two each."""
from __future__ import annotations

from pathlib import Path

from gmpq_core.fileio import atomic_write_json, save_checkpoint
from orchestrator.cli import main
from orchestrator.commands import search as search_cmd, train_fp as train_fp_cmd
from orchestrator.commands._single_run import file_marks, replaced_since
from orchestrator.commands.train_fp import stopped_text

TRAIN_FP = ["train-fp", "--dataset", "digits", "--proxy-size", "100", "--test-size", "40", "--batch-size", "16",
            "--max-steps-per-epoch", "1", "--epochs", "1"]
SEARCH = ["search", "--dataset", "digits", "--proxy-size", "100", "--eval-size", "40", "--epochs", "1",
          "--teacher-epochs", "1", "--batch-size", "16", "--max-steps-per-epoch", "1"]


def _err(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_the_train_fp_stop_text_follows_the_files_replaced_since_the_marks(tmp_path):
    out = tmp_path / "fp"
    out.mkdir()
    again = "Rerunning the same command trains the model again from epoch 1"
    assert stopped_text(out, None) == f"train-fp keeps no checkpoint, so nothing of this training is kept. {again}."
    save_checkpoint(out / "fp.pt", {"w": 1})                 # an earlier training's files
    atomic_write_json(out / "fp_result.json", {"top1": 1.0})
    marks = file_marks(out, ("fp.pt", "fp_result.json"))
    assert replaced_since(out, marks) == []
    assert stopped_text(out, marks) == (f"train-fp keeps no checkpoint, so nothing of this training is kept (the "
                                        f"earlier fp.pt in {out} is left as it was). {again}.")
    save_checkpoint(out / "fp.pt", {"w": 2})                 # this training's weights replace them ...
    assert replaced_since(out, marks) == ["fp.pt"]
    assert stopped_text(out, marks) == (f"the training had finished and its fp.pt is written in {out}, but not its "
                                        f"fp_result.json ({out / 'fp_result.json'} is the earlier training's). "
                                        f"{again} and writes both.")
    atomic_write_json(out / "fp_result.json", {"top1": 2.0})   # ... and its record
    assert stopped_text(out, marks) == (f"the training had finished: its fp.pt and fp_result.json are written in "
                                        f"{out} (only its summary was not printed). {again}.")
    (out / "fp_result.json").unlink()                          # none before this run wrote one: said so
    fresh = file_marks(out, ("fp.pt", "fp_result.json"))
    save_checkpoint(out / "fp.pt", {"w": 3})
    assert "but not its fp_result.json (there is no fp_result.json)" in stopped_text(out, fresh)


def test_a_train_fp_stopped_after_writing_fp_pt_says_it_is_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "fp"
    assert main([*TRAIN_FP, "--out", str(out)]) == 0            # an earlier training's fp.pt
    before = (out / "fp.pt").read_bytes()
    capsys.readouterr()

    def stop(path, *a, **k):      # the stop comes once fp.pt is replaced, before fp_result.json is
        raise KeyboardInterrupt
    monkeypatch.setattr(train_fp_cmd, "atomic_write_json", stop)
    assert main([*TRAIN_FP, "--out", str(out), "--seed", "1"]) == 130
    err = _err(capsys)
    assert (out / "fp.pt").read_bytes() != before              # replaced: the old message said nothing was kept
    assert "nothing of this training is kept" not in err
    assert (f"gmpq train-fp: interrupted; the training had finished and its fp.pt is written in {out}, but not its "
            f"fp_result.json ({out / 'fp_result.json'} is the earlier training's)") in err


def test_a_search_stopped_after_writing_its_files_says_they_are_written(tmp_path, capsys, monkeypatch):
    out = tmp_path / "s"

    def stop(*a, **k):            # the stop comes once both files are replaced, before the summary is printed
        raise KeyboardInterrupt
    monkeypatch.setattr(search_cmd, "format_summary", stop)
    assert main([*SEARCH, "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 130
    err = _err(capsys)
    assert "nothing of this search is kept" not in err
    assert (f"gmpq search: interrupted; the search had finished: its policy.json and result.json are written in "
            f"{out} (only its summary was not printed). The FP teacher is kept in the cache") in err
    assert (Path(out) / "policy.json").is_file() and (Path(out) / "result.json").is_file()
