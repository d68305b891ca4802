"""`gmpq finetune --policy SWEEP/policies/<trial_id>.json` without --data-root reads its data from the data root the
sweep recorded (``data_root`` in SWEEP/sweep_config.yaml) and says so in one line; an explicit --data-root wins; a
policy with no record reads the data where it did before (the dataset's default location), with no line."""
from __future__ import annotations

import argparse

import pytest
import yaml

from gmpq_core.policy import BitPolicy
from orchestrator.cli import main
from orchestrator.commands import _finetune_fp, train_fp

from test_finetune_sweep_fp import TINY, sweep  # same folder (pytest puts it on sys.path)


@pytest.fixture
def roots(monkeypatch) -> list:
    """The ``root`` every dataset load of the command is asked for (the digits ignore it, so the runs stay quick)."""
    seen: list = []
    real = train_fp.load_dataset

    def recorded(name, *, root=None, image_size=None):
        seen.append(root)
        return real(name, root=None, image_size=image_size)
    monkeypatch.setattr(train_fp, "load_dataset", recorded)
    return seen


def sweep_config(folder, data_root, *, out_dir=None) -> None:
    """The sweep_config.yaml a sweep saves (resolved: absolute paths), with the keys read here."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep_config.yaml").write_text(yaml.safe_dump({
        "version": 1, "name": "demo", "out_dir": str(out_dir or folder), "model": "resnet20",
        "proxy_dataset": "digits", "target_dataset": "digits", "data_root": data_root}))


def test_a_sweeps_policy_reads_the_data_from_the_sweeps_recorded_data_root(tmp_path, capsys, roots):
    """It looked in the dataset's default location unless the user repeated --data-root."""
    policy, _ = sweep(tmp_path)
    data = tmp_path / "datasets"
    data.mkdir()
    sweep_config(tmp_path / "sweep", str(data))
    assert main(["finetune", "--policy", str(policy), *TINY, "--out", str(tmp_path / "out")]) == 0
    assert roots == [str(data)]
    err = " ".join(capsys.readouterr().err.split())
    assert (f"reading 'digits' from {data}, the data root recorded in {tmp_path / 'sweep' / 'sweep_config.yaml'} "
            "(pass --data-root DIR to read it from elsewhere)") in err


def test_an_explicit_data_root_wins_and_the_line_names_both(tmp_path, capsys, roots):
    policy, _ = sweep(tmp_path)
    recorded, given = tmp_path / "datasets", tmp_path / "mine"
    recorded.mkdir()
    given.mkdir()
    sweep_config(tmp_path / "sweep", str(recorded))
    assert main(["finetune", "--policy", str(policy), *TINY, "--data-root", str(given),
                 "--out", str(tmp_path / "out")]) == 0
    assert roots == [str(given)]
    err = " ".join(capsys.readouterr().err.split())
    assert f"reading 'digits' from --data-root {given}, not from {recorded}, the data root recorded in " in err
    assert main(["finetune", "--policy", str(policy), *TINY, "--data-root", str(recorded),   # the same: no line
                 "--out", str(tmp_path / "out2")]) == 0
    assert roots[-1] == str(recorded) and "reading 'digits'" not in capsys.readouterr().err


def test_a_moved_sweep_reads_a_data_root_that_lay_inside_it_inside_the_folder_now_used(tmp_path, capsys, roots):
    old = tmp_path / "was"                                   # written there, then moved to tmp_path / "sweep"
    policy, _ = sweep(tmp_path, recorded_dir=old)
    (tmp_path / "sweep" / "data").mkdir()
    sweep_config(tmp_path / "sweep", str(old / "data"), out_dir=old)
    assert main(["finetune", "--policy", str(policy), *TINY, "--out", str(tmp_path / "out")]) == 0
    assert roots == [str((tmp_path / "sweep" / "data").resolve())]


