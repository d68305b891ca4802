"""Bad command-line input to train-fp / finetune / bitops and config files: exit 2 with one paragraph that names
the flag and the value, before any training, with nothing written (each case once ended in a traceback, after
the work, or was silently ignored)."""
from __future__ import annotations

import json

import pytest
import torch

from gmpq_core.bitops import count_bitops
from gmpq_core.models import build_model
from gmpq_core.policy import BitPolicy
from orchestrator.cli import main

# the quickest real training run: UCI digits (8x8, in scikit-learn), one batch
TINY = ["--dataset", "digits", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16"]
TRAIN_FP = ["train-fp", *TINY, "--proxy-size", "100", "--test-size", "100"]


def refused(capsys, argv: list[str]) -> str:
    """The one-paragraph error of a command that must exit 2 without a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("gmpq: error: "), err
    return " ".join(err.split())          # unwrapped: the paragraph is filled at 100 columns


@pytest.mark.parametrize("command", ["sweep", "run", "search", "study"])
def test_a_binary_config_file_is_refused_as_not_text(command, tmp_path, capsys):
    cfg = tmp_path / "binary.yaml"
    cfg.write_bytes(b"\x00\x01\xff\xfe binary")
    err = refused(capsys, [command, "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert "binary.yaml' is not text" in err and "YAML" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_train_fp_refuses_an_out_that_is_a_file_before_training(out, tmp_path, capsys):
    """It trained, then lost the model to a FileExistsError / NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("keep me")
    err = refused(capsys, [*TRAIN_FP, "--out", str(tmp_path / out)])
    assert "afile' is a file, not a folder" in err and "--out" in err
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("argv", [[*TRAIN_FP, "--out", ""], ["finetune", "--uniform", "4", "4", "--out", " "]])
def test_an_empty_out_is_refused_not_taken_as_the_current_folder(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = refused(capsys, argv)
    assert "--out" in err and "is empty" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag, value, needle", [
    ("--in-channels", "3", "takes 3 input channel(s) (--in-channels 3), but digits has 1-channel images"),
    ("--num-classes", "3", "has 3 output classes (--num-classes 3), but digits has 10 classes"),
])
@pytest.mark.parametrize("command", [TRAIN_FP, ["finetune", "--uniform", "4", "4", *TINY, "--train-size", "100"]])
def test_model_options_that_do_not_fit_the_dataset_are_refused_before_training(command, flag, value, needle, tmp_path,
                                                                               capsys):
    """A conv RuntimeError ('expected input to have 3 channels') or 'Target 8 is out of bounds' after loading."""
    err = refused(capsys, [*command, flag, value, "--out", str(tmp_path / "out")])
    assert needle in err and f"Drop {flag}" in err and "--dataset" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["bitops", "--model", "resnet20", "--w-bits", "4", "--a-bits", "4", "--input-size", "100000"],
    [*TRAIN_FP, "--input-size", "100000"],
])
def test_an_input_size_past_the_bound_is_refused_not_allocated(argv, tmp_path, capsys):
    """120 GB (bitops) and 600 TB (the resized dataset of train-fp) allocations, and an out-of-memory traceback."""
    err = refused(capsys, [*argv, *(["--out", str(tmp_path / "out")] if argv[0] == "train-fp" else [])])
    assert "--input-size must be at most 4096 pixels per side, but got --input-size 100000" in err
    assert not (tmp_path / "out").exists()


def test_bitops_counts_on_the_meta_device_so_no_input_size_allocates(capsys):
    """The count needs shapes only: every layer's forward sees a meta tensor (nothing allocated or computed)."""
    devices = set()
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: devices.update(t.device.type for t in inp if isinstance(t, torch.Tensor)))
    try:
        assert main(["bitops", "--model", "resnet20", "--w-bits", "4", "--a-bits", "4", "--input-size", "32",
                     "--in-channels", "3", "--json"]) == 0
    finally:
        hook.remove()
    assert devices == {"meta"}
    model = build_model("resnet20", num_classes=10, in_channels=3, small_input=False)
    on_cpu = count_bitops(model, BitPolicy.uniform(model, 4, 4), 32, 3)           # the same count on real tensors
    got = json.loads(capsys.readouterr().out)
    assert (got["macs"], got["bitops_quantized"], got["bitops_total"]) == (on_cpu.macs, on_cpu.bitops_quantized,
                                                                            on_cpu.bitops_total)


