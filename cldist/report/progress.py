"""Progress lines for concurrently running tasks that stay readable in a log file.

Every event is exactly one line, written in one `write` call under a lock, with a prefix
saying which task it is about - so lines from concurrent tasks interleave only as whole lines:

    [task 003] started
    [task 003 | stage2 | epoch 2/4] loss 0.5312  lr 9.5e-04  12.3s
    [task 003] finished in 1m02s
    [progress] tasks: 2/5 done | running: 3,4 | queued: 5 | ETA 1m20s
    [cldist] any other message

No carriage returns or progress bars: those turn into noise once redirected to a file.
Task ids are expected to be 0..n_tasks-1 (queued = the ids not started yet).
"""
from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Sequence, TextIO

from cldist.report.summary import format_duration

MAX_IDS_SHOWN = 8


def format_ids(task_ids: Sequence[int] | int) -> str:
    """`3,4,5`, a count when given an int, `-` when empty, truncated past MAX_IDS_SHOWN ids."""
    if isinstance(task_ids, int):
        return str(task_ids)
    ids = sorted(int(t) for t in task_ids)
    if not ids:
        return "-"
    shown = ",".join(str(t) for t in ids[:MAX_IDS_SHOWN])
    if len(ids) > MAX_IDS_SHOWN:
        shown += f",... (+{len(ids) - MAX_IDS_SHOWN})"
    return shown


def format_status_line(done: int, n_tasks: int, running: Sequence[int] | int,
                       queued: Sequence[int] | int, eta_s: float | None) -> str:
    """`tasks: 2/5 done | running: 3,4 | queued: 5 | ETA 1m20s` (ETA `?` while unknown)."""
    eta = "?" if eta_s is None else format_duration(eta_s)
    return (f"tasks: {done}/{n_tasks} done | running: {format_ids(running)} | "
            f"queued: {format_ids(queued)} | ETA {eta}")


class Progress:
    """Thread-safe progress reporter for a stream of `n_tasks` tasks.

    `clock` is injectable so tests can drive time; it defaults to `time.monotonic`.
    """

    def __init__(self, n_tasks: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.n_tasks = int(n_tasks)
        # Resolved at call time (not as a default argument) so pytest's capture sees it.
        self.stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self._lock = threading.Lock()
        self._started_at: dict[int, float] = {}
        self._durations: dict[int, float] = {}

    # ------------------------------------------------------------------ events

    def task_started(self, task_id: int) -> None:
        with self._lock:
            self._started_at[int(task_id)] = self._clock()
            self._write_locked(f"[task {int(task_id):03d}] started")

    def epoch(self, task_id: int, phase: str, epoch: int, n_epochs: int,
              loss: float, lr: float) -> None:
        """One finished epoch; `epoch` is 1-based (`epoch 2/4` is the second of four).

        The trailing time is the time since `task_started` for this task.
        """
        with self._lock:
            now = self._clock()
            elapsed = now - self._started_at.setdefault(int(task_id), now)
            self._write_locked(
                f"[task {int(task_id):03d} | {phase} | epoch {epoch}/{n_epochs}] "
                f"loss {float(loss):.4f}  lr {float(lr):.1e}  {format_duration(elapsed)}")

    def task_finished(self, task_id: int, seconds: float | None = None) -> None:
        """A task is done; `seconds` defaults to the time since `task_started`.

        Prints the finished line and then the stream's status line.
        """
        task_id = int(task_id)
        with self._lock:
            now = self._clock()
            if seconds is None:
                seconds = now - self._started_at.get(task_id, now)
            self._started_at.setdefault(task_id, now - seconds)
            self._durations[task_id] = float(seconds)
            self._write_locked(f"[task {task_id:03d}] finished in {format_duration(seconds)}")
            self._write_locked(f"[progress] {self._status_locked(now)}")

    def message(self, text: str) -> None:
        """Free text; each of its lines gets the `[cldist]` prefix."""
        with self._lock:
            for line in str(text).splitlines() or [""]:
                self._write_locked(f"[cldist] {line}")

    # ------------------------------------------------------------------ status

    def status_line(self, done: int, running: Sequence[int] | int,
                    queued: Sequence[int] | int, eta_s: float | None) -> str:
        """Format a status line for this stream (see `format_status_line`)."""
        return format_status_line(done, self.n_tasks, running, queued, eta_s)

    def status(self) -> str:
        """The current status line, from the tasks seen so far."""
        with self._lock:
            return self._status_locked(self._clock())

    def eta_seconds(self) -> float | None:
        """Estimated seconds until all tasks finish; None before any task has finished."""
        with self._lock:
            return self._eta_locked(self._clock())

    # ------------------------------------------------------------------ internals

    def _running(self) -> list[int]:
        return [t for t in self._started_at if t not in self._durations]

    def _queued(self) -> list[int]:
        return [t for t in range(self.n_tasks) if t not in self._started_at]

    def _eta_locked(self, now: float) -> float | None:
        """Remaining work at the mean finished-task duration, spread over the running tasks.

        Running tasks count for what is left of a mean duration; queued tasks for a whole one.
        Concurrency is taken as the number of tasks running now (at least one).
        """
        if not self._durations:
            return None
        mean = sum(self._durations.values()) / len(self._durations)
        running = self._running()
        queued = max(0, self.n_tasks - len(self._durations) - len(running))
        remaining = sum(max(0.0, mean - (now - self._started_at[t])) for t in running)
        remaining += queued * mean
        return remaining / max(1, len(running))

    def _status_locked(self, now: float) -> str:
        return format_status_line(len(self._durations), self.n_tasks, self._running(),
                                  self._queued(), self._eta_locked(now))

    def _write_locked(self, line: str) -> None:
        # One write per line (newline included) so other writers to the stream cannot split it.
        self.stream.write(line.replace("\n", " ") + "\n")
        self.stream.flush()
