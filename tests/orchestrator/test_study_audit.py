"""Findings of an audit of ``gmpq study``, each pinned: --analyze-only describes the study in its folder (a --config
or --smoke of another study is refused, as a run with it is), the datasets are checked before the study folder is
written or Ray starts, and the results page says "n/a (one seed)" where one seed gives no standard error, shows
the search settings the searches used (defaults filled in), and says why a table has no rows.

Everything runs in process on hand-made rows (no Ray: ``ray_session`` is replaced by one that fails the test)."""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import StudyConfig, check_same_study_config, load_study_config  # noqa: E402
from experiments.generalization_ray import run_study, write_rows  # noqa: E402
from gmpq_core.errors import ConfigError  # noqa: E402
from orchestrator.cli import main  # noqa: E402
from orchestrator.study import write_results_md  # noqa: E402

SMOKE = REPO / "experiments" / "generalization_smoke.yaml"
TINY = {"name": "tiny", "target": "fashion_mnist", "proxies": [{"name": "fmnist500", "dataset": "fashion_mnist",
                                                                "size": 500}],
        "budgets": [3.0], "seeds": [0], "methods": ["gmpq", "uniform", "random"],
        "search": {"epochs": 1, "batch_size": 32, "max_steps_per_epoch": 1},
        "finetune": {"epochs": 1, "max_steps_per_epoch": 1, "batch_size": 32},
        "target_fp": {"steps": 2, "batch_size": 32, "lr": 0.1}, "teacher": {"steps": 2, "batch_size": 32, "lr": 0.1},
        "proxy_eval_size": 100, "test_size": 100, "ard_images": 8, "resources": {"cpu": 1, "gpu": 0}}


def _study(capsys, *argv: str) -> tuple[int, str]:
    """Exit status and stderr with the error paragraph's line breaks undone."""
    rc = main(["study", *argv])
    return rc, " ".join(capsys.readouterr().err.split())


def _row(method: str, proxy: str, seed: int, top1: float) -> dict:
    return {"cell_id": f"{method}|{proxy}|b3|s{seed}", "method": method, "proxy": proxy, "budget": 3.0, "seed": seed,
            "target_top1": top1, "gbitops_quantized": 0.1, "gbitops_total": 1.0, "cell_seconds": 1.0,
            "search_seconds": 5.0 if method == "gmpq" else 0.0, "proxy_top1": 60.0 if method == "gmpq" else math.nan,
            "proxy_ard": 0.3 if method == "gmpq" else math.nan, "target_ard": 0.2, "status": "completed", "error": None}


def _tiny_study(tmp_path: Path, **changes) -> tuple[Path, Path]:
    """A study folder as 'gmpq study --config tiny.yaml --out DIR' leaves it (its 3 cells done), and tiny.yaml."""
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, **changes}))
    d = tmp_path / "st1"
    d.mkdir()
    (d / "study_config.yaml").write_text(yaml.safe_dump(load_study_config(cfg_file).to_dict(), sort_keys=False))
    write_rows(d, [_row("gmpq", "fmnist500", 0, 70.0), _row("uniform", "none", 0, 79.0),
                   _row("random", "none", 0, 60.0)])
    return d, cfg_file


# -- 1. --analyze-only describes the study in its folder -------------------------------------------------------
def test_analyze_only_refuses_the_smoke_config_for_another_studys_folder_as_a_run_does(tmp_path, capsys):
    d, _ = _tiny_study(tmp_path)
    with pytest.raises(ConfigError) as run_refusal:          # what a run with --smoke says ('gmpq study' exit 2)
        check_same_study_config(load_study_config(SMOKE), d, "study.parquet")
    rc, err = _study(capsys, "--smoke", "--out", str(d), "--analyze-only")
    rule = " ".join(str(run_refusal.value).split()).removesuffix(" Resume with the same config, or pass another --out.")
    assert rc == 2 and rule in err and "Traceback" not in err
    # nothing is resumed in this mode: its own ways out, not a run's "Resume with the same config"
    assert "Resume with" not in err and err.endswith(f"{rule} --analyze-only writes the page of the study as it was "
                                                     "run: leave out --config and --smoke to use the saved config, or "
                                                     "give --out the folder of the study this config ran.")
    assert not (d / "results.md").exists() and not list(d.glob("*.png"))   # no page of the wrong study
    assert not (d / "mlflow.db").exists() and not (d / "mlflow_parent.json").exists()   # nothing uploaded


def test_analyze_only_refuses_a_config_naming_another_study_or_grid(tmp_path, capsys):
    d, _ = _tiny_study(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "name": "renamed", "seeds": [0, 1]}))   # a run would resume these
    rc, err = _study(capsys, "--config", str(other), "--out", str(d), "--analyze-only")
    assert rc == 2 and "differs in name, seeds" in err and "leave out --config and --smoke" in err
    assert not (d / "results.md").exists() and not list(d.glob("*.png"))


