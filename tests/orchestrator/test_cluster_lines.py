"""The lines a sweep joined to a Ray cluster says (the cluster-mode walkthrough): ``gmpq status``'s continue command
names ``--address`` for a lost cluster; the shared-storage warning only for a cluster with a node on another host;
a line naming the recorded cluster a resume or a final stage joins; the cluster joined recorded instead of
``auto``; "1 trial, 1 at a time"; a failed trial's error kept beyond the Ray temp file its line names."""
from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from orchestrator.cli import main

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)

JOIN_HINT = ("--address ADDRESS (the cluster's address once it runs again: 'gmpq cluster up' prints a new one; "
             "--address auto finds the one it recorded)")


class _StopHere(Exception):
    pass


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"        # closed again: nothing answers there


def _stopped_sweep(d: Path, address: str | None) -> Path:
    """A sweep folder as a lost cluster leaves it: one trial started, none ended, no driver running."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "sweep_config.yaml").write_text(yaml.safe_dump({"name": "cut", "model": "resnet20", "n_trials": 4,
                                                         **({"address": address} if address else {})}))
    event = {"event": "start", "trial_id": "t1", "trial_number": 0, "time": time.time(),
             "params": {"budget_avg_bits": 3.0, "proxy_size": 512}}
    (d / "trial_events.jsonl").write_text(json.dumps(event) + "\n")
    return d


def _demo(tmp_path: Path, **overrides):
    from orchestrator.sweep_config import load_sweep_config

    return load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "s"), "n_trials": 2,
                                                       "cache_dir": None, **overrides})


# 1. gmpq status of a sweep that ran on a cluster: the cluster may be gone

def test_status_of_a_joined_sweep_names_the_address_flag_for_a_lost_cluster(tmp_path, capsys):
    sweep = _stopped_sweep(tmp_path / "s", "10.0.0.5:6379")
    assert main(["status", str(sweep)]) == 0
    out = _one_line(capsys.readouterr().out)
    assert (f"Continue with: gmpq sweep --out {sweep} --resume (or gmpq run --out {sweep} --resume, which also "
            "fine-tunes).") in out                                     # the recorded cluster stays the default
    assert (f"It joins the Ray cluster its sweep_config.yaml records (10.0.0.5:6379); if that cluster is gone, add "
            f"{JOIN_HINT}.") in out, out
    from orchestrator.cluster_watch import join_hint                   # the lost cluster's paragraph's words
    assert join_hint(False).strip() == JOIN_HINT


@pytest.mark.parametrize("address", [None, "local"])
def test_status_of_a_local_sweep_names_no_address(tmp_path, capsys, address):
    sweep = _stopped_sweep(tmp_path / "s", address)
    assert main(["status", str(sweep)]) == 0
    out = _one_line(capsys.readouterr().out)
    assert f"Continue with: gmpq sweep --out {sweep} --resume" in out and "--address" not in out


def test_pareto_before_any_trial_ended_names_the_address_flag_too(tmp_path, capsys):
    sweep = _stopped_sweep(tmp_path / "s", "10.0.0.5:6379")
    assert main(["pareto", "--sweep", str(sweep), "--no-mlflow"]) == 2
    assert f"if that cluster is gone, add {JOIN_HINT}" in _one_line(capsys.readouterr().err)


# 2. the shared-storage warning: only for a cluster with a node on another host

def _node(host: str | None, ip: str = "10.9.9.9") -> dict:
    return {"Alive": True, "NodeManagerHostname": host, "NodeManagerAddress": ip, "NodeID": host or ip}


def test_other_hosts_are_those_not_this_machine():
    from orchestrator.sweep_join import other_hosts

    here = socket.gethostname()
    assert other_hosts([_node(here), _node(here, "127.0.0.1")]) == []           # gmpq cluster up on one machine
    assert other_hosts([_node(here), _node("worker-2")]) == ["worker-2"]
    assert other_hosts([_node(None, "127.0.0.1")]) == []                        # no hostname: its address
    assert other_hosts([_node(None, "10.9.9.9")]) == ["10.9.9.9"]
    assert other_hosts([{**_node("worker-2"), "Alive": False}]) == []           # dead nodes linger in the list


# 3. a line naming the recorded cluster joined (the sweep's config), as --address auto's line does

def test_a_final_stage_says_it_joins_the_cluster_its_sweep_recorded(tmp_path, capsys, caplog):
    import ray

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process: nothing would be joined")
    dead = _dead_address()
    d = tmp_path / "cs"
    make_sweep(d)
    cfg = yaml.safe_load((d / "sweep_config.yaml").read_text())
    (d / "sweep_config.yaml").write_text(yaml.safe_dump({**cfg, "address": dead}))
    target = tmp_path / "cache" / "target_fp.pt"
    target.parent.mkdir()
    target.write_bytes(b"not read before the join")
    target.with_suffix(".json").write_text("{}")
    (d / "shared.json").write_text(json.dumps({"target_model_path": str(target)}))
    assert main(["finetune", "--sweep", str(d), "--top-k", "1", "--workers", "1"]) == 2    # nothing answers there
    text = _one_line(caplog.text + capsys.readouterr().err)
    assert (f"joining the Ray cluster at {dead} (from the sweep's config {d / 'sweep_config.yaml'}; --address "
            "overrides it)") in text, text
    caplog.clear()
    assert main(["finetune", "--sweep", str(d), "--top-k", "1", "--workers", "1", "--address", dead]) == 2
    assert "joining the Ray cluster at" not in caplog.text + capsys.readouterr().err       # given: no line


def test_a_sweep_says_it_joins_the_cluster_its_config_records(tmp_path, caplog, monkeypatch):
    """``gmpq sweep --resume`` (and a --config file's address) joins an address it read from a file: said before
    the join (``address_origin`` set by the command), once."""
    import ray

    import orchestrator.ray_env as ray_env
    from orchestrator.sweep import run_sweep

    if ray.is_initialized():
        pytest.skip("Ray already runs in this test process: nothing would be joined")

    def stop(*_, **__):
        raise _StopHere

    monkeypatch.setattr(ray_env, "check_join_address", lambda *_: None)       # taken as live
    monkeypatch.setattr(ray_env, "ray_session", stop)                          # the join: stopped there
    cfg = _demo(tmp_path, address="10.0.0.5:6379")
    origin = f"the sweep's config {tmp_path / 's' / 'sweep_config.yaml'}"
    with ray_env.address_origin(origin, cfg.address), pytest.raises(_StopHere):
        run_sweep(cfg, progress=False)
    line = f"joining the Ray cluster at 10.0.0.5:6379 (from {origin}; --address overrides it)"
    assert caplog.text.count(line) == 1, caplog.text
    caplog.clear()
    with pytest.raises(_StopHere):                                             # given as --address: no line
        run_sweep(_demo(tmp_path / "b", address="10.0.0.5:6379"), progress=False)
    assert "joining the Ray cluster" not in caplog.text


def test_the_join_line_is_left_to_ray_env_where_it_says_its_own():
    from orchestrator.sweep_resume import joining_text

    assert joining_text("auto", "the sweep's config x") is None        # ray_env says what auto found
    assert joining_text("local", "the sweep's config x") is None
    assert joining_text("ray://10.0.0.5:10001", "x") == "joining the Ray cluster at ray://10.0.0.5:10001 (from x; " \
                                                        "--address overrides it)"


# 4. --resume --address auto on a finished sweep keeps the cluster its config records

def test_a_finished_sweep_resumed_with_address_auto_keeps_its_recorded_address(tmp_path):
    from orchestrator.results import read_trials, trial_row, write_results
    from orchestrator.sweep import run_sweep
    from orchestrator.sweep_config import save_resolved_config

    cfg = _demo(tmp_path, n_trials=1, address="10.0.0.5:6379")
    save_resolved_config(cfg)
    out = Path(cfg.resolved().out_dir)
    write_results(out, [trial_row(trial_id="t1", config={"budget_avg_bits": 3.0, "proxy_size": 500},
                                  status="completed", last_result={"transfer_top1": 70.0, "gbitops": 0.4,
                                                                   "bitops": 400_000_000, "proxy_top1": 50.0})], [])
    assert len(read_trials(out)) == 1
    summary = run_sweep(replace(cfg, address="auto"), resume=True, progress=False)
    assert summary.n_completed == 1
    assert yaml.safe_load((out / "sweep_config.yaml").read_text())["address"] == "10.0.0.5:6379"


# 5. the start line

@pytest.mark.parametrize("n, at_once, said", [(1, 2, "1 trial, 1 at a time"), (3, 2, "3 trials, 2 at a time"),
                                               (2, 4, "2 trials, 2 at a time")])
def test_the_start_line_counts_trials_in_words_and_never_more_at_a_time(tmp_path, n, at_once, said):
    from orchestrator.sweep_join import start_text

    text = start_text(_demo(tmp_path, n_trials=n, max_concurrent_trials=at_once).resolved())
    assert text.startswith(said + ", "), text


def test_the_start_line_says_what_the_nodes_hold_at_once_not_more():
    # a 2-core machine with max_concurrent_trials: 4 said "4 at a time" beside the warning that 2 fit
    from orchestrator.sweep_join import start_text

    cfg = _demo(Path("/tmp/x"), n_trials=6, max_concurrent_trials=4).resolved()
    assert start_text(cfg, 2).startswith("6 trials, 2 at a time, 1 CPU each")
    assert start_text(cfg, 8).startswith("6 trials, 4 at a time") and start_text(cfg).startswith("6 trials, 4 at")


# 6. a failed trial's line: Ray's error.txt goes with its session's temp dir

def _failed_trial(where: Path) -> SimpleNamespace:
    where.mkdir(parents=True)
    error = where / "error.txt"
    error.write_text("Failure # 1\nray.exceptions.ActorDiedError: The actor died because its node has died. Node "
                     "Id: abc\n\tthe actor's node was terminated expectedly: received SIGTERM\n")
    return SimpleNamespace(trial_id="t_1", path=None, error_file=str(error), pickled_error_file=None)


def test_a_failed_trials_line_names_where_its_error_is_kept(tmp_path, capsys):
    from orchestrator.sweep_progress import SweepProgress
    from orchestrator.trial_status import TrialStatusBook

    progress = SweepProgress(2, TrialStatusBook(), (0.3, 0.6), tmp_path / "sweep")
    session = tmp_path / "gmpq-ray-x1" / "session_2026-01-02_03-04-05_678901_42" / "artifacts" / "2026" / "t_1"
    progress.on_trial_error(0, [], _failed_trial(session))
    err = _one_line(capsys.readouterr().err)
    assert "ActorDiedError: its node died" in err
    assert (f"({session / 'error.txt'}, a Ray temp file; the error is also kept in trials.parquet: gmpq status "
            f"--sweep {tmp_path / 'sweep'})") in err, err
    elsewhere = tmp_path / "ray_results" / "t_1"                        # not Ray's temp dir: named alone
    progress.on_trial_error(0, [], _failed_trial(elsewhere))
    assert _one_line(capsys.readouterr().err).endswith(f"({elsewhere / 'error.txt'})")


# With a real Ray session on this machine (last: the other tests need none running)

@pytest.fixture(scope="module")
def ray_here():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


def test_a_sweep_on_a_cluster_of_this_machine_alone_records_it_and_warns_of_no_storage(tmp_path, caplog, monkeypatch,
                                                                                      ray_here):
    """``--address auto`` joined this machine's Ray: sweep_config.yaml records its GCS address, not ``auto`` (a
    later ``gmpq finetune --sweep`` would resolve auto again); its one node is this host, so no warning about
    storage every node shares; a 1-trial sweep is not warned that 2 trials do not fit at once. The sweep stops
    before its shared models are prepared (before any training)."""
    import orchestrator.sweep as sweep

    def stop(*_, **__):
        raise _StopHere

    import orchestrator.sweep_join as sweep_join

    monkeypatch.setattr(sweep, "prepare_shared", stop)
    monkeypatch.setattr(sweep_join, "_gmpq_local_cluster", lambda address: address == ray_here)   # gmpq cluster up's
    cfg = _demo(tmp_path, address="auto", n_trials=1, max_concurrent_trials=2, resources={"cpu": 1, "gpu": 0})
    with pytest.raises(_StopHere):
        sweep.run_sweep(cfg, progress=False)
    saved = yaml.safe_load((tmp_path / "s" / "sweep_config.yaml").read_text())
    assert saved["address"] == ray_here
    assert "storage every node shares" not in caplog.text, caplog.text
    assert "fit at once" not in caplog.text, caplog.text        # 1 trial: "2 at a time" was never asked for


def test_a_cluster_of_this_host_that_gmpq_cluster_up_did_not_start_may_grow_so_it_is_warned(tmp_path, caplog,
                                                                                             monkeypatch, ray_here):
    """A review: an autoscaling cluster (min_workers 0) has only its head when the sweep starts; its later nodes need
    the shared storage all the same."""
    import orchestrator.sweep as sweep
    import orchestrator.sweep_join as sweep_join

    def stop(*_, **__):
        raise _StopHere

    monkeypatch.setattr(sweep, "prepare_shared", stop)
    monkeypatch.setattr(sweep_join, "_gmpq_local_cluster", lambda address: False)
    with pytest.raises(_StopHere):
        sweep.run_sweep(_demo(tmp_path, address="auto", n_trials=1, resources={"cpu": 1, "gpu": 0}), progress=False)
    assert "whose nodes all run on this host so far: nodes it adds later" in caplog.text, caplog.text


def test_a_sweep_on_a_cluster_with_a_node_elsewhere_warns(tmp_path, caplog, monkeypatch, ray_here):
    import cluster.connect as connect
    import orchestrator.sweep as sweep

    def stop(*_, **__):
        raise _StopHere

    real = connect.alive_nodes
    monkeypatch.setattr(connect, "alive_nodes", lambda: [*real(), _node("worker-2")])   # (the warning's view only)
    monkeypatch.setattr(sweep, "prepare_shared", stop)
    with pytest.raises(_StopHere):
        sweep.run_sweep(_demo(tmp_path, address=ray_here), progress=False)
    text = _one_line(caplog.text)
    assert (f"the sweep joins a Ray cluster ({ray_here}) with nodes on other hosts (worker-2): trials on its other "
            "nodes need storage_path (--storage) and cache_dir (--cache-dir) on storage every node shares") in text, \
        text
