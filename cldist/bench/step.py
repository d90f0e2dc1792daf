"""`cldist bench step`: cldist's training step against a hand-written PyTorch loop.

The same LoRA-wrapped timm ViT (LoRA on q, k, v; one head; everything else frozen), the same
batches (in memory), the same optimiser (torch AdamW + cosine schedule) and loss, trained

- by a plain loop: forward, cross-entropy, backward, AdamW step, schedule step, zero_grad;
- by `cldist.train.loop.fit` - the loop both runners run, with its NaN check and per-epoch
  progress - over `TorchStepEngine` (the inline runner's) and over `DeepSpeedStepEngine`
  at ZeRO-0 (the Ray runner's engine with one worker).

Repeats are interleaved (plain, fit + torch, fit + DeepSpeed, plain, ...) so that drift on a
shared machine hits every variant alike; each run times `STEPS` steps after `WARMUP` steps
(engine start-up excluded). The ratio is the median over repeats of cldist (DeepSpeed, ZeRO-0)
/ plain in the same repeat.

Beside it, a Ray Train job of 2 workers (1 thread each, half the batch each, so the same
global batch) times a plain local loop (no communication), a hand-written data-parallel loop
(one flat all-reduce of the LoRA gradients per step), and `fit` over DeepSpeed at ZeRO-0 and
ZeRO-2: the per-step overhead of ZeRO-2 is its time minus the hand-written loop's.

The pieces (`lora_vit`, `memory_batches`, `plain_steps`, `fit_steps`, `compare_steps`,
`flops_per_step`) are reused by the GPU check (cldist/bench/gpu.py) with ViT-B/16 in bf16.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from . import register

QKV = ("blocks.*.attn.qkv.q", "blocks.*.attn.qkv.k", "blocks.*.attn.qkv.v")
ADAPTER = "t000"
LR, WEIGHT_DECAY = 1e-3, 0.0

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
OnStep = Callable[[int], None]


# ---------------------------------------------------------------- the model and the data

def lora_vit(name: str, img_size: int | None, patch_size: int | None, rank: int = 8,
             n_classes: int = 10, seed: int = 0) -> tuple[nn.Module, list[nn.Parameter]]:
    """A randomly initialised timm ViT with cldist's LoRA on q, k, v (rank `rank`) and one head
    of `n_classes`, as the adapter methods build it; returns (model, trainable parameters)."""
    from ..methods.base import trainable
    from ..methods.common import adapter_model
    from ..models.backbone import BackboneSpec, build_backbone
    from ..models.continual import freeze
    from ..models.inject import split_fused_qkv

    torch.manual_seed(seed)
    backbone = build_backbone(BackboneSpec(name=name, pretrained=False, img_size=img_size,
                                           patch_size=patch_size))
    split_fused_qkv(backbone)
    model = adapter_model(backbone, int(backbone.num_features), QKV, None)
    g = torch.Generator().manual_seed(seed)
    layers = model.lora_layers().values()
    for layer in layers:
        layer.add_adapter(ADAPTER, rank, generator=g)
    head = model.add_head(ADAPTER, n_classes, g)
    model.activate([ADAPTER], [ADAPTER])
    freeze(model)
    params = trainable([p for layer in layers
                        for p in (layer.lora_A[ADAPTER], layer.lora_B[ADAPTER])]
                       + list(head.parameters()))
    return model, params


def memory_batches(n: int, batch_size: int, img_size: int, n_classes: int = 10, seed: int = 0,
                   pin: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`n` random (images, labels) batches held in memory (pinned for a GPU's copies)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, img_size, img_size, generator=g)
        y = torch.randint(0, n_classes, (batch_size,), generator=g)
        out.append((x.pin_memory(), y.pin_memory()) if pin else (x, y))
    return out


# ---------------------------------------------------------------- the two loops

def plain_steps(model: nn.Module, params: list[nn.Parameter], batches: Batches,
                device: torch.device, on_step: OnStep, bf16: bool = False,
                all_reduce: Callable[[list[torch.Tensor]], None] | None = None) -> None:
    """The hand-written loop: what a user writes around the same model and optimiser.
    `all_reduce` (a data-parallel loop's gradient averaging) runs between backward and step."""
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, len(batches)))
    model.to(device).train()
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float(), y)
        loss.backward()
        if all_reduce is not None:
            all_reduce([p.grad for p in params])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        on_step(i)
    model.eval()