@pytest.mark.parametrize("argv, needle", [
    ([*TRAIN_FP, "--test-size", "99999999"],
     "--test-size 99999999 is larger than the test split of digits (360 images)"),
    ([*TRAIN_FP, "--test-size", "5"], "--test-size 5 is smaller than the number of classes"),
    ([*TRAIN_FP, "--proxy-size", "99999999"], "--proxy-size 99999999 is larger than the training split of digits"),
    (["finetune", "--uniform", "4", "4", *TINY, "--train-size", "99999999"],
     "--train-size 99999999 is larger than the training split of digits"),
])
def test_subset_sizes_too_large_or_small_name_the_flag(argv, needle, tmp_path, capsys):
    """The message said 'proxy size 99999999 ...' for --test-size."""
    err = refused(capsys, [*argv, "--out", str(tmp_path / "out")])
    assert needle in err and "proxy size" not in err


@pytest.fixture
def policy_file(tmp_path):
    model = build_model("resnet20", num_classes=10, in_channels=1, small_input=True)
    policy = BitPolicy.uniform(model, 4, 4)
    meta = {"model": "resnet20", "in_channels": 1, "num_classes": 10, "input_size": 8, "small_input": True,
            "dataset": "digits"}
    return str(BitPolicy(layers=policy.layers, fingerprint=policy.fingerprint, meta=meta).save(tmp_path / "p.json"))


@pytest.mark.parametrize("value", ["0", "-0.1", "nan", "inf"])
def test_finetune_names_fp_lr_not_lr(value, policy_file, tmp_path, capsys):
    """'lr must be a finite number > 0, but got lr=0.0' after loading the data: the user typed --fp-lr."""
    err = refused(capsys, ["finetune", "--policy", policy_file, "--fp-lr", value, "--out", str(tmp_path / "out")])
    assert f"--fp-lr must be a finite number > 0, but got --fp-lr {float(value)}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("uri, needle", [
    ("bogus://x", "--tracking-uri 'bogus://x' has a scheme MLflow does not know ('bogus')"),
    ("", "--tracking-uri '' is empty"),
    ("sqlite:///{d}/afile/mlflow.db", "afile' is a file, not a folder; pass --tracking-uri sqlite:///PATH"),
])
def test_finetune_sweep_checks_the_tracking_uri_before_ray_starts(uri, needle, tmp_path, capsys):
    """It was accepted and the Ray Train fine-tune started; `gmpq sweep` refuses the same URI at once."""
    (tmp_path / "afile").write_text("")
    err = refused(capsys, ["finetune", "--sweep", str(tmp_path / "sweep"), "--tracking-uri",
                           uri.format(d=tmp_path)])
    assert needle in err


@pytest.mark.parametrize("extra, needle", [
    (["--max-concurrent", "2"], "--max-concurrent is for gmpq finetune --sweep DIR"),
    (["--distill-alpha", "0.3"], "--distill-alpha 0.3 has no effect without --distill"),
    (["--distill-temperature", "2", "--distill-alpha", "0.3"],
     "--distill-alpha 0.3 and --distill-temperature 2.0 have no effect without --distill"),
])
def test_finetune_options_that_would_be_ignored_are_refused(extra, needle, policy_file, tmp_path, capsys):
    err = refused(capsys, ["finetune", "--policy", policy_file, *extra, "--out", str(tmp_path / "out")])
    assert needle in err
    assert not (tmp_path / "out").exists()


