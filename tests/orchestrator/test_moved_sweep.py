"""A sweep folder moved or copied works on its own files (orchestrator/moved_sweep.py and its callers)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from orchestrator.moved_sweep import follow_folder, moved_path, recorded_dir, same_folder
from orchestrator.results import CONFIG_FILE, load_resolved_config
from orchestrator.sweep_config import load_sweep_config, save_resolved_config


def _saved_sweep(folder: Path, cache: Path) -> Path:
    """A sweep folder as 'gmpq sweep' leaves it before any trial: the resolved config and a results marker."""
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(folder), "cache_dir": str(cache)})
    save_resolved_config(cfg)
    (folder / "trial_events.jsonl").write_text("")
    return folder


def test_moved_path_moves_only_what_lay_inside_the_old_folder(tmp_path):
    old, new = tmp_path / "a", tmp_path / "b"
    assert moved_path(f"sqlite:///{old}/mlflow.db", old, new) == f"sqlite:///{new}/mlflow.db"
    assert moved_path(str(old / "ray_results"), old, new) == str(new / "ray_results")
    assert moved_path(str(old), old, new) == str(new)
    for kept in (f"sqlite:///{tmp_path}/shared.db", str(tmp_path / "ab" / "x"), "http://host:5000",
                 "postgresql://u@h/db", None, ""):
        assert moved_path(kept, old, new) == kept


def test_recorded_paths_are_moved_as_written_links_inside_the_old_folder_included(tmp_path):
    old, new, scratch = tmp_path / "a", tmp_path / "b", tmp_path / "scratch"
    assert moved_path((old / "rr").as_uri(), old, new) == (new / "rr").as_uri()
    assert moved_path((tmp_path / "x y").as_uri(), old, new) == (tmp_path / "x y").as_uri()
    scratch.mkdir()
    old.mkdir()
    (old / "ray_results").symlink_to(scratch)        # a link in the original: its recorded path moves, not its target
    assert moved_path(str(old / "ray_results"), old, new) == str(new / "ray_results")


def test_one_folder_under_two_paths_is_not_a_move(tmp_path):
    """The same folder seen through a link or another mount path: nothing is rewritten."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real, target_is_directory=True)
    data = {"out_dir": str(tmp_path / "alias"), "storage_path": str(tmp_path / "alias" / "ray_results")}
    assert same_folder(tmp_path / "alias", real.resolve()) and follow_folder(data, real) == data


def test_follow_folder_keeps_a_cache_outside_and_moves_one_inside(tmp_path):
    old, new, cache = tmp_path / "a", tmp_path / "b", tmp_path / "cache"
    data = {"out_dir": str(old), "tracking_uri": "http://mlflow:5000", "optuna_storage": f"sqlite:///{old}/optuna.db",
            "storage_path": str(old / "ray_results"), "cache_dir": str(cache), "name": "demo"}
    moved = follow_folder(data, new)
    assert moved == {**data, "out_dir": str(new), "optuna_storage": f"sqlite:///{new}/optuna.db",
                     "storage_path": str(new / "ray_results")}
    assert follow_folder({**data, "cache_dir": str(old / "cache")}, new)["cache_dir"] == str(new / "cache")
    assert follow_folder(data, old) == data and recorded_dir({"name": "x"}) is None


def test_a_copied_sweep_folder_reads_its_own_stores(tmp_path):
    original = _saved_sweep(tmp_path / "runs" / "demo", tmp_path / "cache")
    copy = tmp_path / "laptop" / "demo"
    shutil.copytree(original, copy)
    for read in (load_resolved_config(copy), load_sweep_config(copy / CONFIG_FILE).to_dict()):
        assert read["out_dir"] == str(copy.resolve())
        assert read["tracking_uri"] == f"sqlite:///{copy.resolve()}/mlflow.db"
        assert read["optuna_storage"] == f"sqlite:///{copy.resolve()}/optuna.db"
        assert read["storage_path"] == str(copy.resolve() / "ray_results")
        assert read["cache_dir"] == str((tmp_path / "cache").resolve())
    assert load_resolved_config(copy, follow_moves=False)["out_dir"] == str(original.resolve())
    assert load_resolved_config(original)["out_dir"] == str(original.resolve())     # the original: as written


