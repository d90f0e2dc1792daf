"""Where everything lives in a run directory (DESIGN.md, "Run directory").

    RUN/state.json                      the marker + completed tasks, ranks, accuracy matrix
    RUN/config.json, RUN/config.yaml    the resolved config (JSON is what cldist reads back)
    RUN/seeds.json                      every seed that decides the run's numbers
    RUN/manifest.json                   the scenario's manifest + `shard_root`
    RUN/metrics.json                    the finished run's metrics
    RUN/tasks/TTT/                      a finished task's safetensors + meta.json
    RUN/tasks/.staging-TTT-xxxxxxxx/    a task being written
    RUN/reference.safetensors           PEARL's trained reference (when not pre-trained)
    RUN/tb/                             TensorBoard events
    RUN/cldist.lock                     the writers' lock
"""
from __future__ import annotations

import uuid
from pathlib import Path

from .files import LOCK_FILE, STATE_FILE

CONFIG_FILE = "config.json"
CONFIG_YAML_FILE = "config.yaml"
SEEDS_FILE = "seeds.json"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
REFERENCE_FILE = "reference.safetensors"
TASKS_DIR = "tasks"
TB_DIR = "tb"

__all__ = ["CONFIG_FILE", "CONFIG_YAML_FILE", "LOCK_FILE", "MANIFEST_FILE", "METRICS_FILE",
           "REFERENCE_FILE", "SEEDS_FILE", "STATE_FILE", "TASKS_DIR", "TB_DIR", "staging_dir",
           "task_dir"]


def task_dir(run_dir, task_id: int) -> Path:
    """RUN/tasks/TTT: where a finished task's files live."""
    return Path(run_dir) / TASKS_DIR / f"{task_id:03d}"


def staging_dir(run_dir, task_id: int, root: str | Path | None = None) -> Path:
    """A new, unique `.staging-TTT-xxxxxxxx` path for task `task_id`'s files, in RUN/tasks/ or
    in `root` (a job's local staging area); nothing is created."""
    parent = Path(root) if root else Path(run_dir) / TASKS_DIR
    return parent / f".staging-{task_id:03d}-{uuid.uuid4().hex[:8]}"