def fit_steps(model: nn.Module, params: list[nn.Parameter], batches: Batches,
              device: torch.device, on_step: OnStep, make_engine: Callable) -> dict:
    """The same steps through `cldist.train.loop.fit` (NaN check and progress included)."""
    from ..methods.base import FitRequest
    from ..train import loop

    request = FitRequest("bench", params, 1, LR, nn.functional.cross_entropy,
                         weight_decay=WEIGHT_DECAY, optimizer="adamw",
                         after_step=lambda step, total: on_step(step))
    return loop.fit(model.to(device), request, lambda epoch: iter(batches), len(batches),
                    make_engine, device, on_epoch=lambda *args: None, task_id=0)


def torch_engine(module, params, lr, weight_decay, total_steps, optimizer="adamw"):
    from ..train.engine import TorchStepEngine
    return TorchStepEngine(module, params, lr, weight_decay, total_steps, optimizer)


def deepspeed_engine(zero_stage: int, micro_batch_size: int) -> Callable:
    """A `make_engine` for `fit`: the Ray runner's DeepSpeed engine (bf16 exactly on a GPU)."""
    def make(module, params, lr, weight_decay, total_steps, optimizer="adamw"):
        from ..distributed.deepspeed_engine import DeepSpeedStepEngine
        return DeepSpeedStepEngine(module, params, lr, weight_decay, total_steps,
                                   zero_stage=zero_stage, micro_batch_size=micro_batch_size,
                                   optimizer=optimizer)
    return make


# ---------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """`on_step` for a run of `warmup + steps` steps: the wall and CPU time after each step, the
    device synchronised only after the last warm-up step and after the last step (a sync in
    between would be a cost the loops do not have). On a shared CPU machine the process's CPU
    time is the steadier measure: other jobs stretch wall time, not the work a step does."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.times: list[tuple[float, float]] = []

    def __call__(self, step: int) -> None:
        if step in (self.warmup - 1, self.warmup + self.steps - 1):
            synchronize(self.device)
        self.times.append((time.perf_counter(), time.process_time()))

    def ms_per_step(self, which: int = 0) -> float:
        """Wall (`which` 0) or this process's CPU (1) ms per timed step."""
        if len(self.times) != self.warmup + self.steps:
            raise RuntimeError(f"StepClock: {len(self.times)} steps timed, expected "
                               f"{self.warmup + self.steps}")
        start = self.times[self.warmup - 1] if self.warmup else self.times[0]
        timed = self.steps if self.warmup else self.steps - 1
        return 1e3 * (self.times[-1][which] - start[which]) / max(1, timed)


def compare_steps(variants: dict[str, Callable[[OnStep], object]], repeats: int, warmup: int,
                  steps: int, device: torch.device,
                  budget_s: float | None = None, min_repeats: int = 1,
                  agree: Callable[[bool], bool] | None = None) -> tuple[dict, dict]:
    """(wall, CPU) ms/step of each variant, as {label: [ms per repeat]}; `run(on_step)` trains
    `warmup + steps` steps. Repeats are interleaved: variant 1, variant 2, ..., variant 1, ...
    Stops after a whole repeat once `budget_s` has passed, but not before `min_repeats`;
    with several ranks, `agree` (this rank's "stop" -> any rank's) makes it one decision."""
    start = time.perf_counter()
    times: dict[str, list[float]] = {label: [] for label in variants}
    cpu: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(repeats):
        for label, run in variants.items():
            clock = StepClock(warmup, steps, device)
            run(clock)
            times[label].append(clock.ms_per_step(0))
            cpu[label].append(clock.ms_per_step(1))
        done = len(times[next(iter(times))])
        stop = budget_s is not None and done >= min_repeats \
            and time.perf_counter() - start > budget_s
        if agree is not None:
            stop = agree(stop)
        if stop:
            break
    return times, cpu


def paired_ratio(times: dict[str, list[float]], label: str, base: str) -> float:
    """Median over repeats of `label`'s ms / `base`'s ms in the same repeat."""
    return statistics.median(a / b for a, b in zip(times[label], times[base]))


