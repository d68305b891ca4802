import json

import pytest

from gmpq_core.policy import BitPolicy
from orchestrator.cli import build_parser, main
from orchestrator.commands.search import build_job


def _fmnist_or_skip():
    from gmpq_core.data import load_dataset
    from gmpq_core.errors import DataError
    try:
        load_dataset("fashion_mnist")
    except DataError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_flags_override_the_yaml_config(tmp_path):
    cfg = _write(tmp_path / "c.yaml", "model: resnet20\nproxy_size: 300\neta: 5.0\n"
                                      "search:\n  epochs: 4\n  lam: 0.1\n  budget: {avg_bits: 4}\n")
    args = build_parser().parse_args(["search", "--config", cfg, "--epochs", "2", "--budget-gbitops", "0.3",
                                      "--p-mode", "fixed", "--seed", "7", "--precision", "bf16"])
    job = build_job(args)
    assert job.proxy_size == 300 and job.model == "resnet20" and job.precision == "bf16"
    s = job.search
    assert (s.epochs, s.lam, s.eta, s.p_mode, s.seed) == (2, 0.1, 5.0, "fixed", 7)
    assert s.budget.gbitops == 0.3 and s.budget.avg_bits is None
    assert (s.lr_arch, s.fill_budget) == (0.01, False)          # defaults when neither YAML nor flags set them
    job = build_job(build_parser().parse_args(["search", "--config", cfg, "--lr-arch", "0.5", "--fill-budget"]))
    assert (job.search.lr_arch, job.search.fill_budget) == (0.5, True)
    assert (job.search.include_stem, job.search.include_classifier, job.search.stem_bits) == (False, False, 8)
    job = build_job(build_parser().parse_args(["search", "--include-stem", "--include-classifier", "--stem-bits", "6"]))
    assert (job.search.include_stem, job.search.include_classifier, job.search.stem_bits) == (True, True, 6)


@pytest.mark.parametrize("text,match", [("model: resnet20\n  bad: [1\n", "line"), ("- 1\n- 2\n", "mapping"),
                                        ("modle: resnet20\n", "Unknown keys"),
                                        ("search:\n  p_mode: adaptive\n", "p_mode")])
def test_bad_config_files_exit_2_without_traceback(tmp_path, capsys, text, match):
    code = main(["search", "--config", _write(tmp_path / "c.yaml", text), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err


def test_infeasible_budget_exits_2_naming_the_feasible_range(tmp_path, capsys):
    _fmnist_or_skip()
    code = main(["search", "--proxy-size", "100", "--teacher-epochs", "1", "--batch-size", "50",
                 "--budget-gbitops", "0.01", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    err = " ".join(capsys.readouterr().err.split())                     # undo the line wrapping
    assert code == 2 and "feasible range" in err and "resnet20 at 28 px" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "policy.json").exists() and not (tmp_path / "cache").exists()  # no teacher trained


def test_unknown_target_dataset_exits_2_before_any_training(tmp_path, capsys):
    code = main(["search", "--proxy-size", "100", "--target-dataset", "imagenet1k", "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Unknown dataset 'imagenet1k'" in err and "fashion_mnist" in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()


def test_search_command_writes_policy_and_result(tmp_path, capsys, monkeypatch):
    _fmnist_or_skip()
    import gmpq_core.jobs as jobs

    checks = []
    real_check = jobs.check_job_budget
    monkeypatch.setattr(jobs, "check_job_budget", lambda *a, **k: checks.append(1) or real_check(*a, **k))
    cfg = _write(tmp_path / "c.yaml", "proxy_size: 100\nteacher_epochs: 1\neval_size: 50\n"
                                      "search:\n  batch_size: 50\n  max_steps_per_epoch: 1\n"
                                      "  recalibrate_bn_batches: 1\n")
    out = tmp_path / "run"
    code = main(["search", "--config", cfg, "--epochs", "1", "--budget-avg-bits", "3", "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(out), "--target-dataset", "mnist5k"])
    assert code == 0 and len(checks) == 1       # the budget checked once, before the teacher (one model build)
    policy = BitPolicy.load(out / "policy.json")
    assert len(policy.layers) == 20
    for key, value in {"model": "resnet20", "dataset": "fashion_mnist", "in_channels": 1, "num_classes": 10,
                       "small_input": True, "input_size": 28, "budget": {"avg_bits": 3},
                       "target_dataset": "mnist5k"}.items():
        assert policy.meta[key] == value
    result = json.loads((out / "result.json").read_text())
    for key in ("proxy_top1", "bitops_quantized", "bitops_total", "budget_bitops", "ard", "p", "search_seconds",
                "epochs_run"):
        assert key in result
    assert result["bitops_quantized"] <= result["budget_bitops"] and result["epochs_run"] == 1
    first = capsys.readouterr()
    assert "proxy top-1" in first.out and "holds an earlier search" not in first.err
    # the same --out again: the earlier result is named before it is replaced (teacher cached: quick)
    assert main(["search", "--config", cfg, "--epochs", "1", "--budget-avg-bits", "3", "--cache-dir",
                 str(tmp_path / "cache"), "--out", str(out)]) == 0
    assert f"{out} holds an earlier search's policy.json" in capsys.readouterr().err
