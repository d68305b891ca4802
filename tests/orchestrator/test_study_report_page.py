"""``gmpq study --report PATH`` never replaces a file it did not write as it stands (docs/results.md collects several
studies and hand-written sections): refused before any work, with one paragraph naming the file and the fix. A page
it wrote (stamped with a digest of its text) is rewritten on the next run; the help's examples keep the page in the
study folder. In process, without Ray: each test well under a second."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import load_study_config  # noqa: E402
from experiments.generalization_ray import write_rows  # noqa: E402
from orchestrator.cli import main  # noqa: E402

SMOKE = REPO / "experiments" / "generalization_smoke.yaml"


def _fake_study(d: Path) -> None:
    """A study folder with one completed uniform cell (its config and study.parquet)."""
    d.mkdir(parents=True)
    cfg = load_study_config(SMOKE).to_dict()
    (d / "study_config.yaml").write_text(yaml.safe_dump({**cfg, "methods": ["uniform"], "proxies": []}))
    write_rows(d, [{"cell_id": "uniform|none|b3|s0", "method": "uniform", "proxy": "none", "budget": 3.0, "seed": 0,
                    "target_top1": 70.0, "gbitops_quantized": 0.1, "gbitops_total": 1.0, "cell_seconds": 1.0,
                    "status": "completed", "error": None}])


def _study(capsys, *argv: str) -> tuple[int, str]:
    rc = main(["study", *argv])
    return rc, " ".join(capsys.readouterr().err.split())


def test_a_hand_written_report_file_is_refused_before_the_study_runs(tmp_path, capsys, monkeypatch):
    import experiments.generalization_ray as ray_run

    def run_study(*a, **k):
        raise AssertionError("the study ran although its page could not be written")
    monkeypatch.setattr(ray_run, "run_study", run_study)
    curated = tmp_path / "docs" / "results.md"
    curated.parent.mkdir()
    curated.write_text("# Results\n\nHand-written reading of several studies.\n")
    rc, err = _study(capsys, "--smoke", "--out", str(tmp_path / "study"), "--report", str(curated))
    assert rc == 2 and f"'{curated}'" in err and "Pass --report another file" in err and "Traceback" not in err
    assert curated.read_text() == "# Results\n\nHand-written reading of several studies.\n"   # untouched
    assert not (tmp_path / "study").exists() and not list(curated.parent.glob("*.png"))


def test_analyze_only_rewrites_its_own_page_but_not_one_edited_since(tmp_path, capsys):
    d = tmp_path / "study"
    _fake_study(d)
    page = tmp_path / "page.md"
    assert main(["study", "--out", str(d), "--analyze-only", "--report", str(page)]) == 0
    first = page.read_text()
    assert first.startswith("<!-- written by 'gmpq study'") and "# Generalization study:" in first
    assert main(["study", "--out", str(d), "--analyze-only", "--report", str(page)]) == 0   # its own: rewritten
    capsys.readouterr()
    page.write_text(first + "\nA hand-written line.\n")
    rc, err = _study(capsys, "--out", str(d), "--analyze-only", "--report", str(page))
    assert rc == 2 and "edited since" in err and page.read_text().endswith("A hand-written line.\n")


def test_the_help_examples_write_no_report_over_the_docs(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    text = capsys.readouterr().out
    examples = [line for line in text.splitlines() if line.strip().startswith("gmpq study")]
    assert examples and not any("--report docs/" in line for line in examples), examples


def test_the_study_folders_own_page_is_rewritten_even_without_a_stamp(tmp_path, capsys):
    """The review: a DIR/results.md an earlier gmpq wrote (no stamp) made a resume or --analyze-only of that study
    exit 2, the message suggesting that very file."""
    d = tmp_path / "study"
    _fake_study(d)
    (d / "results.md").write_text("# Generalization study: an older page\n")
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    assert (d / "results.md").read_text().startswith("<!-- written by 'gmpq study'")
    (d / "results.md").write_text("# Generalization study: an older page\n")
    assert main(["study", "--out", str(d), "--analyze-only", "--report", str(d / "results.md")]) == 0
    capsys.readouterr()


def test_an_image_at_the_plot_path_is_not_replaced_but_the_studys_own_plot_is(tmp_path, capsys):
    """``--png`` (or the default plot next to a page outside the study folder) over someone's image: refused before
    any work; a plot gmpq study wrote there (its PNG "Software" text) is rewritten; the study folder's own always."""
    d = tmp_path / "study"
    _fake_study(d)
    photo = tmp_path / "docs" / "figure.png"
    photo.parent.mkdir()
    photo.write_bytes(b"\x89PNG\r\n\x1a\n not a plot of ours")
    rc, err = _study(capsys, "--out", str(d), "--analyze-only", "--png", str(photo))
    assert rc == 2 and f"The plot '{photo}' already exists" in err and "Pass --png another file" in err
    assert photo.read_bytes().endswith(b"not a plot of ours")
    ours = tmp_path / "docs" / "ours.png"
    for _ in range(2):                                           # written, then its own plot rewritten
        assert main(["study", "--out", str(d), "--analyze-only", "--png", str(ours)]) == 0
    capsys.readouterr()
    page = tmp_path / "docs" / "page.md"
    beside = page.parent / "study_generalization_smoke.png"
    beside.write_bytes(photo.read_bytes())
    rc, err = _study(capsys, "--out", str(d), "--analyze-only", "--report", str(page))
    assert rc == 2 and f"The plot '{beside}'" in err
    (d / "study_generalization_smoke.png").write_bytes(photo.read_bytes())        # in the study folder: its own output
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