def flops_per_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   device: torch.device, bf16: bool = False) -> int:
    """FLOPs of one training step (forward + backward of the cross-entropy), as
    torch.utils.flop_counter counts them: matmuls and convolutions, the gradients the
    trainable set needs and nothing else; the optimiser's element-wise work is not counted."""
    from torch.utils.flop_counter import FlopCounterMode

    model.to(device).train()
    x, y = batch[0].to(device), batch[1].to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        nn.functional.cross_entropy(logits.float(), y).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- the benchmark

# budget_s: no further repeat starts after this many seconds (a loaded machine does fewer)
ONE_WORKER = {"model": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 16, "rank": 8,
              "batch": 32, "steps": 20, "warmup": 2, "repeats": 5, "threads": 1,
              "budget_s": 120}
TWO_WORKERS = {"repeats": 3, "steps": 10, "warmup": 2, "budget_s": 45}

PLAIN = "plain PyTorch loop (baseline)"
FIT_TORCH = "cldist fit + torch engine (inline runner)"
FIT_ZERO0 = "cldist fit + DeepSpeed ZeRO-0 (ray runner)"


def one_worker_rows(s: dict, device: torch.device = torch.device("cpu")
                    ) -> tuple[dict, dict, list]:
    """Plain loop vs fit + torch engine vs fit + DeepSpeed ZeRO-0 in this process:
    (wall ms, CPU ms, rows)."""
    n_classes = 10
    batches = memory_batches(s["warmup"] + s["steps"], s["batch"], s["img_size"], n_classes,
                             pin=device.type == "cuda")
    models = {label: lora_vit(s["model"], s["img_size"], s["patch_size"], s["rank"], n_classes)
              for label in (PLAIN, FIT_TORCH, FIT_ZERO0)}
    variants = {
        PLAIN: lambda clock: plain_steps(*models[PLAIN], batches, device, clock),
        FIT_TORCH: lambda clock: fit_steps(*models[FIT_TORCH], batches, device, clock,
                                           torch_engine),
        FIT_ZERO0: lambda clock: fit_steps(*models[FIT_ZERO0], batches, device, clock,
                                           deepspeed_engine(0, s["batch"])),
    }
    wall, cpu = compare_steps(variants, s["repeats"], s["warmup"], s["steps"], device,
                              s.get("budget_s"), min_repeats=min(3, s["repeats"]))
    return wall, cpu, step_rows(wall, cpu, PLAIN, workers=1)


def step_rows(wall: dict, cpu: dict, base: str, workers: int) -> list[dict]:
    """One row per variant: median wall and CPU ms/step, each repeat's, and the paired ratios."""
    return [{"variant": label, "workers": workers,
             "wall_ms_per_step": round(statistics.median(wall[label]), 1),
             "cpu_ms_per_step": round(statistics.median(cpu[label]), 1),
             "wall_vs_plain": round(paired_ratio(wall, label, base), 3),
             "cpu_vs_plain": round(paired_ratio(cpu, label, base), 3),
             "repeats": len(wall[label]),
             "wall_ms_repeats": " ".join(f"{m:.0f}" for m in wall[label])}
            for label in wall]


