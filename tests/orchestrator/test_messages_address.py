"""A Ray address that no cluster answers says where it came from: ``gmpq finetune --sweep DIR`` without --address
joins the address the sweep's config recorded (a cluster started again has another), so the message names that file,
not "--address ..., from argument", and the fixes name --address auto / HOST:PORT / local."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml

from cluster.connect import resolve_address
from cluster.errors import ClusterError
from orchestrator.ray_env import _join_address

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"        # closed again: nothing answers there


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _sweep_with_address(tmp_path: Path, address: str) -> Path:
    """A sweep folder as the sweep leaves it, its config recording ``address``, its FP target model in place (the
    stage reaches the join without training one)."""
    d = tmp_path / "cs2"
    make_sweep(d)
    cfg = yaml.safe_load((d / "sweep_config.yaml").read_text())
    cfg["address"] = address
    (d / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))
    target = tmp_path / "cache" / "target_fp.pt"
    target.parent.mkdir()
    target.write_bytes(b"not read before the join")
    target.with_suffix(".json").write_text("{}")
    (d / "shared.json").write_text(f'{{"target_model_path": "{target}"}}')
    return d


@pytest.fixture
def no_ray():
    import ray

    if ray.is_initialized():       # a Ray left running in this process would be reused: nothing would be joined
        pytest.skip("Ray already runs in this test process")
    yield
    assert not ray.is_initialized()


def test_finetune_sweep_names_the_sweeps_config_as_the_stale_addresss_source_and_the_address_fixes(tmp_path, capsys,
                                                                                                  no_ray):
    from orchestrator.cli import main

    dead = _dead_address()
    sweep = _sweep_with_address(tmp_path, dead)
    assert main(["finetune", "--sweep", str(sweep), "--top-k", "1", "--workers", "1"]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"No Ray cluster answers at {dead}" in err, err
    assert f"address '{dead}' from the sweep's config {sweep / 'sweep_config.yaml'}, not from --address" in err
    assert "from argument" not in err
    for fix in ("--address auto", "--address HOST:PORT", "--address local", "gmpq cluster up"):
        assert fix in err, (fix, err)


def test_finetune_sweep_with_address_still_names_the_argument(tmp_path, capsys, no_ray):
    from orchestrator.cli import main

    sweep = _sweep_with_address(tmp_path, "10.255.255.1:6379")       # the config's: not the one joined
    dead = _dead_address()
    assert main(["finetune", "--sweep", str(sweep), "--address", dead]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"No Ray cluster answers at {dead} (--address {dead}, from argument)" in err, err
    assert "sweep_config.yaml" not in err and "--address auto" in err


def test_an_origin_applies_only_to_its_address_and_only_inside(tmp_path):
    from orchestrator.ray_env import address_origin

    dead = _dead_address()
    with address_origin("--config tiny.yaml", dead):
        with pytest.raises(ClusterError, match=r"address '127\.0\.0\.1:\d+' from --config tiny\.yaml, not from "):
            _join_address(dead)
        other = _dead_address()
        with pytest.raises(ClusterError, match=rf"\(--address {other}, from argument\)"):
            _join_address(other)                   # another address than the one it came with: as given
    with pytest.raises(ClusterError, match=rf"\(--address {dead}, from argument\)"):
        _join_address(dead)


def test_an_auto_address_from_a_config_names_the_config_and_what_auto_resolved_to(monkeypatch):
    from orchestrator.ray_env import address_origin

    dead = _dead_address()
    monkeypatch.setenv("RAY_ADDRESS", dead)
    with address_origin("the sweep's config /x/sweep_config.yaml"):
        with pytest.raises(ClusterError) as e:
            _join_address("auto")
    text = _one_line(str(e.value))
    assert (f"No Ray cluster answers at {dead} (address 'auto' from the sweep's config /x/sweep_config.yaml, not "
            "from --address, resolved from RAY_ADDRESS)") in text, text


def test_resolve_address_labels_an_explicit_address_with_the_callers_source():
    assert resolve_address("10.0.0.5:6379").source == "argument"
    got = resolve_address("10.0.0.5:6379", source="the sweep's config cs2/sweep_config.yaml")
    assert (got.kind, got.address, got.source) == ("gcs", "10.0.0.5:6379", "the sweep's config cs2/sweep_config.yaml")
    assert resolve_address("ray://10.0.0.5:10001", source="X").source == "X"
    assert resolve_address("local", source="X").source == "default"      # nothing to join: nothing to label


def test_gmpq_sweep_names_where_an_address_it_was_not_given_came_from(tmp_path):
    """``gmpq sweep --out D --resume`` joins the address D's saved config recorded; --config FILE, FILE's."""
    from orchestrator.cli import build_parser
    from orchestrator.commands.sweep import address_origin_text, config_from_args
    from orchestrator.sweep_config import load_sweep_config, save_resolved_config

    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "cs2"),
                                                                     "address": "10.0.0.5:6379"}))
    resume = build_parser().parse_args(["sweep", "--out", str(tmp_path / "cs2"), "--resume"])
    assert address_origin_text(resume, config_from_args(resume)) == \
        f"the sweep's config {tmp_path / 'cs2' / 'sweep_config.yaml'}"
    given = build_parser().parse_args(["sweep", "--out", str(tmp_path / "cs2"), "--resume", "--address", "auto"])
    assert address_origin_text(given, config_from_args(given)) is None
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({"preset": "demo", "address": "10.0.0.5:6379"}))
    new = build_parser().parse_args(["sweep", "--config", str(tiny), "--out", str(tmp_path / "cs3")])
    assert address_origin_text(new, config_from_args(new)) == f"--config {tiny}"
    local = build_parser().parse_args(["sweep", "--preset", "demo", "--out", str(tmp_path / "cs4")])
    assert address_origin_text(local, config_from_args(local)) is None          # no address: a local Ray


def test_a_sweep_with_a_dead_address_is_refused_before_it_writes_a_file_or_warns(tmp_path, capsys, caplog, no_ray):
    """The walkthrough: the refusal came after sweep_config.yaml, optuna.db and mlflow.db were written into --out,
    and after a warning about shared storage for a cluster that was not there."""
    from orchestrator.cli import main

    dead, out = _dead_address(), tmp_path / "sweep"
    assert main(["sweep", "--preset", "demo", "--n-trials", "2", "--out", str(out), "--address", dead,
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"No Ray cluster answers at {dead} (--address {dead}, from argument)" in err, err
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert "storage every node shares" not in caplog.text + err


@pytest.mark.parametrize("argv", [["run"], ["run", "--check"], ["sweep", "--check"], ["sweep"]])
def test_a_dead_address_from_a_config_names_the_config_in_every_command(tmp_path, capsys, no_ray, argv):
    """The review: gmpq run's checks moved before its Ray start, out of the context naming the config's address,
    and said '(--address ..., from argument)'; --check never had it."""
    from orchestrator.cli import main

    dead, cfg = _dead_address(), tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"preset": "demo", "address": dead, "cache_dir": str(tmp_path / "cache")}))
    assert main([*argv, "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert f"from --config {cfg}, not from --address" in err and "from argument" not in err, err


class _StopHere(Exception):
    pass


@pytest.mark.parametrize("address, warned", [("local", False), ("10.0.0.5:6379", False)])
def test_the_shared_storage_warning_is_for_a_joined_cluster_only(tmp_path, caplog, monkeypatch, address, warned):
    """``--address local`` is this machine's own Ray: its trials see the sweep folder, so no warning about storage
    every node shares; nor before a cluster is joined: the warning waits for the join, and only a node on another
    host brings it (``test_cluster_lines.py``). The sweep is stopped at the results check, before anything is
    written."""
    import orchestrator.ray_env as ray_env
    import orchestrator.results as results
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import load_sweep_config

    def stop(*_, **__):
        raise _StopHere

    monkeypatch.setattr(ray_env, "check_join_address", lambda *_: None)
    monkeypatch.setattr(results, "read_trials", stop)
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "s"), "n_trials": 2,
                                                      "address": address, "cache_dir": None})
    with pytest.raises(_StopHere):
        run_sweep(cfg, progress=False)
    assert ("storage every node shares" in caplog.text) is warned, caplog.text
    assert not (tmp_path / "s" / "sweep_config.yaml").exists()
