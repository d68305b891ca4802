"""Integrity: damaged files are reported by name; writes are atomic; loaders are safe; servers bind loopback.

A truncated or corrupted Parquet table, fine-tune checkpoint, policy or run-id file is detected where
it is read and reported by name (CheckpointError / PolicyMismatchError -> exit 2), not as a crash later.
A writer killed with SIGKILL in the middle of rewriting trials.parquet leaves the old or the new table,
never half of one. A source scan checks that every ``torch.load`` passes ``weights_only=True``, every
``yaml.load`` a safe loader, that no pickle of user files is read, and that result files are written
through ``gmpq_core.fileio.atomic_write*``.
"""
from __future__ import annotations

import ast
import inspect
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faults import fake_sweep_dir

ROOT = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("gmpq_core", "orchestrator", "cluster", "search_spaces")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00garbage" * 64)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_parquet_is_reported_by_name(tmp_path, capsys, how):
    from gmpq_core.errors import CheckpointError
    from orchestrator.cli import main
    from orchestrator.results import read_layers
    from orchestrator.results_callback import ResultsCallback

    d = tmp_path / "sweep"
    fake_sweep_dir(d)
    _damage(d / "trials.parquet", how)
    assert main(["pareto", "--sweep", str(d), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert "trials.parquet" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match="trials.parquet"):
        ResultsCallback(d)                     # a resumed sweep refuses it before any trial runs
    _damage(d / "layers.parquet", how)
    with pytest.raises(CheckpointError, match="layers.parquet"):
        read_layers(d)


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_finetune_checkpoint_is_reported_by_name(tmp_path, capsys, how):
    from gmpq_core.fileio import save_checkpoint
    from gmpq_core.models import build_model
    from orchestrator.cli import main

    out = tmp_path / "ft"
    fp = tmp_path / "fp.pt"
    save_checkpoint(fp, build_model("resnet20", num_classes=10, in_channels=1, small_input=True).state_dict())
    ckpt = out / "checkpoints" / "last.pt"
    save_checkpoint(ckpt, {"epoch": 1, "model": {}, "optimizer": {}, "scheduler": {}, "history": [{"epoch": 1}]})
    _damage(ckpt, how)
    argv = ["finetune", "--uniform", "4", "4", "--fp-checkpoint", str(fp), "--epochs", "2", "--train-size", "100",
            "--test-size", "100", "--batch-size", "50", "--max-steps-per-epoch", "1", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "last.pt" in err and "corrupted" in err and "Traceback" not in err
    assert not (out / "finetune_result.json").exists()


def test_policies_are_json_only(tmp_path, capsys):
    from orchestrator.cli import main

    policy = tmp_path / "policy.json"
    policy.write_bytes(pickle.dumps({"version": 1, "layers": {}}))      # a pickle is never unpickled
    assert main(["finetune", "--policy", str(policy), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "policy.json" in err and "Traceback" not in err and not (tmp_path / "out").exists()


_WRITER = """
import sys, itertools
from orchestrator.results import trial_row, write_results
for i in itertools.count():
    rows = [trial_row(trial_id=f"t{j:04d}", config={"x": float(i)}, last_result={"proxy_top1": float(i)},
                      status="completed") for j in range(400)]
    write_results(sys.argv[1], rows, [])
    print(i, flush=True)
"""


@pytest.mark.slow
def test_a_writer_killed_mid_write_leaves_a_whole_table(tmp_path):
    from orchestrator.results import read_trials

    d = tmp_path / "sweep"
    d.mkdir()
    for k in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline()                   # at least one table is complete
            time.sleep(0.05 + 0.13 * k)                     # then die somewhere inside a later rewrite
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        df = read_trials(d)                                 # never half a table
        assert len(df) == 400 and df["param_x"].nunique() == 1
    left = [p.name for p in d.iterdir() if p.name not in ("trials.parquet", "layers.parquet")]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in left)   # only hidden temp files of dead writers


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
            yield node, owner, name


def _is_mode(node) -> bool:
    """A literal open() mode such as "w" or "rb" (not a file name)."""
    return isinstance(node, ast.Constant) and isinstance(node.value, str) and 0 < len(node.value) <= 3 \
        and set(node.value) <= set("rwaxbt+")


def _kw(node: ast.Call, key: str):
    return next((k.value for k in node.keywords if k.arg == key), None)


# Non-atomic writes that are fine: probes deleted at once, append-only logs.
ALLOWED_WRITES = {("orchestrator/trainable.py", "open"), ("cluster/mlflow_server.py", "open"),
                  ("cluster/local.py", "open"), ("cluster/connect.py", "write_text"),
                  ("orchestrator/sweep_config.py", "write_text"), ("gmpq_core/fileio.py", "fdopen")}
# Non-atomic writes in files other helpers own, reported to the lead (owner fixes them).
PENDING_WRITES = {("orchestrator/study.py", "savefig"): "figure written in place; use orchestrator.plots' "
                                                         "atomic save"}


def test_source_uses_safe_loaders_and_atomic_writes():
    bad, writes = [], set()
    for sub in SOURCE_DIRS:
        for path in sorted((ROOT / sub).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text(), rel)
            for node, owner, name in _calls(tree):
                where = f"{rel}:{node.lineno}"
                if owner == "torch" and name == "load":
                    wo = _kw(node, "weights_only")
                    if not (isinstance(wo, ast.Constant) and wo.value is True):
                        bad.append(f"{where} torch.load without weights_only=True")
                if owner == "yaml" and name in ("load", "load_all"):
                    loader = _kw(node, "Loader")
                    lname = getattr(loader, "attr", getattr(loader, "id", ""))
                    if lname not in ("SafeLoader", "CSafeLoader", "_Loader"):
                        bad.append(f"{where} yaml.{name} without a safe loader")
                if owner == "yaml" and name in ("unsafe_load", "full_load", "unsafe_load_all"):
                    bad.append(f"{where} yaml.{name}")
                if owner in ("pickle", "cloudpickle", "dill") and name in ("load", "loads"):
                    # Ray's own files, which Ray unpickles anyway: a trial's error file, the searcher's saved state
                    if rel not in ("orchestrator/results.py", "orchestrator/sweep_grow.py"):
                        bad.append(f"{where} {owner}.{name}")
                mode = node.args[1] if name in ("open", "fdopen") and len(node.args) > 1 else _kw(node, "mode")
                if name == "open" and mode is None and _is_mode(node.args[0] if node.args else None):
                    mode = node.args[0]                   # Path.open("w"): the mode comes first
                writes_file = (name in ("open", "fdopen") and isinstance(mode, ast.Constant)
                               and any(c in str(mode.value) for c in "wax")) or \
                    name in ("write_text", "write_bytes", "to_parquet", "to_csv", "savefig") or \
                    (owner == "torch" and name == "save" and rel != "gmpq_core/fileio.py")
                if writes_file and name == "savefig" and node.args and isinstance(node.args[0], ast.Name) \
                        and node.args[0].id == "f":
                    writes_file = False                   # savefig into atomic_write's temp file object
                if writes_file:
                    writes.add((rel, name))
    assert not bad, "\n".join(bad)
    # the Pareto plot and the result tables go through atomic_write (no direct writes in those modules)
    unexpected = sorted(writes - ALLOWED_WRITES - set(PENDING_WRITES))
    assert not unexpected, f"non-atomic writes of result files: {unexpected}"


def test_servers_bind_loopback_by_default():
    from cluster.mlflow_server import start_mlflow_server
    from orchestrator.cli import build_parser

    assert inspect.signature(start_mlflow_server).parameters["host"].default == "127.0.0.1"
    args = build_parser().parse_args(["mlflow-server"])
    assert args.host == "127.0.0.1"


@pytest.mark.ray
@pytest.mark.slow
def test_a_deleted_results_table_is_rebuilt_when_the_sweep_resumes(tmp_path):
    """A damaged trials.parquet can be moved away: the resumed sweep rebuilds the finished rows from Tune."""
    from ray import tune

    from orchestrator.ray_env import ray_session
    from orchestrator.results import read_trials
    from orchestrator.results_callback import ResultsCallback

    def trainable(config):
        x = float(config["x"])
        tune.report({"phase": "transfer", "epoch": 1, "proxy_top1": 10.0 + x, "transfer_top1": 20.0 + x,
                     "bitops": 100, "done": True})

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with ray_session(num_cpus=1):
        tune.Tuner(trainable, param_space={"x": tune.grid_search([1.0, 2.0])},
                   run_config=tune.RunConfig(name="t", storage_path=str(sweep / "ray_results"), verbose=0,
                                             callbacks=[ResultsCallback(sweep)])).fit()
        first = read_trials(sweep).sort_values("trial_id")
        (sweep / "trials.parquet").unlink()
        (sweep / "layers.parquet").unlink()
        tune.Tuner.restore(str(sweep / "ray_results" / "t"), trainable, resume_errored=True).fit()
    again = read_trials(sweep).sort_values("trial_id")
    assert list(again["trial_id"]) == list(first["trial_id"]) and len(again) == 2
    assert list(again["transfer_top1"]) == list(first["transfer_top1"]) == [21.0, 22.0]
    assert set(again["status"]) == {"completed"}


def test_a_text_file_given_as_a_checkpoint_is_named_as_such_and_no_bad_advice(tmp_path):
    """A JSON result passed as --fp-checkpoint used to get torch's "load with weights_only=False" text and
    "delete it": a valid file the user should keep."""
    from gmpq_core.errors import CheckpointError
    from gmpq_core.fileio import load_checkpoint

    (tmp_path / "fp_result.json").write_text('{"top1": 90.0}')
    with pytest.raises(CheckpointError, match=r"is a text file, not a PyTorch checkpoint.*fp\.pt"):
        load_checkpoint(tmp_path / "fp_result.json")
    (tmp_path / "junk.pt").write_bytes(b"\x80\x02junk that is not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "junk.pt")
    assert "weights_only=False" not in str(e.value) and "junk.pt" in str(e.value)
