"""The stream recipe: train and evaluate a whole task stream, top to bottom.

    cfg -> run directory -> scenario shards -> method's task graph -> runner runs the jobs
    -> each finished task: commit (atomic), log, score the new blocks / rows
    -> metrics.json, TensorBoard, summary table, report

CPU-sized example (seconds): `cldist run scenario=digits_5t backbone=test_vit runner=inline`.
"""
from __future__ import annotations

import signal
import threading
import time
from datetime import datetime
from pathlib import Path

from .config.compose import to_yaml
from .config.schema import RunConfig
from .data.manifest import Manifest
from .assemble import TaskJob, make_method, stream_evaluator
from .errors import Interrupted, UserError
from .rundir import RunDir
from .eval.metrics import accuracy_after, summarize
from .eval.stream_evaluator import task_il_metrics
from .report.progress import Progress
from .report.summary import format_summary_table
from .report.tensorboard import TensorBoardLogger
from .runners import make_runner


def default_run_dir(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method.name}-{cfg.scenario.name}-{stamp}"


def ensure_scenario(cfg: RunConfig) -> Manifest:
    """The scenario's manifest: the given one, or the shards built (once) into data_dir."""
    sc = cfg.scenario
    access = dict(allowed_hosts=sc.allowed_hosts, max_member_bytes=sc.max_member_bytes)
    if sc.manifest:
        return Manifest.load(sc.manifest, **access)
    data_dir = Path(sc.data_dir)
    if (data_dir / "manifest.json").is_file():
        m = Manifest.load(data_dir, **access)
        if m.source != sc.source or m.n_tasks != sc.n_tasks:
            raise UserError(f"{data_dir} holds a {m.source} stream of {m.n_tasks} tasks, not the "
                            f"{sc.source} stream of {sc.n_tasks} that scenario={sc.name} asks for; "
                            f"set scenario.data_dir to another directory or remove it")
        # a scenario whose caps or class order changed must not silently reuse the old shards
        asked = {"seed": sc.class_order_seed, "max_train_per_class": sc.max_train_per_class,
                 "max_test_per_class": sc.max_test_per_class}
        differ = [f"{k}: built {m.build[k]}, asked {v}" for k, v in asked.items()
                  if k in m.build and m.build[k] != v]
        if differ:
            raise UserError(f"{data_dir} was built with other settings than scenario={sc.name} "
                            f"asks for ({'; '.join(differ)}); set scenario.data_dir to another "
                            f"directory or remove it to rebuild")
        return m
    from .data.build import build_dataset
    print(f"[data] building {sc.source} shards into {data_dir} ...", flush=True)
    return build_dataset(sc.source, data_dir, root=sc.root, n_tasks=sc.n_tasks,
                         seed=sc.class_order_seed, max_train_per_class=sc.max_train_per_class,
                         max_test_per_class=sc.max_test_per_class)


def preflight(cfg: RunConfig, manifest: Manifest) -> None:
    """Fail before anything is written: shards must match the manifest, targets must match.

    Every shard's checksum is verified, and every local shard is also read through once
    (members, labels, sample count - images are not decoded): a shard that is truncated, holds
    a foreign member or label, or disagrees with the manifest's count is reported now, not
    when its task comes up hours into the run. Remote shards get the checksum only (a second
    download is too dear); the loader checks the rest when it reads them.
    """
    from .data.remote import is_local, verify_shard_checksum
    from .data.shards import iter_shard
    for task in manifest.tasks:
        for shard in task.train + task.test:
            url = manifest.shard_url(shard)
            verify_shard_checksum(url, shard.sha256)
            if is_local(url):
                for _ in iter_shard(url, task.classes, expected_count=shard.n_samples,
                                    max_member_bytes=cfg.scenario.max_member_bytes):
                    pass
    if cfg.runner == "inline" and cfg.trainer.use_gpu:
        import torch
        if not torch.cuda.is_available():
            raise UserError("trainer.use_gpu=true with runner=inline, but torch sees no CUDA "
                            "device here; drop trainer.use_gpu, or use runner=ray to train on "
                            "a cluster's GPUs")
    method = make_method(cfg)
    try:
        from .models.backbone import build_backbone
        from .models.inject import split_fused_qkv
        from .assemble import backbone_spec
        backbone = build_backbone(backbone_spec(cfg))
        if cfg.backbone.family == "vit":
            split_fused_qkv(backbone)
        method.build(backbone, int(backbone.num_features), [len(t.classes) for t in manifest.tasks])
    except ValueError as e:  # inject_lora: no target matched
        raise UserError(f"method.targets={cfg.method.targets}: {e}") from None


