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
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..atomic import fsync_dir, write_json_atomic
from ..errors import UserError

STATE_FILE = "state.json"
REFERENCE_FILE = "reference.safetensors"


def task_dir(run_dir, task_id: int) -> Path:
    return Path(run_dir) / "tasks" / f"{task_id:03d}"


def write_task_dir(staging: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                   reference: dict[str, torch.Tensor] | None = None) -> None:
    """Write a finished task's files into `staging` (fsynced, not yet visible as finished)."""
    staging.mkdir(parents=True, exist_ok=False)
    for stem, group in tensors.items():
        save_file({k: v.contiguous() for k, v in group.items()}, str(staging / f"{stem}.safetensors"))
    if reference is not None:
        save_file({k: v.contiguous() for k, v in reference.items()}, str(staging / REFERENCE_FILE))
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    for f in staging.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(staging)


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


def load_task_tensors(run_dir, task_id: int) -> dict[str, dict[str, torch.Tensor]]:
    d = task_dir(run_dir, task_id)
    if not d.is_dir():
        raise UserError(f"task {task_id} has no files in {d}; the run directory is incomplete - "
                        f"`cldist resume {run_dir}` retrains it")
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        try:
            out[f.stem] = load_file(str(f))
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{f} is not a readable safetensors file ({e}); delete tasks/"
                            f"{task_id:03d} and `cldist resume` to retrain the task") from e
    return out


def load_reference(run_dir) -> dict[str, torch.Tensor] | None:
    p = Path(run_dir) / REFERENCE_FILE
    return load_file(str(p)) if p.is_file() else None


class RunState:
    """`state.json`: which tasks are finished, their ranks and meta, the accuracy matrix."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STATE_FILE
        self.data = {"completed_tasks": [], "ranks": {}, "params_per_task": {},
                     "accuracy_matrix": [], "task_meta": {}, "status": "running"}
        if self.path.is_file():
            try:
                self.data.update(json.loads(self.path.read_text()))
            except json.JSONDecodeError as e:
                raise UserError(f"{self.path} is not valid JSON ({e}); the run directory is "
                                f"damaged") from e

    @property
    def completed(self) -> list[int]:
        return list(self.data["completed_tasks"])

    def record_task(self, task_id: int, meta: dict) -> None:
        done = set(self.data["completed_tasks"]) | {task_id}
        self.data["completed_tasks"] = sorted(done)
        self.data["ranks"][str(task_id)] = meta.get("ranks", {})
        self.data["params_per_task"][str(task_id)] = int(meta.get("params_added", 0))
        slim = {k: v for k, v in meta.items() if k not in ("ranks", "staging_dir")}
        self.data["task_meta"][str(task_id)] = slim
        self.save()

    def set_rows(self, rows: list[list[float]]) -> None:
        self.data["accuracy_matrix"] = rows
        self.save()

    def set(self, key: str, value) -> None:
        self.data[key] = value
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


RUN_MANIFEST = "manifest.json"


def save_run_manifest(run_dir, manifest) -> None:
    """RUN/manifest.json: the scenario's manifest plus where its shards live (`shard_root`)."""
    data = manifest.to_dict()
    data["shard_root"] = str(manifest.root)
    write_json_atomic(Path(run_dir) / RUN_MANIFEST, data)


def load_run_manifest(run_dir):
    from ..data.manifest import Manifest
    path = Path(run_dir) / RUN_MANIFEST
    if not path.is_file():
        raise UserError(f"{path} is missing; {run_dir} is not a cldist run directory")
    root = json.loads(path.read_text()).get("shard_root")
    return Manifest.load(path, root=root)
