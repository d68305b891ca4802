"""Sweep configs (sweep_config, sweep_checks): merging, overrides, round trip, and bad configs failing with exit 2
before Ray starts."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gmpq_core.errors import BudgetInfeasibleError, ConfigError
from orchestrator.cli import main
from orchestrator.sweep_checks import check_sweep_config
from orchestrator.sweep_config import (
    SweepConfig,
    load_sweep_config,
    save_resolved_config,
    trial_search_config,
)


def _write(tmp_path, data, name="sweep.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def _gmpq_sweep_fails(args, capsys):
    """Run `gmpq sweep ARGS`; must exit 2 with a message and leave Ray unstarted."""
    import ray

    code = main(["sweep", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not ray.is_initialized()
    assert "Traceback" not in err
    return " ".join(err.split())


def test_flags_override_the_preset(tmp_path):
    cfg = load_sweep_config(preset="demo", overrides={"n_trials": 3, "space.search_epochs": 1,
                                                      "out_dir": str(tmp_path), "tracking_uri": None})
    assert cfg.n_trials == 3 and cfg.space.possible_values("search_epochs") == (1,)
    assert cfg.space.possible_values("proxy_size") == (500, 1000)          # untouched parts stay
    r = cfg.resolved()
    assert r.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db" and r.optuna_storage == f"sqlite:///{tmp_path}/optuna.db"
    assert r.storage_path == str(tmp_path / "ray_results")


def test_precision_is_auto_unless_the_file_or_the_flag_says_otherwise(tmp_path, capsys):
    from orchestrator.cli import build_parser
    from orchestrator.commands.sweep import config_from_args
    from orchestrator.trainable import build_search_job

    assert load_sweep_config(preset="demo").precision == "auto"
    path = _write(tmp_path, {"preset": "demo", "precision": "bf16"})
    cfg = config_from_args(build_parser().parse_args(["sweep", "--config", str(path), "--out", str(tmp_path / "o")]))
    assert cfg.precision == "bf16" and SweepConfig.from_dict(cfg.to_dict()).precision == "bf16"
    assert build_search_job(cfg, {**cfg.space.first_point(), "proxy_size": 500}).precision == "bf16"  # the trials'
    cfg = config_from_args(build_parser().parse_args(["sweep", "--config", str(path), "--precision", "fp32"]))
    assert cfg.precision == "fp32"                                               # the flag wins
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["sweep", "--preset", "demo", "--precision", "fp16"])
    assert e.value.code == 2 and "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_sweep_saved_before_the_precision_key_resumes_and_fine_tunes_in_float32(tmp_path):
    """Sweeps saved before session 13 trained in float32 on GPUs too; 'auto' would switch a resumed GPU sweep
    to bf16 half-way. On a CPU both mean float32, so resuming with the preset still matches."""
    import yaml

    from orchestrator.final_stage import final_job
    from orchestrator.sweep import _check_same_config

    saved = save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}))
    data = yaml.safe_load(saved.read_text())
    assert data.pop("precision") == "auto"
    saved.write_text(yaml.safe_dump(data, sort_keys=False))
    assert load_sweep_config(saved).precision == "fp32"
    _check_same_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}).resolved())
    job = final_job(data, {"trial_id": "t1", "policy_json": "{}"}, tmp_path / "fp.pt", epochs=1)
    assert job.precision == "fp32" and (job.train_size, job.test_size) == (None, None)     # the full splits
    quick = {**data, "finetune": {**data["finetune"], "train_size": 3000, "test_size": 500}}
    job = final_job(quick, {"trial_id": "t1", "policy_json": "{}"}, tmp_path / "fp.pt", epochs=1, test_size=700)
    assert (job.train_size, job.test_size) == (3000, 700)                 # the section's, a given value wins
    assert final_job({**data, "precision": "bf16"}, {"trial_id": "t1", "policy_json": "{}"}, tmp_path / "fp.pt",
                     epochs=1).precision == "bf16"
    with pytest.raises(ConfigError, match="these settings differ .*: seed"):         # other keys still count
        _check_same_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "seed": 9})
                           .resolved())


def test_config_file_merges_over_its_preset_and_round_trips(tmp_path):
    path = _write(tmp_path, {"preset": "demo", "name": "mine", "transfer": {"epochs": 2},
                             "space": {"eta": {"type": "float", "low": 5, "high": 50}}})
    cfg = load_sweep_config(path)
    assert cfg.name == "mine" and cfg.transfer.epochs == 2 and cfg.transfer.train_size == 5000
    assert cfg.space["eta"].low == 5 and "lam" in cfg.space
    assert SweepConfig.from_dict(cfg.to_dict()) == cfg
    saved = save_resolved_config(SweepConfig.from_dict({**cfg.to_dict(), "out_dir": str(tmp_path / "s")}))
    back = load_sweep_config(saved)
    assert back.out_dir == str(tmp_path / "s") and back.tracking_uri.startswith("sqlite:///")


def test_trial_search_config_maps_space_params():
    cfg = load_sweep_config(preset="demo")
    sc = trial_search_config(cfg, {"budget_avg_bits": 3.0, "eta": 7.0, "lam": 1e-4, "p_mode": "fixed",
                                   "p_fixed": 2.0, "lr_arch": 0.02, "search_epochs": 3, "proxy_size": 500})
    assert (sc.eta, sc.lam, sc.p_mode, sc.p_fixed, sc.lr_arch, sc.epochs) == (7.0, 1e-4, "fixed", 2.0, 0.02, 3)
    assert sc.budget.avg_bits == 3.0 and sc.max_steps_per_epoch == 8 and sc.batch_size == 64


def test_relative_sqlite_stores_and_storage_are_saved_absolute(tmp_path, monkeypatch):
    """A relative sqlite:///x.db (or --storage folder) was saved as written: a resume, gmpq status or a trial started
    in another folder opened another file (an empty Optuna study, a second MLflow store)."""
    from orchestrator.sweep_config import absolute_sqlite
    monkeypatch.chdir(tmp_path)
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": "s", "optuna_storage": "sqlite:///db/optuna.db",
                                                      "tracking_uri": "sqlite:///ml.db?timeout=5",
                                                      "storage_path": "tune"}).resolved()
    assert cfg.optuna_storage == f"sqlite:///{tmp_path / 'db' / 'optuna.db'}"
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'ml.db'}?timeout=5" and cfg.storage_path == str(tmp_path / "tune")
    for same in ("sqlite:////abs/x.db", "sqlite:///:memory:", "postgresql://u@h/db", "http://mlflow:5000", None):
        assert absolute_sqlite(same) == same
    assert load_sweep_config(preset="demo", overrides={"storage_path": "s3://bucket/x"}).resolved().storage_path \
        == "s3://bucket/x"


def test_mlflow_tracking_uri_from_the_environment_when_nothing_names_one(tmp_path, monkeypatch, capsys):
    """MLflow's own $MLFLOW_TRACKING_URI (set in the KubeRay/launcher pods) was never read: runs went to the folder's
    SQLite store. Now it is the default below --tracking-uri and the config's key, said in a line, and checked."""
    from orchestrator.commands.sweep import say_env_tracking_uri

    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)})
    assert cfg.resolved().tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert cfg.resolved().tracking_uri == "http://mlflow.example:5000"
    named = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "tracking_uri": "sqlite:///x.db"})
    assert named.resolved().tracking_uri == f"sqlite:///{Path.cwd() / 'x.db'}"      # absolute, as saved
    said: list[str] = []
    say_env_tracking_uri(cfg, False, said.append)
    say_env_tracking_uri(cfg, True, said.append)          # a resume keeps its saved store: nothing to say
    say_env_tracking_uri(named, False, said.append)
    assert said == ["MLflow tracking URI http://mlflow.example:5000 from $MLFLOW_TRACKING_URI (--tracking-uri names "
                    "another store; unset the variable to log to the sweep folder's mlflow.db)"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    msg = _gmpq_sweep_fails(["--preset", "demo", "--out", str(tmp_path / "s")], capsys)
    assert "tracking_uri (from $MLFLOW_TRACKING_URI) 'bogus://nowhere' has a scheme MLflow does not know" in msg


def test_a_resume_keeps_the_mlflow_store_it_started_with_whatever_mlflow_tracking_uri_says_now(tmp_path, monkeypatch):
    """A review: a config naming no store took $MLFLOW_TRACKING_URI from the resuming shell, and --resume --config was
    refused as a changed config when the variable differed from the sweep's start (or was set since)."""
    import orchestrator.sweep as sweep
    from orchestrator.sweep_config import save_resolved_config

    class Reached(Exception):
        pass

    def reached(cfg, *a, **k):
        raise Reached(cfg.tracking_uri)

    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}).resolved())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    monkeypatch.setattr(sweep, "check_sweep_config", reached)        # past the same-config check: stop there
    with pytest.raises(Reached, match=f"sqlite:///{tmp_path}/mlflow.db"):
        sweep.run_sweep(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}), resume=True,
                        progress=False)


