"""The task queue behind job slots (`trainer.tasks_per_job=auto`): pure bookkeeping, no Ray.

A job slot is a long-lived training job that asks the queue for the next ready task, learns
it, has it committed, and asks again, until the queue has nothing ready for it; so a stream
pays a job's start-up once per slot instead of once per job. The Ray runner keeps one
`SlotQueue` in its coordinator actor (cldist.distributed.actors), next to the commits, so that
"committed" and "done in the queue" are one step: a committed task is never handed out again.

Rules:
* ready = not done, not held by a slot, every dependency done; a slot gets the lowest ready
  task (the task graph's order: in a chain, task t+1 is ready only once t is committed);
* a slot holds at most one task; `claim` by a slot that still holds one returns that task;
* a slot that starts (again) gives its held task back first - a restarted slot (Ray Train
  retries a job whose worker died) may not have committed it - so a crash never loses the
  record of a task: it is ready again for whichever slot asks first;
* `claim` answers None when nothing is ready *now* (or the queue is closed): the slot ends.
  Tasks that become ready later get a fresh slot from the runner.
"""
from __future__ import annotations

from typing import Iterable

from . import ready_order


class SlotQueue:
    def __init__(self, tasks: Iterable[int], deps: dict[int, list[int]], done: Iterable[int] = ()):
        self.pending = sorted(int(t) for t in tasks)  # not done yet (held ones included)
        self.deps = {int(t): [int(d) for d in ds] for t, ds in deps.items()}
        self.done = {int(t) for t in done}
        self.held: dict[str, int] = {}  # slot -> the task it is learning
        self.attempts: dict[str, int] = {}  # slot -> worker-group starts
        self.closed = False
        unknown = sorted({d for t in self.pending for d in self.deps.get(t, [])}
                         - set(self.pending) - self.done)
        if unknown:
            raise ValueError(f"tasks {self.pending} depend on {unknown}, which are neither "
                             f"queued nor done")

    def ready(self) -> list[int]:
        held = set(self.held.values())
        return ready_order([t for t in self.pending if t not in held], self.deps, self.done)

    def start(self, slot: str) -> int:
        """A slot's worker group starts (again): give back what it held; its attempt number."""
        self.held.pop(slot, None)
        self.attempts[slot] = self.attempts.get(slot, 0) + 1
        return self.attempts[slot]

    def claim(self, slot: str) -> int | None:
        """The task `slot` should learn next, or None: nothing ready now, the slot ends."""
        if slot in self.held:
            return self.held[slot]
        if self.closed:
            return None
        ready = self.ready()
        if not ready:
            return None
        self.held[slot] = ready[0]
        return ready[0]

    def complete(self, task: int) -> bool:
        """`task` is committed; True the first time."""
        task = int(task)
        for slot, t in list(self.held.items()):
            if t == task:
                del self.held[slot]
        if task in self.done:
            return False
        self.done.add(task)
        if task in self.pending:
            self.pending.remove(task)
        return True

    def release(self, slot: str) -> int | None:
        """`slot` has ended (or failed for good): its task, if any, is ready again."""
        return self.held.pop(slot, None)

    def close(self) -> None:
        """Hand out nothing more (the stream is stopping); slots end after their task."""
        self.closed = True

    def status(self) -> dict:
        return {"left": len(self.pending), "ready": 0 if self.closed else len(self.ready()),
                "holding": len(self.held), "closed": self.closed}
