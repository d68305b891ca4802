"""bench_sweep's accounting of the sweep's tail: idle slots and the cores lent to the last trials."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_sweep  # noqa: E402


def _iso(t: float) -> str:
    from datetime import datetime, timezone
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat()


def test_tail_idle_counts_slots_without_a_trial_after_the_last_start():
    rows = [{"started_at": _iso(0), "finished_at": _iso(50)}, {"started_at": _iso(10), "finished_at": _iso(20)},
            {"started_at": _iso(20), "finished_at": _iso(30)}]
    # last start at 20; from 30 to 50 one of two slots is empty
    assert abs(bench_sweep._tail_idle_slot_s(rows, 2) - 20.0) < 1e-6


def test_lent_cores_count_from_each_switch_to_the_trial_end(tmp_path):
    events = [{"event": "start", "trial_id": "a", "time": 0.0},
              {"event": "threads", "trial_id": "a", "threads": 2, "time": 30.0},
              {"event": "threads", "trial_id": "a", "threads": 4, "time": 40.0},
              {"event": "end", "trial_id": "a", "time": 45.0},
              {"event": "end", "trial_id": "b", "time": 30.0}]
    path = tmp_path / "trial_events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    # 1 extra slot for 10 s, then 3 extra slots for 5 s (1 CPU per trial)
    assert abs(bench_sweep._lent_slot_s(path, 1.0) - 25.0) < 1e-6
    assert abs(bench_sweep._lent_slot_s(path, 2.0) - (0 + 1 * 5.0)) < 1e-6     # 2 CPU per trial: 4 threads = +1
    assert bench_sweep._lent_slot_s(tmp_path / "missing.jsonl", 1.0) == 0.0


def test_lent_time_stops_at_a_new_attempt_and_a_pruned_trial_uses_its_finish_time(tmp_path):
    events = [{"event": "threads", "trial_id": "a", "threads": 2, "time": 10.0},
              {"event": "start", "trial_id": "a", "time": 12.0},            # the attempt died; a retry starts
              {"event": "end", "trial_id": "a", "time": 200.0},
              {"event": "threads", "trial_id": "p", "threads": 2, "time": 50.0}]   # pruned: no end event
    path = tmp_path / "trial_events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert abs(bench_sweep._lent_slot_s(path, 1.0) - 2.0) < 1e-6
    assert abs(bench_sweep._lent_slot_s(path, 1.0, {"p": 53.0}) - 5.0) < 1e-6
    assert abs(bench_sweep._lent_slot_s(path, 0.5, {"p": 53.0}) - 5.0) < 1e-6   # own threads: max(1, int(cpu))