def test_demo_preset_passes_the_full_check(tmp_path):
    facts = check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}))
    assert facts.input_size == 28 and facts.in_channels == 1 and facts.feasible_avg_bits == (2.0, 6.0)


def test_unknown_preset_exits_2_listing_presets(capsys):
    err = _gmpq_sweep_fails(["--preset", "nope"], capsys)
    assert "Unknown preset 'nope'" in err and "demo" in err


def test_empty_space_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "preset: demo\nspace: null\n")
    cfg_err = _gmpq_sweep_fails(["--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert "search space is empty" in cfg_err


def test_infeasible_budget_exits_2_with_the_feasible_range(tmp_path, capsys):
    path = _write(tmp_path, {"preset": "demo", "candidates": [3, 4, 6],
                             "space": {"budget_avg_bits": {"type": "float", "low": 2.5, "high": 5.0}}})
    err = _gmpq_sweep_fails(["--config", str(path), "--out", str(tmp_path / "o")], capsys)
    assert "feasible range 3..6 average bits" in err and "resnet20 at 28 px" in err
    with pytest.raises(BudgetInfeasibleError):
        check_sweep_config(load_sweep_config(path, overrides={"out_dir": str(tmp_path / "o")}))


@pytest.mark.parametrize("change, match", [
    ({"model": "resnet21"}, "Unknown model 'resnet21'.*resnet20"),
    ({"proxy_dataset": "fashion"}, "Unknown dataset 'fashion'.*fashion_mnist"),
    ({"pruner": {"name": "medain"}}, "Unknown pruner 'medain'.*median.*hyperband"),
    ({"space": {"proxy_size": [500, 70000]}}, "proxy_size 70000 is larger than.*60000"),
    ({"transfer": {"test_size": 20000}}, "transfer.test_size 20000 is larger.*10000"),
    ({"transfer": {"lr": 0}}, "transfer.lr must be > 0"),
    ({"space": {"lam": {"type": "float", "low": 0.0, "high": 1e-3, "log": False}}}, "'lam'.*must be > 0"),
    ({"space": {"eta": {"type": "float", "low": 0, "high": 10, "log": True}}}, "log-scale range needs low > 0"),
    ({"space": {"proxy_size": {"type": "int", "low": 500, "high": 1000}}}, "'proxy_size' must be a fixed value or a list"),
    ({"search": {"epochs": 3}}, "search.epochs is set by the sweep"),
    ({"search": {"batch_sise": 3}}, "batch_sise"),
    ({"budget_buckets": [4.0, 3.0]}, "budget_buckets must be increasing"),
    ({"n_trials": 0}, "n_trials must be a positive integer"),
    ({"resources": {"cpu": 0}}, "resources.cpu must be a number > 0"),
    ({"finetune": {"nesterov": "yes"}}, "finetune.nesterov must be true/false"),
    ({"finetune": {"workers": "many"}}, r"finetune.workers must be a positive integer or 'auto' .* got workers='many'"),
    ({"finetune": {"max_concurrent": 0}}, r"finetune.max_concurrent must be a positive integer or null .* got max_concurrent=0"),
    ({"colour": "red"}, "Unknown sweep config key.*colour"),
    ({"precision": "fp16"}, r"precision must be one of auto, fp32, bf16, but got precision='fp16'"),
    ({"finetune": {"train_size": 0}}, r"finetune.train_size must be a positive integer or null .* got train_size=0"),
    ({"finetune": {"test_size": 20000}}, r"finetune.test_size 20000 is larger.*10000"),
])
def test_bad_values_fail_before_ray_with_a_clear_message(tmp_path, change, match):
    import ray

    path = _write(tmp_path, {"preset": "demo", **change})
    with pytest.raises(ConfigError, match=match):
        check_sweep_config(load_sweep_config(path, overrides={"out_dir": str(tmp_path / "o")}))
    assert not ray.is_initialized()


def test_unwritable_out_dir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    err = _gmpq_sweep_fails(["--preset", "demo", "--out", str(blocker / "sweep")], capsys)
    assert "cannot be written" in err


def test_malformed_yaml_names_line_and_column(tmp_path, capsys):
    path = _write(tmp_path, "preset: demo\nn_trials: [3\n")
    err = _gmpq_sweep_fails(["--config", str(path)], capsys)
    assert "not valid YAML at line" in err


def test_resume_without_a_sweep_exits_2(tmp_path, capsys):
    err = _gmpq_sweep_fails(["--preset", "demo", "--out", str(tmp_path / "none"), "--resume"], capsys)
    assert "Nothing to resume" in err


def test_a_new_pruner_or_dimension_type_replaces_the_old_one_whole():
    cfg = load_sweep_config(preset="demo", overrides={"pruner.name": "none"})
    assert cfg.pruner.name == "none" and cfg.pruner.kwargs == {}
    cfg = load_sweep_config(preset="demo", overrides={"space.lam": {"type": "categorical", "choices": [1e-4, 1e-3]}})
    assert cfg.space.possible_values("lam") == (1e-4, 1e-3)


def test_resume_with_only_out_reads_the_saved_config(tmp_path):
    from orchestrator.cli import build_parser
    from orchestrator.commands.sweep import config_from_args

    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "n_trials": 4})
    save_resolved_config(cfg)
    args = build_parser().parse_args(["sweep", "--out", str(tmp_path), "--resume"])
    assert config_from_args(args).resolved() == cfg.resolved()
    args = build_parser().parse_args(["sweep", "--out", str(tmp_path / "nothing"), "--resume"])
    with pytest.raises(ConfigError, match="Nothing to resume"):
        config_from_args(args)


