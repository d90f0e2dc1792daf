"""Sweeps (`cldist run --multirun`): grid expansion, validation, sweep.json, the paired table,
side by side on the Ray runner, and resuming an interrupted sweep."""
from __future__ import annotations

import json
import math
import signal

import pytest

from cldist.cli import main
from cldist.errors import ConfigError, Interrupted, UserError
from cldist.report.paired import paired_stats
from cldist.sweep import (SWEEP_FILE, load_sweep, member_name, parse_sweep, resume_sweep,
                          safe_member_name)
from tests.conftest import first_tasks

TINY = ["scenario=digits_5t", "backbone=test_vit", "trainer.epochs=1", "trainer.batch_size=32",
        "report=false"]


# ------------------------------------------------------------------------ expansion (fast)
def test_hydra_sweep_grammar_expands_the_grid():
    spec = parse_sweep(["method=pearl,sdlora", "seed=range(0,3)", "backbone=test_vit",
                        "method.lr=choice(1e-3,2e-3)", "sweep.baseline='method=sdlora'"])
    assert spec.common == ["backbone=test_vit"]
    assert spec.swept == {"method": ["pearl", "sdlora"], "seed": ["0", "1", "2"],
                          "method.lr": ["0.001", "0.002"]}
    assert spec.baseline == {"method": "sdlora"}
    assert len(spec.members) == 12
    first = spec.members[0]
    assert first.name == "method=pearl,seed=0,method.lr=0.001"
    assert first.overrides == ["backbone=test_vit", "method=pearl", "seed=0", "method.lr=0.001"]
    assert len({m.name for m in spec.members}) == 12


def test_every_bad_sweep_key_in_one_message():
    with pytest.raises(ConfigError) as e:
        parse_sweep(["runner=ray,inline", "seed=interval(0,1)", "run_dir=x", "seed=1,2",
                     "sweep.baseline='method=seq_lora'"])
    text = str(e.value)
    for culprit in ("runner=ray,inline", "interval()", "run_dir=x", "sweep.baseline"):
        assert culprit in text, text


@pytest.mark.parametrize("value", ["../../etc", "/abs/path", "a/../b", "..", ".hidden", "x" * 300,
                                   "a b;$(rm)"])
def test_member_names_stay_inside_the_sweep_dir(value):
    name = member_name({"scenario.manifest": value})
    assert safe_member_name(name) and "/" not in name and ".." not in name