def _two_worker_fn(config: dict) -> None:
    """Ray Train worker: the 2-worker variants, interleaved; rank 0 reports ms/step."""
    import json

    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from ..distributed.train_job import report, worker_context

    s = config["settings"]
    torch.set_num_threads(int(s["threads"]))
    rank, world_size, device = worker_context()
    per_worker = s["batch"] // world_size
    batches = memory_batches(s["warmup"] + s["steps"], per_worker, s["img_size"],
                             seed=1 + rank)

    def all_reduce(grads: list[torch.Tensor]) -> None:  # one bucket, as DDP would
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= world_size
        for g, avg in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(avg)

    labels = ["plain loop, local (no communication)",
              "plain loop + gradient all-reduce (hand-written data parallel)",
              "cldist fit + DeepSpeed ZeRO-0", "cldist fit + DeepSpeed ZeRO-2"]
    models = {label: lora_vit(s["model"], s["img_size"], s["patch_size"], s["rank"])
              for label in labels}

    def synced(run):
        def go(clock):
            dist.barrier()  # the local loop never waits for the other rank by itself
            run(clock)
        return go

    variants = {
        labels[0]: synced(lambda c: plain_steps(*models[labels[0]], batches, device, c)),
        labels[1]: synced(lambda c: plain_steps(*models[labels[1]], batches, device, c,
                                                all_reduce=all_reduce)),
        labels[2]: synced(lambda c: fit_steps(*models[labels[2]], batches, device, c,
                                              deepspeed_engine(0, per_worker))),
        labels[3]: synced(lambda c: fit_steps(*models[labels[3]], batches, device, c,
                                              deepspeed_engine(2, per_worker))),
    }
    def any_rank(stop: bool) -> bool:  # every rank must run the same repeats (collectives)
        flag = torch.tensor([float(stop)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    wall, cpu = compare_steps(variants, s["repeats"], s["warmup"], s["steps"], device,
                              s.get("budget_s"), min_repeats=min(2, s["repeats"]),
                              agree=any_rank)
    report({"times_json": json.dumps({"wall": wall, "cpu": cpu}), "world_size": world_size})


def two_worker_rows(s: dict, storage: Path) -> tuple[list[dict], float]:
    """The 2-worker Ray Train job: plain local / hand-written all-reduce / ZeRO-0 / ZeRO-2."""
    import json

    from ..distributed.bench_cluster import transient_cluster
    from ..distributed.train_job import run_train_job

    with transient_cluster():  # the next benchmark must not share the CPUs with idle Ray
        result = run_train_job(_two_worker_fn, {"settings": s}, num_workers=2, use_gpu=False,
                               storage_path=str(storage), name="bench-step-2w")
    times = json.loads(result.metrics["times_json"])
    wall, cpu = times["wall"], times["cpu"]
    labels = list(wall)
    hand, zero2 = labels[1], labels[3]
    overhead = statistics.median(a - b for a, b in zip(wall[zero2], wall[hand]))
    return step_rows(wall, cpu, labels[0], workers=2), round(overhead, 1)


def run_step_bench(work: Path, one: dict = ONE_WORKER, two: dict | None = TWO_WORKERS) -> dict:
    """The benchmark with settings `one` (and `two` merged over them for the 2-worker job;
    None skips it)."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(one["threads"]))
    try:
        wall, cpu, rows = one_worker_rows(one)
    finally:
        torch.set_num_threads(threads_before)
    result = {
        "setup": (f"{one['model']} at {one['img_size']} px (patch {one['patch_size']}), batch "
                  f"{one['batch']}, LoRA rank {one['rank']} on q/k/v + head, AdamW, fp32, CPU, "
                  f"{one['threads']} thread(s) per process; {len(wall[PLAIN])} interleaved "
                  f"repeats of {one['steps']} steps after {one['warmup']} warm-up steps"),
        # CPU time: on a shared CPU machine other jobs stretch wall time, not a step's work
        "ratio": round(paired_ratio(cpu, FIT_ZERO0, PLAIN), 3),
        "ratio_measure": "median over repeats of cldist (fit + DeepSpeed ZeRO-0, 1 worker) / "
                         "plain loop, process CPU time per step",
        "ratio_wall": round(paired_ratio(wall, FIT_ZERO0, PLAIN), 3),
        "ratio_torch_engine": round(paired_ratio(cpu, FIT_TORCH, PLAIN), 3),
        "plain_ms_per_step": round(statistics.median(wall[PLAIN]), 1),
        "cldist_ms_per_step": round(statistics.median(wall[FIT_ZERO0]), 1),
        "goal": "ratio <= 1.05",
    }
    if two is not None:
        rows2, overhead = two_worker_rows({**one, **two}, work / "step-ray")
        rows += rows2
        result["zero2_two_workers_overhead_ms_per_step"] = overhead
        result["two_workers"] = (f"Ray Train job of 2 workers, batch {one['batch'] // 2} each "
                                 f"(same global batch), {rows2[0]['repeats']} interleaved repeats "
                                 f"of {two['steps']} steps; overhead = ZeRO-2 minus the "
                                 f"hand-written all-reduce loop, wall ms per step")
    result["rows"] = rows
    return result


@register
def bench_step(work: Path) -> dict:
    return run_step_bench(work)
