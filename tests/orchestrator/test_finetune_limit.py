"""A GBitOPs limit for one final stage (``gmpq finetune --sweep DIR --max-gbitops G|none``: selected again within it,
the sweep config left as it is) and a ``gmpq pareto --pick`` of a trial the running sweep has not ended yet: on tiny
sweep folders, the job builder stubbed so that nothing trains (no Ray); every refusal leaves the files as they were."""
from __future__ import annotations

import json
import socket
import time

import pytest
import yaml
from final_sweep import make_sweep as make_final_sweep
from test_pareto_pick import POINTS, make_sweep

from gmpq_core.errors import GMPQError
from orchestrator.cli import main
from orchestrator.pareto import read_pareto


@pytest.fixture
def sweep(tmp_path):
    """t1, t2, t3 (3/4, 4/4, 6/6 bits) all on the front, finetune.top_k 3; pareto.parquet selects all three."""
    d = tmp_path / "sweep"
    make_final_sweep(d, bits=((3, 4), (4, 4), (6, 6)))
    assert main(["pareto", str(d), "--no-mlflow"]) == 0
    return d


def gbitops(d) -> dict[str, float]:
    return dict(zip(read_pareto(d)["trial_id"], read_pareto(d)["bitops"] / 1e9))


def between(d, low: str, high: str) -> str:
    """A limit that ``low`` fits and ``high`` does not, as typed on the command line."""
    g = gbitops(d)
    return f"{(g[low] + g[high]) / 2:.4f}"


def set_config_limit(d, limit: float | None) -> None:
    cfg = yaml.safe_load((d / "sweep_config.yaml").read_text())
    cfg["finetune"]["max_gbitops"] = limit
    (d / "sweep_config.yaml").write_text(yaml.safe_dump(cfg))


def files(d) -> dict[str, bytes]:
    return {name: (d / name).read_bytes() for name in ("pareto.parquet", "sweep_config.yaml")}


@pytest.fixture
def built(tmp_path, monkeypatch):
    """The trial ids whose fine-tune job the final stage builds; the stage stops (exit 2) before any training."""
    from orchestrator import final_stage

    ids: list[str] = []

    def stop(*a, **k):
        raise GMPQError("stopped here by the test")
    monkeypatch.setattr(final_stage, "target_fp_checkpoint", lambda *a, **k: tmp_path / "fp.pt")
    monkeypatch.setattr(final_stage, "final_job", lambda cfg, row, *a, **k: ids.append(row["trial_id"]))
    monkeypatch.setattr(final_stage, "check_not_shorter", stop)
    return ids


def finetune(d, capsys, *argv: str) -> str:
    capsys.readouterr()
    assert main(["finetune", "--sweep", str(d), *argv]) == 2
    return " ".join(capsys.readouterr().err.split())


def test_finetune_max_gbitops_selects_again_within_it_for_this_call_only(sweep, built, capsys):
    limit = between(sweep, "t2", "t3")
    config = (sweep / "sweep_config.yaml").read_bytes()
    err = finetune(sweep, capsys, "--max-gbitops", limit)
    assert "stopped here by the test" in err and sorted(built) == ["t1", "t2"]
    back = read_pareto(sweep)
    assert list(back.loc[back["selected"], "trial_id"]) == ["t1", "t2"]
    assert all(r.endswith(f"within the {float(limit):g} GBitOPs limit") for r in back.query("selected")
               ["selection_reason"])
    assert (sweep / "sweep_config.yaml").read_bytes() == config                # for this call only
    assert (f"gmpq finetune: selected 2 of the Pareto front's 3 policies again within the {float(limit):g} GBitOPs "
            f"limit (--max-gbitops {float(limit)}, this call only: {sweep / 'sweep_config.yaml'} keeps "
            "finetune.max_gbitops none)") in err
    # K from finetune.top_k (3): fewer fit, and the line names the limit in force
    assert (f"2 selected of the 3 asked for (finetune.top_k): only 2 of the 3 on the Pareto front within the "
            f"{float(limit):g} GBitOPs limit") in err
    built.clear()
    assert "stopped here" in finetune(sweep, capsys, "--max-gbitops", limit, "--top-k", "1")
    assert len(built) == 1 and read_pareto(sweep)["selected"].sum() == 1


def test_the_fewer_line_of_top_k_names_the_given_limit_not_the_configs(sweep, built, capsys):
    set_config_limit(sweep, float(between(sweep, "t1", "t2")))                # the config's: t1 only
    limit = between(sweep, "t2", "t3")
    err = finetune(sweep, capsys, "--top-k", "3", "--max-gbitops", limit)
    assert sorted(built) == ["t1", "t2"]
    assert (f"2 selected of the 3 asked for (--top-k): only 2 of the 3 on the Pareto front within the "
            f"{float(limit):g} GBitOPs limit") in err


def test_finetune_max_gbitops_none_lifts_the_configs_limit(sweep, built, capsys):
    config_limit = float(between(sweep, "t1", "t2"))
    set_config_limit(sweep, config_limit)
    config = (sweep / "sweep_config.yaml").read_bytes()
    err = finetune(sweep, capsys, "--top-k", "3")                              # the config's limit: t1 only
    assert built == ["t1"]
    built.clear()
    err = finetune(sweep, capsys, "--max-gbitops", "none")
    assert sorted(built) == ["t1", "t2", "t3"] and read_pareto(sweep)["selected"].sum() == 3
    assert (f"selected 3 of the Pareto front's 3 policies again with no GBitOPs limit (--max-gbitops none, this call "
            f"only: {sweep / 'sweep_config.yaml'} keeps finetune.max_gbitops {config_limit:g})") in err
    assert (sweep / "sweep_config.yaml").read_bytes() == config
    assert not any("over the" in r for r in read_pareto(sweep)["selection_reason"])