def test_analyze_only_uses_the_saved_config_or_the_same_one(tmp_path, capsys):
    d, cfg_file = _tiny_study(tmp_path)
    assert main(["study", "--out", str(d), "--analyze-only"]) == 0
    page = (d / "results.md").read_text()
    assert "# Generalization study: tiny" in page and "3 cells = methods ['gmpq', 'uniform', 'random']" in page
    assert (d / "study_tiny.png").is_file() and "generalization_smoke" not in page
    (d / "results.md").unlink()
    other_resources = tmp_path / "same.yaml"     # how cells run is no other study: accepted, the saved one described
    other_resources.write_text(yaml.safe_dump({**TINY, "resources": {"cpu": 2, "gpu": 0}, "max_concurrent_trials": 1}))
    for cfg in (cfg_file, other_resources):
        assert main(["study", "--config", str(cfg), "--out", str(d), "--analyze-only"]) == 0
        assert "# Generalization study: tiny" in (d / "results.md").read_text()
    capsys.readouterr()


# -- 2. datasets checked before anything is written or Ray starts -----------------------------------------------
@pytest.fixture
def no_ray(monkeypatch):
    import orchestrator.ray_env as ray_env

    @contextlib.contextmanager
    def ray_session(*_, **__):
        raise AssertionError("Ray was started before the datasets were checked")
        yield
    monkeypatch.setattr(ray_env, "ray_session", ray_session)


