"""The MLflow sink's warning when the store cannot be reached names a ``gmpq sync-mlflow`` command that can be copied
as printed: with ``--tracking-uri`` when the store is not the one sync-mlflow uses by default (the sweep's saved
``tracking_uri``, else its own mlflow.db), without it when it is. No Ray, no server: an http port nothing listens on."""
from __future__ import annotations

import socket

import pytest

from final_sweep import make_sweep   # same folder (pytest puts it on sys.path)


def _down_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _warning(sink) -> str:
    with pytest.warns(RuntimeWarning, match="MLflow logging disabled") as caught:
        assert not sink.connect()
    return str(next(w.message for w in caught if "MLflow logging disabled" in str(w.message)))


def test_the_sync_command_names_a_tracking_uri_other_than_the_sweeps_own(tmp_path):
    from orchestrator.mlflow_sink import MLflowSink

    sweep = tmp_path / "sweep"
    make_sweep(sweep)                                    # logs to its own sqlite:///<sweep>/mlflow.db
    uri = _down_uri()                                    # e.g. gmpq finetune --sweep DIR --tracking-uri URI
    msg = _warning(MLflowSink(uri, sweep))
    assert msg.endswith(f"'gmpq sync-mlflow --sweep {sweep} --tracking-uri {uri}' uploads what is missing."), msg


def test_the_sync_command_has_no_tracking_uri_when_it_is_the_sweeps_saved_one(tmp_path):
    from orchestrator.mlflow_sink import MLflowSink
    from orchestrator.results import CONFIG_FILE

    sweep = tmp_path / "sweep"
    make_sweep(sweep)
    uri = _down_uri()
    config = sweep / CONFIG_FILE                         # a sweep that logs to the server itself
    config.write_text(config.read_text().replace(f"sqlite:///{sweep / 'mlflow.db'}", uri))
    msg = _warning(MLflowSink(uri, sweep))
    assert msg.endswith(f"'gmpq sync-mlflow --sweep {sweep}' uploads what is missing."), msg