def test_a_saved_config_reused_for_a_new_sweep_gets_the_new_folders_stores(tmp_path):
    """gmpq sweep --config runs/a/sweep_config.yaml --out runs/b: b's own MLflow, Optuna and Tune state
    (before, b logged into a's mlflow.db and continued a's Optuna study)."""
    a = _saved_sweep(tmp_path / "a", tmp_path / "cache")
    b = tmp_path / "b"
    cfg = load_sweep_config(a / CONFIG_FILE, overrides={"out_dir": str(b)}).resolved()
    assert (cfg.out_dir, cfg.tracking_uri, cfg.optuna_storage, cfg.storage_path) == (
        str(b.resolve()), f"sqlite:///{b.resolve()}/mlflow.db", f"sqlite:///{b.resolve()}/optuna.db",
        str(b.resolve() / "ray_results"))
    shared = load_sweep_config(a / CONFIG_FILE, overrides={"out_dir": str(b), "tracking_uri": "http://h:5000"})
    assert shared.tracking_uri == "http://h:5000"                       # a store named by a flag is kept


def test_another_config_file_kept_in_a_sweep_folder_keeps_its_out_dir(tmp_path):
    """runs/a/next.yaml naming out_dir runs/b is a plan for b, not a's saved config."""
    a = _saved_sweep(tmp_path / "a", tmp_path / "cache")
    (a / "next.yaml").write_text(yaml.safe_dump({"preset": "demo", "out_dir": str(tmp_path / "b")}))
    assert load_sweep_config(a / "next.yaml").sweep_dir == (tmp_path / "b").resolve()


def test_a_renamed_sweeps_pickled_optuna_storage_opens_the_folders_own(tmp_path):
    """Tune's state of a resumed sweep holds its Optuna storage pickled: unpickled as it is, it reconnects to
    the old folder's file (gone after a rename: the resume failed)."""
    import pickle
    import sqlite3

    import optuna

    from orchestrator.sweep import optuna_storage_now

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    storage = optuna.storages.RDBStorage(f"sqlite:///{a}/optuna.db")
    optuna.create_study(study_name="s", storage=storage).optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    blob = pickle.dumps(storage)
    storage.engine.dispose()
    a.rename(b)
    import sqlalchemy.exc

    with pytest.raises((sqlite3.OperationalError, sqlalchemy.exc.OperationalError),   # what a resume in the
                       match="unable to open database file"):                         # renamed folder met
        pickle.loads(blob)
    with optuna_storage_now(f"sqlite:///{b}/optuna.db"):
        moved = pickle.loads(blob)
    assert moved.url == f"sqlite:///{b}/optuna.db" and len(optuna.load_study(study_name="s", storage=moved).trials) == 2
    assert not a.exists() and pickle.loads(pickle.dumps(moved)).url == moved.url   # the patch is gone after
    other = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/studies.db")           # another store: kept
    with optuna_storage_now(f"sqlite:///{b}/optuna.db"):
        assert pickle.loads(pickle.dumps(other)).url == f"sqlite:///{tmp_path}/studies.db"


def test_a_config_template_named_like_a_saved_one_keeps_its_out_dir(tmp_path):
    """A sweep_config.yaml in a folder that holds no sweep is a template: its out_dir is where to write."""
    target = tmp_path / "runs" / "x"
    templates = tmp_path / "configs"
    templates.mkdir()
    (templates / CONFIG_FILE).write_text(yaml.safe_dump({"preset": "demo", "out_dir": str(target)}))
    assert load_sweep_config(templates / CONFIG_FILE).sweep_dir == target.resolve()


