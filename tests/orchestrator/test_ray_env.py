"""ray_map: independent jobs as parallel Ray tasks (real local Ray, 2 CPUs)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_2cpu():
    import sys

    from ray import cloudpickle

    from orchestrator.ray_env import ray_session

    cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import test modules
    with ray_session(num_cpus=2):
        yield


def _meet(folder: str, me: str, other: str, timeout: float = 60.0) -> bool:
    """Write my marker, then wait for the other task's: True only if both ran at the same time."""
    Path(folder, me).touch()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if Path(folder, other).exists():
            return True
        time.sleep(0.05)
    return False


def _meet_job(args: tuple) -> tuple:
    folder, me, other = args
    import torch

    return me, _meet(folder, me, other), torch.get_num_threads()


def test_ray_map_runs_the_jobs_side_by_side_and_keeps_their_order(ray_2cpu, tmp_path):
    from orchestrator.ray_env import ray_map

    done = []
    jobs = [(str(tmp_path), "a", "b"), (str(tmp_path), "b", "a")]
    out = ray_map(_meet_job, jobs, num_cpus=1, on_done=lambda job, res: done.append(job[1]))
    # each job waited for the other one's marker: run one after the other, the first would time out
    assert out == [("a", True, 1), ("b", True, 1)]
    assert sorted(done) == ["a", "b"]


def _fail_or_mark(args: tuple) -> str:
    folder, name = args
    if name == "bad":
        from gmpq_core.errors import ConfigError

        raise ConfigError("bad job")
    time.sleep(0.5)
    Path(folder, name).touch()
    return name


def test_ray_map_raises_the_first_error_as_its_own_type_after_the_other_jobs_finish(ray_2cpu, tmp_path):
    from gmpq_core.errors import ConfigError
    from orchestrator.ray_env import ray_map

    with pytest.raises(ConfigError, match="bad job") as err:
        ray_map(_fail_or_mark, [(str(tmp_path), "bad"), (str(tmp_path), "good")], num_cpus=1)
    assert str(err.value) == "bad job"       # the task's own message, not Ray's wrapper with a traceback
    assert (tmp_path / "good").exists()      # the good job still ran to its end


def _torch_threads_job(name: str) -> tuple:
    import torch

    return name, torch.get_num_threads()


def test_ray_map_gives_each_job_its_own_cores_as_torch_threads(ray_2cpu):
    from orchestrator.ray_env import ray_map

    out = ray_map(_torch_threads_job, ["teacher", "target"], num_cpus=lambda job: 2 if job == "target" else 1)
    assert out == [("teacher", 1), ("target", 2)]

