"""Address resolution and storage-path checks (pure functions: node lists as ray.nodes() gives them)."""
from __future__ import annotations

import json

import pytest

from cluster.preflight import preflight_sweep
from cluster.connect import (check_storage_path, distinct_hosts, resolve_address, storage_filesystem,
                             use_token_auth_if_available)
from gmpq_core.errors import ConfigError


def node(host: str, ip: str, *, alive: bool = True, cpu: float = 2.0, gpu: float = 0.0, node_id: str = "") -> dict:
    return {"NodeID": node_id or f"{host}-{ip}", "Alive": alive, "NodeManagerHostname": host,
            "NodeManagerAddress": ip, "Resources": {"CPU": cpu, "GPU": gpu} if gpu else {"CPU": cpu}}


ONE_HOST = [node("vm", "10.0.0.1"), node("vm", "10.0.0.1"), node("vm", "10.0.0.1")]
THREE_HOSTS = [node("head", "10.0.0.1"), node("gpu-a", "10.0.0.2"), node("gpu-b", "10.0.0.3")]


def test_nodes_on_one_machine_count_as_one_host_and_dead_nodes_are_ignored():
    assert distinct_hosts(ONE_HOST) == ("vm",)
    assert distinct_hosts(THREE_HOSTS) == ("gpu-a", "gpu-b", "head")
    assert distinct_hosts([node("a", "1.1.1.1"), node("b", "1.1.1.2", alive=False)]) == ("a",)
    # no hostname given: the IP identifies the host
    assert distinct_hosts([{"Alive": True, "NodeManagerAddress": "10.0.0.9"}]) == ("10.0.0.9",)


def test_local_storage_is_fine_on_a_single_host_cluster(tmp_path):
    check = check_storage_path(str(tmp_path), ONE_HOST)
    assert check.kind == "local" and check.hosts == ("vm",)
    assert check_storage_path(f"file://{tmp_path}", ONE_HOST).kind == "local"


def test_local_storage_on_a_multi_host_cluster_fails_up_front_and_says_why():
    with pytest.raises(ConfigError) as err:
        check_storage_path("/data/ray_results", THREE_HOSTS)
    msg = str(err.value)
    assert "'/data/ray_results'" in msg and "3 hosts" in msg and "gpu-a" in msg
    assert "s3://" in msg and "gs://" in msg and "shared" in msg


def test_multi_host_local_storage_passes_only_when_every_host_saw_the_probe():
    seen = {"head": True, "gpu-a": True, "gpu-b": True}
    assert check_storage_path("/mnt/nfs/runs", THREE_HOSTS, visible_on=seen).kind == "local"
    with pytest.raises(ConfigError, match="not visible on gpu-b"):
        check_storage_path("/mnt/nfs/runs", THREE_HOSTS, visible_on=dict(seen, **{"gpu-b": False}))


@pytest.mark.parametrize("uri", ["s3://bucket/sweeps", "gs://bucket/sweeps", "gcs://bucket/x", "hdfs://nn:8020/x"])
def test_object_storage_uris_suit_any_cluster(uri):
    check = check_storage_path(uri, THREE_HOSTS)
    assert check.kind == "remote" and check.storage_path == uri


def test_unknown_scheme_and_empty_path_are_rejected():
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        check_storage_path("ftp://host/x", ONE_HOST)
    with pytest.raises(ConfigError, match="non-empty"):
        check_storage_path("  ", ONE_HOST)


def test_storage_filesystem_resolves_through_pyarrow(tmp_path):
    import pyarrow.fs as pafs

    fs, path = storage_filesystem(str(tmp_path / "results"))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "results")
    fs, path = storage_filesystem("mock:///bucket/prefix")  # pyarrow's in-memory test filesystem
    assert path == "bucket/prefix"
    with pytest.raises(ConfigError, match="pyarrow cannot open storage 'nope://x/y'"):
        storage_filesystem("nope://x/y")


def test_resolve_address_kinds(tmp_path):
    assert resolve_address(None).kind == "local"
    assert resolve_address("local").kind == "local"
    r = resolve_address("10.0.0.5:6379")
    assert (r.kind, r.address, r.source) == ("gcs", "10.0.0.5:6379", "argument")
    assert resolve_address("ray://head.example:10001").kind == "client"
    # auto: RAY_ADDRESS wins, then the state file of `gmpq cluster up`, then Ray's own discovery
    r = resolve_address("auto", environ={"RAY_ADDRESS": "10.0.0.7:6379"}, state_dir=tmp_path)
    assert (r.kind, r.address, r.source) == ("gcs", "10.0.0.7:6379", "RAY_ADDRESS")
    r = resolve_address("auto", environ={}, state_dir=tmp_path)
    assert (r.kind, r.address) == ("auto", "auto")


def test_resolve_auto_ignores_a_recorded_cluster_whose_head_is_gone(tmp_path):
    # a state file pointing at a process group that does not exist (pgid 2**22 + 7 is above pid_max)
    state = {"version": 1, "address": "10.9.9.9:1234", "state_dir": str(tmp_path), "temp_dir": str(tmp_path),
             "started_at": 0.0, "nodes": [{"name": "head", "group": {"name": "head", "pgid": 2**22 + 7,
                                                                     "start_time": 1}, "num_cpus": 0,
                                           "resources": {"node_0": 1.0}, "log_path": "x"}]}
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    assert resolve_address("auto", environ={}, state_dir=tmp_path).kind == "auto"


@pytest.mark.parametrize("bad", ["http://10.0.0.5:8265", "10.0.0.5", "10.0.0.5:99999", "ray://nohost", "a b:1"])
def test_bad_addresses_are_config_errors(bad):
    with pytest.raises(ConfigError, match="HOST:PORT"):
        resolve_address(bad)


def test_token_auth_turns_on_only_when_unset_and_a_token_exists(tmp_path):
    token = tmp_path / "auth_token"
    env = {"RAY_AUTH_TOKEN_PATH": str(token)}
    assert use_token_auth_if_available(env) is False and "RAY_AUTH_MODE" not in env
    token.write_text("x" * 32)
    assert use_token_auth_if_available(env) is True and env["RAY_AUTH_MODE"] == "token"
    env = {"RAY_AUTH_TOKEN_PATH": str(token), "RAY_AUTH_MODE": "disabled"}
    assert use_token_auth_if_available(env) is False and env["RAY_AUTH_MODE"] == "disabled"


def test_preflight_names_the_setting_whose_path_is_not_shared(tmp_path):
    nodes = [dict(n, Resources={"CPU": 4.0}) for n in THREE_HOSTS]
    pre = preflight_sweep(storage_path="s3://bucket/r", cpu=1, gpu=0, max_concurrent_trials=20, nodes=nodes,
                          probe=False, shared_paths={"out_dir": "gs://bucket/sweep"})
    assert pre.n_nodes == 3 and pre.resources.max_parallel_trials == 12 and len(pre.hosts) == 3
    assert any("max_concurrent_trials=20 but only 12" in w for w in pre.warnings)
    with pytest.raises(ConfigError, match="out_dir '/home/me/runs/x' is a local path"):
        preflight_sweep(storage_path="s3://bucket/r", cpu=1, gpu=0, nodes=nodes, probe=False,
                        shared_paths={"out_dir": "/home/me/runs/x"})