@pytest.mark.parametrize("ids", ["current", "older"])
def test_mlflow_in_a_copied_folder_reuses_its_runs_and_keeps_artifacts_in_the_copy(tmp_path, ids):
    """``older``: id files without their folder (written before it was recorded) and the copy's config
    already rewritten for the copy (as a resumed sweep does before its MLflow callback starts)."""
    import json

    from mlflow.tracking import MlflowClient

    from orchestrator.mlflow_sink import MLflowSink

    original = _saved_sweep(tmp_path / "a", tmp_path / "cache")
    sink = MLflowSink(None, original)
    assert sink.connect()
    child = sink.child_run("trials", "t1", run_name="t1", params={"x": 1}, tags={"trial_id": "t1"})
    sink.client.log_text(child, "one", "note.txt")
    copy = tmp_path / "b"
    shutil.copytree(original, copy)
    before = {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()}
    if ids == "older":
        from orchestrator.mlflow_sink import PARENT_FILE, RUNS_FILE
        for name in (PARENT_FILE, RUNS_FILE):
            data = json.loads((copy / name).read_text())
            del data["sweep_dir"]
            (copy / name).write_text(json.dumps(data))
        save_resolved_config(load_sweep_config(copy / CONFIG_FILE))
        assert load_resolved_config(copy, follow_moves=False)["out_dir"] == str(copy.resolve())
    from mlflow.tracking._tracking_service import utils   # a new process on the copy starts without MLflow's
    getattr(utils, "_artifact_repos_cache", {}).clear()     # per-run artifact folders cached by this one

    from orchestrator.moved_sweep import store_not_yet_moved
    assert store_not_yet_moved(copy, load_resolved_config(copy), "demo") == original.resolve()   # gmpq status says so
    moved = MLflowSink(None, copy)
    assert moved.tracking_uri == f"sqlite:///{copy.resolve()}/mlflow.db" and moved.connect()
    assert store_not_yet_moved(copy, load_resolved_config(copy), "demo") is None
    assert moved.parent_run_id == sink.parent_run_id                     # no second parent run
    again = moved.child_run("trials", "t1", run_name="t1", params={"x": 1}, tags={"trial_id": "t1"})
    assert again == child
    moved.client.log_text(again, "two", "note2.txt")
    client = MlflowClient(moved.tracking_uri)
    runs = client.search_runs([moved._experiment_id])
    assert len(runs) == 2 and all(r.info.artifact_uri.startswith((copy.resolve() / "mlartifacts").as_uri())
                                  for r in runs)
    assert client.get_run(moved.parent_run_id).data.tags["gmpq.sweep_dir"] == str(copy.resolve())
    assert sorted(a.path for a in client.list_artifacts(again)) == ["note.txt", "note2.txt"]
    assert {p: p.stat().st_mtime_ns for p in original.rglob("*") if p.is_file()} == before


def test_a_model_cache_recorded_on_another_machine_falls_back_to_this_ones(tmp_path, monkeypatch):
    """A folder copied from another machine names its cache there (~/.cache of another user): the final
    stage and a resume use this machine's cache instead; a Ray cluster keeps the shared one it named."""
    from orchestrator.moved_sweep import usable_cache_dir

    mine = tmp_path / "my_cache"
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(mine))
    said = []
    gone = str(tmp_path / "elsewhere" / ".cache" / "gmpq")
    assert usable_cache_dir(gone, address=None, say=said.append) == str(mine.resolve()) and gone in said[0]
    assert usable_cache_dir(gone, address="ray://head:10001") == gone
    (tmp_path / "here").mkdir()
    assert usable_cache_dir(str(tmp_path / "here"), address=None) == str(tmp_path / "here")
    assert usable_cache_dir(None, address=None) is None


def test_a_moved_sweep_is_not_resumed_through_ray_client(tmp_path):
    """Ray Client restores Tune's state on the cluster, where the old folder's Optuna storage would be used."""
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep import run_sweep

    original = _saved_sweep(tmp_path / "a", tmp_path / "cache")
    moved = tmp_path / "b"
    original.rename(moved)
    cfg = load_sweep_config(moved / CONFIG_FILE, overrides={"out_dir": str(moved), "address": "ray://head:10001"})
    with pytest.raises(ConfigError, match="Ray Client"):
        run_sweep(cfg, resume=True, progress=False)


def test_a_moved_sweep_is_not_resumed_through_ray_client_named_by_ray_address(tmp_path, monkeypatch):
    """``--address auto`` follows ``$RAY_ADDRESS``: a ``ray://`` one goes through Ray Client just the same."""
    from gmpq_core.errors import ConfigError
    from orchestrator.sweep_resume import _check_moved_resume    # reached once grpcio (Ray Client) is installed

    original = _saved_sweep(tmp_path / "a", tmp_path / "cache")
    moved = tmp_path / "b"
    original.rename(moved)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    cfg = load_sweep_config(moved / CONFIG_FILE, overrides={"out_dir": str(moved), "address": "auto"})
    with pytest.raises(ConfigError, match=r"Ray Client \(--address auto, from \$RAY_ADDRESS=ray://head:10001\)") as e:
        _check_moved_resume(cfg)
    # the fix is not the --address auto given: on the head node, with the variable unset
    assert "from the head node (--address auto there, with $RAY_ADDRESS unset" in " ".join(str(e.value).split())
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")          # a head node's own address: not Ray Client
    _check_moved_resume(cfg)
