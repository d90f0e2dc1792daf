"""The first benchmarks of `cldist bench`: scheduling, eval, routing, svd, loader, stream100.

See cldist/bench/__init__.py for the list and docs/BENCHMARKS.md for the figures.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from . import register, run_stream_on, synthetic_stream_data, task_meta


@register
def bench_scheduling(work: Path) -> dict:
    data = synthetic_stream_data(work, 10)
    variants = {
        "1 job at a time (baseline)": ("trainer.max_concurrent_tasks=1",),
        "2 jobs side by side": ("trainer.max_concurrent_tasks=2",),
        "2 jobs side by side, every SVD a Ray task": ("trainer.max_concurrent_tasks=2",
                                                      "cluster.svd_inline_max_flops=0"),
        "2 jobs side by side, 3 tasks per job": ("trainer.max_concurrent_tasks=2",
                                                 "trainer.tasks_per_job=3"),
        "1 job, 2 data-parallel workers": ("trainer.max_concurrent_tasks=1",
                                           "trainer.num_workers=2"),
    }
    rows, base = [], None
    for label, extra in variants.items():
        run_dir = work / f"sched-{len(rows)}"
        start = time.perf_counter()
        run_stream_on(data, run_dir, "runner=ray", *extra)
        wall = time.perf_counter() - start
        base = base or wall
        meta = task_meta(run_dir)
        train = sum(m["train_seconds"] for m in meta.values())
        svd = sum(m.get("rank_allocation_seconds", 0.0) for m in meta.values())
        rows.append({"variant": label, "wall_s": round(wall, 1),
                     "speedup": round(base / wall, 2),
                     "svd_share_of_task_time": round(svd / train, 3) if train else None})
    return {"stream": "PEARL, 10 tasks x 2 synthetic classes, test_vit 16 px", "rows": rows}


@register
def bench_eval(work: Path) -> dict:
    from ..config.compose import compose
    from ..assemble import make_scorer
    from ..eval.scoring import row_from_blocks
    data = synthetic_stream_data(work, 50)
    run_dir = work / "eval-run"
    if not (run_dir / "metrics.json").exists():  # trained inline: the run is the input here
        run_stream_on(data, run_dir, "runner=inline", "method.epochs=1", "method.reference_epochs=2")
    cfg = compose(["scenario=digits_5t", f"scenario.manifest={data}", "backbone=test_vit",
                   f"run_dir={run_dir}", "report=false", "cluster.eval_actors=2"])
    from ..distributed.runner import RayRunner
    ray_runner = RayRunner(cfg, run_dir)
    rows = []
    try:
        for n in (10, 20, 50):
            pairs = [(i, j) for i in range(n) for j in range(n)]
            naive = make_scorer(cfg, run_dir)
            naive.load_tasks(range(n))
            for j in range(n):
                naive.test_set(j)  # decoding is not what is compared: both cache it
            start = time.perf_counter()
            blocks = {}
            for i, j in pairs:  # the naive loop: one block, one forward
                blocks.update({(b.subnet, b.test): b for b in naive.score_blocks([(i, j)])})
            naive_s = time.perf_counter() - start
            ray_runner.score_blocks(pairs)  # warm: actors built, test sets decoded
            start = time.perf_counter()
            sharded = {(b.subnet, b.test): b for b in ray_runner.score_blocks(pairs)}
            sharded_s = time.perf_counter() - start
            labels = {j: naive.test_labels(j) for j in range(n)}
            assert row_from_blocks(n - 1, blocks, labels) == row_from_blocks(n - 1, sharded, labels)
            rows.append({"tasks": n, "blocks": len(pairs), "naive_s": round(naive_s, 2),
                         "sharded_s": round(sharded_s, 2),
                         "speedup": round(naive_s / sharded_s, 2)})
    finally:
        ray_runner.close()
    return {"run": "PEARL, 50 tasks x 2 synthetic classes (8 test images each), test_vit",
            "evaluator_actors": 2, "rows": rows}


@register
def bench_routing(work: Path) -> dict:
    from ..config.compose import compose
    from ..assemble import make_scorer
    from ..eval.scoring import fit_router, routed_row_from_blocks, row_from_blocks
    torch.set_num_threads(1)
    data = synthetic_stream_data(work, 100)
    run_dir = work / "routing-run"
    if not (run_dir / "metrics.json").exists():  # trained inline: the run is the input here
        run_stream_on(data, run_dir, "runner=inline", "method.epochs=1", "method.reference_epochs=2")
    cfg = compose(["scenario=digits_5t", f"scenario.manifest={data}", "backbone=test_vit",
                   f"run_dir={run_dir}", "report=false"])
    top_k, combine, shrinkage = 2, "posterior_head", cfg.router.shrinkage
    scorer = make_scorer(cfg, run_dir)
    scorer.load_tasks(range(100))
    scorer.task_statistics(range(100))  # the router's state, held like the sub-networks
    for j in range(100):
        scorer.test_set(j)  # decoding is not what is compared: both cache it
    scorer.score_routed(9, range(10), top_k, combine, shrinkage)  # warm both paths
    scorer.score_blocks([(0, 0), (1, 1)])
    rows = []
    for n in (10, 50, 100):
        tests = list(range(n))
        images = sum(len(scorer.test_labels(j)) for j in tests)
        start = time.perf_counter()  # the paper's protocol: every sub-network on every image
        blocks = {(b.subnet, b.test): b
                  for b in scorer.score_blocks([(i, j) for i in tests for j in tests])}
        labels = {j: scorer.test_labels(j) for j in tests}
        ensemble_row = row_from_blocks(n - 1, blocks, labels)
        ensemble_s = time.perf_counter() - start
        scorer.forget_features()  # the reference forward is part of routed scoring
        start = time.perf_counter()
        routed = scorer.score_routed(n - 1, tests, top_k, combine, shrinkage)
        routed_s = time.perf_counter() - start
        # the same decision as the one the stream derives from the blocks
        lda = fit_router([scorer.task_statistics([t])[t] for t in tests], shrinkage, 2 * n)
        assert routed.row == routed_row_from_blocks(
            n - 1, blocks, labels, scorer.reference_features(tests), lda, [2] * n, top_k,
            combine).row
        assert len(ensemble_row) == n
        rows.append({"tasks": n, "test_images": images,
                     "ensemble_images_per_s": round(images / ensemble_s, 1),
                     "routed_images_per_s": round(images / routed_s, 1),
                     "speedup": round(ensemble_s / routed_s, 1),
                     "forwards_per_image_ensemble": n,
                     "forwards_per_image_routed": round(routed.forwards_per_image, 2)})
    return {"run": "PEARL, 100 tasks x 2 synthetic classes (8 test images each), test_vit, "
                   "1 thread; the first T tasks' sub-networks and test sets",
            "routed": f"score_routed, top_k={top_k}, combine={combine}", "rows": rows}


@register
def bench_svd(work: Path) -> dict:
    from ..coordinator.ranks import lora_product_svd
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    B, A = torch.randn(768, 16, generator=g), torch.randn(16, 768, generator=g)
    dense = (B @ A + 1e-3 * torch.randn(768, 768, generator=g)).double()

    def timed(fn, repeat=5):
        fn()
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    base = timed(lambda: torch.linalg.svd(dense, full_matrices=False))
    low = timed(lambda: torch.svd_lowrank(dense, q=40, niter=4))
    qr = timed(lambda: lora_product_svd(B, A))
    rows = [{"method": "dense SVD (baseline)", "ms": round(1e3 * base, 2), "speedup": 1.0},
            {"method": "randomised SVD, q=40", "ms": round(1e3 * low, 2),
             "speedup": round(base / low, 1)},
            {"method": "QR of rank-16 factors + 16x16 SVD", "ms": round(1e3 * qr, 3),
             "speedup": round(base / qr, 1)}]
    return {"layer": "768 x 768 (ViT-B attention projection), float64, 1 thread", "rows": rows}


@register
def bench_loader(work: Path) -> dict:
    import numpy as np
    from PIL import Image

    from ..data.build import build_dataset
    from ..data import TaskReader, make_transform
    data = work / "photos"
    if not (data / "manifest.json").exists():
        # 2 classes x 192 JPEGs of 400 x 300 px (ImageNet-R's images are of this order), stored
        # as their own bytes, as the photo sources are
        rng = np.random.default_rng(0)
        for c in range(2):
            for split, count in (("train", 192), ("test", 8)):
                folder = work / "tree" / split / f"c{c}"
                folder.mkdir(parents=True, exist_ok=True)
                base = rng.uniform(0, 255, (3, 4, 3)).astype(np.uint8)
                for i in range(count):
                    image = Image.fromarray(base).resize((400, 300), Image.BICUBIC)
                    noisy = np.asarray(image, np.float32) + rng.normal(0, 20, (300, 400, 3))
                    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
                        folder / f"{i:03d}.jpg", quality=90)
        build_dataset("folder", data, root=work / "tree", n_tasks=1, seed=0,
                      image_size="original")
    from ..data.manifest import Manifest
    manifest = Manifest.load(data)
    transform = make_transform(224, 3, train=True, augment=True, crop="random_resized")
    n_images = manifest.tasks[0].n_train

    def in_process():
        return sum(len(y) for _, y in TaskReader(manifest, 0, "train", transform,
                                                 shuffle=True).batches(32))

    def with_workers(n):
        loader = torch.utils.data.DataLoader(
            TaskReader(manifest, 0, "train", transform, shuffle=True).dataset(), batch_size=32,
            num_workers=n)
        return lambda: sum(len(y) for _, y in loader)

    def images_per_s(fn, repeat=3):
        assert fn() == n_images  # warm-up: page cache, checksum cache, worker start-up code
        start = time.perf_counter()
        for _ in range(repeat):
            assert fn() == n_images
        return repeat * n_images / (time.perf_counter() - start)

    torch.set_num_threads(1)
    base = images_per_s(in_process)
    rows = [{"variant": "in the training process (baseline)", "images_per_s": round(base, 1),
             "speedup": 1.0}]
    for n in (1, 2):
        rate = images_per_s(with_workers(n))
        rows.append({"variant": f"trainer.loader_workers={n}", "images_per_s": round(rate, 1),
                     "speedup": round(rate / base, 2)})
    return {"task": f"{n_images} JPEGs of 400 x 300 px -> RandomResizedCrop(224) + flip, "
                    f"batches of 32, no model step", "rows": rows}


@register
def bench_stream100(work: Path) -> dict:
    data = synthetic_stream_data(work, 100)
    # Ray Train's controller registers reports and notices a job's end only when it polls its
    # workers (Ray's default: every 2 s); packed jobs wait for the registration after each task
    variants = {"Ray Train's 2 s poll (baseline)": ("trainer.poll_interval_s=2",),
                "cldist's 0.5 s poll (default)": ()}
    walls, metrics = {}, {}
    for i, (label, extra) in enumerate(variants.items()):
        start = time.perf_counter()
        metrics = run_stream_on(data, work / f"stream100-{i}", "runner=ray", "trainer.tasks_per_job=25",
                       "method.epochs=1", "method.reference_epochs=2", *extra)
        walls[label] = time.perf_counter() - start
    base = next(iter(walls.values()))
    train = metrics["train_seconds_per_task"][1:]  # the default's; task 0 trains the reference
    deciles = [round(statistics.mean(train[i:i + 10]), 2) for i in range(0, len(train), 10)]
    return {"stream": "PEARL, 100 tasks x 2 synthetic classes, test_vit, 25 tasks per job",
            "wall_s": {label: round(w, 1) for label, w in walls.items()},
            "speedup": {label: round(base / w, 2) for label, w in walls.items()},
            "train_s_per_task_by_decile": deciles,
            "eval_ms_per_image": [round(1e3 * x, 2) for x in metrics["eval_seconds_per_image"]],
            "rows": [{"tasks": f"{10 * i + 1}-{10 * i + 10}", "train_s_per_task": d}
                     for i, d in enumerate(deciles)]}
