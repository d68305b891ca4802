"""A read-only sweep folder: ``gmpq pareto``, ``gmpq finetune --sweep`` and ``gmpq export`` refuse it with the one
paragraph and exit 2 of the other commands (``gmpq_core.fileio.check_writable_dir``) before any work, where they
ended in an OSError traceback at their first file; ``gmpq evaluate``, which only reads, keeps working there.

Read-only is real here: a non-root user gets a folder without write permission; root (which writes through
permissions) gets a tmpfs mounted there and remounted read-only. The tests skip where neither is possible."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from final_model_files import sweep_with_models
from test_run import hand_made_sweep

from orchestrator.cli import main


def _run(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0


@pytest.fixture
def read_only(tmp_path):
    """``(folder, freeze)``: fill ``folder``, then ``freeze()`` makes it (and its subfolders) read-only."""
    folder = tmp_path / "ro"
    folder.mkdir()
    root = hasattr(os, "geteuid") and os.geteuid() == 0
    mounted = False
    if root:               # root writes through permissions: a read-only tmpfs instead
        if shutil.which("mount") is None or not _run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)]):
            pytest.skip("running as root, and a read-only tmpfs cannot be mounted here")
        mounted = True

    def freeze() -> None:
        if mounted:
            if not _run(["mount", "-o", "remount,ro", str(folder)]):
                pytest.skip("the tmpfs cannot be remounted read-only here")
        else:
            for d, _, _ in os.walk(folder):
                os.chmod(d, 0o555)
        try:
            (folder / ".probe").write_text("x")
        except OSError:
            return
        pytest.skip("cannot make a folder read-only on this system")

    yield folder, freeze
    if mounted:
        _run(["umount", str(folder)]) or _run(["umount", "-l", str(folder)])
    else:
        for d, _, _ in os.walk(folder):
            os.chmod(d, 0o755)


def _refused(argv: list[str], capsys, folder) -> str:
    import ray

    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and not ray.is_initialized()
    text = " ".join(err.split())
    assert "cannot be written" in text and str(folder) in text, text
    assert text.count("gmpq: error:") == 1
    return text


def test_pareto_refuses_a_read_only_sweep_before_any_work(read_only, capsys):
    folder, freeze = read_only
    hand_made_sweep(folder)
    freeze()
    for extra in (["--no-mlflow"], ["--top-k", "1"]):     # with MLflow too (the sweep's mlflow.db lies there)
        text = _refused(["pareto", "--sweep", str(folder), *extra], capsys, folder)
        assert "The sweep folder" in text and "gmpq pareto writes pareto.parquet" in text
        assert f"cp -r {folder} NEW_DIR" in text


def test_finetune_sweep_refuses_a_read_only_sweep_before_ray_starts(read_only, capsys):
    folder, freeze = read_only
    hand_made_sweep(folder)
    freeze()
    text = _refused(["finetune", "--sweep", str(folder)], capsys, folder)
    assert "gmpq finetune --sweep writes final.parquet" in text
    for extra in (["--top-k", "1"], ["--epochs", "1", "--workers", "1"]):
        _refused(["finetune", "--sweep", str(folder), *extra], capsys, folder)


def test_finetune_sweep_still_says_a_folder_is_no_sweep_first(read_only, capsys):
    folder, freeze = read_only
    freeze()
    assert main(["finetune", "--sweep", str(folder)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "is not a sweep made by 'gmpq sweep'" in err and "cannot be written" not in err


def test_export_refuses_a_read_only_models_folder_and_can_write_elsewhere(read_only, tmp_path, capsys):
    folder, freeze = read_only
    sweep_with_models(folder)
    freeze()
    text = _refused(["export", str(folder)], capsys, folder)
    assert f"{folder / 'models'}" in text and ".int.pt beside each model" in text
    one = _refused(["export", str(folder / "models" / "t0.pt")], capsys, folder)
    assert "or pass --out FILE" in one
    _refused(["export", str(folder / "models" / "t0.pt"), "--out", str(folder / "t0.int.pt")], capsys, folder)
    out = tmp_path / "elsewhere" / "t0.int.pt"                  # read from the read-only folder, written elsewhere
    assert main(["export", str(folder / "models" / "t0.pt"), "--out", str(out)]) == 0
    assert out.is_file()


def test_evaluate_still_reads_a_read_only_sweep(read_only, capsys):
    folder, freeze = read_only
    sweep_with_models(folder, n=1)
    freeze()
    assert main(["evaluate", str(folder), "--test-size", "100"]) == 0, capsys.readouterr().err
    assert "t0.pt" in capsys.readouterr().out
