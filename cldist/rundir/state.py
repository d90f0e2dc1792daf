"""state.json - which tasks are finished, their ranks and meta, the accuracy matrix - and
bringing a run directory back to a task boundary before a resume.

state.json is written last when a task commits (cldist.rundir.tasks), so it is the truth: a
resume removes what it does not list and retrains what it lists but whose files are gone.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Sequence

from ..errors import UserError
from ..atomic_io import write_json_atomic
from .files import DAMAGED, FORMAT_VERSION, STATE_FILE, read_json, state_marker_problem
from .layout import REFERENCE_FILE, TASKS_DIR, task_dir

# R[t][j]: accuracy (percent) on task j's test data after task t, j <= t (cldist.eval.metrics)
AccuracyMatrix = Sequence[Sequence[float]]


def validate_matrix(R: AccuracyMatrix) -> list[list[float]]:
    """Check that ``R`` is a non-empty lower-triangular list of rows; return it as floats.

    Raises ValueError naming the first malformed row.
    """
    if R is None or len(R) == 0:
        raise ValueError("accuracy matrix is empty: expected at least one row (one task)")
    rows: list[list[float]] = []
    for t, row in enumerate(R):
        if len(row) != t + 1:
            raise ValueError(
                f"accuracy matrix row {t} has {len(row)} entries; a lower-triangular matrix "
                f"needs row t to have t+1 entries (accuracy on tasks 0..t after task t)"
            )
        values = [float(x) for x in row]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"accuracy matrix row {t} contains a non-finite value: {list(row)}")
        rows.append(values)
    return rows


def _state_problem(data) -> str | None:
    """What is wrong with state.json's content (None when it has the shape cldist writes)."""
    if not isinstance(data, dict):
        return "must be a JSON object"
    marker = state_marker_problem(data)
    if marker:
        return f"is not a cldist run state ({marker})"
    done = data.get("completed_tasks", [])
    if not isinstance(done, list):
        return f"completed_tasks must be a list of task numbers, not {done!r}"
    bad = [t for t in done if not isinstance(t, int) or isinstance(t, bool) or t < 0]
    if bad:
        return f"completed_tasks holds {', '.join(repr(t) for t in bad)}, which are not task numbers"
    for key in ("ranks", "params_per_task", "task_meta"):
        if not isinstance(data.get(key, {}), dict):
            return f"{key} must be a JSON object"
    for key in ("ranks", "task_meta"):  # per task: an object (ranks per layer, the task's meta)
        for t, value in data.get(key, {}).items():
            if not isinstance(value, dict):
                return f"{key}[{t!r}] must be a JSON object, not {value!r:.60}"
    for t, value in data.get("params_per_task", {}).items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"params_per_task[{t!r}] must be a number, not {value!r:.60}"
    rows = data.get("accuracy_matrix", [])
    if not isinstance(rows, list) or not all(
            isinstance(r, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                        for x in r) for r in rows):
        return "accuracy_matrix must be a list of rows of numbers"
    for key in ("status", "method", "backbone"):
        if not isinstance(data.get(key, ""), str):
            return f"{key} must be a string, not {data[key]!r:.60}"
    if not isinstance(data.get("resume_overrides", []), list):
        return "resume_overrides must be a list"
    return None


