"""Every registered method through the same checks, plus one mechanism test per method.

Everything runs in-process on timm's tiny `test_vit` (16 px, 6 blocks, width 64) with small
random tensors: a task context whose `fit` is the real `cldist.train.loop.fit` driven by an
AdamW engine that also checks, at every step, that exactly the requested parameters get
gradients. Tasks run like the task jobs do: a fresh model per task, the reference and the
earlier tasks' saved state (through safetensors bytes) loaded into it, then `learn_task`, then
(methods with `class_statistics`) the statistics pass, saved with the task's state.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.layers import Conv2dSame
from torch import nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import cldist.methods  # noqa: F401  - registers every method
from cldist.config.compose import config_from_dict
from cldist.config.schema import MethodOptions, RouterConfig, resolve_targets
from cldist.errors import ConfigError
from cldist.methods.base import METHODS, TaskContext
from cldist.methods.codyra import ADAPTER as CODYRA_ADAPTER
from cldist.methods.inflora import layer_tokens
from cldist.models.backbone import BackboneSpec, build_backbone
from cldist.models.continual import task_key
from cldist.models.inject import split_fused_qkv
from cldist.models.lora import LoRAConv2d
from cldist.train import loop
from cldist.train.engine import TorchStepEngine
from cldist.coordinator.statistics import (STATS_STEM, ClassStatistics, router_features,
                                           router_projection, statistics_tensors)
from cldist.coordinator.discriminant import LinearDiscriminant
from cldist.train.statistics import collect_task_statistics
from cldist.assemble import run_defaults
from cldist.train.task import with_run_defaults
from cldist.coordinator.run_coordinator import allocate_ranks_locally

ROOT = Path(__file__).resolve().parents[3]
# methods that train nothing: their model is made of the saved statistics of every seen task
TRAINING_FREE = {"slda"}
N_TASKS, CLASSES, PER_CLASS, BATCH, SIZE = 3, 2, 8, 8, 16
CPU = torch.device("cpu")


# -- data ------------------------------------------------------------------------------------
def make_data(seed: int = 0):
    """N_TASKS tasks of CLASSES classes: a random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(N_TASKS * CLASSES, 3, SIZE, SIZE, generator=g)

    def sample(label, n):
        return templates[label] + 0.5 * torch.randn(n, 3, SIZE, SIZE, generator=g)

    train, test = [], []
    for t in range(N_TASKS):
        labels = [t * CLASSES + c for c in range(CLASSES)]
        x = torch.cat([sample(lab, PER_CLASS) for lab in labels])
        y = torch.tensor([lab for lab in labels for _ in range(PER_CLASS)])
        perm = torch.randperm(len(y), generator=g)
        train.append((x[perm], y[perm]))
        test.append(torch.cat([sample(lab, 4) for lab in labels]))
    return train, test


TRAIN, TEST = make_data()
EVAL_X = torch.cat(TEST)


# -- method, model, context ------------------------------------------------------------------
def method_config(name: str, **overrides):
    path = ROOT / "configs" / "method" / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {"name": name}
    # typed by the method's options class as Hydra does it: an unknown key or a wrongly typed
    # value fails here, with every bad value
    backbone = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/backbone/test_vit.yaml"))
    return config_from_dict({"method": {**raw, **overrides}, "backbone": backbone}, format1=False)


def make_method(name: str, **overrides):
    return METHODS[name].from_run(method_config(name, **overrides))


class TinyCNN(nn.Module):
    """A small CNN with 3x3 (padded, strided) and 1x1 convs: the CNN path of every method."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 1)
        self.c3 = Conv2dSame(16, 16, 3, stride=2)
        self.num_features = 16

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        return x.mean(dim=(2, 3))


CNN_TARGETS = ["c1", "c2", "c3"]


def make_cnn_method(name: str, **overrides):
    cfg = method_config(name, **{"epochs": 2, **overrides})
    return METHODS[name].from_run(cfg, CNN_TARGETS, is_cnn=True)


def fresh_model(method, reference=None):
    torch.manual_seed(0)  # the run seed: every task job starts from the same initial backbone
    if getattr(method, "is_cnn", False):
        backbone = TinyCNN()
    else:
        backbone = build_backbone(BackboneSpec(name="test_vit", img_size=SIZE, patch_size=4))
        split_fused_qkv(backbone)
    model = method.build(backbone, int(backbone.num_features), [CLASSES] * N_TASKS)
    model.head_init = method.options.head_init  # as build_model sets it
    if reference is not None:
        method.load_reference_state(model, reference)
    return model


class CheckingEngine(TorchStepEngine):
    """The torch engine, asserting after every backward that exactly the requested parameters
    have gradients (a frozen parameter with requires_grad left on would show up here)."""

    def __init__(self, module, params, lr, weight_decay, total_steps, optimizer="adamw"):
        super().__init__(module, params, lr, weight_decay, total_steps, optimizer)
        self.allowed = {id(p) for p in params}

    def backward_and_step(self, loss):
        loss.backward()
        for n, p in self.module.named_parameters():
            if id(p) in self.allowed:
                assert p.grad is not None, f"requested parameter {n} got no gradient"
            else:
                assert p.grad is None, f"frozen parameter {n} got a gradient"
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_ctx(t: int, train=TRAIN, log: list | None = None,
             options: MethodOptions = MethodOptions(), before_fit=None, after_fit=None,
             engines: list | None = None) -> TaskContext:
    """`fit` fills in the run's optimiser keys as train_task does; `before_fit(model, request)`
    and `after_fit(model, request)` see every phase; `engines` collects every engine made."""
    x, y = train[t]

    def batches(epoch):
        for i in range(0, len(y), BATCH):
            yield x[i:i + BATCH], y[i:i + BATCH]

    def seen(epoch):
        xs = torch.cat([train[s][0] for s in range(t + 1)])
        ys = torch.cat([train[s][1] for s in range(t + 1)])
        order = torch.randperm(len(ys), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(ys), BATCH):
            yield xs[order[i:i + BATCH]], ys[order[i:i + BATCH]]

    def fit(model, request):
        source, n = (seen, (t + 1) * len(y)) if request.data == "seen" else (batches, len(y))
        request = with_run_defaults(request, run_defaults(options))  # as train_task does
        requested = {id(p) for p in request.params}
        frozen = {k: p.detach().clone() for k, p in model.named_parameters() if id(p) not in requested}
        if before_fit is not None:
            before_fit(model, request)

        def make_engine(*args, **kwargs):
            engine = CheckingEngine(*args, **kwargs)
            if engines is not None:  # the optimiser as made (finish() may release it)
                engines.append((request.phase, [dict(g, params=None)
                                                for g in engine.optimizer.param_groups]))
            return engine

        result = loop.fit(model, request, source, math.ceil(n / BATCH), make_engine, CPU)
        now = dict(model.named_parameters())
        for k, before in frozen.items():
            assert torch.equal(before, now[k]), f"{request.phase}: frozen parameter {k} changed"
        if log is not None:
            log.append(request)
        if after_fit is not None:
            after_fit(model, request)
        return result

    return TaskContext(task_id=t, n_tasks=N_TASKS, classes_per_task=[CLASSES] * N_TASKS,
                       class_offsets=[CLASSES * i for i in range(N_TASKS)], fit=fit,
                       allocate_ranks=allocate_ranks_locally, train_batches=batches,
                       generator=torch.Generator().manual_seed(1000 + t), device=CPU,
                       seen_train_batches=seen, steps_per_epoch=math.ceil(len(y) / BATCH))


def roundtrip(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Through safetensors, as the task files are written and read."""
    return {stem: st_load(st_save({k: v.contiguous() for k, v in group.items()}))
            for stem, group in state.items()}