# --- misc leftovers (session 16) ---
@pytest.mark.parametrize("root, where", [("afile", "is a file"), ("afile/sub", "lies under")])
@pytest.mark.parametrize("command", [[*TRAIN_FP, "--dataset", "cifar10"],
                                     ["finetune", "--uniform", "4", "4", *TINY, "--dataset", "cifar10"],
                                     ["search", "--dataset", "cifar10"]])
def test_a_data_root_that_is_a_file_is_refused_before_any_work(command, root, where, tmp_path, capsys):
    """Fashion-MNIST passed over it with a warning; with cifar10 the download into it failed, blaming the network."""
    (tmp_path / "afile").write_text("keep me")
    err = refused(capsys, [*command, "--data-root", str(tmp_path / root), "--out", str(tmp_path / "out")])
    assert f"--data-root '{tmp_path / root}' {where}" in err and "not a folder; pass --data-root the folder" in err
    assert "download" not in err and "internet" not in err
    assert not (tmp_path / "out").exists() and (tmp_path / "afile").read_text() == "keep me"


def test_an_empty_data_root_is_refused_not_taken_as_the_current_folder(tmp_path, capsys):
    err = refused(capsys, [*TRAIN_FP, "--data-root", "", "--out", str(tmp_path / "out")])
    assert "--data-root '' is empty (an unset shell variable?)" in err and not (tmp_path / "out").exists()


def test_a_data_root_in_a_config_file_that_is_a_file_is_refused(tmp_path, capsys):
    """The config key reaches the same check as the flag (in load_dataset), before the search starts."""
    (tmp_path / "afile").write_text("")
    cfg = tmp_path / "search.yaml"
    cfg.write_text(f"model: resnet20\ndataset: digits\ndata_root: {tmp_path / 'afile'}\n")
    err = refused(capsys, ["search", "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert f"The data root '{tmp_path / 'afile'}' is a file, not a folder" in err and "data_root in a config" in err
    assert not (tmp_path / "out").exists()


def test_sync_mlflow_error_says_what_failed_not_a_librarys_deprecation_notice(tmp_path, capsys, monkeypatch):
    """'Cannot sync ... to MLflow: The ``noload`` loader strategy is deprecated ...; MLflow logging disabled: ...'
    (SQLAlchemy warns once per process, as MLflow's store first queries: the notice is raised here on purpose)."""
    import warnings

    from orchestrator.mlflow_sink import MLflowSink

    connect = MLflowSink.connect

    def noisy_connect(self, **kw):
        warnings.warn_explicit("The ``noload`` loader strategy is deprecated", DeprecationWarning, "sqlalchemy_store.py",
                               1, module="mlflow.store.tracking.sqlalchemy_store")
        return connect(self, **kw)
    monkeypatch.setattr(MLflowSink, "connect", noisy_connect)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: demo\nmodel: resnet20\n")
    (tmp_path / "bad.db").write_text("not a database\n")
    err = refused(capsys, ["sync-mlflow", "--sweep", str(sweep), "--tracking-uri", f"sqlite:///{tmp_path / 'bad.db'}"])
    assert f"Cannot sync '{sweep}' to MLflow: MLflow logging disabled: connecting failed" in err
    assert "file is not a database" in err and "noload" not in err and "deprecated" not in err


@pytest.mark.parametrize("flag, value, says", [
    ("--lr", "-1", "--lr must be a finite number > 0, but got --lr -1. Use e.g. --lr 0.1."),
    ("--epochs", "0", "--epochs must be a whole number >= 1, but got --epochs 0. Pass --epochs 1 or more, or leave it "
                      "out for its default."),
])
def test_a_single_fine_tunes_bad_value_names_the_flag_typed(tmp_path, capsys, flag, value, says):
    """The walkthrough: 'gmpq finetune --lr -1' said 'lr=-1.0', a key the user never typed."""
    assert main(["finetune", "--uniform", "4", "4", "--model", "resnet20", "--dataset", "fashion_mnist",
                 "--out", str(tmp_path / "ft"), flag, value]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err == f"gmpq: error: {says}" and not (tmp_path / "ft").exists()
