"""What lets a user find their way between a sweep's MLflow runs (``orchestrator.mlflow_stages`` and
``gmpq sync-mlflow`` write it):

- tags that link runs both ways: a trial run's ``pareto`` and, when selected, ``selection_reason`` (why ``gmpq
  pareto`` picked it: ``knee of the front``, ``best in bucket <i> (...)``, ...; dropped when a later front no longer
  selects it), its ``finetune_run_id``; a fine-tune run's ``trial_run_id`` (the run of the trial whose policy it
  fine-tunes);
- the runs' descriptions (``mlflow.note.content``, the UI's "Description"): the parent says where everything is and
  sums up the front and the fine-tunes, a trial what became of it, a fine-tune where its policy came from. Each is
  composed from what the run (or the sweep folder's tables) holds at the time, and rewritten as that changes; a
  description a user wrote or edited in the UI is left alone (tag ``gmpq.note_digest``: the digest of the one gmpq
  wrote last).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

__all__ = ["SELECTION_TAG", "TRIAL_RUN_TAG", "NOTE_TAG", "NOTE_DIGEST_TAG", "set_note", "tag_trial", "trial_note",
           "finetune_note", "sweep_note", "note_sweep", "link_finetune"]

SELECTION_TAG = "selection_reason"      # a selected trial run's: why gmpq pareto picked it (pareto.parquet's column)
TRIAL_RUN_TAG = "trial_run_id"          # a fine-tune run's: its trial's run (which names it back: finetune_run_id)
NOTE_TAG = "mlflow.note.content"        # what the MLflow UI shows as a run's description (markdown)
NOTE_DIGEST_TAG = "gmpq.note_digest"    # the digest of the description gmpq wrote last (another: a user's, kept)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    f = _num(v)
    return "?" if f is None else f"{f:{spec}}{unit}"


def set_note(sink: Any, rid: str | None, text: str, tags: Mapping[str, str] | None = None) -> bool:
    """Make ``text`` run ``rid``'s description (``tags``: the run's, when already read), unless it is already or the
    run's description is not the one gmpq wrote last (a user's: kept). Returns whether it changed."""
    if not rid:
        return False
    if tags is None:
        data = sink.call("reading a run", lambda: sink.client.get_run(rid).data)
        if data is None:
            return False
        tags = data.tags
    current = tags.get(NOTE_TAG)
    if current == text or (current and tags.get(NOTE_DIGEST_TAG) != _digest(current)):
        return False
    from mlflow.entities import RunTag

    sink.call("describing a run", sink.client.log_batch, rid,
              tags=[RunTag(NOTE_TAG, text), RunTag(NOTE_DIGEST_TAG, _digest(text))], synchronous=True)
    return True


def trial_note(tid: str, tags: Mapping[str, str], metrics: Mapping[str, float],
               finetune_name: str | None = None) -> str:
    """A trial run's description, from its tags and metrics: what it searched and found, where it stands on the
    Pareto front (tag ``pareto``) and, once fine-tuned, where its fine-tune run is."""
    lines = [f"GMPQ search trial `{tid}` ({tags.get('status', '?')}): its policy reached "
             f"{_fmt(metrics.get('transfer_top1'), '.2f', '%')} top-1 in the transfer check at "
             f"{_fmt(metrics.get('gbitops'), '.3f')} GBitOPs (budget {_fmt(metrics.get('budget_avg_bits'), '.2f')} "
             "average bits)."]
    pareto = tags.get("pareto")
    if pareto == "selected":
        why = tags.get(SELECTION_TAG) or "no reason recorded"
        lines.append(f"Pareto front: selected for the final fine-tune ({why}).")
    elif pareto == "front":
        lines.append("Pareto front: on the front, not selected for the final fine-tune.")
    elif pareto == "dominated":
        lines.append("Pareto front: dominated (a trial on the front is at least as accurate at no more BitOPs).")
    if tags.get("finetune_run_id"):
        name = f"`{finetune_name}`" if finetune_name else "its fine-tune run"
        lines.append(f"Fine-tuned: {_fmt(metrics.get('final_top1'), '.2f', '%')} top-1 (`final_top1`) in {name}, "
                     f"run id {tags['finetune_run_id']} (tag `finetune_run_id`).")
    return "\n\n".join(lines)


def finetune_note(row: Mapping[str, Any], trial_rid: str | None) -> str:
    """A fine-tune run's description, from its final.parquet row: whose policy, why it was picked, what it reached."""
    tid = str(row["trial_id"])
    src = str(row.get("policy_source") or f"sweep trial {tid}")
    trial = f"run id {trial_rid} (tag `{TRIAL_RUN_TAG}`)" if trial_rid else "no run in this store"
    epochs = _num(row.get("epochs"))
    return "\n\n".join([
        f"Final fine-tune (Ray Train) of the policy of {src}; the trial's own run is `{tid}`, {trial}.",
        f"{_fmt(row.get('final_top1'), '.2f', '%')} top-1 (`final_top1`) on "
        f"{_fmt(row.get('test_images'), '.0f')} target test images after {_fmt(epochs, '.0f')} "
        f"epoch{'' if epochs == 1 else 's'}, at {_fmt(row.get('gbitops'), '.3f')} GBitOPs; the trial's transfer "
        f"check reached {_fmt(row.get('transfer_top1'), '.2f', '%')} (`transfer_top1`). Settings: the `recipe.*` "
        "params; the model file: artifact `model/`."])


