"""The run directory: durable, atomic persistence of finished tasks and run state.

Layout (DESIGN.md):
    RUN/config.yaml, RUN/manifest.json
    RUN/state.json                      completed tasks, ranks, accuracy matrix (atomic)
    RUN/tasks/TTT/<stem>.safetensors    a finished task's tensors (adapter, head, ...)
    RUN/tasks/TTT/meta.json
    RUN/reference.safetensors           PEARL's trained reference (when not pre-trained)

A task is committed by writing its files into `tasks/.staging-*`, fsyncing them, renaming the
directory to `tasks/TTT` and only then rewriting `state.json` (tmp + fsync + rename). A crash
leaves either the old state or the new one, never a half-written task that looks finished.
Nothing here is unpickled: tensors are safetensors, everything else JSON.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import fsync_dir, write_json_atomic
from ..data.remote import check_location, url_scheme
from ..errors import StorageError, UserError
from ..rundir import DAMAGED, FORMAT_VERSION, STATE_FILE, read_json, state_marker_problem

REFERENCE_FILE = "reference.safetensors"


def task_dir(run_dir, task_id: int) -> Path:
    return Path(run_dir) / "tasks" / f"{task_id:03d}"


def write_task_dir(staging: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                   reference: dict[str, torch.Tensor] | None = None) -> None:
    """Write a finished task's files into `staging` (fsynced, not yet visible as finished)."""
    # meta.json lists the tensor files, so a reader can tell a missing one from an old layout
    meta = {**meta, "tensor_files": sorted(f"{stem}.safetensors" for stem in tensors)}
    target = staging
    try:
        staging.mkdir(parents=True, exist_ok=False)
        for stem, group in tensors.items():
            target = staging / f"{stem}.safetensors"
            save_file({k: v.contiguous() for k, v in group.items()}, str(target))
        if reference is not None:
            target = staging / REFERENCE_FILE
            save_file({k: v.contiguous() for k, v in reference.items()}, str(target))
        target = staging / "meta.json"
        target.write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        for f in staging.iterdir():
            target = f
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, SafetensorError) as e:  # a full disk, most likely: name the file
        reason = getattr(e, "strerror", None) or str(e)
        raise StorageError(f"cannot write {target}: {reason}; free space on that file system "
                           f"and retry") from None
    fsync_dir(staging)


def stage_copy(run_dir, task_id: int, source: str | Path) -> Path:
    """Copy a finished task's files from `source` into a new `tasks/.staging-*` (fsynced).

    For files that must stay where they are: a Ray Train checkpoint committed while its job
    still runs is what a retry of that job resumes from.
    """
    staging = Path(run_dir) / "tasks" / f".staging-{task_id:03d}-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, staging)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageError(f"cannot copy task {task_id} from {source} to {staging}: "
                           f"{e.strerror or e}; free space on that file system and retry") from None
    fsync_dir(staging)
    return staging


