"""The Ray-free study runner: real Fashion-MNIST cells in this process, rows kept as they finish,
a rerun resumes, a deadline stops before a cell, and ``gmpq study --analyze-only`` reads its rows."""
from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))   # experiments/ lives beside the installed packages

from experiments.generalization import StudyConfig, load_study_config, smoke_version  # noqa: E402
from experiments.generalization_local import ROWS_FILE, run_local  # noqa: E402


def _tiny() -> StudyConfig:
    cfg = smoke_version(load_study_config(REPO / "experiments" / "generalization_smoke.yaml"))
    d = cfg.to_dict()
    d.update(name="local_tiny", methods=["uniform", "random"], proxies=d["proxies"][:1], seeds=[0], ard_images=8)
    return StudyConfig.from_dict(d)


def test_local_runner_writes_rows_resumes_and_feeds_the_results_page(tmp_path):
    out = tmp_path / "study"
    said: list[str] = []
    stopped = run_local(_tiny(), out, minutes=0.0, say=said.append)      # deadline before any cell
    assert stopped["cells_run"] == 0 and any("deadline" in m for m in said)
    first = run_local(_tiny(), out, say=said.append)
    assert first["cells_run"] == 2
    rows = [json.loads(line) for line in (out / ROWS_FILE).read_text().splitlines()]
    assert {r["method"] for r in rows} == {"uniform", "random"}
    assert all(r["status"] == "completed" and 0.0 <= r["target_top1"] <= 100.0 for r in rows)
    assert all(r["bitops_quantized"] <= r["budget_bitops"] for r in rows)
    assert run_local(_tiny(), out, say=said.append)["cells_run"] == 0     # resumed: nothing left
    assert (out / "study.parquet").is_file()

    from orchestrator.cli import main
    report = tmp_path / "page.md"
    assert main(["study", "--out", str(out), "--analyze-only", "--report", str(report)]) == 0
    page = report.read_text()
    assert "uniform" in page and "experiments.generalization_local" in page
    # a run on a lent machine brings back rows, not the model cache: the page reads what the run recorded
    target = first["shared_models"]["target"]
    assert 0.0 <= target["top1"] <= 100.0 and target["steps"] > 0
    fp_line = f"- **target FP model**: {target['top1']:.2f}% top-1"
    assert fp_line in page
    import shutil
    shutil.rmtree(out / "cache")
    assert main(["study", "--out", str(out), "--analyze-only", "--report", str(report)]) == 0
    assert fp_line in report.read_text()       # (uniform and random cells need no teachers)


def test_a_rerun_with_another_recipe_is_refused_but_more_seeds_are_welcome(tmp_path, capsys):
    import pytest

    from experiments.generalization_local import main
    from gmpq_core.errors import ConfigError

    out = tmp_path / "study"
    run_local(_tiny(), out, say=lambda m: None)
    changed = _tiny().to_dict()
    changed["finetune"] = {**changed["finetune"], "lr": 0.5}
    with pytest.raises(ConfigError, match="differs in finetune.*another --out"):
        run_local(StudyConfig.from_dict(changed), out, say=lambda m: None)
    more = _tiny().to_dict()
    more["seeds"] = [0, 1]
    assert run_local(StudyConfig.from_dict(more), out, say=lambda m: None)["cells_run"] == 2   # only seed 1's
    cfg_file = tmp_path / "changed.yaml"
    import yaml
    cfg_file.write_text(yaml.safe_dump(changed))
    assert main(["--config", str(cfg_file), "--out", str(out)]) == 2
    assert "differs in finetune" in capsys.readouterr().err


def test_a_study_may_gain_a_proxy_but_not_change_one(tmp_path):
    import pytest
    import yaml

    from experiments.generalization import check_same_study_config
    from gmpq_core.errors import ConfigError

    base = _tiny().to_dict()
    (tmp_path / "study_config.yaml").write_text(yaml.safe_dump(StudyConfig.from_dict(base).to_dict()))
    (tmp_path / ROWS_FILE).write_text("")
    grown = {**base, "proxies": [*base["proxies"], {"name": "extra", "dataset": "fashion_mnist", "size": 300}]}
    check_same_study_config(StudyConfig.from_dict(grown), tmp_path, ROWS_FILE)          # new cells only
    changed = {**base, "proxies": [{**base["proxies"][0], "size": 999}]}
    with pytest.raises(ConfigError, match="differs in proxies"):
        check_same_study_config(StudyConfig.from_dict(changed), tmp_path, ROWS_FILE)


def test_a_study_saved_before_the_precision_key_resumes_on_a_cpu_and_a_bad_value_is_refused(tmp_path):
    import pytest
    import yaml

    from experiments.generalization import check_same_study_config
    from gmpq_core.errors import ConfigError

    old = _tiny().to_dict()
    old.pop("precision")                                   # written before the key: it ran float32
    (tmp_path / "study_config.yaml").write_text(yaml.safe_dump(old))
    (tmp_path / ROWS_FILE).write_text("")
    check_same_study_config(_tiny(), tmp_path, ROWS_FILE)                # auto is float32 on a CPU
    check_same_study_config(StudyConfig.from_dict({**old, "precision": "fp32"}), tmp_path, ROWS_FILE)
    with pytest.raises(ConfigError, match="differs in precision"):
        check_same_study_config(StudyConfig.from_dict({**old, "precision": "bf16"}), tmp_path, ROWS_FILE)
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16.*'half'"):
        StudyConfig.from_dict({**old, "precision": "half"})