@torch.no_grad()
def predict(method, model, t: int, x=EVAL_X) -> torch.Tensor:
    model.eval()
    if method.prediction == "subnetworks":
        method.activate_subnetwork(model, t)
    else:
        method.activate_model(model, t)
    return model(x)


def load_into_fresh(run, t: int):
    method = run["method"]
    model = fresh_model(method, run["reference"])
    for s in method.prediction_dependencies(t):
        method.load_task_state(model, s, roundtrip(run["states"][s]))
    return model


def task_classes(t: int) -> list[int]:
    return [t * CLASSES + c for c in range(CLASSES)]


def train_stream(method, train=TRAIN, n_tasks: int = N_TASKS, **ctx_hooks):
    """Tasks 0..n_tasks-1 like the task jobs run them; keeps every trained model and state.
    `ctx_hooks`: make_ctx's before_fit / after_fit / engines."""
    run = {"method": method, "reference": None, "states": [], "models": [], "metas": [],
           "logits": [], "requests": []}
    for t in range(n_tasks):
        model = fresh_model(method, run["reference"])
        for dep in method.state_dependencies(t):
            method.load_task_state(model, dep, roundtrip(run["states"][dep]))
        log: list = []
        ctx = make_ctx(t, train, log, method.options, **ctx_hooks)
        meta = method.learn_task(model, ctx)
        if t == 0:
            ref = method.reference_state(model)
            run["reference"] = None if ref is None else {k: v.clone() for k, v in ref.items()}
        state = method.task_state(model, t)
        if method.class_statistics:  # as the task job does after learning
            # the run's router settings (slda holds them; the others take the defaults)
            projection = router_projection(
                getattr(method, "projection_dim", RouterConfig().projection_dim),
                model.feature_dim, getattr(method, "seed", 0))
            stats = collect_task_statistics(model, method, t, task_classes(t),
                                            lambda: ctx.train_batches(0), CPU, projection)
            state = {**state, STATS_STEM: statistics_tensors(stats)}
        run["states"].append(roundtrip(state))
        run["models"].append(model)
        run["metas"].append(meta)
        run["requests"].append(log)
        # a training-free method's model is the saved statistics: it predicts once loaded
        run["logits"].append(predict(method, load_into_fresh(run, t), t)
                             if method.name in TRAINING_FREE else predict(method, model, t))
    return run


_RUNS: dict[tuple, dict] = {}


def stream(name: str, **overrides) -> dict:
    key = (name, repr(sorted(overrides.items())))
    if key not in _RUNS:
        _RUNS[key] = train_stream(make_method(name, **{"epochs": 2, **overrides}))
    return _RUNS[key]


# -- the shared table -------------------------------------------------------------------------
TABLE = [pytest.param(name, {}, id=name) for name in sorted(METHODS)] + [
    pytest.param("sdlora", {"variant": "official"}, id="sdlora-official"),
    pytest.param("inflora", {"variant": "official", "blocks": 3}, id="inflora-official-b3",
                 marks=pytest.mark.slow),
    pytest.param("codyra", {"variant": "official"}, id="codyra-official"),
    pytest.param("sdlora", {"boundary": "paper"}, id="sdlora-boundary-paper"),
]


@pytest.mark.parametrize("name,overrides", TABLE)
def test_method_contract(name, overrides):
    """Frozen parameters get no gradient and do not move (checked inside every fit); saving a
    task and loading it (with its dependencies) into a fresh model reproduces the trained
    model's predictions bit for bit; the declared graph/prediction kinds are known."""
    run = stream(name, **overrides)
    method = run["method"]
    assert method.graph in ("chain", "independent")
    assert method.prediction in ("single", "subnetworks")
    assert method.class_statistics or method.prediction != "subnetworks", \
        "a sub-network method needs class statistics (the routed Class-IL decision)"
    for t in range(N_TASKS):
        trains = name not in TRAINING_FREE
        assert bool(run["requests"][t]) == trains, f"task {t}: {len(run['requests'][t])} fits"
        reloaded = predict(method, load_into_fresh(run, t), t)
        assert torch.equal(run["logits"][t], reloaded), f"task {t}: reload changed predictions"
        if method.prediction == "single":
            assert run["logits"][t].shape == (len(EVAL_X), CLASSES * (t + 1))
        assert (STATS_STEM in run["states"][t]) == method.class_statistics
        added = method.params_added(run["models"][t], t)
        assert isinstance(added, int) and (added > 0) == trains


def test_every_registered_method_has_a_config():
    for name in METHODS:
        path = ROOT / "configs" / "method" / f"{name}.yaml"
        assert path.exists(), f"configs/method/{name}.yaml is missing"
        cfg = method_config(name)
        assert cfg.method.name == name


def test_new_method_options_are_validated():
    with pytest.raises(ConfigError) as e:
        method_config("codyra", rank=0, dense_fraction=1.0, kappa_max=-1.0, kappa_steps=0)
    text = str(e.value)
    for key in ("method.rank=0", "method.dense_fraction", "method.kappa_max", "method.kappa_steps"):
        assert key in text
    with pytest.raises(ConfigError) as e:
        method_config("inflora", gpm_eps=0.0, blocks=0)
    assert "method.gpm_eps" in str(e.value) and "method.blocks" in str(e.value)
    with pytest.raises(ConfigError) as e:
        method_config("sdlora_rr", rank_schedule=[10, 0], kd_threshold=-1.0, optimizer="lion")
    for key in ("method.rank_schedule", "method.kd_threshold", "method.optimizer=lion"):
        assert key in str(e.value)


def test_yaml_defaults_are_the_options_defaults():
    """A method's options dataclass and its configs/method/<name>.yaml give the same values,
    and the YAML names no key the method does not have (config_from_dict refuses those)."""
    for name, cls in METHODS.items():
        assert dataclasses.asdict(method_config(name).method) == \
            dataclasses.asdict(cls.Options()), f"configs/method/{name}.yaml != {cls.Options}"


