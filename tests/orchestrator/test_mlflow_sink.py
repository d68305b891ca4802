"""MLflow + Parquet callbacks driven by a real tiny Ray Tune run, with a real SQLite MLflow store."""
from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray import tune  # noqa: E402

from orchestrator.mlflow_callback import MLflowCallback  # noqa: E402
from orchestrator.mlflow_sink import PARENT_FILE, RUNS_FILE, default_tracking_uri  # noqa: E402
from orchestrator.results import read_layers, read_trials  # noqa: E402
from orchestrator.results_callback import ResultsCallback  # noqa: E402
from orchestrator.trial_status import TrialStatusBook  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

LAYERS = [{"name": "layer1.0.conv1", "macs": 1000, "w_bits": 4, "a_bits": 2},
          {"name": "layer1.0.conv2", "macs": 3000, "w_bits": 2, "a_bits": 2}]


@pytest.fixture(scope="module")
def ray_local():
    from orchestrator.ray_env import init_ray
    started = init_ray(num_cpus=2)
    yield
    if started:
        ray.shutdown()


def make_trainable(marker: Path):
    """x < 0: raises on its first attempt only (marker file); otherwise 3 epochs then the final row."""
    def trainable(config):
        x = float(config["x"])
        if x < 0 and not marker.exists():
            marker.write_text("failed once")
            raise ValueError("boom: deliberate first-attempt failure")
        for epoch in range(3):
            tune.report({"phase": "search", "epoch": epoch, "proxy_top1": 10.0 * (epoch + 1) + abs(x),
                         "ce": 1.0 / (epoch + 1), "l_gen": 0.1, "expected_gbitops": 1e-5, "p": 3.0, "ard": 0.5,
                         "budget_bucket": 1, "prune_value": 10.0 * (epoch + 1) + abs(x)})
        bitops = sum(d["macs"] * d["w_bits"] * d["a_bits"] for d in LAYERS)
        tune.report({"phase": "search", "epoch": 2, "done": True, "proxy_top1": 30.0 + abs(x),
                     "transfer_top1": 50.0 + abs(x), "bitops": bitops, "bitops_total": bitops * 10,
                     "budget_bitops": 20000, "budget_avg_bits": 3.0, "gbitops": bitops / 1e9, "ard": 0.5,
                     "p": 3.0, "search_seconds": 0.1, "transfer_seconds": 0.05, "epochs_run": 3,
                     "node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname(),
                     "policy_json": json.dumps({"version": 1, "layers": {d["name"]: {"w_bits": d["w_bits"],
                                                "a_bits": d["a_bits"]} for d in LAYERS}}),
                     "layers_json": json.dumps(LAYERS)})
    return trainable


class PruneBelow(tune.Stopper):
    """Stops a trial whose proxy_top1 is under ``threshold`` at epoch 1 and marks it pruned in the book."""

    def __init__(self, book: TrialStatusBook, threshold: float) -> None:
        self.book, self.threshold = book, threshold

    def __call__(self, trial_id, result):
        if result.get("epoch") == 1 and not result.get("done") and result["proxy_top1"] < self.threshold:
            self.book.mark_pruned(trial_id, f"proxy_top1 {result['proxy_top1']} < {self.threshold}")
            return True
        return False

    def stop_all(self):
        return False


def run_tune(sweep, trainable, callbacks, stopper=None, xs=(1.0, 5.0, -1.0)):
    tuner = tune.Tuner(trainable, param_space={"x": tune.grid_search(list(xs)), "eta": 40.0},
                       tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
                       run_config=tune.RunConfig(name="sweep", storage_path=str(sweep / "ray_results"),
                                                 callbacks=callbacks, stop=stopper, verbose=0,
                                                 failure_config=tune.FailureConfig(max_failures=0)))
    return tuner.fit()


def child_runs(mlflow, uri, name):
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=[name], output_format="pandas")
    return runs, runs[runs["tags.gmpq.role"] == "trial"]