def commit_task(run_dir, task_id: int, staging: str | Path) -> Path:
    """Make a staged task final: rename it to tasks/TTT (and its reference to RUN/)."""
    run_dir, staging = Path(run_dir), Path(staging)
    final = task_dir(run_dir, task_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # a retried job finished twice: keep the first commit, drop the duplicate
        shutil.rmtree(staging, ignore_errors=True)
        return final
    ref = staging / REFERENCE_FILE
    if ref.exists():
        os.replace(ref, run_dir / REFERENCE_FILE)
        fsync_dir(run_dir)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def clean_staging(run_dir) -> list[str]:
    """Remove leftovers of tasks that never committed (a crash mid-task)."""
    removed = []
    tasks = Path(run_dir) / "tasks"
    if tasks.is_dir():
        for p in tasks.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _retrain_hint(run_dir, task_id: int) -> str:
    return (f"delete {task_dir(run_dir, task_id)} and `cldist resume {run_dir}` retrains "
            f"task {task_id} (it names any finished task trained on top of it, to delete too)")


def load_task_tensors(run_dir, task_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """A finished task's tensors by file stem. Only safetensors are read: a file of any other
    kind in the task's directory (a torch.save pickle, say) is refused, never loaded."""
    d = task_dir(run_dir, task_id)
    if not d.is_dir():
        raise UserError(f"task {task_id} has no files in {d}; the run directory is incomplete - "
                        f"`cldist resume {run_dir}` retrains it")
    expected: list[str] = []
    for f in sorted(d.iterdir()):
        if f.name.startswith("."):  # NFS silly-renames and editor droppings, never ours
            continue
        if f.name == "meta.json":
            expected = read_json(f, _retrain_hint(run_dir, task_id)).get("tensor_files", [])
            if not isinstance(expected, list) or not all(isinstance(n, str) for n in expected):
                raise UserError(f"{f}: tensor_files must be a list of file names; "
                                f"{_retrain_hint(run_dir, task_id)}")
        elif f.suffix != ".safetensors" or not f.is_file():
            raise UserError(f"{f} is not a safetensors file; cldist writes only safetensors and "
                            f"meta.json into a task's directory and never unpickles a "
                            f"checkpoint; {_retrain_hint(run_dir, task_id)}")
    for name in expected:
        if not (d / name).is_file():
            raise UserError(f"{d / name} is missing; {_retrain_hint(run_dir, task_id)}")
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        try:
            out[f.stem] = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{f} is not a readable safetensors file ({e}); "
                            f"{_retrain_hint(run_dir, task_id)}") from None
    return out


def load_reference(run_dir) -> dict[str, torch.Tensor] | None:
    p = Path(run_dir) / REFERENCE_FILE
    if not p.is_file():
        return None
    try:
        return load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{p} is not a readable safetensors file ({e}); every task starts "
                        f"from it: {_retrain_hint(run_dir, 0)}") from None


def load_task_into(method, model, run_dir, task_id: int) -> None:
    """Load a finished task's files into `model` through `method`: the boundary where files
    that do not fit the model (a tensor of another shape, a missing tensor, a config whose
    method was changed) become one message naming the file and tensor."""
    tensors = load_task_tensors(run_dir, task_id)
    with _Loading(run_dir, task_id, tensors):
        method.load_task_state(model, task_id, tensors)


def load_reference_into(method, model, run_dir) -> None:
    """Load RUN/reference.safetensors (when there) into `model`, like load_task_into."""
    reference = load_reference(run_dir)
    if reference is not None:
        with _Loading(run_dir, None, {"reference": reference}):
            method.load_reference_state(model, reference)


class _Loading:
    """Turns what load_state_dict and the methods raise on files that do not fit the model
    into a UserError naming the file and the tensor."""

    def __init__(self, run_dir, task_id: int | None, tensors: dict):
        self.run_dir, self.task_id, self.tensors = Path(run_dir), task_id, tensors

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None or isinstance(error, UserError) or not issubclass(
                kind, (RuntimeError, KeyError, ValueError, NotImplementedError)):
            return False
        task = self.task_id if self.task_id is not None else 0
        where = (task_dir(self.run_dir, task) if self.task_id is not None
                 else self.run_dir / REFERENCE_FILE)
        if issubclass(kind, NotImplementedError):
            raise UserError(f"{where}: the run's method cannot load these files - was "
                            f"config.json's method.name changed after they were written? "
                            f"Restore it, or start a new run") from None
        text = " ".join(str(error).strip("'\"").split())
        match = re.search(r"size mismatch for ([^:\s]+): copying a param with shape "
                          r"torch\.Size\(\[([^\]]*)\]\)", text)
        if match:
            name = match.group(1)
            shape = [int(x) for x in match.group(2).split(",") if x.strip()]
            for stem, group in self.tensors.items():
                for key, value in group.items():
                    if (key == name or key.endswith("." + name)) and list(value.shape) == shape:
                        culprit = where / f"{stem}.safetensors" if self.task_id is not None else where
                        raise UserError(f"{culprit}: tensor {key!r} has shape {shape}, which does "
                                        f"not fit the run's model ({match.group(0)}, ...); "
                                        f"{_retrain_hint(self.run_dir, task)}") from None
        raise UserError(f"{where}: the files do not fit the run's model ({text[:300]}); "
                        f"{_retrain_hint(self.run_dir, task)}") from None


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
        # format_version marks the directory as cldist's (cldist.rundir); a run made before
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
    tasks = run_dir / "tasks"
    if tasks.is_dir():
        for d in sorted(tasks.iterdir()):
            if d.is_dir() and d.name.isdigit() and int(d.name) not in done:
                shutil.rmtree(d)
                notes.append(f"task {int(d.name)} was committed but never recorded in "
                             f"state.json: retraining it")
    return notes


