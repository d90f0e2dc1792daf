"""`cldist bench [NAME]`: the benchmark suite behind docs/BENCHMARKS.md.

One module per group of benchmarks in this package; each registers its functions with
`@register` when imported (run_benchmarks imports them all).

Every benchmark measures a cldist path against a plain baseline side by side, in one process
and one run, and reports the ratio; the figures go to stdout (a markdown table) and to
`OUT/NAME.json`. All run on synthetic data (cldist.data.synthetic, or the JPEGs `loader`
draws) and timm's test ViT, so they need no download and take minutes on a 2-core machine:

- `scheduling`: a 10-task PEARL stream through the Ray runner - one job at a time (baseline)
  vs two independent jobs side by side vs packed jobs (`trainer.tasks_per_job`);
  also the share of task time spent in SVD rank allocation.
- `eval`: the full class-IL accuracy matrix of the first N = 10, 20, 50 tasks of a finished
  PEARL run - a naive loop (one process, one forward per (sub-network, test set) block) vs
  the sharded evaluator (Ray actors, sub-networks sharded, test sets batched per sub-network).
- `routing`: Class-IL scoring throughput (test images/s) of the first T = 10, 50, 100 tasks of
  a finished PEARL run - the ensemble (every sub-network on every image, the paper's protocol;
  baseline) vs routed (`Scorer.score_routed`: one reference forward, then only each image's
  top-2 sub-networks, images grouped by routed task), and network forwards per image.
- `svd`: one ViT-B-sized layer (768 x 768) - dense SVD (baseline) vs randomised SVD vs QR of
  rank-16 LoRA factors with an r x r SVD.
- `loader`: one task of photo-sized JPEGs through the papers' training transform
  (RandomResizedCrop(224) + flip): decoded in the training process (baseline) vs by
  `trainer.loader_workers` DataLoader processes.
- `stream100`: a 100-task stream through the Ray runner with packed jobs: wall time with Ray
  Train's default 2 s worker poll (baseline) vs cldist's 0.5 s (`trainer.poll_interval_s`),
  and per-task time along the stream (flat or not).
- `slots`: the 100-task stream and the default stream (fmnist_5t) with one Ray Train job per
  task (baseline) vs fixed packings (`trainer.tasks_per_job=N`) vs job slots
  (`trainer.tasks_per_job=auto`); wall time and the number of jobs started.
- `step` (step.py): one training step of a LoRA vit_tiny - a hand-written PyTorch loop
  (baseline) vs `fit` over the torch engine and over DeepSpeed ZeRO-0; ZeRO-0/2 with 2 workers
  beside a hand-written all-reduce loop.
- `layers` (layers.py): forward + backward of a LoRA Linear, a LoRA Conv2d and a test_vit step
  at 1, 10, 50, 100 branches - the per-branch loop (baseline) vs the batched layer.
- `gpu` (gpu.py, not in a bare `cldist bench`): the prepared GPU check - ViT-B/16 LoRA in bf16
  (images/s, MFU) beside a plain loop, a 3-task PEARL stream on the GPU, scoring throughput.

    cldist bench svd                  # seconds
    cldist bench step layers          # < 10 min on 2 cores
    cldist bench                      # all but gpu (slots, four 100-task streams, is the longest)
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import tempfile
from pathlib import Path
from typing import Callable

BENCHMARKS: dict[str, Callable[[Path], dict]] = {}
IN_SUITE: list[str] = []   # what `cldist bench` with no NAME runs (not the GPU check)


def register(fn: Callable[[Path], dict] | None = None, *, in_suite: bool = True):
    """`@register` or `@register(in_suite=False)`: benchmark `bench_NAME` becomes `cldist bench NAME`."""
    def add(fn: Callable[[Path], dict]) -> Callable[[Path], dict]:
        name = fn.__name__.removeprefix("bench_")
        BENCHMARKS[name] = fn
        if in_suite:
            IN_SUITE.append(name)
        return fn
    return add(fn) if fn is not None else add


def synthetic_stream_data(work: Path, n_tasks: int) -> Path:
    from ..data.build import build_dataset
    from ..data.synthetic import write_synthetic_tree
    data = work / f"data{n_tasks}"
    if not (data / "manifest.json").exists():
        tree = write_synthetic_tree(work / f"tree{n_tasks}", 2 * n_tasks, train_per_class=16,
                                    test_per_class=8, size=16)
        build_dataset("folder", data, root=tree, n_tasks=n_tasks, seed=0)
    return data


def run_stream_on(data: Path, run_dir: Path, *overrides: str) -> dict:
    from ..config.compose import compose
    from ..stream import run_stream
    cfg = compose(["scenario=digits_5t", f"scenario.manifest={data}", "backbone=test_vit",
                   f"run_dir={run_dir}", "method.epochs=3", "method.stage1_epochs=1",
                   "method.reference_epochs=5", "trainer.batch_size=16", "report=false",
                   *overrides])
    return run_stream(cfg)


def task_meta(run_dir: Path) -> dict:
    from ..rundir import RunDir
    return RunDir(run_dir).read_state()["task_meta"]


def _load_modules() -> None:
    """Import every module of this package, so each one's @register calls fill BENCHMARKS."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_benchmarks(names: list[str], out: Path) -> dict:
    from ..errors import UserError
    _load_modules()
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UserError(f"unknown benchmark(s) {unknown}; choose from {sorted(BENCHMARKS)}")
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory(prefix="cldist-bench-") as tmp:
        for name in names or IN_SUITE:
            result = BENCHMARKS[name](Path(tmp))
            results[name] = result
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
            print(f"\n## {name}\n" + json.dumps({k: v for k, v in result.items() if k != "rows"})
                  + "\n\n" + markdown_table(result["rows"]), flush=True)
    return results