def test_a_method_refuses_keys_it_does_not_have():
    """Every unknown key is named, with the bad values, in one error (`cldist run` refuses them
    through Hydra: tests/unit/test_cli.py)."""
    with pytest.raises(ConfigError) as e:
        method_config("pearl", gpm_epz=0.5, kappa_maximum=1, stage1_lr=-1.0)
    text = str(e.value)
    assert "'method.gpm_epz' does not exist for method pearl" in text
    assert "'method.kappa_maximum' does not exist for method pearl" in text
    assert "method.stage1_lr=-1.0" in text


def test_format1_config_json_round_trips():
    """config.json keeps run-directory format 1: every flat key in its order, the values a run
    wrote carried through even where the method has no such key."""
    from cldist.config.schema import FORMAT1_METHOD_KEYS
    from cldist.methods.sdlora import SDLoRAOptions
    old = {**FORMAT1_METHOD_KEYS, **dataclasses.asdict(SDLoRAOptions()), "stage1_lr": 0.5}
    backbone = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/backbone/test_vit.yaml"))
    cfg = config_from_dict({"method": old, "backbone": backbone})
    assert type(cfg.method) is SDLoRAOptions and not hasattr(cfg.method, "stage1_lr")
    written = cfg.to_dict()["method"]
    assert written == old and list(written) == list(FORMAT1_METHOD_KEYS)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def test_phases_name_their_learning_rate_key():
    """A FitRequest names its options key; the trainer reads it (not a float compared with
    every key: with lr == stage1_lr that guess named neither)."""
    from cldist.methods.base import FitRequest
    from cldist.methods.pearl import PearlOptions
    opts = PearlOptions(lr=1e-3, stage1_lr=1e-3, epochs=5)
    stage1 = with_run_defaults(FitRequest("s1", [], lr_key="stage1_lr", loss_fn=lambda x, y: x,
                                          epochs=2), run_defaults(opts))
    assert (stage1.lr, stage1.epochs, stage1.lr_key) == (1e-3, 2, "stage1_lr")
    main = with_run_defaults(FitRequest("s2", [], loss_fn=lambda x, y: x),
                             run_defaults(opts, epochs=7))
    assert (main.lr, main.epochs, main.optimizer) == (1e-3, 7, "adamw")
    phases = {r.phase: r.lr_key for r in stream("pearl")["requests"][1]}
    assert phases == {"stage1": "stage1_lr", "stage2": "lr"}


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_every_optimizer_the_config_accepts_is_built(name):
    """Each name config validation accepts (cldist.choices) is one the trainer builds."""
    from cldist.choices import OPTIMIZERS
    from cldist.train.engine import make_optimizer
    assert name in OPTIMIZERS
    p = torch.nn.Parameter(torch.zeros(2))
    opt = make_optimizer(name, [p], 0.1, 0.0)
    assert type(opt) is {"adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    assert set(OPTIMIZERS) == {"adamw", "sgd"}, "a new optimiser: add its row above"


@pytest.mark.slow  # keeps `make test-fast` under 5 minutes; `make test` runs it
def test_imports_point_one_way():
    """config/ imports no method, trainer or coordinator; the registry is full whichever
    module of cldist.methods (or a module using it) is imported first."""
    import subprocess
    import sys
    checks = [
        "import sys, cldist.config.compose, cldist.config.schema; "
        "bad = [m for m in sys.modules if m.startswith(('cldist.methods', 'cldist.train', "
        "'cldist.coordinator', 'cldist.eval', 'cldist.models'))]; assert not bad, bad",
        "import cldist.methods.base as b; assert len(b.METHODS) >= 11, sorted(b.METHODS)",
        "import cldist.train.loop, cldist.methods as m; assert 'pearl' in m.METHODS",
        "import cldist.methods.slda; from cldist.config.schema import METHOD_OPTIONS; "
        "assert 'sdlora_kd' in METHOD_OPTIONS",
    ]
    for code in checks:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert done.returncode == 0, f"{code}\n{done.stderr[-2000:]}"


@pytest.mark.slow  # keeps `make test-fast` under 5 minutes; `make test` runs it
def test_a_new_method_is_one_file_one_yaml_one_row(tmp_path, digits_dir, monkeypatch):
    """README "Adding a method": the options dataclass and the method (here, in this test), its
    YAML, and nothing else - `cldist run method=tiny_probe` composes it (its own key typed and
    overridable, a key it lacks refused) and runs it through the inline runner."""
    import json
    import shutil

    from cldist.cli import main
    from cldist.config.schema import must_be
    from cldist.methods.base import (ContinualMethod, FitRequest, current_task_loss,
                                     register_method, trainable, unregister_method)
    from cldist.methods.common import head_state, load_head
    from cldist.models.continual import freeze

    from tests.conftest import first_tasks, tiny_overrides

    @dataclasses.dataclass
    class TinyProbeOptions(MethodOptions):
        name: str = "tiny_probe"
        epochs: int = 1
        head_lr: float = 0.05  # its own key: the heads' learning rate

        def problems(self) -> list[str]:
            return super().problems() + must_be("method.head_lr", self.head_lr,
                                                self.head_lr > 0, "must be > 0")

    class TinyProbe(ContinualMethod):
        """One linear head per task on the frozen backbone, one model over all heads."""
        name = "tiny_probe"
        Options = TinyProbeOptions

        def learn_task(self, model, ctx):
            key = task_key(ctx.task_id)
            model.add_head(key, ctx.n_classes, ctx.generator)
            model.activate([], [key])
            fit = ctx.fit(model, FitRequest("head", trainable(model.heads[key].parameters()),
                                            lr_key="head_lr",
                                            loss_fn=current_task_loss(ctx.offset)))
            freeze(model)
            return {"fits": [fit]}

        def task_state(self, model, task_id):
            return {"head": head_state(model, task_key(task_id))}

        def load_task_state(self, model, task_id, state):
            load_head(model, task_key(task_id), state["head"])
            freeze(model)

        def activate_model(self, model, upto_task):
            model.activate([], [task_key(i) for i in range(upto_task + 1)])

    configs = tmp_path / "configs"
    shutil.copytree(ROOT / "configs", configs)
    (configs / "method" / "tiny_probe.yaml").write_text(
        "name: tiny_probe\ntargets: [k]\nepochs: 1\nhead_lr: 0.05\n")
    monkeypatch.setenv("CLDIST_CONFIG_DIR", str(configs))
    register_method(TinyProbe)
    try:
        assert dataclasses.asdict(method_config("tiny_probe").method) == \
            dataclasses.asdict(TinyProbeOptions())  # the YAML-defaults check, as for every method
        data = first_tasks(digits_dir, tmp_path / "data", 2)
        args = tiny_overrides(data, tmp_path / "run", "method=tiny_probe", "runner=inline",
                              "method.head_lr=0.1")
        assert main(["run", *args[:-1], "method.kappa_max=1"]) == 2  # a key it lacks
        assert not (tmp_path / "run").exists()
        assert main(["run", *args]) == 0
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["method"] == "tiny_probe" and len(metrics["accuracy_matrix"]) == 2
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["method"]["head_lr"] == 0.1
        meta = json.loads((tmp_path / "run" / "tasks" / "001" / "meta.json").read_text())
        assert meta["fits"][0]["phase"] == "head" and meta["fits"][0]["steps"] > 0
    finally:
        unregister_method("tiny_probe")


# -- keys every method must honour ------------------------------------------------------------
# methods that train something; the training-free ones (slda) are held to "no fits, no
# parameters" by the contract test instead
TRAINED = sorted(set(METHODS) - set(TRAINING_FREE))


_FIRST_TASKS: dict[str, dict] = {}


def _first_tasks(name: str) -> dict:
    """Tasks 0 and 1 (PEARL's task 0 is the reference; task 1 runs its two stages) with
    `head_init=zero` and `weight_decay=0.05`, every phase's heads recorded as they are when the
    phase starts, and every optimiser's parameter groups as made. One run per method serves
    both tests below."""
    if name in _FIRST_TASKS:
        return _FIRST_TASKS[name]
    heads_at_start: list[tuple[str, str, torch.Tensor]] = []
    engines: list = []

    def before_fit(model, request):
        requested = {id(p) for p in request.params}
        for key, head in model.heads.items():
            if id(head.weight) in requested:
                heads_at_start.append((request.phase, key,
                                       torch.cat([head.weight.detach().flatten(),
                                                  head.bias.detach()])))

    pearl = {"stage1_epochs": 1, "reference_epochs": 1} if name == "pearl" else {}
    method = make_method(name, epochs=1, head_init="zero", weight_decay=0.05, **pearl)
    train_stream(method, n_tasks=2, before_fit=before_fit, engines=engines)
    _FIRST_TASKS[name] = {"heads": heads_at_start, "engines": engines}
    return _FIRST_TASKS[name]


@pytest.mark.parametrize("name", TRAINED)
def test_zero_head_init_reaches_every_trained_head(name):
    """`method.head_init=zero`: every head a phase trains is zero when that phase starts (PEARL
    re-initialises its head before stage 2: that one too)."""
    out = _first_tasks(name)
    assert out["heads"], f"{name}: no phase trained a head"
    for phase, key, values in out["heads"]:
        assert not values.any(), f"{name}, phase {phase}: head {key} starts non-zero"
    if name == "pearl":
        assert [p for p, _, _ in out["heads"]] == ["reference", "stage1", "stage2"]


@pytest.mark.parametrize("name", TRAINED)
def test_weight_decay_reaches_every_optimiser(name):
    """`method.weight_decay` is applied by the trainer to every phase a method leaves it to
    (FitRequest.weight_decay None); PEARL's stage 1 alone keeps 0 by design (pearl.py)."""
    out = _first_tasks(name)
    assert out["engines"], f"{name}: no optimiser was made"
    for phase, groups in out["engines"]:
        decays = {g["weight_decay"] for g in groups}
        expect = 0.0 if (name, phase) == ("pearl", "stage1") else 0.05
        assert decays == {expect}, f"{name}, phase {phase}: weight decay {decays}"


def test_run_defaults_fill_only_what_a_method_left_to_the_run():
    """train_task's `fit` applies the run's optimiser keys where a request leaves them None."""
    from cldist.methods.base import FitRequest
    left = FitRequest("p", [], 1, 1e-3, lambda x, y: x)
    run = MethodOptions(optimizer="sgd", weight_decay=0.05)
    filled = with_run_defaults(left, run_defaults(run))
    assert (filled.optimizer, filled.weight_decay) == ("sgd", 0.05)
    kept = with_run_defaults(dataclasses.replace(left, optimizer="adamw", weight_decay=0.0),
                             run_defaults(run))
    assert (kept.optimizer, kept.weight_decay) == ("adamw", 0.0)


# -- roles on the ViT -------------------------------------------------------------------------
# which projections of every block get adapters, per method, with its config's targets: the
# papers' choices (PEARL keys only, SD-LoRA q+v, InfLoRA k+v). On EfficientNet-Lite0 every role
# maps to the same pointwise convolutions (docs/RESULTS.md), so only a ViT tells them apart.
ROLE_MODULES = {"q": ["attn.qkv.q"], "k": ["attn.qkv.k"], "v": ["attn.qkv.v"],
                "proj": ["attn.proj"], "mlp": ["mlp.fc1", "mlp.fc2"]}
EXPECTED_ROLES = {"pearl": ["k"], "sdlora": ["q", "v"], "sdlora_kd": ["q", "v"],
                  "sdlora_rr": ["q", "v"], "inflora": ["k", "v"], "seq_lora": ["q", "v"],
                  "codyra": ["q", "k", "v", "proj", "mlp"],
                  # no adapters: full fine-tuning, frozen features, statistics only
                  "seq_ft": [], "joint": [], "linear_probe": [], "slda": []}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_vit_role_mapping(name):
    """On test_vit (fused qkv split into q, k, v Linear layers) a method's adapters sit on
    exactly its roles' projections in every block, each the size of one projection."""
    assert name in EXPECTED_ROLES, f"{name}: add its expected roles to EXPECTED_ROLES"
    method = make_method(name)
    model = fresh_model(method)
    depth = len(model.backbone.blocks)
    expect = {f"blocks.{i}.{m}" for i in range(depth) for role in EXPECTED_ROLES[name]
              for m in ROLE_MODULES[role]}
    layers = model.lora_layers()
    assert set(layers) == expect
    width = model.feature_dim
    for n, layer in layers.items():
        if ".attn.qkv." in n:  # one of the three split projections, never the fused 3 x width
            assert (layer.out_features, layer.in_features) == (width, width), n
    assert not any(isinstance(m, nn.Linear) and n.endswith("attn.qkv")
                   for n, m in model.backbone.named_modules()), "a fused qkv was left"


# -- PEARL ------------------------------------------------------------------------------------
def test_pearl_earlier_subnetworks_are_bit_identical_after_later_tasks():
    run = stream("pearl")
    method = run["method"]
    model = fresh_model(method, run["reference"])
    for t in range(N_TASKS):  # one model holding every task, as the evaluator builds it
        method.load_task_state(model, t, roundtrip(run["states"][t]))
    for t in range(N_TASKS):
        assert torch.equal(predict(method, model, t), run["logits"][t])


def _reference_part(model) -> dict[str, torch.Tensor]:
    """The backbone without adapters and per-task norm copies: W_r, BatchNorm statistics too."""
    return {k: v.detach().clone() for k, v in model.backbone.state_dict().items()
            if ".lora_" not in k and ".branches." not in k}


@pytest.mark.parametrize("task_norms", [True, False], ids=["task-norms", "shared-norms"])
def test_pearl_cnn_reference_norms_and_stage1(task_norms):
    """PEARL on a CNN, the configuration docs/RESULTS.md measures (per-task norms), and with
    `task_norms: false`. After every task W_r - every weight and BatchNorm statistic outside
    the adapters - is bit-identical to the reference; stage 1 moved the target weights (and,
    with task norms, the base norms) and all of it was discarded; each task's LoRA and norm
    copies come back bit-identically from its saved state. Without task norms the shared
    BatchNorm statistics never move after the reference, stage 1 included."""
    stage1: list[dict[str, torch.Tensor]] = []

    def after_fit(model, request):
        if request.phase == "stage1":
            stage1.append(_reference_part(model))

    method = make_cnn_method("pearl", task_norms=task_norms, stage1_epochs=1,
                             reference_epochs=2)
    run = train_stream(method, after_fit=after_fit)
    reference = run["reference"]
    assert reference is not None and set(reference) == set(_reference_part(run["models"][0]))
    bn = "bn.base." if task_norms else "bn."
    # the reference training (task 0) did update the statistics: they are W_r's own
    assert reference[bn + "running_mean"].abs().max() > 0
    targets = [f"{c}.base.weight" for c in CNN_TARGETS]
    assert len(stage1) == N_TASKS - 1
    for t in range(1, N_TASKS):
        model, key = run["models"][t], task_key(t)
        now = _reference_part(model)
        for k, v in reference.items():
            assert torch.equal(now[k], v), f"task {t}: {k} differs from W_r"
        moved = stage1[t - 1]
        assert all(not torch.equal(moved[k], reference[k]) for k in targets), \
            f"task {t}: stage 1 left a target weight at W_r: nothing to discard"
        for stat in ("running_mean", "running_var"):
            assert torch.equal(moved[bn + stat], reference[bn + stat]) != task_norms, \
                f"task {t}: stage 1 {'left' if task_norms else 'moved'} the shared {stat}"
        reloaded = load_into_fresh(run, t)
        for n, layer in model.lora_layers().items():
            again = reloaded.lora_layers()[n]
            assert torch.equal(layer.lora_A[key], again.lora_A[key])
            assert torch.equal(layer.lora_B[key], again.lora_B[key])
        norms = model.task_norm_layers()
        assert bool(norms) == task_norms
        for n, m in norms.items():
            own = m.branches[key].state_dict()
            back = reloaded.task_norm_layers()[n].branches[key].state_dict()
            assert set(own) == set(back) and all(torch.equal(own[k], back[k]) for k in own)
            # stage 2 trained the task's own copy, statistics included
            assert not torch.equal(own["running_mean"], reference[bn + "running_mean"])
        assert torch.equal(predict(method, reloaded, t), run["logits"][t])


# -- SD-LoRA ----------------------------------------------------------------------------------
def test_sdlora_old_directions_frozen_magnitudes_move():
    run = stream("sdlora")
    first = run["states"][0]["adapter"]
    for t in (1, 2):
        model = run["models"][t]
        for n, layer in model.lora_layers().items():
            assert torch.equal(layer.lora_A["t000"].detach(), first[f"{n}.lora_A"])
            assert torch.equal(layer.lora_B["t000"].detach(), first[f"{n}.lora_B"])
        assert set(model.sd_magnitudes) == {task_key(i) for i in range(t + 1)}
    a0 = [float(run["states"][t]["magnitudes"]["t000"]) for t in range(N_TASKS)]
    assert a0[0] != a0[1] != a0[2], f"alpha_0 never trained: {a0}"
    # every request trained all magnitudes, the current A/B and the head - nothing else
    names = {id(p): n for n, p in run["models"][2].named_parameters()}
    trained = {names[id(p)] for p in run["requests"][2][0].params}
    assert {"sd_magnitudes.t000", "sd_magnitudes.t001", "sd_magnitudes.t002"} <= trained
    assert not any(".t000" in n or ".t001" in n for n in trained if "lora_" in n)
    assert all(".t002" in n for n in trained if "lora_" in n)


def test_sdlora_rank_schedule():
    method = make_method("sdlora_rr")
    assert [method.rank_for(t) for t in (0, 3, 4, 7, 8, 20)] == [10, 10, 8, 8, 6, 6]
    assert make_method("sdlora", rank=7).rank_for(9) == 7


def test_sdlora_official_normalisation():
    method = make_method("sdlora", variant="official", boundary="normalise")
    model = fresh_model(method)
    layer = next(iter(model.lora_layers().values()))
    layer.add_adapter("t000", 3)
    layer.set_adapter_weights("t000", torch.randn(layer.out_features, 3), torch.randn(3, layer.in_features))
    expect = torch.linalg.norm(layer.lora_B["t000"]) * torch.linalg.norm(layer.lora_A["t000"])
    assert torch.allclose(method.direction_norm(layer, "t000"), expect)
    paper = make_method("sdlora", boundary="normalise")
    assert torch.allclose(paper.direction_norm(layer, "t000"),
                          torch.linalg.norm(layer.lora_B["t000"] @ layer.lora_A["t000"]))


@pytest.mark.slow  # keeps `make test-fast` under 5 minutes; `make test` runs it
@pytest.mark.parametrize("boundary", ["continuous", "normalise", "paper"])
def test_sdlora_boundary(boundary):
    """When task 1 starts, task 0's B A turns into a frozen direction. `continuous` leaves the
    model computing exactly what was evaluated after task 0, and so does `paper` (the direction
    was unit-norm already); `normalise` rescales the update."""
    run = stream("sdlora", boundary=boundary)
    method = run["method"]
    model = load_into_fresh(run, 0)
    after_task0 = predict(method, model, 0)
    method._wire(model, current=None)  # as task 1's job wires it: t000 is an old direction now
    with torch.no_grad():
        at_task1_start = model(EVAL_X)
    assert torch.equal(after_task0, run["logits"][0])
    assert torch.allclose(at_task1_start, after_task0, atol=1e-5) == (boundary != "normalise")


def test_sdlora_paper_boundary_current_direction_is_unit_norm_from_the_first_step():
    """`boundary=paper`: B starts small and non-zero, so the current direction B A / ||B A|| is
    defined when training starts and each layer's update is alpha_t (1.0) times a unit-norm
    direction; the other boundaries start from B = 0 (no update)."""
    for boundary, expect in (("paper", 1.0), ("continuous", 0.0)):
        method = make_method("sdlora", boundary=boundary)
        model = fresh_model(method)
        ctx = make_ctx(0)
        at_start = {}

        def fit(model_, request, at_start=at_start):
            with torch.no_grad():
                for n, layer in model_.lora_layers().items():
                    B = layer.lora_B["t000"]
                    at_start[n] = (float(B.abs().max()), float(torch.linalg.norm(
                        layer.delta_matrix("t000"))))
            return {}

        ctx.fit = fit
        method.learn_task(model, ctx)
        assert at_start
        for n, (b_max, update) in at_start.items():
            assert (0 < b_max <= 0.01) if boundary == "paper" else b_max == 0, n
            assert update == pytest.approx(expect, rel=1e-5), n


@pytest.mark.parametrize("boundary", ["paper", "continuous"])
def test_sdlora_paper_boundary_normalises_every_direction(boundary):
    """After training with `boundary=paper` every task's update in every layer, the current
    task's included, is its magnitude times a unit-norm direction, and the model does not
    depend on the scale of any B; with `continuous` the current B A keeps its learned scale."""
    run = stream("sdlora", boundary=boundary)
    method, model = run["method"], run["models"][2]
    method.activate_model(model, 2)
    with torch.no_grad():
        for n, layer in model.lora_layers().items():
            for key in layer.adapters():
                alpha = float(model.sd_magnitudes[key])
                norm = float(torch.linalg.norm(layer.delta_matrix(key)))
                unit = norm == pytest.approx(abs(alpha), rel=1e-4)
                assert unit == (boundary == "paper"), f"{n}/{key}: ||update|| {norm}, alpha {alpha}"
        model.eval()
        before = model(EVAL_X)
        for layer in model.lora_layers().values():
            layer.lora_B["t002"].mul_(3.0)
        scaled = model(EVAL_X)
        for layer in model.lora_layers().values():
            layer.lora_B["t002"].div_(3.0)
    assert torch.allclose(before, scaled, atol=1e-5) == (boundary == "paper")


def _kd_model(method, combination: bool):
    """Two frozen old directions and a current LoRA that is (or is not) their combination."""
    g = torch.Generator().manual_seed(3)
    model = fresh_model(method)
    for key in ("t000", "t001"):
        model.sd_magnitudes[key] = torch.nn.Parameter(torch.tensor([0.7 if key == "t000" else 1.3]))
    model.sd_magnitudes["t002"] = torch.nn.Parameter(torch.tensor([0.9]))
    for layer in model.lora_layers().values():
        dout, din = layer.out_features, layer.in_features
        B0, A0 = torch.randn(dout, 2, generator=g), torch.randn(2, din, generator=g)
        B1, A1 = torch.randn(dout, 3, generator=g), torch.randn(3, din, generator=g)
        for key, (B, A) in (("t000", (B0, A0)), ("t001", (B1, A1))):
            layer.add_adapter(key, A.shape[0])
            layer.set_adapter_weights(key, B, A)
        if combination:  # B_2 A_2 = 0.3 B0 A0 - 0.8 B1 A1, exactly
            B2, A2 = torch.cat([0.3 * B0, -0.8 * B1], 1), torch.cat([A0, A1], 0)
        else:
            B2, A2 = torch.randn(dout, 5, generator=g), torch.randn(5, din, generator=g)
        layer.add_adapter("t002", 5)
        layer.set_adapter_weights("t002", 0.05 * B2, A2)
    for h in range(3):
        model.add_head(task_key(h), CLASSES, g)
    method.activate_model(model, 2)
    return model


@pytest.mark.parametrize("variant,boundary", [("paper", "continuous"), ("official", "continuous"),
                                              ("paper", "paper"), ("official", "paper")])
def test_sdlora_kd_absorbs_a_spanned_direction(variant, boundary):
    method = make_method("sdlora_kd", variant=variant, boundary=boundary)
    model = _kd_model(method, combination=True)
    with torch.no_grad():
        model.eval()
        before = model.backbone(EVAL_X)
    n_params = sum(p.numel() for p in model.parameters())
    info = method._distill(model, "t002")
    assert info["absorbed"] and info["max_residual"] < 1e-9
    assert "t002" not in model.sd_magnitudes
    assert all("t002" not in layer.lora_A for layer in model.lora_layers().values())
    assert sum(p.numel() for p in model.parameters()) < n_params
    method.activate_model(model, 2)
    with torch.no_grad():
        after = model.backbone(EVAL_X)
    assert torch.allclose(before, after, atol=1e-4), "absorbing changed the function"
    # the state after the task carries no adapter, and a reload rebuilds the absorbed model
    state = roundtrip(method.task_state(model, 2))
    assert state["adapter"] == {} and state["offsets"]


def test_sdlora_kd_keeps_a_new_direction():
    method = make_method("sdlora_kd")
    model = _kd_model(method, combination=False)
    info = method._distill(model, "t002")
    assert not info["absorbed"] and info["max_residual"] > 9e-4
    assert "t002" in model.sd_magnitudes
    assert all("t002" in layer.lora_A for layer in model.lora_layers().values())


# -- InfLoRA ----------------------------------------------------------------------------------
def _free_residual(A: torch.Tensor, memory) -> float:
    """Relative size of the part of A's rows inside the protected subspace."""
    basis, complement = memory
    basis = basis.to(A.dtype)
    if float(torch.linalg.norm(A)) == 0.0:  # no free dimension was left: an all-zero branch
        return 0.0
    inside = A - (A @ basis) @ basis.T if complement else (A @ basis) @ basis.T
    return float(torch.linalg.norm(inside) / torch.linalg.norm(A))


@pytest.mark.parametrize("overrides", [{}, {"variant": "official"}], ids=["paper", "official"])
def test_inflora_new_input_rows_orthogonal_to_old_subspace(overrides):
    run = stream("inflora", **overrides) if overrides else stream("inflora")
    for t in (1, 2):
        old = run["states"][t - 1]["memory"]
        model = run["models"][t]
        for n, layer in model.lora_layers().items():
            memory = (old[f"{n}.basis"], bool(old[f"{n}.complement"].item()))
            A = layer.lora_A[task_key(t)].detach().double()
            assert _free_residual(A, memory) < 1e-6, f"{n}: task {t} rows enter the old subspace"
            # designed rows: orthonormal / sqrt(3), and the output side trained from zero
            assert torch.allclose(A @ A.T, torch.eye(A.shape[0], dtype=A.dtype) / 3, atol=1e-6)
    # only output sides and the head trained
    names = {id(p): n for n, p in run["models"][2].named_parameters()}
    trained = {names[id(p)] for p in run["requests"][2][0].params}
    assert trained and all("lora_B.t002" in n or n.startswith("heads.t002") for n in trained)


def test_inflora_memory_grows_and_switches_to_complement():
    method = make_method("inflora")
    g = torch.Generator().manual_seed(0)
    d = 16
    H = torch.randn(d, 200, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, d,
                                                                                dtype=torch.float64)[:, None]
    C = H @ H.T / 200
    mem = method.update_memory(C, None, 0.5)
    assert not mem[1] and 1 <= mem[0].shape[1] < d / 2
    U = mem[0].double()
    assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-6)
    mem2 = method.update_memory(C, mem, 0.999)  # demands nearly all energy: crosses d/2
    assert mem2[1], "a basis over d/2 must be stored as its complement"
    protected = method.protected_dims(mem2, d)
    assert protected > d / 2
    # the complement is orthogonal to the old protected basis
    assert float(torch.linalg.norm(mem2[0].double().T @ U)) < 1e-5