@pytest.mark.parametrize("argv, words", [
    (["--max-gbitops", "0"], ["--max-gbitops takes the most GBitOPs",
                              "or 'none' for no limit, but got --max-gbitops 0."]),
    (["--max-gbitops", "abc"], ["such as --max-gbitops 0.4", "but got --max-gbitops abc."]),
    (["--max-gbitops", "-1", "--top-k", "2"], ["but got --max-gbitops -1."]),
    (["--max-gbitops", "0.0001"], ["No policy of the Pareto front fits the limit of 0.0001 GBitOPs: the cheapest on "
                                   "it is trial t1", "or gmpq finetune --sweep {d} --max-gbitops G (for that call)",
                                   "Nothing was written."]),
])
def test_a_refused_limit_names_the_value_and_the_fix_and_writes_nothing(sweep, built, capsys, argv, words):
    before = files(sweep)
    err = finetune(sweep, capsys, *argv)
    assert err.count("gmpq: error:") == 1 and "Traceback" not in err and "stopped here" not in err
    assert all(w.format(d=sweep) in err for w in words), err
    assert files(sweep) == before and built == []
    assert not (sweep / "final.parquet").exists() and not (sweep / "driver.finetune.json").exists()


def test_max_gbitops_with_a_policy_is_refused_as_the_other_sweep_only_options(sweep, tmp_path, capsys):
    before = files(sweep)
    out = tmp_path / "one"
    assert main(["finetune", "--policy", str(sweep / "policies" / "t1.json"), "--max-gbitops", "0.4",
                 "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.count("gmpq: error:") == 1 and "Traceback" not in err
    assert "--max-gbitops is for gmpq finetune --sweep DIR (the Ray Train fine-tune of a sweep's selected policies)" \
        in err and "Add --sweep DIR, or drop those options." in err
    assert files(sweep) == before and not out.exists()


# --- a pick of a trial the running sweep has not ended ----------------------------------------------------------

def running_sweep(d, pid: int, started: tuple[str, ...]):
    """A tiny sweep (test_pareto_pick's points and a failed trial) that the live process ``pid`` runs, with the
    trials ``started`` begun and not ended (trial_events.jsonl, no row)."""
    make_sweep(d, points=[*POINTS, ("fa11ed00", None, 300_000_000, "failed")])
    assert main(["pareto", str(d), "--no-mlflow"]) == 0
    (d / "driver.json").write_text(json.dumps({"stage": "sweep", "host": socket.gethostname(), "pid": pid,
                                               "started": time.time()}))
    (d / "trial_events.jsonl").write_text("".join(
        json.dumps({"trial_id": t, "event": "start", "trial_number": 20 + i, "time": time.time(),
                    "params": {"budget_avg_bits": 3.0}}) + "\n" for i, t in enumerate(started)))
    return d


def pick(d, capsys, *ids: str) -> str:
    before = {p.name: p.read_bytes() for p in (d / "pareto.parquet", d / "pareto.png")}
    capsys.readouterr()
    assert main(["pareto", str(d), "--no-mlflow", *(a for i in ids for a in ("--pick", i))]) == 2
    err = capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (d / "pareto.parquet", d / "pareto.png")} == before
    [error] = [line for line in err.splitlines() if line.startswith("gmpq: error:")]
    assert "Traceback" not in err and err.count("gmpq: error:") == 1
    return " ".join(err[err.index("gmpq: error:"):].split())       # one paragraph, from its start


def test_a_pick_of_a_trial_still_running_says_it_is_listed_once_it_ends_and_only_while_it_runs(tmp_path, other_process,
                                                                                                capsys):
    d = running_sweep(tmp_path / "s", other_process.pid, ("ff00beef", "ee11cafe"))
    err = pick(d, capsys, "ff00")
    assert "--pick ff00: no trial of the sweep" in err and "has an id starting with 'ff00' (8 trials ended so far)" \
        in err
    assert (f"The sweep in {d} is still running, and so is trial ff00beef: it is listed once it ends (and can be "
            f"picked if it completes on the front); run 'gmpq pareto {d} --pick ff00' again then.") in err
    assert "The front, by GBitOPs: 5e1ec7ed" in err                        # the usual fix follows
    err = pick(d, capsys, "a1fa", "77")                                    # no running trial matches it either
    assert (f"--pick 77: no trial of the sweep {d} has an id starting with '77' (8 trials ended so far). The sweep in "
            f"{d} is still running: a running trial is listed once it ends; if '77' names one, run 'gmpq pareto {d} "
            "--pick a1fa,77' again then.") in err
    err = pick(d, capsys, "fa11")                                          # a failed row: maybe retried
    assert "--pick fa11: trial fa11ed00 did not complete (status failed)" in err
    assert "a failed trial that Ray Tune retries keeps its failed row until the retry ends" in err
    driver = json.loads((d / "driver.json").read_text())
    (d / "driver.json").write_text(json.dumps({**driver, "pid": 999_999_999}))    # its driver gone: not running
    for ids in (("ff00",), ("fa11",), ("b0a7",)):
        err = pick(d, capsys, *ids)
        assert "still running" not in err and "again then" not in err and "ended so far" not in err

