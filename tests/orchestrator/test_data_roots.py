"""A --data-root typed on the command line that does not exist is refused before any work (one paragraph: the value,
what exists, the fix) unless the dataset downloads into it; it used to be passed over for the system's
Fashion-MNIST with a warning, training on other data than the folder named. A recorded root keeps that fallback
(test_finetune_defaults_data_root.py); gmpq evaluate refuses any missing root (test_model_file_hints.py). Real data:
the Debian package's Fashion-MNIST where it is installed."""
from __future__ import annotations

import pytest

from gmpq_core.data import sources
from gmpq_core.errors import ConfigError
from orchestrator.cli import main
from orchestrator.data_roots import check_given_data_root, check_sweep_data_root, downloads_into_root

TINY = ["--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "16"]
COMMANDS = {"train-fp": ["train-fp", *TINY, "--proxy-size", "100", "--test-size", "100"],
            "finetune": ["finetune", "--uniform", "4", "4", *TINY, "--train-size", "100", "--test-size", "100"],
            "search": ["search", "--proxy-size", "100", "--epochs", "1", "--max-steps-per-epoch", "1"]}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_typed_data_root_that_does_not_exist_is_refused_not_replaced_by_other_data(command, tmp_path, capsys):
    elsewhere = sources.find_fashion_mnist(None)
    if elsewhere is None:
        pytest.skip("no Fashion-MNIST copy outside a data root here (apt-get install dataset-fashion-mnist)")
    typo = tmp_path / "fashoin" / "data"
    argv = [*COMMANDS[command], "--dataset", "fashion_mnist", "--data-root", str(typo), "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    folder = elsewhere["train_images"].parent
    assert f"--data-root '{typo}': no such folder ({typo}; the nearest folder that exists is {tmp_path})" in err
    assert f"'fashion_mnist' would be read from {folder} instead, which is other data than a folder you named" in err
    assert f"or drop --data-root to read it from {folder}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not typo.parent.exists()


def test_a_dataset_that_reads_no_root_is_not_refused_for_one_the_other_dataset_downloads_into(tmp_path):
    """digits, mnist5k and imagefolder:PATH read no data root: a new sweep with a MNIST-5k proxy and a CIFAR-10 target
    names the folder CIFAR-10 downloads into, checked for each dataset (sweep.check_sweep), and is not refused."""
    new = tmp_path / "new" / "cifar"
    for dataset in ("mnist5k", "cifar10", "digits", f"imagefolder:{tmp_path}"):
        check_given_data_root(str(new), dataset, flag="data_root in the sweep config")
    assert not new.parent.exists()
    check_given_data_root(str(tmp_path), "fashion_mnist")        # a folder that exists: read as before
    check_given_data_root(None, "digits")


def test_a_new_sweeps_root_that_its_cifar10_target_downloads_into_is_not_refused_for_its_proxy(tmp_path):
    """One data_root serves a sweep's proxy and target: a new folder the CIFAR-10 target downloads into is no typo,
    whatever the proxy (a Fashion-MNIST one reads its copy elsewhere, warned, as before); without such a target a
    Fashion-MNIST proxy's missing root is refused."""
    new = tmp_path / "new" / "cifar"
    for proxy in ("mnist5k", "fashion_mnist"):
        check_sweep_data_root(str(new), (proxy, "cifar10"))
    if sources.find_fashion_mnist(None) is not None:                 # a copy elsewhere: read instead, refused
        with pytest.raises(ConfigError, match=r"data_root in the sweep config '.*cifar': no such folder"):
            check_sweep_data_root(str(new), ("fashion_mnist", "fashion_mnist"))
    check_sweep_data_root(None, ("fashion_mnist", "cifar10"))
    assert not new.parent.exists()


def test_a_misspelt_dataset_with_a_new_root_is_refused_for_its_name_not_the_root(tmp_path, capsys):
    """CIFAR10 is no dataset (cifar10 is, and downloads into the new folder): the refusal lists the datasets."""
    assert main([*COMMANDS["train-fp"], "--dataset", "CIFAR10", "--data-root", str(tmp_path / "new"),
                 "--out", str(tmp_path / "out")]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Unknown dataset 'CIFAR10'. Available datasets: cifar10," in err and "no such folder" not in err
    assert not (tmp_path / "out").exists()


def test_a_dataset_that_downloads_into_the_root_takes_a_new_folder(tmp_path, monkeypatch):
    """CIFAR-10 always downloads into its root; Fashion-MNIST does where no copy exists elsewhere (no Debian
    package, no ./data): then the typed folder is where its files go, as before."""
    new = tmp_path / "new" / "cifar"
    check_given_data_root(str(new), "cifar10")
    assert downloads_into_root("cifar10") and not downloads_into_root("digits")
    monkeypatch.chdir(tmp_path)                                  # no ./data/FashionMNIST/raw here
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian-package"))
    assert downloads_into_root("fashion_mnist")
    check_given_data_root(str(new), "fashion_mnist")
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path))
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(b"")                       # a copy elsewhere: read instead, so refused
    with pytest.raises(ConfigError, match=f"would be read from {tmp_path} instead"):
        check_given_data_root(str(new), "fashion_mnist")


def test_a_new_sweeps_data_root_that_does_not_exist_is_refused_and_a_resumes_is_not_checked(tmp_path, capsys):
    """A new sweep's config value is typed (``gmpq sweep --set data_root=...`` / a YAML): a typo is refused before any
    file; a resumed sweep's root is recorded (a moved sweep): ``check_given_data_root`` is not applied to it."""
    from orchestrator.sweep import check_sweep
    from orchestrator.sweep_config import load_sweep_config

    typo = tmp_path / "fashon"
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "data_root": str(typo)})
    with pytest.raises(ConfigError, match=r"data_root in the sweep config '.*fashon': no such folder") as e:
        check_sweep(cfg, False)
    assert "Set data_root in the sweep config to the folder that holds its files" in str(e.value)
    assert not (tmp_path / "sweep").exists()
    with pytest.raises(ConfigError) as e:              # resume: nothing to resume here, but not the data root's words
        check_sweep(cfg, True)
    assert "no such folder" not in str(e.value)


@pytest.mark.parametrize("command", ["sweep", "run"])
def test_check_downloads_nothing_and_says_where_a_cifar10_target_will_be_downloaded(command, tmp_path, capsys):
    # --check writes nothing: a CIFAR-10 target not in its data_root is checked by its known shape, not downloaded
    root = tmp_path / "cifar"
    (tmp_path / "cfg.yaml").write_text(f"preset: demo\nproxy_dataset: mnist5k\ntarget_dataset: cifar10\n"
                                       f"data_root: {root}\nn_trials: 2\n")
    argv = [command, "--config", str(tmp_path / "cfg.yaml"), "--out", str(tmp_path / "out"), "--check"]
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert f"data: CIFAR-10 is not in {root} yet; the sweep downloads it there when it starts" in out
    assert "config OK" in out and not root.exists() and not (tmp_path / "out").exists()