def sweep_note(name: str, sweep_dir: Path, pareto_df: pd.DataFrame | None, final_df: pd.DataFrame | None) -> str:
    """The parent run's description: the layout of the sweep's runs and artifacts, then the front and the fine-tunes
    as the sweep folder's pareto.parquet and final.parquet hold them."""
    parts = [
        f"GMPQ sweep `{name}` (folder `{sweep_dir}`).",
        "Child runs: one per trial, named by its trial id (tag `gmpq.role` = `trial`; once `gmpq pareto` ran, tag "
        "`pareto` = `selected`, `front` or `dominated`, and a selected one's `selection_reason`), and one per "
        "fine-tuned policy and recipe, `finetune-<trial_id>` (`gmpq.role` = `finetune`). A fine-tune's tag "
        "`trial_run_id` names its trial's run, which names it back (`finetune_run_id`, metric `final_top1`). "
        "The same quantity has the same name in every run (`transfer_top1`, `gbitops`, `bitops`, `final_top1`).",
        "Artifacts: `pareto/pareto_table.json` (the front: `MlflowClient().load_table(experiment_id, "
        "\"pareto/pareto_table.json\", run_ids=[this run])`), `results/` (the Parquet tables and plots), "
        "`sweep_config.yaml`. Filters: the selected trials `tags.pareto = 'selected'`, the whole front "
        "`tags.pareto != 'dominated'`."]
    if pareto_df is not None and len(pareto_df):
        sel = pareto_df[pareto_df["selected"].astype(bool)] if "selected" in pareto_df else pareto_df.iloc[:0]
        items = [f"`{r['trial_id']}` ({_fmt(r.get('transfer_top1'), '.2f', '%')} at {_fmt(r.get('gbitops'), '.3f')} "
                 f"GBitOPs: {r.get('selection_reason') or 'selected'})" for r in sel.to_dict("records")]
        parts.append(f"Pareto front: {len(pareto_df)} trial{'' if len(pareto_df) == 1 else 's'}, {len(sel)} "
                     f"selected" + (": " + "; ".join(items) if items else "") + ".")
    if final_df is not None and len(final_df):
        items = [f"`{r['trial_id']}` {_fmt(r.get('final_top1'), '.2f', '%')} at {_fmt(r.get('gbitops'), '.3f')} "
                 f"GBitOPs" for r in final_df.to_dict("records")]
        parts.append("Fine-tuned (final.parquet): " + "; ".join(items) + ".")
    return "\n\n".join(parts)


def note_sweep(sink: Any, sweep_dir: str | Path) -> bool:
    """Describe the parent run from the sweep folder's tables (``sweep_note``); returns whether it changed."""
    from gmpq_core.errors import CheckpointError

    from .results import FINAL_FILE, PARETO_FILE, read_table

    data = sink.call("reading the parent run", lambda: sink.client.get_run(sink.parent_run_id).data)
    if data is None:
        return False
    d, tables = Path(sweep_dir), []
    for name in (PARETO_FILE, FINAL_FILE):
        try:
            tables.append(read_table(d / name).to_pandas() if (d / name).is_file() else None)
        except CheckpointError:        # a damaged table: the layout is still worth saying
            tables.append(None)
    folder = Path(data.tags.get("gmpq.sweep_dir") or d.resolve())    # (a copy sharing a server's runs keeps its tag)
    return set_note(sink, sink.parent_run_id, sweep_note(sink.experiment_name, folder, *tables), data.tags)


def tag_trial(sink: Any, rid: str | None, tid: str, pareto: str, reason: str | None) -> bool:
    """Trial run ``rid``'s ``pareto`` tag, its ``selection_reason`` (set when selected, dropped otherwise) and its
    description; returns whether anything changed."""
    data = sink.call("reading a trial's run", lambda: sink.client.get_run(rid).data) if rid else None
    if data is None:
        return False
    tags, changed = dict(data.tags), False
    if tags.get("pareto") != pareto:
        sink.call("tagging a Pareto trial", sink.client.set_tag, rid, "pareto", pareto)
        tags["pareto"], changed = pareto, True
    if pareto == "selected" and reason and tags.get(SELECTION_TAG) != reason:
        sink.call("tagging a Pareto trial", sink.client.set_tag, rid, SELECTION_TAG, reason)
        tags[SELECTION_TAG], changed = reason, True
    elif pareto != "selected" and SELECTION_TAG in tags:
        sink.call("untagging a trial", sink.client.delete_tag, rid, SELECTION_TAG)
        del tags[SELECTION_TAG]
        changed = True
    return note_trial(sink, rid, tid, tags, data.metrics) or changed


def note_trial(sink: Any, rid: str, tid: str, tags: Mapping[str, str], metrics: Mapping[str, float]) -> bool:
    """Describe trial run ``rid`` (``trial_note``, naming its fine-tune run when it has one)."""
    name = None
    if tags.get("finetune_run_id"):
        info = sink.call("reading a fine-tune run", lambda: sink.client.get_run(tags["finetune_run_id"]).info)
        name = getattr(info, "run_name", None)
    return set_note(sink, rid, trial_note(tid, tags, metrics, name), tags)


def link_finetune(sink: Any, frid: str | None, trial_rid: str | None, row: Mapping[str, Any]) -> bool:
    """Fine-tune run ``frid``'s ``trial_run_id`` tag and description (``finetune_note``); returns whether changed."""
    data = sink.call("reading a fine-tune run", lambda: sink.client.get_run(frid).data) if frid else None
    if data is None:
        return False
    changed = False
    if trial_rid and data.tags.get(TRIAL_RUN_TAG) != trial_rid:
        sink.call("tagging a fine-tune run", sink.client.set_tag, frid, TRIAL_RUN_TAG, trial_rid)
        changed = True
    return set_note(sink, frid, finetune_note(row, trial_rid), data.tags) or changed
