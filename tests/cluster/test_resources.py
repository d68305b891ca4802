"""Per-trial resource requests checked against node lists (as ray.nodes() returns them)."""
from __future__ import annotations

import pytest

from cluster.resources import check_trial_resources, choose_use_gpu, train_scaling, trials_that_fit
from gmpq_core.errors import ConfigError


def node(cpu: float, gpu: float = 0.0, alive: bool = True) -> dict:
    res = {"CPU": cpu, "memory": 1e9}
    if gpu:
        res["GPU"] = gpu
    return {"Alive": alive, "Resources": res}


CPU_CLUSTER = [node(0), node(2), node(2)]            # head with 0 CPUs + two 2-CPU workers
GPU_CLUSTER = [node(0), node(16, 2), node(16, 2)]    # two workers with 2 GPUs each


def test_fractional_gpus_pack_four_searches_per_gpu():
    check = check_trial_resources(2, 0.25, GPU_CLUSTER, max_concurrent_trials=16)
    # per node min(16 // 2, 2 // 0.25) = 8, two nodes -> 16; computed by hand
    assert check.max_parallel_trials == 16 and check.use_gpu
    assert check.cluster_gpu == 4 and check.cluster_cpu == 32
    assert any("shares each GPU among 4 trials" in w for w in check.warnings)


def test_trials_that_fit_counts_per_node_not_cluster_totals():
    # 3 CPUs per trial: each 2-CPU node fits none although the cluster has 4 CPUs
    assert trials_that_fit(3, 0, CPU_CLUSTER) == 0
    assert trials_that_fit(1, 0, CPU_CLUSTER) == 4
    assert trials_that_fit(1, 0, CPU_CLUSTER + [node(8, alive=False)]) == 4  # dead nodes do not count


def test_gpu_request_on_a_cpu_cluster_names_the_numbers():
    with pytest.raises(ConfigError) as err:
        check_trial_resources(1, 0.25, CPU_CLUSTER)
    msg = str(err.value)
    assert "gpu=0.25" in msg and "no GPUs" in msg and "CPU=4" in msg and "3 alive node(s)" in msg
    assert "resources.gpu: 0" in msg


def test_a_trial_larger_than_any_node_fails_with_the_largest_node_size():
    with pytest.raises(ConfigError) as err:
        check_trial_resources(4, 0, CPU_CLUSTER)
    assert "cpu=4" in str(err.value) and "largest node has CPU=2" in str(err.value)
    with pytest.raises(ConfigError, match="gpu=4 but the largest node has GPU=2"):
        check_trial_resources(1, 4, GPU_CLUSTER)


def test_fewer_slots_than_max_concurrent_trials_is_a_warning_not_an_error():
    check = check_trial_resources(1, 0, CPU_CLUSTER, max_concurrent_trials=8)
    assert check.max_parallel_trials == 4 and not check.use_gpu
    assert any("max_concurrent_trials=8 but only 4" in w for w in check.warnings)


@pytest.mark.parametrize("cpu,gpu,match", [(-1, 0, "cpu=-1"), (1, 1.5, "whole number"), (0, 0, "cpu=0 and gpu=0"),
                                           (1, float("nan"), "gpu=nan"), (True, 0, "cpu=True")])
def test_malformed_requests_are_rejected(cpu, gpu, match):
    with pytest.raises(ConfigError, match=match):
        check_trial_resources(cpu, gpu, GPU_CLUSTER)


def test_no_alive_nodes():
    with pytest.raises(ConfigError, match="no alive nodes"):
        check_trial_resources(1, 0, [node(2, alive=False)])


def test_use_gpu_follows_the_cluster_unless_asked():
    assert choose_use_gpu({"CPU": 8, "GPU": 2}) is True
    assert choose_use_gpu({"CPU": 8}) is False
    assert choose_use_gpu({"CPU": 8, "GPU": 2}, requested=False) is False
    with pytest.raises(ConfigError, match="no GPUs"):
        choose_use_gpu({"CPU": 8}, requested=True)


def test_train_scaling_gloo_on_cpu_nccl_on_gpu_and_gang_must_fit():
    cpu = train_scaling(2, CPU_CLUSTER)
    assert (cpu.use_gpu, cpu.backend, cpu.resources_per_worker) == (False, "gloo", {"CPU": 1.0})
    gpu = train_scaling(4, GPU_CLUSTER, cpus_per_worker=4)
    assert (gpu.use_gpu, gpu.backend, gpu.resources_per_worker) == (True, "nccl", {"CPU": 4.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="asks for 5 CPU workers .* only 4 fit"):
        train_scaling(5, CPU_CLUSTER)
