"""The run directory: one `RunDir` type owns its layout, ownership marker and lock, atomic
commits, config/state/metrics/manifest/task I/O and resume preparation; train, eval, the
stream, the CLI, the report and the Ray runner all go through it.

    cldist/rundir/run.py       RunDir, the one entry point
    cldist/rundir/layout.py    file names and task paths (DESIGN.md, "Run directory")
    cldist/rundir/files.py     bounded JSON reads, the ownership marker, the flock
    cldist/rundir/state.py     state.json (RunState) and bringing a run back to a task boundary
    cldist/rundir/tasks.py     staging, committing and reading task files (torch; lazy)
    cldist/rundir/manifest.py  the pinned manifest and its checked `shard_root`

Crash-safe writes (tmp + fsync + rename) are cldist/atomic_io.py's (import them from there);
the commits built from them (state.json, task directories) are this package's.
`import cldist.rundir` pulls in neither torch nor the data readers.
"""
from __future__ import annotations

from .files import (DAMAGED, FORMAT_VERSION, LOCK_FILE, MAX_JSON_BYTES, MAX_JSON_DEPTH,
                    STATE_FILE, RunDirLocked, acquire_lock, foreign_entries, read_json,
                    release_lock, state_marker_problem)
from .layout import (CONFIG_FILE, CONFIG_YAML_FILE, MANIFEST_FILE, METRICS_FILE,
                     REFERENCE_FILE, SEEDS_FILE, TASKS_DIR, TB_DIR)
from .run import METRICS_REQUIRED_KEYS, RunDir
from .state import RunState

__all__ = [
    "CONFIG_FILE", "CONFIG_YAML_FILE", "DAMAGED", "FORMAT_VERSION", "LOCK_FILE", "MANIFEST_FILE",
    "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "METRICS_FILE", "METRICS_REQUIRED_KEYS", "REFERENCE_FILE",
    "RunDir", "RunDirLocked", "RunState", "SEEDS_FILE", "STATE_FILE", "TASKS_DIR", "TB_DIR",
    "acquire_lock", "foreign_entries", "read_json", "release_lock", "state_marker_problem",
]
