"""`cldist bench layers`: a LoRA layer's cost as its number of branches grows, before and after
batching (issue 21 item 2; `cldist.models.lora.BATCH_BRANCHES`).

A stream's single-network methods keep one branch per task (InfLoRA, SD-LoRA's directions), so
task t trains the newest branch with t frozen ones beside it. Here n = 1, 10, 50, 100 branches
of rank 8: n - 1 frozen, the newest trainable. Timed, forward + backward (+ AdamW step):

- `layer linear`: one LoRALinear 192 -> 192 (vit_tiny's q) on 8 x 64 tokens;
- `layer conv`: one LoRAConv2d 64 -> 64, 3 x 3, on 8 x 64 x 16 x 16;
- `test_vit step`: timm's test ViT at 16 px (`backbone=test_vit`), LoRA on every block's q, k,
  v, batch 32, one head: forward, cross-entropy, backward, AdamW step;
- `test_vit step, coefficients`: the same with every frozen branch multiplied by its own
  trainable scalar (SD-LoRA's magnitudes, one nn.Parameter per task), handed to each layer as
  ONE vector (`set_coefficients`: the n - 1 scalars concatenated once per forward and shared by
  the layers, as SD-LoRA's `boundary: continuous`): after, one gather and one multiply per layer;
  before, the per-branch loop (the vector evaluated once per forward, one index and one scalar
  multiply per branch).

"before" is the per-branch loop (`BATCH_BRANCHES = False`), "after" the batched layers; each
repeat times both back to back on the same model (so drift on a shared machine hits both
alike) and the figure is the median over repeats. One thread (torch.set_num_threads(1)), as
the other CPU benchmarks' timings. `ratio_100_vs_1`: the test_vit step at 100 branches over
1 branch, after (the issue's goal: <= 1.2).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import register

BRANCHES = (1, 10, 50, 100)
RANK = 8
REPEATS, SLOT_S = 7, 0.3
QKV = ("blocks.*.attn.qkv.q", "blocks.*.attn.qkv.k", "blocks.*.attn.qkv.v")


def add_branches(layers, n: int, coefficients: list | None = None) -> list[nn.Parameter]:
    """n rank-RANK branches on every layer (random A and B, so each one matters), all frozen but
    the newest; with `coefficients` (a list to fill), every frozen branch of every layer is
    multiplied by its task's trainable scalar, all of a layer's through one vector callable
    (`set_coefficients`). Returns the trainable tensors."""
    g = torch.Generator().manual_seed(0)
    names = [f"t{i:03d}" for i in range(n)]
    trainable = []
    if coefficients is not None:
        coefficients += [nn.Parameter(torch.ones(1)) for _ in names[:-1]]
    vector = _coefficients(coefficients) if coefficients else None  # one for every layer
    for layer in layers:
        for i, name in enumerate(names):
            layer.add_adapter(name, RANK, generator=g)
            newest = i == n - 1
            with torch.no_grad():
                layer.lora_B[name].normal_(0.0, 0.02, generator=g)
            for p in (layer.lora_A[name], layer.lora_B[name]):
                p.requires_grad_(newest)
            if newest:
                trainable += [layer.lora_A[name], layer.lora_B[name]]
        if vector is not None:
            layer.set_coefficients(names[:-1], vector)
        layer.active = tuple(names)
    return trainable + list(coefficients or [])


def _coefficients(alphas: list[nn.Parameter]) -> Callable[[], torch.Tensor]:
    """c = [alpha_i]: SD-LoRA's coefficients of the frozen directions with boundary
    `continuous`: the per-task scalars concatenated once per forward (SD-LoRA's
    MagnitudeVector, shared by every layer)."""
    from ..methods.sdlora import MagnitudeVector
    shared, keys = MagnitudeVector(), tuple(range(len(alphas)))
    params = dict(enumerate(alphas))
    return lambda: shared.vector(keys, params)


def layer_case(kind: str, n: int) -> Callable[[], None]:
    """One forward + backward of a LoRA layer with n branches (input gradient included)."""
    from ..models.lora import LoRAConv2d, LoRALinear
    torch.manual_seed(0)
    if kind == "linear":
        layer = LoRALinear(nn.Linear(192, 192))
        x = torch.randn(8, 64, 192)
    else:
        layer = LoRAConv2d(nn.Conv2d(64, 64, 3, padding=1))
        x = torch.randn(8, 64, 16, 16)
    layer.base.requires_grad_(False)
    add_branches([layer], n)
    x.requires_grad_(True)

    def step():
        layer(x).square().mean().backward()
        x.grad = None
        for p in layer.parameters():
            p.grad = None
    return step


def vit_case(n: int, coefficients: bool = False) -> Callable[[], None]:
    """One training step of test_vit (LoRA on q, k, v) with n branches per layer."""
    from ..methods.common import adapter_model
    from ..models.backbone import BackboneSpec, build_backbone
    from ..models.inject import split_fused_qkv
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec(name="test_vit", img_size=16, patch_size=4))
    split_fused_qkv(backbone)
    model = adapter_model(backbone, int(backbone.num_features), QKV, None)
    params = add_branches(model.lora_layers().values(), n, [] if coefficients else None)
    g = torch.Generator().manual_seed(0)
    head = model.add_head("t", 10, g)
    model.activate(list(next(iter(model.lora_layers().values())).active), ["t"])
    params += list(head.parameters())
    for p in head.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_round_robin(steps: dict[int, Callable[[], None]], repeats: int
                     ) -> dict[int, tuple[float, float]]:
    """Median ms per call of each step with the per-branch loop and with batching. Every repeat
    times every (n, before/after) back to back, so drift on a shared machine hits all alike;
    each timing runs the step enough times to last about SLOT_S (a millisecond step timed
    once is mostly noise)."""
    from ..models import lora
    times: dict[tuple[int, bool], list[float]] = {}
    calls: dict[tuple[int, bool], int] = {}
    try:
        for n, step in steps.items():
            for batched in (False, True):  # warm-up: caches built, allocator primed
                lora.BATCH_BRANCHES = batched
                step()
                start = time.perf_counter()
                step()
                calls[n, batched] = max(1, min(50, round(SLOT_S / (time.perf_counter() - start))))
        for _ in range(repeats):
            for n, step in steps.items():
                for batched in (False, True):
                    lora.BATCH_BRANCHES = batched
                    k = calls[n, batched]
                    start = time.perf_counter()
                    for _ in range(k):
                        step()
                    times.setdefault((n, batched), []).append((time.perf_counter() - start) / k * 1e3)
    finally:
        lora.BATCH_BRANCHES = True
    return {n: (statistics.median(times[n, False]), statistics.median(times[n, True]))
            for n in steps}


@register
def bench_layers(work: Path) -> dict:
    cases: dict[str, Callable[[int], Callable[[], None]]] = {
        "layer linear 192x192, 512 tokens": lambda n: layer_case("linear", n),
        "layer conv 64x64 3x3, 8x16x16": lambda n: layer_case("conv", n),
        "test_vit step (16 px, batch 32)": lambda n: vit_case(n),
        "test_vit step, coefficients": lambda n: vit_case(n, coefficients=True),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for what, make in cases.items():
            timed = time_round_robin({n: make(n) for n in BRANCHES}, REPEATS)
            base = timed[BRANCHES[0]]
            for n, (before, after) in timed.items():
                rows.append({"case": what, "branches": n, "before_ms": round(before, 2),
                             "after_ms": round(after, 2),
                             "before_vs_1": round(before / base[0], 2),
                             "after_vs_1": round(after / base[1], 2),
                             "speedup": round(before / after, 2)})
    finally:
        torch.set_num_threads(threads)
    step = {r["branches"]: r for r in rows if r["case"].startswith("test_vit step (")}
    return {"machine": "CPU, torch.set_num_threads(1)", "rank": RANK,
            "ratio_100_vs_1": step[100]["after_vs_1"],
            "ratio_100_vs_1_before": step[100]["before_vs_1"], "rows": rows}