def _feature_drift(run) -> float:
    """How far task 0's features moved between the end of task 0 and the end of the stream."""
    method = run["method"]
    x = TEST[0]
    feats = []
    for t in (0, N_TASKS - 1):
        model = run["models"][t]
        method.activate_model(model, t)
        model.eval()
        with torch.no_grad():
            feats.append(model.features(x))
    return float(torch.linalg.norm(feats[1] - feats[0]) / torch.linalg.norm(feats[0]))


@pytest.mark.slow  # keeps `make test-fast` under 5 minutes; `make test` runs it
def test_inflora_moves_old_features_far_less_than_seq_lora():
    # the same training for both (seq_lora defaults to SGD, InfLoRA to AdamW)
    common = {"targets": ["k", "v"], "rank": 10, "lr": 1e-2, "epochs": 3, "optimizer": "adamw"}
    inflora = _feature_drift(stream("inflora", **common))
    seq = _feature_drift(stream("seq_lora", **common))
    assert seq > 0.01, f"seq_lora barely moved ({seq:.4f}): the comparison says nothing"
    assert inflora < 0.3 * seq, f"InfLoRA drift {inflora:.4f} vs seq_lora {seq:.4f}"


# -- CoDyRA -----------------------------------------------------------------------------------
def test_codyra_proximal_step_zeroes_small_weights_exactly():
    method = make_method("codyra", kappa_max=0.005, dense_fraction=0.5)
    assert method.kappa(0, 100) == 0.0 and method.kappa(49, 100) == 0.0
    assert method.kappa(50, 100) == pytest.approx(0.005 / 50)
    assert method.kappa(99, 100) == pytest.approx(0.005)
    model = fresh_model(method)
    layer = next(iter(model.lora_layers().values()))
    layer.add_adapter(CODYRA_ADAPTER, 4)
    layer.add_gate(CODYRA_ADAPTER, torch.tensor([0.001, -0.004, 0.5, -0.7]))
    method.proximal_step(model, 99, 100)  # kappa = kappa_max
    w = layer.lora_w[CODYRA_ADAPTER].detach()
    assert w[0].item() == 0.0 and w[1].item() == 0.0
    assert torch.allclose(w[2:], torch.tensor([0.495, -0.695]))
    method.proximal_step(model, 10, 100)  # dense phase: untouched
    assert torch.equal(layer.lora_w[CODYRA_ADAPTER].detach(), w)
    official = make_method("codyra", variant="official", kappa_max=0.005)
    layer.lora_w[CODYRA_ADAPTER].data = torch.tensor([0.008, -0.2, 0.5, 0.0])
    official.proximal_step(model, 99, 100)  # the authors' ops zero |w| < 2 kappa
    assert torch.allclose(layer.lora_w[CODYRA_ADAPTER].detach(), torch.tensor([0.0, -0.195, 0.495, 0.0]))