def prepare_run_dir(cfg: RunConfig, manifest: Manifest) -> Path:
    """Create the run directory, take its lock and write its files, marker first
    (RunDir.create). The lock stays held by this process; run_stream releases it when the
    run ends."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    given = cfg.run_dir
    cfg.run_dir = str(run_dir)  # what config.json records
    try:
        RunDir(run_dir).create(method=cfg.method.name, backbone=cfg.backbone.name,
                               config=cfg.to_dict(), config_yaml=to_yaml(cfg),
                               seeds=seed_record(cfg, manifest), manifest=manifest)
    except BaseException:
        cfg.run_dir = given
        raise
    return run_dir


def seed_record(cfg: RunConfig, manifest: Manifest) -> dict:
    """Every seed that decides a run's numbers and how each task's is derived (RUN/seeds.json;
    each task's meta.json holds its own values). Same config + seed = same numbers on CPU."""
    from .train.task import task_seeds
    return {
        "seed": cfg.seed,
        "class_order_seed": manifest.order_seed, "class_order": list(manifest.class_order),
        "train_test_split_seed": (manifest.build or {}).get("split_seed"),
        "rules": {
            "init": "torch.manual_seed(seed) before each task's model is built (random-init "
                    "backbones, heads, LoRA factors); the method's own generator per task: "
                    "seed * 1000003 + task * 7919",
            "data_order": "seed * 1000003 + task: shard order and shuffle buffer, re-drawn "
                          "per epoch from (data_seed, epoch, task)",
            "augmentation": "torch's global RNG, seeded by torch.manual_seed(seed) at the "
                            "task's model build, consumed in data order",
        },
        "per_task": {str(t): task_seeds(cfg.seed, t) for t in range(manifest.n_tasks)},
    }


class _Signals:
    """While a run trains, SIGTERM and SIGINT raise Interrupted in the main thread: the driver
    then records "interrupted" in state.json, stops its runner and exits non-zero, leaving the
    run resumable. Repeats during that cleanup are ignored, so it finishes. Ray's own driver
    handler (sys.exit on SIGTERM, installed by ray.init) is replaced while the run lasts."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.previous: dict = {}
        self.interrupted: Interrupted | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals; an embedding caller's business
        for s in self.SIGNALS:
            old = signal.signal(s, self._handle)
            self.previous.setdefault(s, old)

    def restore(self) -> None:
        for s, old in self.previous.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self.previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.interrupted is not None:
            return
        self.interrupted = Interrupted(signum)
        raise self.interrupted


def run_stream(cfg: RunConfig, resume_dir: str | Path | None = None, *, job_slots=None,
               progress_stream=None) -> dict:
    """Train and evaluate the stream `cfg` describes; returns metrics.json's content.

    The run directory's lock is held until it returns (RunDir); SIGTERM/SIGINT stop the
    run at once, recorded as "interrupted" in state.json, and raise Interrupted. A sweep
    (cldist.sweep) runs several streams side by side: `job_slots`, a semaphore its runs share,
    bounds their Ray jobs together, and `progress_stream` is where this run's progress lines
    go (default stdout)."""
    signals = _Signals()
    signals.install()
    try:
        if resume_dir is None:
            manifest = ensure_scenario(cfg)
            preflight(cfg, manifest)
            run_dir = prepare_run_dir(cfg, manifest)  # takes the lock
        else:
            run_dir = Path(resume_dir)
            RunDir(run_dir).acquire_lock()  # re-entrant: `cldist resume` holds it already
        try:
            return _run_locked(cfg, run_dir, resume_dir is not None, signals, job_slots,
                               progress_stream)
        except Interrupted as e:
            e.stopped_run = e.stopped_run or str(run_dir)
            try:  # stopped before the runner existed, or it could not record it
                state = RunDir(run_dir).state()
                if state.data.get("status") != "interrupted":
                    state.set("status", "interrupted")
            except Exception:  # noqa: BLE001 - the interruption is the news
                pass
            raise
        finally:
            RunDir(run_dir).release_lock()
    finally:
        signals.restore()


def _run_locked(cfg: RunConfig, run_dir: Path, resuming: bool, signals: _Signals,
                job_slots=None, progress_stream=None) -> dict:
    wall_start = time.perf_counter()
    resume_dir = run_dir if resuming else None
    run = RunDir(run_dir)
    manifest = run.read_manifest()
    n = manifest.n_tasks
    method = make_method(cfg)
    deps = {t: d for t, d in enumerate(method.task_graph(n))}
    if resume_dir is not None:
        for note in run.prepare_resume(deps, n):
            print(f"[resume] {note}", flush=True)
    progress = Progress(n, stream=progress_stream)
    runner = make_runner(cfg.runner, cfg, run_dir, progress=progress, job_slots=job_slots)
    signals.install()  # again: starting Ray replaced the SIGTERM handler with its own
    coordinator = runner.coordinator  # the one owner of state.json
    coordinator.set("status", "running")
    done_before = set(coordinator.snapshot()["completed_tasks"])
    progress.mark_done(done_before)  # a resumed run's finished tasks count in the status/ETA
    tb = TensorBoardLogger(run.tb_path)
    lock = threading.Lock()
    n_test = [t.n_test for t in manifest.tasks]
    evaluator = stream_evaluator(cfg, manifest, method.prediction, runner)
    global_step = {"value": 0}

    def record_rows(rows: list[int]) -> None:
        for r in rows:
            s = summarize(evaluator.rows[: r + 1], n_test[: r + 1])
            tb.log_task_row(r, evaluator.rows[r], s["acc"], s["aaa"],
                            accuracy_after(evaluator.task_il_rows[r], n_test))
            for rule, rows in evaluator.rule_rows().items():  # both Class-IL rules, side by side
                tb.log_rule_row(rule, r, rows[r], accuracy_after(rows[r], n_test))
            progress.message(f"[eval] after task {r:03d}: Acc {s['acc']:.2f}%  AAA {s['aaa']:.2f}%  "
                             f"row {[round(x, 1) for x in evaluator.rows[r]]}")
        coordinator.set_rows(evaluator.rows)

    try:
        with lock:
            record_rows(evaluator.tasks_finished(sorted(done_before)))

        def on_done(finished: list[tuple[int, dict]]) -> None:
            # commit every task first (nothing finished is lost), then score them together
            with lock:
                for t, meta in finished:
                    if "staging_dir" in meta:  # none: the runner committed it (job slots)
                        coordinator.commit(t, meta["staging_dir"], meta)
                    for fit in meta.get("fits", []):
                        lrs = fit.get("lrs") or [None] * len(fit["losses"])  # None: no lr point
                        for e, (loss, lr) in enumerate(zip(fit["losses"], lrs)):
                            tb.log_epoch(t, fit["phase"], e, global_step["value"], loss, lr)
                            global_step["value"] += 1
                    if meta.get("ranks"):
                        tb.log_ranks(t, meta["ranks"])
                    progress.task_finished(t)
                record_rows(evaluator.tasks_finished([t for t, _ in finished]))

        jobs = {t: TaskJob(str(run_dir), cfg.to_dict(), t) for t in range(n) if t not in done_before}
        runner.run_tasks(jobs, deps, on_done, started=progress.task_started)
    except BaseException as caught:
        # a signal that landed inside Ray's C code surfaces as a SystemError around ours
        e = signals.interrupted if signals.interrupted is not None else caught
        progress.close()  # end a terminal's live status line before the traceback
        try:
            coordinator.set("status", "interrupted")
        except Exception:  # noqa: BLE001 - e.g. the disk is still full: report what stopped us
            pass
        # the message ends with how to continue the run (unless it says so itself already)
        if isinstance(e, (UserError, Interrupted)) and "cldist resume" not in str(e):
            e.stopped_run = str(run_dir)
            try:
                e.finished_tasks = sorted(coordinator.snapshot()["completed_tasks"])
            except Exception:  # noqa: BLE001 - the count is a nicety, the error is the news
                pass
        runner.close()
        if e is caught:
            raise
        raise e from None

    if len(evaluator.rows) != n:
        raise RuntimeError(f"only {len(evaluator.rows)} of {n} accuracy rows were computed")
    s = summarize(evaluator.rows, n_test)
    state = coordinator.snapshot()
    meta = state["task_meta"]
    params = [int(state["params_per_task"].get(str(t), 0)) for t in range(n)]
    metrics = {"acc": s["acc"], "aaa": s["aaa"], "forgetting": s["forgetting"], "bwt": s["bwt"],
               "accuracy_matrix": evaluator.rows, "n_tasks": n, "method": cfg.method.name,
               "params_per_task": round(sum(params) / n), "params_added": params,
               "wall_seconds": time.perf_counter() - wall_start
               + float(state.get("wall_seconds_before", 0.0)),
               "avg_acc_curve": s["avg_acc_curve"], "forgetting_per_task": s["forgetting_per_task"],
               "n_test": n_test, "ranks": state["ranks"], "runner": cfg.runner,
               "scenario": cfg.scenario.name, "backbone": cfg.backbone.name, "seed": cfg.seed,
               "train_seconds_per_task": [meta.get(str(t), {}).get("train_seconds") for t in range(n)],
               "eval_seconds_per_image": evaluator.eval_seconds,
               "eval_tasks_seen": evaluator.eval_tasks_seen,
               # runs agree to the bit only on the same kernels (cldist.train.task.kernels)
               "kernels": sorted({m["kernels"] for m in meta.values() if "kernels" in m}),
               **task_il_metrics(evaluator.task_il_rows, n_test),
               **evaluator.class_il_metrics()}
    run.write_metrics(metrics)
    coordinator.set("status", "finished")
    tb.log_hparams(_flat_hparams(cfg), {k: metrics[k] for k in ("acc", "aaa", "forgetting", "bwt",
                                                                "params_per_task", "wall_seconds")})
    runner.close()
    print(format_summary_table(metrics), flush=True)
    if cfg.report:
        from .report.report import html_path, write_report
        path = write_report(run_dir)  # also puts the figures into tb/report/
        print(f"report: {path}", flush=True)
        print(f"report: {html_path(path)}", flush=True)
    tb.close()
    print(f"run directory: {run_dir}", flush=True)
    return metrics


def _flat_hparams(cfg: RunConfig) -> dict:
    d = cfg.to_dict()
    return {"method": d["method"], "scenario": d["scenario"]["name"], "backbone": d["backbone"]["name"],
            "runner": d["runner"], "seed": d["seed"], "trainer": d["trainer"]}