def test_invalid_members_are_listed_together_exit_2(tmp_path, capsys):
    rc = main(["run", "-m", "method=seq_lora,nonesuch", "seed=0,1", "trainer.batch_size=0",
               *TINY[:2], f"sweep_dir={tmp_path / 's'}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "member method=nonesuch,seed=0" in err and "member method=nonesuch,seed=1" in err
    assert "member method=seq_lora,seed=0: trainer.batch_size=0" in err
    assert not (tmp_path / "s").exists()  # nothing started


def test_a_grid_without_multirun_is_refused(capsys):
    assert main(["run", "method=pearl,sdlora"]) == 2
    assert "--multirun" in capsys.readouterr().err


def test_paired_statistics():
    s = paired_stats([1.0, 3.0, -1.0, 5.0])
    assert s.mean == pytest.approx(2.0)
    assert s.sd == pytest.approx(math.sqrt(20 / 3))
    assert s.t == pytest.approx(2.0 / (math.sqrt(20 / 3) / 2))
    assert (s.better, s.n) == (3, 4)
    assert paired_stats([-1.0, -2.0], higher_is_better=False).better == 2
    assert paired_stats([2.0]).t is None


def test_a_tampered_sweep_record_is_refused(tmp_path):
    (tmp_path / SWEEP_FILE).write_text(json.dumps({
        "format": "cldist-sweep", "format_version": 1, "members": [
            {"name": "../escape", "overrides": [], "swept": {}, "status": "queued"}]}))
    with pytest.raises(UserError, match="stay inside the sweep directory"):
        load_sweep(tmp_path)
    (tmp_path / SWEEP_FILE).write_text("[" * 10000)
    with pytest.raises(UserError, match="sweep.json"):
        load_sweep(tmp_path)


# -------------------------------------------------------------------- end to end (slow)
def _task_intervals(member_dir):
    state = json.loads((member_dir / "state.json").read_text())
    return [(m["started_at"], m["finished_at"]) for m in state["task_meta"].values()]


@pytest.mark.slow
def test_ray_sweep_runs_members_side_by_side_and_pairs_them(digits_dir, ray_cluster, tmp_path):
    """2 methods x 2 seeds on a 2-task digits stream, through the Ray runner on the shared
    2-CPU cluster: members' tasks overlap (recorded times), never more than the 2 job slots,
    and the comparison holds the paired table against the baseline."""
    data = first_tasks(digits_dir, tmp_path / "data", 2)
    sweep = tmp_path / "sweep"
    rc = main(["run", "--multirun", "method=seq_lora,sdlora", "seed=0,1", *TINY,
               "cluster.eval_actors=1", f"scenario.manifest={data}", f"sweep_dir={sweep}",
               "sweep.baseline='method=seq_lora'"])
    assert rc == 0
    record = json.loads((sweep / SWEEP_FILE).read_text())
    assert record["status"] == "finished"
    names = [m["name"] for m in record["members"]]
    assert names == ["method=seq_lora,seed=0", "method=seq_lora,seed=1",
                     "method=sdlora,seed=0", "method=sdlora,seed=1"]
    assert all(m["status"] == "finished" for m in record["members"])
    intervals = {n: _task_intervals(sweep / n) for n in names}
    overlapping = {(a, b) for a in names for b in names if a < b
                   for s1, e1 in intervals[a] for s2, e2 in intervals[b] if s1 < e2 and s2 < e1}
    assert overlapping, intervals  # members ran side by side, not one after another
    points = sorted({t for ts in intervals.values() for s, e in ts for t in (s, e)})
    for a, b in zip(points, points[1:]):  # the sweep's bound: at most 2 tasks at any moment
        mid = (a + b) / 2
        assert sum(s <= mid < e for ts in intervals.values() for s, e in ts) <= 2
    comparison = (sweep / "comparison.md").read_text()
    assert "Paired differences against method=seq_lora" in comparison
    assert "| method=sdlora | 0/1 |" in comparison and "/2 |" in comparison


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_to_the_same_metrics(digits_dir, tmp_path, monkeypatch,
                                                          capsys):
    """Two members that compute the same stream (they differ only in a Ray polling interval,
    which the inline runner ignores); the second is interrupted after its first task committed.
    `cldist resume SWEEP` keeps the finished member, resumes the other from task 1, and its
    metrics equal the uninterrupted member's."""
    import cldist.stream
    data = first_tasks(digits_dir, tmp_path / "data", 2)
    sweep = tmp_path / "sweep"
    original = cldist.stream.TensorBoardLogger.log_task_row
    fired = []

    def interrupt_once(self, task_id, *args, **kwargs):
        original(self, task_id, *args, **kwargs)
        if task_id == 0 and "poll_interval_s=0.6" in str(self.log_dir) and not fired:
            fired.append(task_id)
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(cldist.stream.TensorBoardLogger, "log_task_row", interrupt_once)
    rc = main(["run", "-m", "trainer.poll_interval_s=0.5,0.6", "method=seq_lora", *TINY,
               "runner=inline", f"scenario.manifest={data}", f"sweep_dir={sweep}"])
    assert rc == 1 and fired
    assert "cldist resume" in capsys.readouterr().err
    record = json.loads((sweep / SWEEP_FILE).read_text())
    assert [m["status"] for m in record["members"]] == ["finished", "interrupted"]
    done, stopped = (sweep / m["name"] for m in record["members"])
    assert json.loads((stopped / "state.json").read_text())["completed_tasks"] == [0]
    finished_before = (done / "metrics.json").read_text()

    assert main(["resume", str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 members to run" in out
    record = json.loads((sweep / SWEEP_FILE).read_text())
    assert [m["status"] for m in record["members"]] == ["finished", "finished"]
    assert (done / "metrics.json").read_text() == finished_before  # skipped, untouched
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (done, stopped))
    assert b["accuracy_matrix"] == a["accuracy_matrix"] and b["acc"] == a["acc"]
    assert (sweep / "comparison.md").is_file()
    assert resume_sweep(sweep, []) == 0  # nothing left to do
