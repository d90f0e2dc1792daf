"""`cldist bench slots`: job slots (`trainer.tasks_per_job=auto`) against fixed packing.

Two PEARL streams through the Ray runner, each run with one Ray Train job per task (the
baseline), fixed packings (`trainer.tasks_per_job=N`) and job slots, side by side in one run
on one embedded cluster (started before the first timing):

- the 100-task synthetic stream of `stream100` (2 classes per task, test_vit, 1 stage-2
  epoch);
- the default stream (`scenario=fmnist_5t`, efficientnet_lite0, the default epochs), whose
  shards must exist in $CLDIST_DATA_DIR/fmnist_5t (or be buildable there); skipped, and said
  so, when they cannot be had.

With the default 2 job slots a fixed packing's jobs are spread evenly over the slots, so N at
or above ceil(independent tasks / 2) is one job per slot: the largest packing measured here.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import register, run_stream_on, synthetic_stream_data


def _jobs(run_dir: Path) -> int:
    return sum(1 for _ in (run_dir / "ray_train").iterdir())


def _measure(stream: str, variants: dict, run, rows: list) -> None:
    base = None
    for label, extra in variants.items():
        start = time.perf_counter()
        run_dir = run(len(rows), extra)
        wall = time.perf_counter() - start
        base = base or wall
        rows.append({"stream": stream, "variant": label, "overrides": " ".join(extra),
                     "ray_train_jobs": _jobs(run_dir), "wall_s": round(wall, 1),
                     "speedup": round(base / wall, 2)})


@register
def bench_slots(work: Path, n_tasks: int = 100, default_stream: bool = True) -> dict:
    """`n_tasks` synthetic tasks; `default_stream=False` leaves fmnist_5t out (a short check)."""
    from ..distributed.cluster import connect
    connect()  # the embedded cluster's start-up is nobody's wall time
    rows: list[dict] = []
    data = synthetic_stream_data(work, n_tasks)

    def synthetic(i: int, extra: tuple) -> Path:
        run_dir = work / f"slots-{i}"
        run_stream_on(data, run_dir, "runner=ray", "method.epochs=1",
                      "method.reference_epochs=2", *extra)
        return run_dir

    variants = {"one job per task (baseline)": ("trainer.tasks_per_job=1",)}
    per_slot = -(-(n_tasks - 1) // 2)  # PEARL's independent tasks over the 2 slots
    if n_tasks > 10:  # a long stream: also a packing between one job per task and per slot
        variants[f"{-(-per_slot // 2)} tasks per job (2 jobs per slot)"] = (
            f"trainer.tasks_per_job={-(-per_slot // 2)}",)
    variants[f"{per_slot} tasks per job (1 job per slot)"] = (f"trainer.tasks_per_job={per_slot}",)
    variants["job slots"] = ("trainer.tasks_per_job=auto",)
    _measure(f"PEARL, {n_tasks} synthetic tasks", variants, synthetic, rows)

    note = None if default_stream else "default stream not measured (default_stream=False)"
    from ..config.compose import compose
    from ..stream import ensure_scenario, run_stream
    try:
        if note is None:
            ensure_scenario(compose([]))  # built once, outside the timings
    except Exception as e:  # noqa: BLE001 - no Fashion-MNIST here: measure the rest
        note = f"default stream skipped: {type(e).__name__}: {e}"

    def default(i: int, extra: tuple) -> Path:
        run_dir = work / f"slots-{i}"
        run_stream(compose([f"run_dir={run_dir}", "report=false", *extra]))
        return run_dir

    if note is None:
        _measure("default (fmnist_5t, PEARL)", {
            "one job per task (baseline)": ("trainer.tasks_per_job=1",),
            "2 tasks per job (1 job per slot)": ("trainer.tasks_per_job=2",),
            "job slots": ("trainer.tasks_per_job=auto",),
        }, default, rows)
    out = {"streams": "PEARL through the Ray runner, 2 job slots (2 CPUs, 1 worker per job)",
           "rows": rows}
    for stream in dict.fromkeys(r["stream"] for r in rows):
        mine = [r for r in rows if r["stream"] == stream]
        auto = next(r for r in mine if r["variant"] == "job slots")
        fixed = min((r for r in mine if r["variant"] != "job slots"), key=lambda r: r["wall_s"])
        out.setdefault("slots_vs_best_other", {})[stream] = {
            "best_other": fixed["variant"], "ratio": round(fixed["wall_s"] / auto["wall_s"], 2)}
    if note:
        out["note"] = note
    return out