RUN_MANIFEST = "manifest.json"
RUN_CONFIG = "config.json"


def save_run_manifest(run_dir, manifest) -> None:
    """RUN/manifest.json: the scenario's manifest plus where its shards live (`shard_root`:
    an absolute directory, or the base URL the scenario's manifest came from)."""
    data = manifest.to_dict()
    root = str(manifest.root)
    data["shard_root"] = root if url_scheme(root) else os.path.abspath(root or ".")
    write_json_atomic(Path(run_dir) / RUN_MANIFEST, data)


def _run_data_access(run_dir) -> tuple[list[str], int | None]:
    """`scenario.allowed_hosts` and `scenario.max_member_bytes` from the run's config.json -
    what every caller's RunConfig holds (it is read from, or written to, that file); a run
    written before these keys existed gets the defaults (no remote hosts)."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        scenario = json.loads(path.read_text()).get("scenario", {})
    except (OSError, ValueError, AttributeError):
        return [], None  # the callers report an unreadable config.json themselves
    if not isinstance(scenario, dict):
        return [], None
    hosts = scenario.get("allowed_hosts", [])
    cap = scenario.get("max_member_bytes")
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise UserError(f"{path}: scenario.allowed_hosts must be a list of host names, got "
                        f"{hosts!r}")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise UserError(f"{path}: scenario.max_member_bytes must be a positive integer, got "
                        f"{cap!r}")
    return hosts, cap


def load_run_manifest(run_dir, allowed_hosts=None, max_member_bytes=None):
    """The run's pinned manifest, its shards read from `shard_root`.

    The root is checked like a scenario's (`cldist.data.remote.check_location`): an absolute
    local directory, or a URL on `allowed_hosts` - never a command (`pipe:`) or another
    scheme. `allowed_hosts` / `max_member_bytes` default to the run's own config.json values.
    """
    from ..data.manifest import Manifest
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing; {run_dir} is not a cldist run directory")
    data = read_json(path, expect=None)  # size- and depth-capped (cldist.rundir)
    if allowed_hosts is None or max_member_bytes is None:
        hosts, cap = _run_data_access(run_dir)
        allowed_hosts = hosts if allowed_hosts is None else allowed_hosts
        max_member_bytes = cap if max_member_bytes is None else max_member_bytes
    root = data.get("shard_root") if isinstance(data, dict) else None
    damaged = (f"the run directory is damaged: restore {path} from a backup or start a new "
               f"run")
    if not isinstance(root, str) or not root:
        raise UserError(f"{path}: shard_root must be the shards' directory or base URL, got "
                        f"{root!r}; {damaged}")
    if url_scheme(root) is None and (not os.path.isabs(root) or os.path.normpath(root) != root):
        raise UserError(f"{path}: shard_root {root!r} is not an absolute, normalised directory "
                        f"(cldist writes the dataset's absolute path); {damaged}")
    try:
        check_location(root, allowed_hosts, what="shard_root")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return Manifest.load(path, root=root, allowed_hosts=allowed_hosts,
                         max_member_bytes=max_member_bytes)