def test_model_cache_defaults_to_the_user_cache_and_follows_cache_dir(tmp_path, monkeypatch):
    from orchestrator.cli import build_parser
    from orchestrator.commands.sweep import config_from_args

    monkeypatch.setenv("GMPQ_CACHE_DIR", str(tmp_path / "env_cache"))
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep")})
    assert cfg.resolved().cache_dir == str(tmp_path / "env_cache")     # shared by every sweep, not in --out
    monkeypatch.delenv("GMPQ_CACHE_DIR")
    assert cfg.resolved().cache_dir == str(Path("~/.cache/gmpq").expanduser().resolve())
    args = build_parser().parse_args(["sweep", "--preset", "demo", "--out", str(tmp_path / "s2"),
                                      "--cache-dir", str(tmp_path / "mine")])
    assert config_from_args(args).resolved().cache_dir == str(tmp_path / "mine")


def test_a_cluster_sweep_keeps_its_cache_in_the_sweep_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("GMPQ_CACHE_DIR")
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "sweep"), "address": "auto"})
    assert cfg.resolved().cache_dir == str(tmp_path / "sweep" / "cache")   # shared storage on a cluster


def test_resume_keeps_the_cache_the_sweep_started_with(tmp_path, monkeypatch):
    from orchestrator.sweep import _saved_cache_dir, run_sweep

    old = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "cache_dir": str(tmp_path / "old")})
    save_resolved_config(old)                                   # e.g. a sweep made when the cache lived in --out
    (tmp_path / "old").mkdir()                                  # (it made its cache; one not on this machine:
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(tmp_path / "elsewhere"))   # test_moved_sweep)
    again = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)})
    assert _saved_cache_dir(again) == str(tmp_path / "old")
    with pytest.raises(ConfigError, match="Nothing to resume"):  # not "cache_dir differ"
        run_sweep(again, resume=True, progress=False)