def test_codyra_merge_reproduces_unmerged_outputs():
    method = make_method("codyra")
    model = fresh_model(method)
    g = torch.Generator().manual_seed(5)
    for layer in model.lora_layers().values():
        layer.add_adapter(CODYRA_ADAPTER, 6, generator=g)
        layer.set_adapter_weights(CODYRA_ADAPTER, 0.1 * torch.randn(layer.out_features, 6, generator=g),
                                  layer.lora_A[CODYRA_ADAPTER].detach())
        layer.add_gate(CODYRA_ADAPTER, torch.tensor([0.0, 1.2, -0.3, 0.0, 0.0, 2.0]))
    model.add_head("t000", CLASSES, g)
    model.activate([CODYRA_ADAPTER], ["t000"])
    model.eval()
    with torch.no_grad():
        before = model(EVAL_X)
    merged, ranks = method.merge(model)
    assert set(ranks.values()) == {3}
    assert all(CODYRA_ADAPTER not in layer.lora_A for layer in model.lora_layers().values())
    model.activate([], ["t000"])
    with torch.no_grad():
        after = model(EVAL_X)
    assert torch.allclose(before, after, atol=1e-5)
    assert all(B.shape[1] == 3 and A.shape[0] == 3 for B, A in merged.values())


def test_codyra_parameter_count_does_not_grow():
    run = stream("codyra")
    counts = []
    for t, model in enumerate(run["models"]):
        assert all(not layer.adapters() for layer in model.lora_layers().values())
        counts.append(sum(p.numel() for n, p in model.named_parameters() if not n.startswith("heads.")))
        ranks = run["metas"][t]["ranks"]
        assert ranks and all(0 <= r <= 16 for r in ranks.values())
        assert method_heads_only(run, t)
    assert len(set(counts)) == 1, counts
    initial = fresh_model(run["method"])
    assert counts[0] == sum(p.numel() for p in initial.parameters())
    # the backbone did change: the merged updates are in the weights
    w0 = dict(initial.named_parameters())
    assert any(not torch.equal(p, w0[n]) for n, p in run["models"][2].named_parameters()
               if n in w0)


