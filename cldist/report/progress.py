"""Live progress of a task stream: one compact status view, for a terminal and for a log file.

The same events render two ways, chosen by whether the output stream is a terminal:

Log (not a TTY: `cldist run > run.log`, a cluster job's log, pytest): one line per event, each
written whole under a lock so concurrent tasks interleave only as whole lines, and a
`[status]` summary at most every `status_every_s` seconds plus once when the last task ends:

    [task 003] started
    [task 003 | stage2 | epoch 2/4] loss 0.5312  lr 9.5e-04  12.3s
    [task 003] finished in 1m02s (3/5 done)
    [status] 3/5 done | running 2: 004 stage2 1/4 loss 0.612, 005 starting | queued 0 | elapsed 3m10s | ETA 1m20s
    [cldist] any other message

Terminal (a TTY): task starts, finishes and messages are printed as lines; while tasks run, the
`[status]` line sits below them and is redrawn in place (carriage return + erase-line) after
every event. Epochs update the status line instead of printing a line each. The status line is cut to the terminal
width, since a wrapped line can no longer be redrawn in place. When the last task ends the
status line is left on screen as an ordinary line; `close()` does the same early (e.g. when the
run fails) so later output does not start mid-line.

Task ids are expected to be 0..n_tasks-1.
"""
from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TextIO

from cldist.report.summary import format_duration

# Running tasks detailed in the status line; more are counted (`+12 more`).
MAX_RUNNING_SHOWN = 4
DEFAULT_STATUS_EVERY_S = 30.0
# Return to column 0 and erase to the end of the line: redraws the status line in place.
ERASE_LINE = "\r\x1b[K"


@dataclass
class _RunningTask:
    started_at: float
    phase: str | None = None
    epoch: int = 0
    n_epochs: int = 0
    loss: float | None = None

    def detail(self, task_id: int) -> str:
        if self.phase is None:
            return f"{task_id:03d} starting"
        return f"{task_id:03d} {self.phase} {self.epoch}/{self.n_epochs} loss {self.loss:.3f}"


def format_status_line(done: int, n_tasks: int,
                       running: Mapping[int, str] | Sequence[int] | int,
                       queued: Sequence[int] | int, eta_s: float | None,
                       elapsed_s: float | None = None) -> str:
    """`3/5 done | running 2: 004 stage2 1/4 loss 0.612, 005 starting | queued 0 | ETA 1m20s`.

    `running` maps task ids to what each is doing (or is just the ids, or a count); `queued`
    is a count or the ids. ETA is `?` while unknown; `elapsed` is shown when given.
    """
    if isinstance(running, int):
        running_part = f"running {running}"
    else:
        details = (dict(running) if isinstance(running, Mapping)
                   else {int(t): f"{int(t):03d}" for t in running})
        ids = sorted(details)
        running_part = f"running {len(ids)}"
        if ids:
            shown = ", ".join(details[t] for t in ids[:MAX_RUNNING_SHOWN])
            if len(ids) > MAX_RUNNING_SHOWN:
                shown += f", +{len(ids) - MAX_RUNNING_SHOWN} more"
            running_part += f": {shown}"
    n_queued = queued if isinstance(queued, int) else len(queued)
    parts = [f"{done}/{n_tasks} done", running_part, f"queued {n_queued}"]
    if elapsed_s is not None:
        parts.append(f"elapsed {format_duration(elapsed_s)}")
    parts.append(f"ETA {'?' if eta_s is None else format_duration(eta_s)}")
    return " | ".join(parts)