def test_gmpq_cache_dir_wins_on_a_cluster_and_data_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv("GMPQ_CACHE_DIR", str(tmp_path / "nfs_cache"))
    monkeypatch.chdir(tmp_path)
    cfg = load_sweep_config(preset="demo", overrides={"out_dir": "sweep", "address": "auto", "data_root": "data",
                                                      "target_dataset": "imagefolder:trees"}).resolved()
    assert cfg.cache_dir == str(tmp_path / "nfs_cache")           # the documented way to point at shared storage
    assert cfg.data_root == str(tmp_path / "data")                # trials run in their own folders
    assert cfg.target_dataset == f"imagefolder:{tmp_path / 'trees'}"
    assert cfg.resolved() == cfg                                  # resolving twice changes nothing


def test_resume_may_change_the_final_stage_but_not_the_sweep(tmp_path):
    """gmpq run --resume --workers 2 after 'workers=4 needs 4 CPUs': the finetune section is the final
    stage's, so it may change; a sweep setting may not (Tune restores the old searcher and space)."""
    from orchestrator.sweep import _check_same_config

    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "finetune.workers": 4}))
    _check_same_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "finetune.workers": 2,
                                                                   "finetune.top_k": 1}).resolved())
    other = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "seed": 9}).resolved()
    with pytest.raises(ConfigError, match=r"these settings differ from .*: seed \(saved 0, now 9\)\. Resume with"):
        _check_same_config(other)                           # (n_trials may grow: test_sweep_grow.py)
    epochs = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "space.search_epochs": 1}).resolved()
    with pytest.raises(ConfigError, match=r"differ from .*: space\.search_epochs \(saved 2, now 1\)\. Resume"):
        _check_same_config(epochs)                          # the nested key named, not all of 'space'


