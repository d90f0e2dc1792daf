"""Faults the reliability tests (tests/system/test_faults.py) inject into Ray training workers.

Production workers only call the epoch hooks the driver hands them
(cldist.distributed.runner.WORKER_EPOCH_HOOKS, empty in a real run); `install` makes
`kill_worker` one of them for a test. With it, a file RUN_DIR/.faults/kill-worker-TTT makes
the worker learning task TTT kill itself with SIGKILL at the end of its first epoch; the file
is consumed first (renamed to ...done: exactly one taker), so the retry goes through.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

FAULTS_DIR = ".faults"


def arm_kill_worker(run_dir: Path, task_id: int) -> Path:
    """The marker that makes `kill_worker` kill the worker learning `task_id`."""
    marker = Path(run_dir) / FAULTS_DIR / f"kill-worker-{task_id:03d}"
    marker.parent.mkdir(exist_ok=True)
    marker.touch()
    return marker


def kill_worker(run_dir: str, task_id: int, **_) -> None:
    """Epoch hook: SIGKILL this worker if RUN_DIR/.faults/kill-worker-TTT exists (once)."""
    marker = Path(run_dir) / FAULTS_DIR / f"kill-worker-{task_id:03d}"
    try:
        os.rename(marker, marker.with_name(marker.name + ".done"))  # exactly one taker
    except OSError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


def install(monkeypatch) -> None:
    """Have every Ray training worker of this test call `kill_worker` after each epoch."""
    from cldist.distributed import runner
    from cldist.distributed.train_job import ship_module_by_value
    ship_module_by_value(sys.modules[__name__])  # workers need not import tests/
    monkeypatch.setattr(runner, "WORKER_EPOCH_HOOKS", (kill_worker,))


def kill_worker_learning(monkeypatch, task_id: int) -> None:
    """Arm `kill_worker` for `task_id` in the run directory the stream prepares, and install it:
    the first worker to finish an epoch of that task SIGKILLs itself, once."""
    from cldist import stream
    prepare = stream.prepare_run_dir

    def prepare_with_fault(cfg, manifest):
        out = prepare(cfg, manifest)
        arm_kill_worker(out, task_id)
        return out

    monkeypatch.setattr(stream, "prepare_run_dir", prepare_with_fault)
    install(monkeypatch)