def _imagefolder(root: Path, classes: int) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(root / split / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("change,says", [
    ({"target": "cifar100"}, "target: Unknown dataset 'cifar100'. Available datasets:"),
    ({"proxies": [{"name": "fmnist500", "dataset": "fashon_mnist", "size": 500}]},
     "the dataset of proxy 'fmnist500': Unknown dataset 'fashon_mnist'"),
    ({"proxies": [{"name": "fmnist500", "dataset": "fashion_mnist", "size": 100000}]},
     "proxy 'fmnist500': size 100000 is larger than the dataset 'fashion_mnist' (60000 training images)"),
    ({"proxies": [{"name": "m", "dataset": "mnist5k", "size": 5000}]},
     "proxy 'm': size 5000 is larger than the dataset 'mnist5k' (4000 training images)"),
    ({"test_size": 20000}, "test_size 20000 is larger than the target dataset 'fashion_mnist' (10000 test images)"),
    ({"proxies": [{"name": "pics", "dataset": "imagefolder:IMAGES", "size": None}]},
     "proxy 'pics' (imagefolder:IMAGES: 3 classes, 3 channel(s)) does not match the target 'fashion_mnist' "
     "(10 classes, 1 channel(s))"),
])
def test_bad_datasets_are_refused_before_the_study_folder_is_written_or_ray_starts(tmp_path, capsys, no_ray,
                                                                                    change, says):
    images = str(_imagefolder(tmp_path / "pics", 3))
    change = yaml.safe_load(yaml.safe_dump(change).replace("IMAGES", images))
    cfg_file, out = tmp_path / "bad.yaml", tmp_path / "study"
    cfg_file.write_text(yaml.safe_dump({**TINY, **change}))
    rc, err = _study(capsys, "--config", str(cfg_file), "--out", str(out))
    assert rc == 2 and says.replace("IMAGES", images) in err and "Traceback" not in err
    assert not out.exists()                                   # no study_config.yaml, no cache/
    if change.get("proxies", [{}])[0].get("dataset") == "fashon_mnist":
        assert "Did you mean 'fashion_mnist' (not 'fashon_mnist')?" in err


@pytest.mark.parametrize("name", ["cifar100", "CIFAR-100", "mnist"])
def test_a_dataset_gmpq_lacks_gets_no_did_you_mean_of_another_dataset(tmp_path, capsys, no_ray, name):
    """cifar100 was answered "Did you mean 'cifar10'?", which is another dataset."""
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text(yaml.safe_dump({**TINY, "target": name}))
    rc, err = _study(capsys, "--config", str(cfg_file), "--out", str(tmp_path / "study"))
    assert rc == 2 and "Did you mean" not in err and "is not one of them" in err
    assert "Available datasets: cifar10, digits, fashion_mnist, imagefolder:PATH, mnist5k." in err


def test_run_study_and_the_local_runner_check_the_datasets_first(tmp_path, no_ray):
    from experiments.generalization_local import run_local

    cfg = StudyConfig.from_dict({**TINY, "target": "cifar100"})
    for run in (run_study, lambda c, o: run_local(c, o, say=lambda m: None)):
        with pytest.raises(ConfigError, match="Unknown dataset 'cifar100'"):
            run(cfg, tmp_path / "study")
        assert not (tmp_path / "study").exists()


# -- 3. the results page says what the data can say --------------------------------------------------------------
def test_one_seed_gives_no_verdict_and_no_nan_and_empty_tables_say_why(tmp_path):
    rows = [_row("gmpq", "fmnist500", 0, 70.0), _row("uniform", "none", 0, 79.0)]
    text = write_results_md(pd.DataFrame(rows), tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"})
    assert "| 3 | fmnist500 | uniform | -9.00 | - | n/a (one seed) |" in text      # the number stays, no "tie"
    assert "tie |" not in text and "nan" not in text.lower()
    assert "GMPQ vs uniform: no verdict on any of 1 (proxy, budget) pairs (one seed: no standard error" in text
    assert "the typical SE of one difference is n/a (one seed)" in text
    assert "| budget | proxy | policies | tau |" not in text            # no header without rows, but why
    assert "No tau: it needs at least 3 searched policies" in text
    text = write_results_md(pd.DataFrame(rows[1:]), tmp_path / "r.md", png_path=tmp_path / "p.png",
                            header={"title": "T"})
    assert "No comparison: the study has no completed gmpq cell." in text and "| versus |" not in text
    assert "- Nothing to read: the completed cells give no comparison" in text


def test_three_seeds_give_ties_wins_and_a_numeric_se(tmp_path):
    rows = [_row("gmpq", "p", s, a) for s, a in ((0, 80.0), (1, 82.0), (2, 81.0))] + \
           [_row("uniform", "none", s, a) for s, a in ((0, 79.0), (1, 83.0), (2, 81.0))] + \
           [_row("random", "none", s, a) for s, a in ((0, 60.0), (1, 60.5), (2, 60.25))]
    text = write_results_md(pd.DataFrame(rows), tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"})
    assert "| 3 | p | uniform | +0.00 | 1.29 | tie |" in text and "| 3 | p | random | +20.75 | 0.60 | win |" in text
    assert "n/a (" not in text and "GMPQ vs random: 1 win, 0 ties, 0 losses over 1" in text
    at4 = [_row("gmpq", "q", s, 81.0) for s in range(3)] + [_row("random", "none", 0, 70.0)]
    rows += [{**r, "budget": 4.0, "cell_id": r["cell_id"].replace("b3", "b4")} for r in at4]   # random: one seed
    text = write_results_md(pd.DataFrame(rows), tmp_path / "r.md", png_path=tmp_path / "p.png", header={"title": "T"})
    assert "GMPQ vs random: 1 win, 0 ties, 0 losses, 1 without a verdict (one seed: no standard error" in text
    assert "| 4 | q | random | +11.00 | - | n/a (one seed) |" in text and "typical SE of one difference is 0.60" in text


def test_the_header_shows_the_search_settings_used_not_none(tmp_path):
    from orchestrator.commands.study import _header

    cfg = StudyConfig.from_dict(TINY)                      # search: no eta, lam, fill_budget
    search = _header(cfg, tmp_path, "tiny.yaml", {"runs": []}, pd.DataFrame())["search"]
    assert "eta 40, lambda 0.0003, fill_budget False" in search and "None" not in search
    assert search.startswith("1 epoch(s) x at most 1 steps of batch 32")
    both = StudyConfig.from_dict({**TINY, "methods": ["gmpq", "eta0"], "search": {"eta": 20.0, "lam": 1e-3}})
    assert "eta 20, lambda 0.001" in _header(both, tmp_path, "x.yaml", {"runs": []}, pd.DataFrame())["search"]
    assert "eta0 sets eta 0" in _header(both, tmp_path, "x.yaml", {"runs": []}, pd.DataFrame())["search"]
    plain = StudyConfig.from_dict({**TINY, "methods": ["uniform"], "proxies": []})
    assert _header(plain, tmp_path, "x.yaml", {"runs": []}, pd.DataFrame())["search"].startswith("none")


def test_the_headers_model_line_follows_the_config_stem_and_size(tmp_path):
    """It said "(small-input stem) at 28 px" whatever the study's model options were."""
    from orchestrator.commands.study import _header

    def model_line(**kw):
        return _header(StudyConfig.from_dict({**TINY, **kw}), tmp_path, "x.yaml", {"runs": []}, pd.DataFrame())["model"]
    assert model_line().startswith("resnet20 (small-input stem) at the dataset's own image size;")
    assert model_line(small_input=False, image_size=32).startswith("resnet20 (ImageNet stem) at 32 px")