def test_a_storage_uri_that_cannot_be_written_fails_before_anything_is_trained(tmp_path):
    """A URI --storage is probed (a file written and deleted) by the check that runs before Ray starts."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    bad = f"file://{blocker}/ray_results"
    with pytest.raises(ConfigError, match="cannot be written from this host") as e:
        check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "o"),
                                                                       "storage_path": bad}))
    assert bad in str(e.value) and "Nothing has been trained yet" in str(e.value)
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "o"),
                                                                       "storage_path": "ftp://host/x"}))
    good = tmp_path / "store"
    check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "o"),
                                                                   "storage_path": f"file://{good}"}))
    assert good.is_dir() and list(good.iterdir()) == []        # the probe file is gone


def test_a_sqlite_store_in_a_folder_that_cannot_be_written_fails_before_anything_is_trained(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for key, flag in (("optuna_storage", "--optuna-storage"), ("tracking_uri", "--tracking-uri")):
        url = f"sqlite:///{blocker}/store.db"
        with pytest.raises(ConfigError, match="is a file, not a folder") as e:
            check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "o"), key: url}))
        assert url in str(e.value) and flag in str(e.value)
    with pytest.raises(ConfigError, match="names a folder, not a database file"):
        check_sweep_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path / "o"),
                                                                       "optuna_storage": f"sqlite:///{tmp_path}"}))


def test_the_tune_experiment_of_a_uri_storage_keeps_its_scheme(tmp_path):
    """--storage s3://bucket/x: Tune restores '<storage>/<name>' as a URI (a Path made it 's3:/bucket/x')."""
    from orchestrator.sweep import experiment_path

    for storage, want in (("s3://bucket/gmpq/ray_results", "s3://bucket/gmpq/ray_results/demo"),
                          ("gs://b/r/", "gs://b/r/demo"), (str(tmp_path / "rr"), str(tmp_path.resolve() / "rr" / "demo")),
                          ("s3://b/r?endpoint_override=minio%3A9000", "s3://b/r/demo?endpoint_override=minio%3A9000")):
        cfg = load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path), "storage_path": storage})
        assert experiment_path(cfg) == want


def test_a_resume_with_another_config_names_the_differences_before_that_configs_own_errors(tmp_path):
    """gmpq sweep --out DIR --resume --preset mobilenetv2 on a demo sweep: the resume mismatch, not the other preset's
    placeholder imagefolder path, which would hide it."""
    import ray

    from orchestrator.sweep import run_sweep

    save_resolved_config(load_sweep_config(preset="demo", overrides={"out_dir": str(tmp_path)}))
    other = load_sweep_config(preset="mobilenetv2", overrides={"out_dir": str(tmp_path), "name": "demo"})
    with pytest.raises(ConfigError, match=r"these settings differ from .*model \(saved resnet20, now mobilenet_v2\)"):
        run_sweep(other, resume=True, progress=False)
    assert not ray.is_initialized()
