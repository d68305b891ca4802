"""What a user meets inspecting a finished sweep and picking policies: the MLflow Pareto table after `gmpq pareto`
ran again, a note when the sweep stopped before its planned trials ended, the Parquet columns the README documents,
and a folder that is no sweep."""
from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import yaml
from final_sweep import make_sweep     # same folder (pytest puts it on sys.path)

from orchestrator.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"


def _pareto_table(sweep: Path):
    """The parent run's Pareto table, as ``mlflow.load_table`` reads it (it finds the runs by their
    ``mlflow.loggedArtifacts`` tag, on the global tracking URI: the file and the tag are read here instead)."""
    import pandas as pd

    from orchestrator.mlflow_sink import PARENT_FILE
    from orchestrator.mlflow_stages import PARETO_TABLE

    client = mlflow.MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    rid = json.loads((sweep / PARENT_FILE).read_text())["run_id"]
    logged = json.loads(client.get_run(rid).data.tags["mlflow.loggedArtifacts"])
    assert {"path": PARETO_TABLE, "type": "table"} in logged
    return pd.read_json(client.download_artifacts(rid, PARETO_TABLE, str(sweep.parent)), orient="split")


def test_pareto_run_again_replaces_the_mlflow_pareto_table_rather_than_appending(tmp_path, capsys):
    # MlflowClient.log_table appends: each rerun used to add the whole front again (4 rows for 2 after one rerun)
    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    assert main(["pareto", str(sweep)]) == 0
    assert main(["pareto", str(sweep), "--top-k", "1"]) == 0
    table = _pareto_table(sweep)
    assert sorted(table["trial_id"]) == ["t1", "t2"]
    assert list(table.loc[table["selected"], "trial_id"]) == ["t2"]      # the latest selection, as pareto.parquet
    assert "Traceback" not in capsys.readouterr().err


def test_pareto_of_a_stopped_sweep_notes_that_the_selection_covers_only_the_ended_trials(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_sweep(sweep)                        # 1 completed trial of the demo preset's 6, no command running it
    assert main(["pareto", str(sweep), "--no-mlflow"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (f"gmpq pareto: note: the sweep in {sweep} stopped with 1 of its 6 planned trials ended (5 not started), "
            f"and this selection covers only those; to run the rest: gmpq sweep --out {sweep} --resume, then gmpq "
            f"pareto {sweep} again.") in err
    cfg = yaml.safe_load((sweep / "sweep_config.yaml").read_text())
    (sweep / "sweep_config.yaml").write_text(yaml.safe_dump({**cfg, "n_trials": 1}))     # finished: nothing to say
    assert main(["pareto", str(sweep), "--no-mlflow"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_finetune_sweep_of_a_stopped_sweep_gets_the_note_naming_its_own_rerun(tmp_path):
    import inspect

    from orchestrator.commands import _finetune_sweep
    from orchestrator.commands.pareto import sweep_stopped_text
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    note = " ".join(sweep_stopped_text(sweep, "gmpq finetune", f"gmpq finetune --sweep {sweep}").split())
    assert note.startswith("gmpq finetune: note: the sweep in") and note.endswith(
        f"gmpq sweep --out {sweep} --resume, then gmpq finetune --sweep {sweep} again.")
    assert "sweep_stopped_text(sweep_dir, \"gmpq finetune\"" in inspect.getsource(_finetune_sweep)


def test_pareto_of_a_folder_that_is_no_sweep_says_so_as_gmpq_status_does(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hi")
    assert main(["pareto", str(tmp_path)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "this folder is not a sweep made by 'gmpq sweep' (give the sweep's --out folder)" in err
    assert "Results file not found" not in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def _documented_columns() -> set[str]:
    text = README.read_text()
    start = text.index("Columns of the Parquet tables")
    section = text[start:text.index("\n\n", text.index("| column |", start))]
    names: set[str] = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([a-z0-9_<>]+)`", line.split("|")[1]))
    return names


def test_every_parquet_column_is_documented_in_the_readme():
    from orchestrator.final_results import FINAL_SCHEMA
    from orchestrator.results import LAYER_SCHEMA, trial_schema

    documented = _documented_columns()
    columns = set(trial_schema().names) | set(LAYER_SCHEMA.names) | set(FINAL_SCHEMA.names) | \
        {"selected", "selection_reason"}                      # pareto.parquet: trials.parquet's columns and these
    assert columns - documented == set()
    assert documented - columns == {"param_<name>"}           # no column the tables lack


def test_export_and_evaluate_of_a_sweep_table_refuse_it_without_advising_to_delete_it(tmp_path, capsys):
    # the loader's message for an unreadable checkpoint ends "if it is one of gmpq's own files, delete it"
    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    for command in ("export", "evaluate"):
        assert main([command, str(sweep / "trials.parquet")]) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert err.count("gmpq: error:") == 1 and "Traceback" not in err
        assert f"'{sweep / 'trials.parquet'}' is not a model file (no file torch.save wrote)" in err
        assert "delete" not in err
    assert (sweep / "trials.parquet").is_file()


def test_the_pareto_plots_bucket_caption_sits_beside_the_axes_not_on_the_pruned_trials_rug():
    import pandas as pd

    from orchestrator.plots import pareto_figure

    trials = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["completed", "pruned", "failed"],
                           "transfer_top1": [70.0, None, None], "bitops": [3e8, 3.9e8, 4e8]})
    front = trials.iloc[:1].assign(selected=True, selection_reason="knee of the front")
    fig = pareto_figure(trials, front, buckets=[3.25, 4.25])
    fig.canvas.draw()
    ax = fig.axes[0]
    [caption] = [t for t in ax.texts if t.get_text().startswith("budget buckets")]
    box, axes = caption.get_window_extent(), ax.get_window_extent()
    assert box.x0 > axes.x1                       # right of the axes: the rug (bottom edge, inside) stays clear
    assert box.x1 <= fig.bbox.x1 + 1 and "3.25, 4.25" in caption.get_text()


def test_sync_mlflow_replaces_a_pareto_table_that_a_later_gmpq_pareto_did_not_log(tmp_path, capsys):
    # gmpq pareto run again while MLflow was off: the sync used to say "the tracking store now matches the sweep
    # folder" with the old front's table, plots and n_selected still on the parent run
    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((3, 4), (4, 4)))
    assert main(["pareto", str(sweep)]) == 0
    assert main(["pareto", str(sweep), "--top-k", "1", "--no-mlflow"]) == 0
    capsys.readouterr()
    assert main(["sync-mlflow", str(sweep)]) == 0
    assert "tables added to the parent run: pareto.parquet" in capsys.readouterr().out
    table = _pareto_table(sweep)
    assert sorted(table["trial_id"]) == ["t1", "t2"] and list(table.loc[table["selected"], "trial_id"]) == ["t2"]
    assert main(["sync-mlflow", str(sweep)]) == 0                # nothing left to change
    assert capsys.readouterr().out.rstrip().endswith("nothing was missing")


def test_status_marks_the_selected_policies_and_the_rest_of_the_front_in_the_trial_table(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    make_sweep(sweep, bits=((2, 2), (3, 4), (4, 4)))     # more bits, more accurate: all three on the front
    assert main(["pareto", str(sweep), "--top-k", "1", "--no-mlflow"]) == 0
    capsys.readouterr()
    assert main(["status", str(sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    notes = sorted(line.split("  ")[-1].strip() for line in out if line.startswith("-  t"))    # (no trial numbers)
    assert notes == ["Pareto front", "Pareto front", "selected"], out