class Progress:
    """Thread-safe progress view of a stream of `n_tasks` tasks (see the module docstring).

    `stream` defaults to stdout; `live` to whether `stream` is a terminal. `status_every_s` is
    the least time between two `[status]` lines in a log. `clock` (seconds) and `width`
    (terminal columns) are injectable for tests.
    """

    def __init__(self, n_tasks: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, live: bool | None = None,
                 status_every_s: float = DEFAULT_STATUS_EVERY_S, width: int | None = None):
        self.n_tasks = int(n_tasks)
        # Resolved at call time (not as a default argument) so pytest's capture sees it.
        self.stream = stream if stream is not None else sys.stdout
        self.live = _is_terminal(self.stream) if live is None else bool(live)
        self.status_every_s = float(status_every_s)
        self._width = width
        self._clock = clock
        self._lock = threading.Lock()
        self._created_at = clock()
        self._last_status_at = self._created_at
        self._running: dict[int, _RunningTask] = {}
        self._durations: dict[int, float] = {}   # finished here, with their durations
        self._done: set[int] = set()              # finished here or before (resume)
        self._most_running = 0
        self._status_on_screen = False            # live: an unterminated status line is shown
        self._final_written = False
        self._closed = False

    # ------------------------------------------------------------------ events

    def mark_done(self, task_ids: Iterable[int]) -> None:
        """Tasks finished before this process started (a resumed run): counted as done, but
        not used for the ETA, which needs durations measured here. Prints nothing."""
        with self._lock:
            for task_id in task_ids:
                self._done.add(int(task_id))
                self._running.pop(int(task_id), None)

    def task_started(self, task_id: int) -> None:
        with self._lock:
            task_id = int(task_id)
            self._running[task_id] = _RunningTask(self._clock())
            self._most_running = max(self._most_running, len(self._running))
            self._emit([f"[task {task_id:03d}] started"])

    def epoch(self, task_id: int, phase: str, epoch: int, n_epochs: int,
              loss: float, lr: float) -> None:
        """One finished epoch; `epoch` is 1-based (`epoch 2/4` is the second of four).

        In a log this prints a line, ending with the time since the task started; on a
        terminal it updates the task's entry in the status line.
        """
        with self._lock:
            task_id = int(task_id)
            now = self._clock()
            task = self._running.get(task_id)
            if task is None:  # an epoch report for a task we were not told had started
                task = self._running[task_id] = _RunningTask(now)
            task.phase, task.epoch, task.n_epochs, task.loss = (
                str(phase), int(epoch), int(n_epochs), float(loss))
            if self.live:
                self._emit([])
            else:
                self._emit([f"[task {task_id:03d} | {phase} | epoch {epoch}/{n_epochs}] "
                            f"loss {float(loss):.4f}  lr {float(lr):.1e}  "
                            f"{format_duration(now - task.started_at)}"])

    def task_finished(self, task_id: int, seconds: float | None = None) -> None:
        """A task is done; `seconds` defaults to the time since `task_started`."""
        with self._lock:
            task_id = int(task_id)
            now = self._clock()
            task = self._running.pop(task_id, None)
            if seconds is None:
                seconds = now - task.started_at if task is not None else 0.0
            self._durations[task_id] = float(seconds)
            self._done.add(task_id)
            self._emit([f"[task {task_id:03d}] finished in {format_duration(seconds)} "
                        f"({len(self._done)}/{self.n_tasks} done)"])

    def message(self, text: str) -> None:
        """Free text; each of its lines gets the `[cldist]` prefix."""
        with self._lock:
            self._emit([f"[cldist] {line}" for line in str(text).splitlines() or [""]])

    def close(self) -> None:
        """Leave the status line on screen as an ordinary line (terminal); idempotent."""
        with self._lock:
            if self._status_on_screen:
                self._write(f"{ERASE_LINE}[status] {self._status_text(self._clock())}\n")
                self._status_on_screen = False
            self._closed = True

    # ------------------------------------------------------------------ status

    def status(self) -> str:
        """The current status, without the `[status]` prefix."""
        with self._lock:
            return self._status_text(self._clock())

    def eta_seconds(self) -> float | None:
        """Estimated seconds until all tasks finish; None before any task has finished here."""
        with self._lock:
            return self._eta(self._clock())

    # ------------------------------------------------------------------ internals

    def _eta(self, now: float) -> float | None:
        """Remaining work at the mean finished-task duration, spread over the concurrency.

        Running tasks count for what is left of a mean duration, tasks not started for a whole
        one. Concurrency is the most tasks seen running at once (tasks can be queued behind a
        dependency for a moment), but no more than the tasks left.
        """
        if not self._durations:
            return None
        mean = sum(self._durations.values()) / len(self._durations)
        not_started = max(0, self.n_tasks - len(self._done) - len(self._running))
        remaining = sum(max(0.0, mean - (now - task.started_at))
                        for task in self._running.values())
        remaining += not_started * mean
        concurrency = max(1, min(self._most_running, len(self._running) + not_started))
        return remaining / concurrency

    def _status_text(self, now: float) -> str:
        running = {t: task.detail(t) for t, task in self._running.items()}
        not_started = max(0, self.n_tasks - len(self._done) - len(self._running))
        return format_status_line(len(self._done), self.n_tasks, running, not_started,
                                  self._eta(now), elapsed_s=now - self._created_at)

    def _emit(self, lines: list[str]) -> None:
        """Write event lines and the status as this mode wants it, in one `write` call."""
        now = self._clock()
        all_done = len(self._done) >= self.n_tasks
        text = "".join(line.replace("\n", " ") + "\n" for line in lines)
        final = all_done and not self._final_written
        if self.live:
            if self._status_on_screen:
                text = ERASE_LINE + text
            self._status_on_screen = False
            if final:
                text += f"[status] {self._status_text(now)}\n"
            elif not all_done and not self._closed and self._running:
                # Only while a task runs: once none does, the caller may print anything (the
                # summary of a resumed run, whose earlier tasks we were never told about).
                text += self._fit_width(f"[status] {self._status_text(now)}")
                self._status_on_screen = True
        elif final or (not all_done and now - self._last_status_at >= self.status_every_s):
            text += f"[status] {self._status_text(now)}\n"
            self._last_status_at = now
        self._final_written = self._final_written or final
        self._write(text)

    def _fit_width(self, line: str) -> str:
        width = self._width or shutil.get_terminal_size((100, 24)).columns
        return line if len(line) < width else line[: max(1, width - 2)] + "~"

    def _write(self, text: str) -> None:
        # One write (and flush) per event so other writers to the stream cannot split a line.
        if text:
            self.stream.write(text)
            self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False
