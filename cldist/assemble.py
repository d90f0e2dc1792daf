"""Model assembly: the one place a RunConfig becomes objects - the method, its model on the
configured backbone (with the run's reference weights), the image transforms, and the set-ups
the trainer (`TaskSetup`), the scorer (`ScoringSetup`) and the stream evaluator take.

train/ and eval/ never read a config: the runners, the stream driver, the CLI and the
benchmarks build what they need here, so a task is trained and scored on the same model and the
same transforms. It sits above config/, data/, models/, methods/, train/ and eval/, below the
runners.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from .config.schema import MethodOptions, RunConfig
from .data import make_transform
from .data.manifest import Manifest
from .errors import ConfigError
from .eval.scoring import Scorer, ScoringSetup
from .eval.stream_evaluator import StreamEvaluator
from .methods.base import ContinualMethod, get_method_class
from .models.backbone import BackboneSpec, build_backbone, default_normalization
from .models.continual import ContinualClassifier
from .models.inject import split_fused_qkv
from .rundir import RunDir
from .train.task import RunDefaults, TaskSetup


@dataclass
class TaskJob:
    """What a task job needs, all of it plain and picklable: the runners send it to workers,
    which turn it into a TaskSetup (`task_setup`)."""

    run_dir: str
    config: dict  # RunConfig.to_dict()
    task_id: int

    @property
    def cfg(self) -> RunConfig:
        return RunConfig.from_dict(self.config)


def make_method(cfg: RunConfig) -> ContinualMethod:
    return get_method_class(cfg.method.name).from_run(cfg)


def backbone_spec(cfg: RunConfig) -> BackboneSpec:
    b = cfg.backbone
    return BackboneSpec(name=b.name, pretrained=b.pretrained, checkpoint=b.checkpoint,
                        img_size=b.img_size, patch_size=b.patch_size)


def build_model(cfg: RunConfig, method: ContinualMethod, manifest: Manifest,
                run_dir: str | Path) -> ContinualClassifier:
    """The method's model on the configured backbone, with the run's reference weights."""
    torch.manual_seed(cfg.seed)  # backbone init (random-init backbones) is part of the seed
    backbone = build_backbone(backbone_spec(cfg))
    if cfg.backbone.family == "vit":
        split_fused_qkv(backbone)
    classes = [len(t.classes) for t in manifest.tasks]
    model = method.build(backbone, int(backbone.num_features), classes)
    model.head_init = cfg.method.head_init
    RunDir(run_dir).load_reference_into(method, model)
    return model


def transforms(cfg: RunConfig, manifest: Manifest):
    """(train, test) image transforms: resize, optional augmentation (`scenario.train_crop`),
    evaluation resize + centre crop (`scenario.test_resize`), normalisation."""
    sc = cfg.scenario
    if sc.normalize == "backbone":
        mean, std = default_normalization(backbone_spec(cfg))
    else:
        mean = std = None
    size = sc.image_size
    try:
        train = make_transform(size, 3, mean, std, train=True, augment=sc.augment,
                               crop=sc.train_crop, resize=sc.test_resize)
        test = make_transform(size, 3, mean, std, train=False, augment=False,
                              crop=sc.train_crop, resize=sc.test_resize)
    except ValueError as e:  # a bad train_crop / test_resize: name the keys
        raise ConfigError([f"scenario.train_crop={sc.train_crop} / scenario.test_resize="
                           f"{sc.test_resize}: {e}"]) from None
    return train, test


def run_defaults(options: MethodOptions, epochs: int | None = None) -> RunDefaults:
    """The run's shared optimiser keys from a method's options; `epochs` is the run's main
    epochs (RunConfig.main_epochs; default the options' own)."""
    return RunDefaults(method=options.name, optimizer=options.optimizer,
                       weight_decay=float(options.weight_decay),
                       epochs=int(options.epochs if epochs is None else epochs),
                       options=dataclasses.asdict(options))


def _run_objects(cfg: RunConfig, run_dir: str | Path):
    """What a TaskSetup and a ScoringSetup share: the run's manifest, its method, the (train,
    test) transforms and the factory of its model (reference weights loaded, no task)."""
    manifest = RunDir(run_dir).read_manifest()
    method = make_method(cfg)
    new_model = functools.partial(build_model, cfg, method, manifest, run_dir)
    return manifest, method, transforms(cfg, manifest), new_model


def task_setup(job: TaskJob) -> TaskSetup:
    """Task `job.task_id` of the run as objects; the model is built when train_task asks."""
    cfg = job.cfg
    manifest, method, (train_tf, test_tf), new_model = _run_objects(cfg, job.run_dir)
    return TaskSetup(run_dir=job.run_dir, task_id=job.task_id, manifest=manifest, method=method,
                     new_model=new_model, train_transform=train_tf, test_transform=test_tf,
                     seed=cfg.seed, batch_size=cfg.trainer.batch_size,
                     eval_batch_size=cfg.trainer.eval_batch_size,
                     loader_workers=cfg.trainer.loader_workers,
                     defaults=run_defaults(cfg.method, cfg.main_epochs),
                     router_projection_dim=cfg.router.projection_dim)


def make_scorer(cfg: RunConfig, run_dir: str | Path, device: str = "cpu") -> Scorer:
    """A Scorer over the run in `run_dir`, with the run's model, transform and router."""
    manifest, method, (_, test_tf), new_model = _run_objects(cfg, run_dir)
    setup = ScoringSetup(manifest=manifest, method=method, new_model=new_model,
                         test_transform=test_tf, router_projection_dim=cfg.router.projection_dim,
                         seed=cfg.seed, eval_batch_size=cfg.trainer.eval_batch_size)
    return Scorer(setup, run_dir, device=device)


def stream_evaluator(cfg: RunConfig, manifest: Manifest, prediction: str,
                     runner) -> StreamEvaluator:
    """The run's StreamEvaluator, with its Class-IL decision settings (eval.*, router.*)."""
    return StreamEvaluator(
        prediction, runner, manifest.n_tasks, [t.n_test for t in manifest.tasks],
        None if manifest.domain_incremental else [len(t.classes) for t in manifest.tasks],
        class_il=cfg.eval.class_il, top_k=cfg.eval.top_k, combine=cfg.eval.combine,
        shrinkage=cfg.router.shrinkage)