@pytest.mark.parametrize("background", [False, True], ids=["in-hook", "writer-thread"])
def test_parent_children_statuses_and_resume_without_duplicates(ray_local, tmp_path, background):
    import mlflow
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "sweep_config.yaml").write_text("name: cbtest\nmodel: resnet20\nfinetune: {top_k: 2}\n")
    uri = default_tracking_uri(sweep)
    book = TrialStatusBook(sweep / "trial_status.json")
    trainable = make_trainable(tmp_path / "marker")
    cbs = [ResultsCallback(sweep, book),
           MLflowCallback(uri, "cbtest", sweep, {"name": "cbtest", "model": "resnet20", "finetune": {"top_k": 2}}, book,
                          background=background)]
    run_tune(sweep, trainable, cbs, PruneBelow(book, threshold=22.0))

    df = read_trials(sweep).set_index("param_x")
    assert df.loc[1.0, "status"] == "pruned" and df.loc[5.0, "status"] == "completed"
    assert df.loc[-1.0, "status"] == "failed" and "boom" in df.loc[-1.0, "error"]
    assert df.loc[5.0, "transfer_top1"] == 55.0 and df.loc[5.0, "bitops"] == 20000
    assert df.loc[1.0, "last_epoch"] == 1 and df.loc[1.0, "transfer_top1"] != df.loc[1.0, "transfer_top1"]  # NaN
    assert df.loc[5.0, "node_id"] and df.loc[5.0, "started_at"] <= df.loc[5.0, "finished_at"]
    assert len(read_layers(sweep)) == 2 * 1 and set(read_layers(sweep)["bitops"]) == {8000, 12000}

    runs, kids = child_runs(mlflow, uri, "cbtest")
    parent = runs[runs["tags.gmpq.role"] == "sweep"]
    assert len(parent) == 1 and len(kids) == 3
    assert set(kids["tags.mlflow.parentRunId"]) == {parent["run_id"].item()}
    assert parent["params.model"].item() == "resnet20" and parent["params.finetune.top_k"].item() == "2"
    by_x = kids.set_index("params.x")
    assert by_x.loc["5.0", "status"] == "FINISHED" and by_x.loc["5.0", "tags.status"] == "completed"
    assert by_x.loc["1.0", "status"] == "KILLED" and by_x.loc["1.0", "tags.status"] == "pruned"
    assert by_x.loc["-1.0", "status"] == "FAILED" and by_x.loc["-1.0", "tags.status"] == "failed"
    client = mlflow.tracking.MlflowClient(uri)
    good = by_x.loc["5.0", "run_id"]
    ce = client.get_metric_history(good, "ce")
    assert sorted(m.step for m in ce) == [0, 1, 2]
    assert client.get_run(good).data.metrics["transfer_top1"] == 55.0
    assert json.loads(Path(mlflow.artifacts.download_artifacts(run_id=good, artifact_path="policy.json",
                                                               tracking_uri=uri)).read_text())["version"] == 1
    ids = json.loads((sweep / RUNS_FILE).read_text())["trials"]
    assert len(ids) == 3 and (sweep / PARENT_FILE).exists()

    # Resume: the errored trial reruns (now succeeding) under the same child run; no duplicate rows/runs.
    tune.Tuner.restore(str(sweep / "ray_results" / "sweep"), trainable, resume_errored=True).fit()
    df2 = read_trials(sweep).set_index("param_x")
    assert len(df2) == 3 and df2.loc[-1.0, "status"] == "completed" and df2.loc[-1.0, "attempt"] == 2
    assert df2.loc[1.0, "status"] == "pruned"
    runs2, kids2 = child_runs(mlflow, uri, "cbtest")
    assert len(kids2) == 3 and len(runs2) == 4
    assert kids2.set_index("params.x").loc["-1.0", "status"] == "FINISHED"
    assert json.loads((sweep / RUNS_FILE).read_text())["trials"] == ids


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("background", [False, True], ids=["in-hook", "writer-thread"])
def test_unreachable_tracking_server_warns_and_parquet_is_still_written(ray_local, tmp_path, background):
    sweep = tmp_path / "sweep"
    uri = f"http://127.0.0.1:{closed_port()}"
    cb = MLflowCallback(uri, "down", sweep, {"name": "down"}, None, background=background)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_tune(sweep, make_trainable(tmp_path / "m"), [ResultsCallback(sweep), cb], xs=(2.0,))
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and "MLflow" in str(w.message)]
    assert len(msgs) == 1 and uri in msgs[0]
    assert not cb.sink.enabled
    assert read_trials(sweep)["status"].tolist() == ["completed"]