def method_heads_only(run, t) -> bool:
    model = run["models"][t]
    return run["method"].params_added(model, t) == sum(
        p.numel() for p in model.heads[task_key(t)].parameters())


def test_codyra_prunes_during_a_task():
    run = stream("codyra", kappa_max=0.5, epochs=2)
    ranks = run["metas"][0]["ranks"]
    assert min(ranks.values()) < 16, "a large kappa must prune components"


# -- baselines --------------------------------------------------------------------------------
def test_seq_lora_one_adapter_trained_by_every_task():
    run = stream("seq_lora")
    a = [run["states"][t]["adapter"] for t in range(N_TASKS)]
    for t in range(1, N_TASKS):
        assert set(a[t]) == set(a[0])
        assert any(not torch.equal(a[t][k], a[t - 1][k]) for k in a[t]), "task t left the LoRA as is"
    for model in run["models"]:
        assert all(layer.adapters() == ["lora"] for layer in model.lora_layers().values())


def test_joint_trains_on_all_seen_data_from_the_initial_backbone():
    run = stream("joint")
    for t, requests in enumerate(run["requests"]):
        assert [r.data for r in requests] == ["seen"]
        assert run["method"].state_dependencies(t) == []
        assert run["logits"][t].shape[1] == CLASSES * (t + 1)
    # the seen-classes loss uses stream labels over every seen class's logit
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0]])
    assert run["requests"][1][0].loss_fn(logits, torch.tensor([2])) < 1e-3


