"""`cldist bench gpu` (and launch/gpu-check.sh): the first check of cldist on a GPU.

One JSON, three parts, each a function that also runs on a CPU with tiny sizes (`--device cpu
--tiny`, which is how the tests run all of it):

- `train`: ViT-B/16 at 224 px (random initialisation: throughput needs no weights), LoRA
  rank 8 on q, k, v + a head, AdamW, bf16 autocast - `cldist.train.loop.fit` through the
  DeepSpeed engine (ZeRO-0, one process: the Ray runner's engine) beside a plain PyTorch loop
  on the same model, batches and optimiser (cldist/bench/step.py), repeats interleaved.
  Images/s, and MFU: the FLOPs of one step as torch.utils.flop_counter counts them (forward +
  backward: matmuls, convolutions, attention) per second, over the card's dense bf16 peak
  (`PEAK_BF16_TFLOPS`, matched on torch.cuda.get_device_name; an unknown card: mfu null and
  the reason).
- `stream`: a 3-task PEARL stream through the Ray runner with `trainer.use_gpu=true` (Ray Train
  workers, DeepSpeed on NCCL, evaluator actors on a GPU share) on synthetic images
  (cldist.data.synthetic; nothing to download), ViT-B/16 random init at 224 px.
- `scoring`: Class-IL scoring throughput (test images/s) on that run - the ensemble (every
  sub-network on every image) and routed (`Scorer.score_routed`: the reference forward, then
  each image's top-k sub-networks), on the GPU. When the stream part left no finished task 0
  (Ray or NCCL failed on the GPU), the same stream is learnt by the inline runner first, so the
  scoring figures come whatever happened to Ray (`run` in the JSON says which).

Each part runs under its own time budget (SIGALRM) and its own try/except: a part that fails
or runs out of time leaves its error string in the JSON and the next part still runs. The JSON
is rewritten after every part, so a check killed from outside keeps what it finished.

    launch/gpu-check.sh [OUT_DIR]                   # on the GPU machine, < 8 min on an H100
    python -m cldist.bench.gpu --out DIR            # the same, by hand
    python -m cldist.bench.gpu --out DIR --device cpu --tiny   # the logic, on a CPU, ~1 min
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Callable

import torch

from . import register

# Dense (no sparsity) bf16 tensor-core peak in TFLOPS, matched in order on a substring of
# torch.cuda.get_device_name() ("NVIDIA H100 80GB HBM3" is the SXM card, "NVIDIA H100 PCIe").
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),   # SXM (HBM3)
    ("H200", 989.0),
    ("A100", 312.0),
)

PARTS = ("train", "stream", "scoring")

SETTINGS: dict[str, dict[str, dict]] = {
    # an H100 in < 8 min even when every part runs out its budget (120 + 240 + 100 s, plus
    # start-up); expected ~1 + ~3 + ~0.5 min
    "full": {
        "train": {"model": "vit_base_patch16_224", "img_size": 224, "patch_size": 16, "rank": 8,
                  "batch": 128, "warmup": 5, "steps": 30, "repeats": 5, "budget_s": 120},
        "stream": {"backbone": "vit_b16", "backbone_name": "vit_base_patch16_224",
                   "image_size": 224, "n_tasks": 3, "train_per_class": 32,
                   "test_per_class": 128, "batch": 32, "epochs": 2, "budget_s": 240},
        "scoring": {"repeats": 3, "budget_s": 100},
    },
    # the same code on a CPU in about a minute (tests, a dry run of the logic)
    "tiny": {
        "train": {"model": "test_vit", "img_size": 16, "patch_size": 4, "rank": 2,
                  "batch": 4, "warmup": 1, "steps": 2, "repeats": 1, "budget_s": 120},
        "stream": {"backbone": "test_vit", "backbone_name": "test_vit", "image_size": 16,
                   "n_tasks": 3, "train_per_class": 8, "test_per_class": 4, "batch": 16,
                   "epochs": 1, "budget_s": 240,
                   # tasks 1 and 2 in one job: one Ray Train start-up less on a 2-core machine
                   "overrides": ["trainer.tasks_per_job=2"]},
        "scoring": {"repeats": 1, "budget_s": 180},
    },
}


class PartTimeout(BaseException):
    """A part ran past its budget (a BaseException: no library's `except Exception` eats it)."""


# ---------------------------------------------------------------- pieces (tested on a CPU)

def peak_bf16_flops(device_name: str | None) -> tuple[float | None, str | None]:
    """(peak dense bf16 FLOP/s, None) for a known card, else (None, the reason)."""
    if not device_name:
        return None, "not a CUDA device: no bf16 tensor-core peak to compare with"
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12, None
    return None, (f"no bf16 peak known for {device_name!r} (cldist.bench.gpu.PEAK_BF16_TFLOPS "
                  f"knows {', '.join(k for k, _ in PEAK_BF16_TFLOPS)})")


def mfu(flops_per_step: float, ms_per_step: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (None without a peak)."""
    if peak_flops is None or ms_per_step <= 0:
        return None
    return flops_per_step / (ms_per_step / 1e3) / peak_flops


def device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise PartTimeout in this thread after `seconds` (SIGALRM: main thread, POSIX only;
    elsewhere no limit)."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise PartTimeout(f"ran past its budget of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def guarded(fn: Callable[[], dict], budget_s: float | None) -> dict:
    """`fn()`'s figures with status "ok", or status "error" and the error string; always the
    part's seconds and budget."""
    start = time.perf_counter()
    try:
        with time_limit(budget_s):
            out = {"status": "ok", **fn()}
    except (Exception, PartTimeout) as e:  # noqa: BLE001 - one part's failure is its figure
        out = {"status": "error", "error": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(limit=8)[-4000:]}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["budget_s"] = budget_s
    return out


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- the parts

def part_train(work: Path, s: dict, device: torch.device, context: dict) -> dict:
    """fit + DeepSpeed ZeRO-0 vs a plain loop: ms/step, images/s, FLOPs/step, MFU."""
    from .step import (compare_steps, deepspeed_engine, fit_steps, flops_per_step, lora_vit,
                       memory_batches, paired_ratio, plain_steps)

    bf16 = device.type == "cuda"  # the DeepSpeed engine's autocast is on exactly on a GPU
    plain, cldist = "plain PyTorch loop", "cldist fit + DeepSpeed ZeRO-0"
    batches = memory_batches(s["warmup"] + s["steps"], s["batch"], s["img_size"],
                             pin=device.type == "cuda")
    models = {label: lora_vit(s["model"], s["img_size"], s["patch_size"], s["rank"])
              for label in (plain, cldist)}
    flops = flops_per_step(models[plain][0], batches[0], device, bf16)
    variants = {
        plain: lambda clock: plain_steps(*models[plain], batches, device, clock, bf16=bf16),
        cldist: lambda clock: fit_steps(*models[cldist], batches, device, clock,
                                        deepspeed_engine(0, s["batch"])),
    }
    # the budget's last third is the margin for a repeat started just before it ran out
    wall, _ = compare_steps(variants, s["repeats"], s["warmup"], s["steps"], device,
                            budget_s=s["budget_s"] * 2 / 3)
    peak, reason = peak_bf16_flops(device_name(device))
    rows = {}
    for label, ms in wall.items():
        median = statistics.median(ms)
        m = mfu(flops, median, peak)
        rows[label] = {"ms_per_step": round(median, 2),
                       "ms_per_step_repeats": [round(x, 2) for x in ms],
                       "images_per_s": round(s["batch"] * 1e3 / median, 1),
                       "mfu": None if m is None else round(m, 4)}
    models.clear()  # free the GPU memory before the next part
    _free(device)
    return {"model": f"{s['model']} at {s['img_size']} px, random init, LoRA rank {s['rank']} "
                     f"on q/k/v + head",
            "batch": s["batch"], "precision": "bf16 autocast" if bf16 else "fp32",
            "steps": s["steps"], "warmup": s["warmup"], "repeats": len(wall[plain]),
            "flops_per_step": flops, "flops_counter": "torch.utils.flop_counter (fwd + bwd)",
            "peak_flops": peak, "mfu_null_reason": reason,
            "ratio": round(paired_ratio(wall, cldist, plain), 3),
            "variants": rows}


def stream_data(work: Path, s: dict) -> Path:
    """Synthetic class images (cldist.data.synthetic, as `synthetic_stream_data` draws them),
    2 classes a task, built into shards once."""
    from ..data.build import build_dataset
    from ..data.synthetic import write_synthetic_tree

    data = work / f"gpu-data-{s['n_tasks']}-{s['train_per_class']}-{s['test_per_class']}"
    if not (data / "manifest.json").exists():
        tree = write_synthetic_tree(work / f"gpu-tree-{uuid.uuid4().hex[:6]}", 2 * s["n_tasks"],
                                    train_per_class=s["train_per_class"],
                                    test_per_class=s["test_per_class"], size=32)
        build_dataset("folder", data, root=tree, n_tasks=s["n_tasks"], seed=0)
    return data


def stream_overrides(data: Path, run_dir: Path, s: dict, use_gpu: bool) -> list[str]:
    return ["scenario=digits_5t", f"scenario.manifest={data}",
            f"scenario.image_size={s['image_size']}", f"backbone={s['backbone']}",
            f"backbone.name={s['backbone_name']}", "backbone.pretrained=false",
            "method=pearl", f"method.epochs={s['epochs']}", "method.stage1_epochs=1",
            f"method.reference_epochs={s['epochs']}", f"trainer.batch_size={s['batch']}",
            "runner=ray", f"trainer.use_gpu={str(use_gpu).lower()}", f"run_dir={run_dir}",
            "report=false", *s.get("overrides", ())]


def part_stream(work: Path, s: dict, device: torch.device, context: dict) -> dict:
    """A 3-task PEARL stream through the Ray runner, on the GPU when there is one."""
    from ..config.compose import compose
    from ..distributed.bench_cluster import transient_cluster
    from ..stream import run_stream

    data = stream_data(work, s)
    run_dir = work / f"gpu-stream-{uuid.uuid4().hex[:6]}"
    overrides = stream_overrides(data, run_dir, s, device.type == "cuda")
    context["stream"] = {"run_dir": run_dir, "overrides": overrides}
    start = time.perf_counter()
    with transient_cluster():
        metrics = run_stream(compose(overrides))
    return {"run_dir": str(run_dir), "overrides": overrides,
            "wall_s": round(time.perf_counter() - start, 1), "n_tasks": metrics["n_tasks"],
            "acc": metrics["acc"], "kernels": metrics["kernels"],
            "train_s_per_task": [None if x is None else round(x, 1)
                                 for x in metrics["train_seconds_per_task"]]}


def scorable_tasks(run_dir: Path | None) -> list[int]:
    """Tasks 0..t of a run that are all finished (routing after task t needs each of them)."""
    state_file = run_dir / "state.json" if run_dir else None
    if state_file is None or not state_file.exists():
        return []
    done = {int(t) for t in json.loads(state_file.read_text()).get("completed_tasks", [])}
    tasks: list[int] = []
    while len(tasks) in done:
        tasks.append(len(tasks))
    return tasks


def part_scoring(work: Path, s: dict, device: torch.device, context: dict) -> dict:
    """Ensemble vs routed Class-IL scoring throughput on the stream's run - or, when the stream
    part left no finished task 0 (Ray on the GPU failed), on the same stream learnt by the
    inline runner, so scoring is measured whatever happened to Ray."""
    from ..config.compose import compose
    from ..assemble import make_scorer
    from ..eval.scoring import row_from_blocks
    from ..stream import run_stream
    from .step import synchronize

    stream = context.get("stream")
    run_dir = Path(stream["run_dir"]) if stream else None
    tasks, source = scorable_tasks(run_dir), "the stream part's run (Ray runner)"
    if not tasks:
        stream_s = context["settings"]["stream"]
        run_dir = work / f"gpu-scoring-inline-{uuid.uuid4().hex[:6]}"
        overrides = [o for o in stream_overrides(stream_data(work, stream_s), run_dir,
                                                 stream_s, device.type == "cuda")
                     if o != "runner=ray"] + ["runner=inline"]
        run_stream(compose(overrides))
        stream = {"run_dir": run_dir, "overrides": overrides}
        tasks, source = scorable_tasks(run_dir), ("an inline run of the same stream (the "
                                                  "stream part left no finished task 0)")
    cfg = compose(stream["overrides"])
    top_k, combine, shrinkage = cfg.eval.top_k, cfg.eval.combine, cfg.router.shrinkage
    scorer = make_scorer(cfg, run_dir, device=str(device))
    scorer.load_tasks(tasks)
    scorer.task_statistics(tasks)
    for j in tasks:
        scorer.test_set(j)  # decoding is not what is measured: both paths cache it
    n = len(tasks)
    images = sum(len(scorer.test_labels(j)) for j in tasks)
    scorer.score_routed(n - 1, tasks, top_k, combine, shrinkage)  # warm both paths
    scorer.score_blocks([(0, 0)])
    ensemble_s, routed_s, forwards = [], [], None
    for _ in range(s["repeats"]):
        start = time.perf_counter()
        blocks = {(b.subnet, b.test): b
                  for b in scorer.score_blocks([(i, j) for i in tasks for j in tasks])}
        row_from_blocks(n - 1, blocks, {j: scorer.test_labels(j) for j in tasks})
        synchronize(device)
        ensemble_s.append(time.perf_counter() - start)
        scorer.forget_features()  # the reference forward is part of routed scoring
        start = time.perf_counter()
        routed = scorer.score_routed(n - 1, tasks, top_k, combine, shrinkage)
        synchronize(device)
        routed_s.append(time.perf_counter() - start)
        forwards = routed.forwards_per_image
    ens, rou = statistics.median(ensemble_s), statistics.median(routed_s)
    return {"run": source, "run_dir": str(run_dir), "tasks": n, "test_images": images,
            "eval_batch_size": cfg.trainer.eval_batch_size,
            "routed": f"score_routed, top_k={top_k}, combine={combine}",
            "ensemble_images_per_s": round(images / ens, 1),
            "routed_images_per_s": round(images / rou, 1),
            "forwards_per_image_ensemble": n,
            "forwards_per_image_routed": round(forwards, 2), "repeats": len(ensemble_s)}


PART_FUNCTIONS: dict[str, Callable[[Path, dict, torch.device, dict], dict]] = {
    "train": part_train, "stream": part_stream, "scoring": part_scoring}


# ---------------------------------------------------------------- the check

def summary_rows(parts: dict) -> list[dict]:
    """One line per part for the markdown table: its status and headline figure."""
    rows = []
    for name, p in parts.items():
        try:
            figure = _headline(name, p)
        except (KeyError, TypeError):  # a part that returned other figures: show them
            figure = json.dumps({k: v for k, v in p.items()
                                 if k not in ("status", "seconds", "budget_s", "traceback")},
                                default=str)[:300]
        rows.append({"part": name, "status": p.get("status"), "seconds": p.get("seconds"),
                     "figure": figure})
    return rows


def _headline(name: str, p: dict) -> str:
    if p.get("status") != "ok":
        return str(p.get("error", p.get("status")))
    if name == "train":
        return "; ".join(f"{label}: {r['images_per_s']} img/s, MFU {r['mfu']}"
                         for label, r in p["variants"].items()) + f"; ratio {p['ratio']}"
    if name == "stream":
        return f"{p['n_tasks']} tasks in {p['wall_s']} s, acc {p['acc']}"
    return (f"ensemble {p['ensemble_images_per_s']} img/s, routed "
            f"{p['routed_images_per_s']} img/s")


def write_json(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def resolve_device(device: str | None, tiny: bool) -> torch.device:
    from ..errors import UserError

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA device here")
    if dev.type == "cpu" and not tiny:
        raise UserError("the GPU check found no CUDA device; run it on a GPU machine, or "
                        "dry-run its logic on this CPU with tiny sizes: python -m "
                        "cldist.bench.gpu --device cpu --tiny (launch/gpu-check.sh DIR -- "
                        "--device cpu --tiny)")
    return dev


def run_gpu_check(work: Path, out_json: Path | None = None, device: str | None = None,
                  tiny: bool = False, parts: tuple[str, ...] = PARTS) -> dict:
    """Run `parts` in order; the result (also written to `out_json` after every part)."""
    from ..errors import UserError

    unknown = [p for p in parts if p not in PART_FUNCTIONS]
    if unknown:
        raise UserError(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    dev = resolve_device(device, tiny)
    settings = SETTINGS["tiny" if tiny else "full"]
    start = time.perf_counter()
    result = {"check": "cldist GPU check", "device": str(dev), "device_name": device_name(dev),
              "tiny": tiny, "torch": torch.__version__, "cuda": torch.version.cuda,
              "host": platform.node(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "parts": {}}
    context: dict = {"settings": settings}
    for name in parts:
        s = settings[name]
        result["parts"][name] = {"status": "running"}
        if out_json is not None:
            write_json(out_json, result)
        result["parts"][name] = guarded(
            lambda: PART_FUNCTIONS[name](work, s, dev, context), s["budget_s"])
        print(f"gpu check: {name}: {result['parts'][name]['status']} "
              f"({result['parts'][name]['seconds']} s)", flush=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["rows"] = summary_rows(result["parts"])
        if out_json is not None:
            write_json(out_json, result)
    return result


@register(in_suite=False)
def bench_gpu(work: Path) -> dict:
    """`cldist bench gpu`: the full check on this machine's GPU (refuses without one)."""
    return run_gpu_check(work)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cldist.bench.gpu",
        description="cldist's GPU check: training throughput and MFU, a Ray stream on the "
                    "GPU, scoring throughput; one JSON")
    parser.add_argument("--out", default="runs/gpu-check", help="directory for gpu.json")
    parser.add_argument("--device", default=None,
                        help="cuda (default when there is one) or cpu (needs --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny sizes (test_vit): the whole logic in about a minute on a CPU")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--work", default=None,
                        help="scratch directory (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    from ..errors import UserError

    out_json = Path(args.out) / "gpu.json"
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    try:
        with contextlib.ExitStack() as stack:
            work = Path(args.work) if args.work else Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="cldist-gpu-check-")))
            result = run_gpu_check(work, out_json, args.device, args.tiny, parts)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n" + json.dumps(result["rows"], indent=1))
    print(f"gpu check JSON: {out_json.resolve()}")
    failed = [n for n, p in result["parts"].items() if p.get("status") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
