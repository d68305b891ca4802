"""Shared test settings: few threads (2-core CI), GPU tests skip cleanly without CUDA."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads on a small shared machine
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.pop("MLFLOW_TRACKING_URI", None)    # a developer's own server: the tests use their folders' stores

import pytest  # noqa: E402
import torch  # noqa: E402
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_mlflow_tracking_uri():
    """``mlflow.set_tracking_uri`` (some tests query their sweep's store through it) also sets $MLFLOW_TRACKING_URI,
    which a sweep takes as its store when nothing names one: no test starts with another's."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def _shared_data_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("gmpq_data_cache"))


@pytest.fixture(autouse=True)
def _own_model_cache(tmp_path_factory, monkeypatch, _shared_data_cache):
    """Each test gets its own teacher / FP-target cache (the default, ~/.cache/gmpq, is shared by runs); the
    decoded dataset copies (``gmpq_core.data.decoded``) are one folder for the whole session."""
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(tmp_path_factory.mktemp("gmpq_cache")))
    monkeypatch.setenv("GMPQ_DATA_CACHE_DIR", _shared_data_cache)


USER_CNN = '''"""A small CNN of a user's own (README "Your own model")."""
from torch import nn


def build(*, num_classes, in_channels, small_input):
    """Three convs and a classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))
'''


@pytest.fixture
def user_cnn() -> str:
    """The source of a user's model file defining ``build`` (tests of ``model: PATH.py:build``)."""
    return USER_CNN


def _live_process():
    """A live process of this host that is not this one (a gmpq command's driver, as far as markers go)."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


other_process = pytest.fixture(_live_process, name="other_process")
second_process = pytest.fixture(_live_process, name="second_process")   # a third process, beside other_process