def test_linear_probe_never_changes_the_backbone():
    """Only the heads train: on a CNN the backbone's weights and BatchNorm statistics after the
    last task equal the initial ones bit for bit, and every task depends on nothing."""
    method = make_cnn_method("linear_probe")
    initial = fresh_model(method).backbone.state_dict()
    run = train_stream(method)
    for t in range(N_TASKS):
        assert method.state_dependencies(t) == []
        assert set(run["states"][t]) == {"head", STATS_STEM}
    final = run["models"][-1].backbone.state_dict()
    assert set(final) == set(initial)
    assert all(torch.equal(final[k], initial[k]) for k in initial)


# -- slda ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("projection_dim", [0, 48])
def test_slda_is_the_discriminant_of_the_seen_tasks_pooled_statistics(projection_dim):
    """After task t, slda scores every image as the linear discriminant fitted on all training
    images of tasks 0..t pooled (through the run's projection when there is one); the order its
    tasks' statistics are loaded in changes nothing; nothing trains."""
    cfg = method_config("slda")
    method = METHODS["slda"](cfg.method, resolve_targets(cfg), is_cnn=False, shrinkage=0.1,
                             projection_dim=projection_dim, seed=cfg.seed)
    run = train_stream(method)
    assert all(m["fits"] == [] for m in run["metas"])
    model = fresh_model(method).eval()
    projection = router_projection(projection_dim, model.feature_dim, cfg.seed)
    with torch.no_grad():
        def feats(x):
            return router_features(model.features(x), projection)
        eval_feats = feats(EVAL_X)
        for t in range(N_TASKS):
            x = torch.cat([TRAIN[s][0] for s in range(t + 1)])
            y = torch.cat([TRAIN[s][1] for s in range(t + 1)])
            pooled = ClassStatistics.from_features(feats(x), y, range(CLASSES * (t + 1)))
            lda = LinearDiscriminant.fit(pooled, 0.1)
            logits = run["logits"][t]
            assert torch.allclose(logits.double(), lda.scores(eval_feats), rtol=1e-5, atol=1e-4)
            assert torch.equal(logits.argmax(1), lda.predict(eval_feats))
            backwards = fresh_model(method)
            for s in reversed(method.prediction_dependencies(t)):
                method.load_task_state(backwards, s, run["states"][s])
            assert torch.equal(predict(method, backwards, t), logits)


def test_slda_refuses_a_model_without_the_statistics_it_is_made_of():
    run = stream("slda")
    method = run["method"]
    model = fresh_model(method)
    method.load_task_state(model, 1, run["states"][1])
    with pytest.raises(ValueError, match=r"tasks \[0\] are not loaded"):
        method.activate_model(model, 1)
    with pytest.raises(ValueError, match="no stats.safetensors"):
        method.load_task_state(model, 0, {})


# -- CNN backbones ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pearl", "sdlora", "sdlora_kd", "inflora", "codyra", "seq_lora"])
def test_conv_targets_contract(name):
    """The same contract on a CNN: LoRA on 3x3, 1x1 and TF-'same' convs."""
    run = train_stream(make_cnn_method(name))
    method = run["method"]
    assert all(isinstance(layer, LoRAConv2d) for layer in run["models"][0].lora_layers().values())
    for t in range(N_TASKS):
        assert torch.equal(run["logits"][t], predict(method, load_into_fresh(run, t), t))
    if name == "inflora":
        for n, layer in run["models"][2].lora_layers().items():
            old = run["states"][1]["memory"]
            A = layer.lora_A["t002"].detach().double()
            assert _free_residual(A, (old[f"{n}.basis"], bool(old[f"{n}.complement"].item()))) < 1e-6


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 5, 3, padding=1, stride=2),
    nn.Conv2d(4, 5, 1, stride=2),
    nn.Conv2d(4, 5, 3, padding=1, padding_mode="reflect"),
    Conv2dSame(4, 5, 3, stride=2),
    nn.Linear(4, 5),
], ids=["conv3x3-s2", "conv1x1-s2", "conv-reflect", "conv2dsame", "linear"])
def test_inflora_tokens_are_what_the_weight_multiplies(conv):
    """Gram statistics use the rows the flattened weight multiplies: tokens @ W^T == output."""
    from cldist.models.lora import LoRALinear
    layer = LoRAConv2d(conv) if isinstance(conv, nn.Conv2d) else LoRALinear(conv)
    x = torch.randn(2, 4, 9, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 3, 4)
    tokens = layer_tokens(layer, x)
    W = conv.weight.reshape(conv.weight.shape[0], -1)
    with torch.no_grad():
        out = layer(x)
        expect = out.permute(0, 2, 3, 1).reshape(-1, W.shape[0]) if out.dim() == 4 else out.reshape(-1, W.shape[0])
        assert torch.allclose(tokens @ W.T + conv.bias, expect, atol=1e-5)


@pytest.mark.parametrize("optimizer,n_classes", [("sgd", 3), ("adamw", 2)])
def test_zero_head_init_keeps_every_heads_mean_logit_at_zero(optimizer, n_classes):
    """`method.head_init=zero`: a head trained on its own task's logits keeps its mean row,
    so its logits average to 0 on every input - the property RESULTS.md's Class-IL analysis
    relies on - while the default initialisation leaves a random common level. (SGD: any
    number of classes; Adam's per-element scaling keeps it only for 2, whose gradients are
    exact opposites.)"""
    from cldist.models.continual import ContinualClassifier
    torch.manual_seed(0)
    model = ContinualClassifier(nn.Linear(12, 12), 12)
    model.head_init = "zero"
    head = model.add_head("t000", n_classes)
    x, y = torch.randn(32, 12), torch.randint(0, n_classes, (32,))
    opt = (torch.optim.SGD(head.parameters(), lr=0.5, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.01))
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        opt.step()
    assert head.weight.abs().max() > 0.05  # it learnt
    assert head.weight.mean(0).abs().max() < 1e-6 and abs(head.bias.mean()) < 1e-6
    assert head(torch.randn(5, 12)).mean(1).abs().max() < 1e-5
    model.head_init = "default"
    assert model.add_head("t001", 3).bias.abs().mean() > 0  # nn.Linear's random draw