class RunState:
    """`state.json`: which tasks are finished, their ranks and meta, the accuracy matrix.

    Every change is written first and applied in memory only once the write succeeded, so
    that after a failed write (a full disk) memory and disk still agree.
    """

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_FILE
        # format_version marks the directory as cldist's (cldist.rundir.files); a run made before
        # the marker gets it with its next write
        self.data = {"format_version": FORMAT_VERSION, "completed_tasks": [], "ranks": {},
                     "params_per_task": {}, "accuracy_matrix": [], "task_meta": {},
                     "status": "running"}
        try:
            loaded = read_json(self.path, expect=None)
        except FileNotFoundError:
            return
        problem = _state_problem(loaded)
        if problem:
            raise UserError(f"{self.path}: {problem}; {DAMAGED}")
        self.data.update(loaded)
        self.data["format_version"] = FORMAT_VERSION

    @property
    def completed(self) -> list[int]:
        return list(self.data["completed_tasks"])

    def record_task(self, task_id: int, meta: dict) -> None:
        slim = {k: v for k, v in meta.items() if k not in ("ranks", "staging_dir")}
        key = str(task_id)
        self._update(completed_tasks=sorted(set(self.data["completed_tasks"]) | {task_id}),
                     ranks={**self.data["ranks"], key: meta.get("ranks", {})},
                     params_per_task={**self.data["params_per_task"],
                                      key: int(meta.get("params_added", 0))},
                     task_meta={**self.data["task_meta"], key: slim})

    def set_rows(self, rows: list[list[float]]) -> None:
        self._update(accuracy_matrix=rows)

    def set(self, key: str, value) -> None:
        self._update(**{key: value})

    def _update(self, **changes) -> None:
        new = {**self.data, **changes}
        write_json_atomic(self.path, new)
        self.data = new

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def prepare_resume(run_dir, deps: dict[int, list[int]], n_tasks: int) -> list[str]:
    """Bring a run directory back to a consistent task boundary before a resume.

    state.json is the truth (it is written last when a task commits), so:
      - staging leftovers and task directories that state.json does not list (committed just
        before a crash or a full disk stopped the state write) are removed: retrained;
      - a task state.json lists but whose files are gone (a user deleted a damaged task, as
        the error messages suggest) is retrained - unless a finished task that still has its
        files depends on it: that task was trained on top of the old files, and retraining
        under it would mix two runs, while deleting it would lose a finished task. That is
        refused (UserError naming both), before anything is changed; the user restores the
        files or deletes the dependents' directories too, and then all of them are retrained.
    Checks state.json first and changes nothing when it is damaged. Returns what was done.
    """
    run_dir = Path(run_dir)
    state = RunState(run_dir)
    done = set(state.completed)
    unknown = sorted(t for t in done if t >= n_tasks)
    if unknown:
        raise UserError(f"{state.path}: completed_tasks lists {unknown}, but the run has tasks "
                        f"0..{n_tasks - 1} only; the run directory is damaged: restore the file "
                        f"from a backup or start a new run")
    missing = {t for t in done if not task_dir(run_dir, t).is_dir()}
    made_reference = bool(state.data["task_meta"].get("0", {}).get("reference"))
    if 0 in done and made_reference and not (run_dir / REFERENCE_FILE).is_file():
        missing.add(0)
    invalid = set(missing)
    changed = True
    while changed:  # every finished task that depends, directly or not, on a missing one
        changed = False
        for t in sorted(done - invalid):
            if any(d in invalid for d in deps.get(t, [])):
                invalid.add(t)
                changed = True
    dependents = sorted(invalid - missing)
    if dependents:
        gone = [f"{task_dir(run_dir, t)}" for t in sorted(missing)]
        if 0 in missing and task_dir(run_dir, 0).is_dir():
            gone[sorted(missing).index(0)] = str(run_dir / REFERENCE_FILE)
        raise UserError(
            f"{state.path} lists tasks {sorted(missing)} as finished, but their files are gone "
            f"({', '.join(gone)}), and the finished tasks {dependents} were trained on top of "
            f"them; restore those files from a backup, or delete "
            f"{', '.join(str(task_dir(run_dir, t)) for t in dependents)} as well and "
            f"`cldist resume {run_dir}` retrains tasks {sorted(invalid)}")
    notes = _remove_uncommitted(run_dir, done)
    if not invalid:
        return notes
    state._update(completed_tasks=sorted(done - invalid),
                  accuracy_matrix=state.data["accuracy_matrix"][:min(invalid)])  # row r: 0..r
    notes.append(f"tasks {sorted(missing)} have no files: retraining them")
    return notes


def _remove_uncommitted(run_dir: Path, done: set[int]) -> list[str]:
    notes = [f"removed unfinished task files: {name}" for name in clean_staging(run_dir)]
    tasks = run_dir / TASKS_DIR
    if tasks.is_dir():
        for d in sorted(tasks.iterdir()):
            if d.is_dir() and d.name.isdigit() and int(d.name) not in done:
                shutil.rmtree(d)
                notes.append(f"task {int(d.name)} was committed but never recorded in "
                             f"state.json: retraining it")
    return notes


def clean_staging(run_dir) -> list[str]:
    """Remove leftovers of tasks that never committed (a crash mid-task)."""
    removed = []
    tasks = Path(run_dir) / TASKS_DIR
    if tasks.is_dir():
        for p in tasks.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed
