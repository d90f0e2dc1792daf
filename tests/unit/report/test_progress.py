"""The live progress view: whole lines from concurrent tasks, a rate-limited status, an ETA,
and a status line redrawn in place on a terminal."""
import io
import re
import threading
import time

import pytest

from cldist.report.progress import ERASE_LINE, Progress, format_status_line

EPOCH_LINE = re.compile(r"\[task \d{3} \| stage[12] \| epoch \d+/\d+\] loss \d\.\d{4}  "
                        r"lr \d\.\de-\d\d  [\dhms.]+")
EVENT_LINE = re.compile(r"\[task \d{3}\] (started|finished in [\dhms.]+ \(\d+/\d+ done\))")
STATUS_LINE = re.compile(r"\[status\] \d+/\d+ done \| running \d+(: .*)? \| queued \d+ \| "
                         r"elapsed [\dhms.]+ \| ETA (\?|[\dhms.]+)")


class CharByCharStream:
    """A stream that stores each character separately and yields the GIL in between.

    Without a lock around whole writes, concurrent writers would interleave inside lines.
    """

    def __init__(self, tty=False):
        self.chars = []
        self.tty = tty

    def write(self, text):
        for char in text:
            self.chars.append(char)
            if char == " ":
                time.sleep(0)  # releases the GIL: let another thread run mid-line
        return len(text)

    def flush(self):
        pass

    def isatty(self):
        return self.tty

    def getvalue(self):
        return "".join(self.chars)


class TickingClock:
    """Fake seconds: each reading is one second later, whichever thread reads it."""

    def __init__(self):
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.now += 1.0
            return self.now


def test_log_output_from_concurrent_tasks_is_one_line_per_event_plus_status():
    stream = CharByCharStream()
    clock = TickingClock()
    n_tasks, n_epochs, every = 6, 20, 25.0
    progress = Progress(n_tasks, stream=stream, clock=clock, status_every_s=every)
    assert not progress.live  # not a terminal: the log rendering

    # The two workers advance in lock step, so two tasks really run side by side
    side_by_side = threading.Barrier(2)

    def train(task_ids):
        for task_id in task_ids:
            progress.task_started(task_id)
            side_by_side.wait()
            for phase, epochs in (("stage1", 2), ("stage2", n_epochs)):
                for epoch in range(1, epochs + 1):
                    progress.epoch(task_id, phase, epoch, epochs, loss=0.5312, lr=9.5e-4)
                    side_by_side.wait()
            progress.task_finished(task_id)
            progress.message(f"[eval] after task {task_id:03d}: Acc 50.00%")

    threads = [threading.Thread(target=train, args=(ids,)) for ids in ([0, 2, 4], [1, 3, 5])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = stream.getvalue().splitlines()
    status = [line for line in lines if line.startswith("[status]")]
    events = [line for line in lines if not line.startswith("[status]")]
    # every event is exactly one whole line
    assert len(events) == n_tasks * (1 + 2 + n_epochs + 1 + 1)
    for line in events:
        assert (EPOCH_LINE.fullmatch(line) or EVENT_LINE.fullmatch(line)
                or line.startswith("[cldist] [eval] after task ")), line
    for line in status:
        assert STATUS_LINE.fullmatch(line), line
    # rate-limited: at most one status per `every` fake seconds, plus the final one
    assert 2 <= len(status) <= clock.now / every + 1
    # an ETA once a task has finished, and a detail for each running task
    assert any(re.search(r"ETA \d", line) for line in status[:-1])
    assert any(re.search(r"running 2: 00\d stage\d \d+/\d+ loss 0\.531, 00\d ", line)
               for line in status)
    assert status[-1].startswith("[status] 6/6 done | running 0 | queued 0 | elapsed ")
    assert status[-1].endswith("| ETA 0.0s")
    last_finished = max(k for k, line in enumerate(lines) if "finished in" in line)
    assert lines[last_finished + 1] == status[-1]  # the final status follows the last task


def test_status_is_rate_limited_in_a_log():
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(3, stream=stream, clock=lambda: now[0], status_every_s=30)
    progress.task_started(0)
    now[0] = 10.0
    progress.epoch(0, "stage2", 1, 2, 0.9, 1e-3)
    assert "[status]" not in stream.getvalue()
    now[0] = 31.0
    progress.epoch(0, "stage2", 2, 2, 0.7, 1e-3)
    now[0] = 40.0
    progress.task_finished(0)
    lines = stream.getvalue().splitlines()
    assert [line.startswith("[status]") for line in lines] == [False, False, False, True, False]
    assert lines[3] == ("[status] 0/3 done | running 1: 000 stage2 2/2 loss 0.700 | queued 2 | "
                        "elapsed 31.0s | ETA ?")
    assert lines[4] == "[task 000] finished in 40.0s (1/3 done)"


def test_status_line_and_eta():
    assert format_status_line(2, 5, [3, 4], [5], 80) == \
        "2/5 done | running 2: 003, 004 | queued 1 | ETA 1m20s"
    many = {t: f"{t:03d} stage2 1/4 loss 0.500" for t in range(3, 10)}
    line = format_status_line(3, 10, many, 0, None, elapsed_s=5)
    assert "running 7: 003 stage2 1/4 loss 0.500, 004" in line and ", +3 more |" in line
    assert line.endswith("| elapsed 5.0s | ETA ?")

    now = [0.0]
    progress = Progress(n_tasks=5, stream=io.StringIO(), clock=lambda: now[0])
    assert progress.eta_seconds() is None
    assert progress.status().endswith("ETA ?")
    progress.task_started(0)
    progress.task_started(1)
    now[0] = 60.0
    progress.task_finished(0)
    progress.task_finished(1)
    progress.task_started(2)
    progress.task_started(3)
    now[0] = 80.0
    # mean 60 s; running 2,3 have 40 s left each, task 4 not started: (40 + 40 + 60) / 2 = 70 s
    assert progress.eta_seconds() == pytest.approx(70.0)
    assert progress.status() == ("2/5 done | running 2: 002 starting, 003 starting | queued 1 | "
                                 "elapsed 1m20s | ETA 1m10s")


def test_resumed_tasks_count_as_done():
    stream = io.StringIO()
    progress = Progress(3, stream=stream, clock=lambda: 0.0)
    progress.mark_done([0, 1])
    progress.task_started(2)
    progress.task_finished(2, seconds=12.0)
    assert stream.getvalue().splitlines()[-2:] == [
        "[task 002] finished in 12.0s (3/3 done)",
        "[status] 3/3 done | running 0 | queued 0 | elapsed 0.0s | ETA 0.0s"]


def test_message_prefixes_every_line():
    stream = io.StringIO()
    Progress(1, stream=stream).message("first\nsecond")
    assert stream.getvalue() == "[cldist] first\n[cldist] second\n"


def visible_lines(output: str) -> list[str]:
    """What a terminal shows: after an erase-line, only the text written after it counts."""
    return [line.split(ERASE_LINE)[-1] for line in output.split("\n")]


def test_terminal_redraws_one_status_line_in_place():
    now = [0.0]
    stream = CharByCharStream(tty=True)
    progress = Progress(2, stream=stream, clock=lambda: now[0], width=70)
    assert progress.live
    progress.task_started(0)
    progress.task_started(1)
    for epoch in (1, 2, 3):
        now[0] += 10
        progress.epoch(0, "stage2", epoch, 3, 0.5, 1e-3)
        progress.epoch(1, "stage1", epoch, 3, 0.8, 1e-3)
    output = stream.getvalue()
    shown = visible_lines(output)
    # epochs print no lines of their own: two permanent lines, then the live status line
    assert shown[:2] == ["[task 000] started", "[task 001] started"]
    assert len(shown) == 3 and shown[2].startswith("[status] 0/2 done | running 2: 000 stage2 3/3")
    assert len(shown[2]) < 70 and shown[2].endswith("~")  # cut to the terminal width
    assert output.count(ERASE_LINE) == 1 + 6  # every event after the first redraws it

    progress.message("hello")
    progress.task_finished(0)
    progress.task_finished(1)
    shown = visible_lines(stream.getvalue())
    assert shown[2:] == ["[cldist] hello", "[task 000] finished in 30.0s (1/2 done)",
                         "[task 001] finished in 30.0s (2/2 done)",
                         "[status] 2/2 done | running 0 | queued 0 | elapsed 30.0s | ETA 0.0s",
                         ""]  # the last task ends the live line: later output starts clean
    progress.message("after")
    assert stream.getvalue().endswith("ETA 0.0s\n[cldist] after\n")


def test_close_ends_the_live_line():
    stream = CharByCharStream(tty=True)
    progress = Progress(3, stream=stream, clock=lambda: 0.0, width=200)
    progress.task_started(0)
    progress.close()
    progress.close()  # idempotent
    output = stream.getvalue()
    assert output.endswith("ETA ?\n") and output.count("[status]") == 2
    progress.task_finished(0)  # after close: plain lines, no live status
    assert stream.getvalue().endswith("\n[task 000] finished in 0.0s (1/3 done)\n")


def test_terminal_line_ends_when_nothing_runs():
    """A resumed run whose earlier tasks Progress never heard of: no status line is left
    unterminated for the caller's next print to run into."""
    stream = CharByCharStream(tty=True)
    progress = Progress(3, stream=stream, clock=lambda: 0.0, width=200)
    progress.task_started(2)
    assert not stream.getvalue().endswith("\n")  # the live status line
    progress.task_finished(2)
    assert stream.getvalue().endswith("[task 002] finished in 0.0s (1/3 done)\n")