def test_a_recorded_data_root_that_is_not_there_leaves_the_default_location_and_says_so(tmp_path, capsys, roots):
    policy, _ = sweep(tmp_path)
    sweep_config(tmp_path / "sweep", "/nonexistent/cluster/data")
    assert main(["finetune", "--policy", str(policy), *TINY, "--out", str(tmp_path / "out")]) == 0
    assert roots == [None]
    err = " ".join(capsys.readouterr().err.split())
    assert ("the data root /nonexistent/cluster/data recorded in " in err
            and "is not there: reading 'digits' from its default location" in err)


@pytest.mark.parametrize("record", ["null", "no sweep_config.yaml", "not a sweep's policy"])
def test_without_a_record_the_data_root_is_as_before(record, tmp_path, capsys, roots):
    policy, _ = sweep(tmp_path)
    if record == "null":
        sweep_config(tmp_path / "sweep", None)
    elif record == "not a sweep's policy":
        sweep_config(tmp_path / "sweep", str(tmp_path))
        loaded = BitPolicy.load(policy)
        meta = {k: v for k, v in loaded.meta.items() if k not in ("sweep_dir", "trial_id")}
        BitPolicy(layers=loaded.layers, fingerprint=loaded.fingerprint, meta=meta).save(tmp_path / "own.json")
        policy = tmp_path / "own.json"
    assert main(["finetune", "--policy", str(policy), *TINY, "--fp-epochs", "1", "--out", str(tmp_path / "out")]) == 0
    assert set(roots) == {None} and "reading 'digits'" not in capsys.readouterr().err


def test_the_recorded_data_root_is_for_the_sweeps_datasets_only(tmp_path):
    """--dataset of another dataset keeps its default location (the sweep's folder may not hold it)."""
    policy, _ = sweep(tmp_path)
    sweep_config(tmp_path / "sweep", str(tmp_path))
    args = argparse.Namespace(policy=str(policy), data_root=None)
    loaded = BitPolicy.load(policy)
    assert _finetune_fp.data_root_default(args, loaded, "cifar10") == (None, "")
    assert _finetune_fp.data_root_default(args, loaded, "digits")[0] == str(tmp_path)
    meta = {**loaded.meta, "data_root": str(tmp_path / "meta")}            # a policy's own record comes first
    (tmp_path / "meta").mkdir()
    own = BitPolicy(layers=loaded.layers, fingerprint=loaded.fingerprint, meta=meta)
    assert _finetune_fp.data_root_default(args, own, "digits")[0] == str(tmp_path / "meta")


def test_a_gmpq_search_policy_reads_the_data_root_its_result_json_records(tmp_path):
    """`gmpq search --out DIR` writes DIR/policy.json and DIR/result.json (the job, with its data root)."""
    from gmpq_core.fileio import atomic_write_json

    policy, _ = sweep(tmp_path)
    loaded = BitPolicy.load(policy)
    own = BitPolicy(layers=loaded.layers, fingerprint=loaded.fingerprint,
                    meta={k: v for k, v in loaded.meta.items() if k not in ("sweep_dir", "trial_id")})
    out = tmp_path / "search"
    own.save(out / "policy.json")
    (tmp_path / "data").mkdir()
    args = argparse.Namespace(policy=str(out / "policy.json"), data_root=None)
    assert _finetune_fp.data_root_default(args, own, "digits") == (None, "")          # no result.json: as before
    atomic_write_json(out / "result.json", {"job": {"dataset": "digits", "data_root": str(tmp_path / "data")}})
    root, line = _finetune_fp.data_root_default(args, own, "digits")
    assert root == str(tmp_path / "data") and f"the data root recorded in {out / 'result.json'}" in line
    assert _finetune_fp.data_root_default(args, own, "cifar10") == (None, "")        # another dataset: its own
    atomic_write_json(out / "result.json", {"job": {"dataset": "digits", "data_root": None}})
    assert _finetune_fp.data_root_default(args, own, "digits") == (None, "")
