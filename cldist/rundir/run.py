"""`RunDir`: one run directory - its layout, ownership and lock, and every read and write of it.

Train, eval, the stream, the CLI, the report and the Ray runner all go through a RunDir; the
modules beside this one hold the parts (files: bounded JSON, the marker, the lock; atomic:
crash-safe writes; state: state.json and resume preparation; tasks: task files; manifest: the
pinned manifest). Run directories are untrusted input (docs/SECURITY.md): every read is
bounded, and a refusal names the file and the field.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from . import files, layout
from ..atomic_io import write_json_atomic, write_text_atomic
from .state import RunState, prepare_resume, validate_matrix

# what a metrics.json must hold to be reported (cldist.report)
METRICS_REQUIRED_KEYS = ("acc", "aaa", "forgetting", "bwt", "accuracy_matrix", "n_tasks",
                         "method", "params_per_task", "wall_seconds")


class RunDir:
    """The run directory at `path` (nothing is read or created until a method asks).

    Messages name the directory as it was given, so `RunDir("runs/a")` says `runs/a/...`.
    """

    def __init__(self, path: str | os.PathLike | "RunDir"):
        self.given = path.given if isinstance(path, RunDir) else path
        self.path = Path(self.given)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.given)

    def __repr__(self) -> str:
        return f"RunDir({str(self.given)!r})"

    # ------------------------------------------------------------------------------ layout
    @property
    def state_path(self) -> Path:
        return self.path / layout.STATE_FILE

    @property
    def config_path(self) -> Path:
        return self.path / layout.CONFIG_FILE

    @property
    def config_yaml_path(self) -> Path:
        return self.path / layout.CONFIG_YAML_FILE

    @property
    def seeds_path(self) -> Path:
        return self.path / layout.SEEDS_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / layout.MANIFEST_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / layout.METRICS_FILE

    @property
    def reference_path(self) -> Path:
        return self.path / layout.REFERENCE_FILE

    @property
    def tasks_path(self) -> Path:
        return self.path / layout.TASKS_DIR

    @property
    def tb_path(self) -> Path:
        return self.path / layout.TB_DIR

    @property
    def lock_path(self) -> Path:
        return self.path / layout.LOCK_FILE

    def task_dir(self, task_id: int) -> Path:
        """RUN/tasks/TTT: where task `task_id`'s files live once committed."""
        return layout.task_dir(self.given, task_id)

    def staging_dir(self, task_id: int, root: str | os.PathLike | None = None) -> Path:
        """A new `.staging-TTT-*` path in RUN/tasks/ (or in `root`); nothing is created."""
        return layout.staging_dir(self.given, task_id, root)

    def has_task(self, task_id: int) -> bool:
        """Whether task `task_id` is committed (its directory exists)."""
        return self.task_dir(task_id).exists()

    # ------------------------------------------------------------------ ownership and lock
    def require(self) -> dict:
        """state.json of the cldist run here; a UserError when the directory is not one."""
        return files.require_run_dir(self.given)

    def is_run(self) -> bool:
        """Whether this is a cldist run directory (cldist's marker says so)."""
        try:
            self.require()
        except UserError:
            return False
        return True

    def foreign_entries(self) -> list[str]:
        """What the directory holds besides cldist's lock file."""
        return files.foreign_entries(self.given)

    def refuse_non_empty(self) -> None:
        """A run starts only in a new or empty directory: anything else is a run (resume it)
        or someone else's files, which cldist must never fill with tasks/ nor overwrite."""
        foreign = self.foreign_entries()
        if not foreign:
            return
        if layout.STATE_FILE in foreign and self.is_run():
            raise UserError(f"{self.given} already holds a run; `cldist resume {self.given}` "
                            f"continues it, or choose another run_dir=")
        raise UserError(f"run_dir={self.given} is not empty and holds no cldist run "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                        f"cldist writes only into a new or empty directory - choose another "
                        f"run_dir=")

    def create(self, *, method: str, backbone: str, config: dict, config_yaml: str,
               seeds: dict, manifest) -> None:
        """Create the run directory, take its lock and write its files, marker first.

        The lock stays held by this process (the caller releases it when the run ends);
        state.json - the marker that makes the directory cldist's - is written before any
        other file, so a directory holding cldist's files always says it is cldist's.
        """
        path = self.path
        if path.exists() and not path.is_dir():
            raise UserError(f"run_dir={self.given} is not a directory; choose another run_dir=")
        if path.is_dir():
            self.refuse_non_empty()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run_dir={self.given} ({e.strerror or e}); choose "
                            f"another run_dir=") from None
        self.acquire_lock()
        try:
            self.refuse_non_empty()  # again under the lock: another `cldist run` may have won
            state = self.state()
            state.data.update(method=method, backbone=backbone)
            state.data["status"] = "starting"
            state.save()
            self.write_config(config, config_yaml)  # a full disk: a message
            self.write_seeds(seeds)
            self.save_manifest(manifest)
        except BaseException:
            self.release_lock()
            raise

    def acquire_lock(self) -> None:
        """Take RUN/cldist.lock (re-entrant within this process) or raise RunDirLocked."""
        files.acquire_lock(self.given)

    def release_lock(self) -> None:
        files.release_lock(self.given)

    def lock(self) -> files.run_dir_lock:
        """`with run.lock():` holds the run directory's lock for the block."""
        return files.run_dir_lock(self.given)

    # ----------------------------------------------------------------------------- reading
    def read_file(self, name: str) -> Any:
        """RUN/name, bounded; a missing file means this is not a run directory."""
        return files.read_run_file(self.given, name)

    def read_config(self, *, checked: bool = True) -> dict:
        """RUN/config.json as a dict.

        `checked` (resume, eval): the directory must be a cldist run, the config must hold
        plain values only (no `${...}` interpolation) and name the method and backbone that
        trained the tasks (state.json); a UserError names the file and field otherwise.
        Unchecked (reports of hand-made runs): config.json, else config.yaml, else {}.
        """
        if not checked:
            return self._read_config_unchecked()
        state = self.require()
        path = self.config_path
        data = self.read_file(layout.CONFIG_FILE)
        where = _interpolation(data)
        if where:
            # a stored config holds resolved values; `${...}` would be resolved (environment
            # variables, resolvers) by whoever reads the run next
            raise UserError(f"{path}: {where[0]} holds the interpolation {where[1]!r}; a run's "
                            f"stored config holds plain values only - restore the value `cldist "
                            f"run` wrote")
        for key in ("method", "backbone"):  # what trained the tasks (state.json, since format 1)
            was, section = state.get(key), data.get(key)
            now = section.get("name") if isinstance(section, dict) else None
            if was is not None and now != was:
                raise UserError(f"{path}: {key}.name is {now!r}, but this run's tasks were "
                                f"trained with {key}={was} (state.json); restore {key}.name, or "
                                f"start a new run for another {key}")
        return data

    def _read_config_unchecked(self) -> dict:
        if self.config_path.is_file():
            return _read_object(self.config_path, "the run directory is damaged")
        if self.config_yaml_path.is_file():
            import yaml

            try:
                return yaml.safe_load(self.config_yaml_path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError as error:
                raise UserError(f"{self.config_yaml_path} is not valid YAML ({error})") from error
        return {}

    def read_state(self) -> dict:
        """state.json as a plain dict (bounded), or {} when there is none (a hand-made
        metrics.json); `state()` is the checked, writable state of a run."""
        path = self.state_path
        return _read_object(path, "the run directory is damaged") if path.is_file() else {}

    def state(self) -> RunState:
        """state.json, checked field by field; changes to it are written atomically."""
        return RunState(self.given)

    def read_metrics(self, required: Sequence[str] = METRICS_REQUIRED_KEYS) -> dict:
        """RUN/metrics.json, checked: a missing file or key, or a malformed accuracy matrix,
        is a UserError naming the file."""
        path = self.metrics_path
        if not path.is_file():
            raise UserError(
                f"{path} not found: the run has not finished. Finish it with "
                f"`cldist resume {self.given}`, or pass a finished run directory.")
        metrics = _read_object(path, f"re-create it with `cldist eval {self.given}`")
        missing = [key for key in required if key not in metrics]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; re-create it with "
                            f"`cldist eval {self.given}`")
        try:
            validate_matrix(metrics["accuracy_matrix"])
        except ValueError as error:
            raise UserError(f"{path}: {error}") from error
        return metrics

    def read_manifest(self, allowed_hosts=None, max_member_bytes=None):
        """The run's pinned manifest, its `shard_root` checked (cldist.rundir.manifest)."""
        from .manifest import load_run_manifest
        return load_run_manifest(self.given, allowed_hosts, max_member_bytes)

    # ----------------------------------------------------------------------------- writing
    def write_config(self, config: dict, config_yaml: str) -> None:
        """config.yaml (for people) and config.json (what cldist reads back), atomically."""
        write_text_atomic(self.config_yaml_path, config_yaml)
        write_json_atomic(self.config_path, config)

    def write_seeds(self, seeds: dict) -> None:
        write_json_atomic(self.seeds_path, seeds)

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.metrics_path, metrics)

    def save_manifest(self, manifest) -> None:
        from .manifest import save_run_manifest
        save_run_manifest(self.given, manifest)

    # -------------------------------------------------------------------------- task files
    @staticmethod
    def write_task_files(staging: str | os.PathLike, tensors: dict, meta: dict,
                         reference: dict | None = None) -> None:
        """Write a finished task's files into `staging` (fsynced, not yet finished)."""
        from .tasks import write_task_dir
        write_task_dir(Path(staging), tensors, meta, reference)

    def stage_copy(self, task_id: int, source: str | os.PathLike) -> Path:
        """Copy a finished task's files from `source` into a new staging directory."""
        from .tasks import stage_copy
        return stage_copy(self.given, task_id, source)

    def commit_task(self, task_id: int, staging: str | os.PathLike) -> Path:
        """Make a staged task final (tasks/TTT, its reference to RUN/); the caller records
        it in state.json afterwards."""
        from .tasks import commit_task
        return commit_task(self.given, task_id, staging)

    def read_task_weights(self, task_id: int) -> dict:
        """A finished task's tensors by file stem ({"adapter": {...}, "head": {...}, ...});
        only safetensors are read, anything else in the task's directory is refused."""
        from .tasks import read_task_weights
        return read_task_weights(self.given, task_id)

    def read_reference(self) -> dict | None:
        """RUN/reference.safetensors, or None when the run has none."""
        from .tasks import read_reference
        return read_reference(self.given)

    def load_task_into(self, method, model, task_id: int) -> None:
        """Load task `task_id`'s files into `model` through `method`; files that do not fit
        the model become one message naming the file and tensor."""
        from .tasks import load_task_into
        load_task_into(method, model, self.given, task_id)

    def load_reference_into(self, method, model) -> None:
        """Load RUN/reference.safetensors (when there) into `model`, like load_task_into."""
        from .tasks import load_reference_into
        load_reference_into(method, model, self.given)

    # ------------------------------------------------------------------------------ resume
    def prepare_resume(self, deps: dict[int, list[int]], n_tasks: int) -> list[str]:
        """Bring the directory back to a consistent task boundary (cldist.rundir.state);
        returns what was done, one note per change."""
        return prepare_resume(self.given, deps, n_tasks)

    def record_resume_overrides(self, state: RunState, changed: dict, was: dict) -> None:
        """Append learning rates changed on resume to state.json's `resume_overrides`."""
        history = list(state.data.get("resume_overrides", []))
        history.append({"overrides": changed, "was": was,
                        "tasks_finished_before": state.completed})
        state.set("resume_overrides", history)


def _read_object(path: Path, remedy: str) -> dict[str, Any]:
    """A JSON object from `path`, size- and depth-capped; a missing file is a UserError."""
    try:
        return files.read_json(path, remedy)
    except FileNotFoundError:
        raise UserError(f"{path} is missing; {remedy}") from None


def _interpolation(node, key: str = "") -> tuple[str, str] | None:
    """The first (dotted key, value) in `node` holding an OmegaConf interpolation."""
    stack = [(key, node)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, str) and "${" in node:
            return key or "(top level)", node
        if isinstance(node, dict):
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(node))
    return None
