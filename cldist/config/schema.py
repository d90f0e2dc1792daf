"""The run configuration: dataclasses that Hydra composes into, and one validation step.

Defaults live in `configs/` (YAML); these dataclasses give every key its type, so that Hydra
rejects a key that does not exist and `validate` can report every bad value at once.
Library code receives these plain dataclasses (or dicts made from them), never Hydra objects.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from ..choices import OPTIMIZERS, RUNNERS
from ..errors import ConfigError

NORMALIZATIONS = ("backbone", "none")
CLASS_IL_RULES = ("routed", "ensemble")
ROUTED_COMBINE = ("posterior_head", "lda_head", "top1")
# a P x P float64 scatter is saved with every task: 8192 dims = 512 MiB a task is the ceiling
MAX_PROJECTION_DIM = 8192


HEAD_INITS = ("default", "zero")


def must_be(key: str, value, ok: bool, what: str) -> list[str]:
    """[`key=value: what`] when not `ok`: the one shape every problem message has."""
    return [] if ok else [f"{key}={value}: {what}"]


def one_of(key: str, value, choices) -> list[str]:
    return must_be(key, value, value in choices, f"choose one of {', '.join(map(str, choices))}")


@dataclass
class MethodOptions:
    """The keys every method has; the trainer applies the optimiser keys (epochs, lr,
    weight_decay, optimizer) and head_init itself.

    Each method subclasses this in its own file with its own keys, whose defaults are its
    `configs/method/<name>.yaml` (a test holds the two equal), and its own `problems()`;
    `@register_method` registers the subclass here (METHOD_OPTIONS) and `compose` gives it to
    Hydra's ConfigStore as `method_schema/<name>`, so `method.<key>` overrides are typed and a
    key the method does not have is refused by name. Config code never imports a method: the
    registry fills when `cldist.methods` (or a module defining a method) is imported.
    """
    name: str = "pearl"
    targets: list[str] = field(default_factory=lambda: ["k"])  # role names or glob patterns
    epochs: int = 3  # the main phase's epochs (PEARL: stage 2); trainer.epochs overrides
    lr: float = 1e-3  # the main phase's learning rate (FitRequest.lr_key "lr")
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9; SD-LoRA's official code)
    # a new task head's initialisation: default (nn.Linear's, as the official code) | zero
    # (a head trained on its own task's logits then keeps its mean logit at 0 - under SGD, or
    # Adam with 2 classes per task: see RESULTS.md)
    head_init: str = "default"

    def problems(self) -> list[str]:
        """Every bad value, as `method.<key>=<value>: <what to do>`; subclasses add theirs to
        `super().problems()`."""
        p = must_be("method.epochs", self.epochs, self.epochs >= 1, "must be >= 1")
        p += positive_lr("method.lr", self.lr)
        p += must_be("method.weight_decay", self.weight_decay,
                     0 <= self.weight_decay < math.inf, "must be a finite number >= 0")
        p += one_of("method.optimizer", self.optimizer, OPTIMIZERS)
        p += one_of("method.head_init", self.head_init, HEAD_INITS)
        if not self.targets:
            p.append("method.targets is empty: name at least one role or module pattern")
        return p

    def run_problems(self, cfg: "RunConfig") -> list[str]:
        """Problems of this method's keys together with other sections (PEARL: a pre-trained
        reference needs pre-trained weights)."""
        return []


def positive_lr(key: str, value: float) -> list[str]:
    if not value > 0:
        return [f"{key}={value}: must be > 0"]
    # inf would only come back as a NaN loss mid-run
    return must_be(key, value, math.isfinite(value), "must be a finite number > 0")


# method name -> its options class (filled by @register_method; see MethodOptions)
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {}


def register_options(name: str, cls: type[MethodOptions]) -> None:
    if not (isinstance(cls, type) and issubclass(cls, MethodOptions)):
        raise TypeError(f"method {name!r}: its Options must subclass MethodOptions")
    if cls().name != name:
        raise ValueError(f"method {name!r}: its Options ({cls.__name__}) default name is "
                         f"{cls().name!r}; declare a MethodOptions subclass with "
                         f"`name: str = {name!r}` and the method's own keys")
    METHOD_OPTIONS[name] = cls


def method_options_class(name: str) -> type[MethodOptions]:
    try:
        return METHOD_OPTIONS[name]
    except KeyError:
        hint = "" if METHOD_OPTIONS else " (none registered: import cldist.methods first)"
        raise KeyError(f"unknown method {name!r}; registered: {sorted(METHOD_OPTIONS)}"
                       f"{hint}") from None


# The method section of config.json in run-directory format 1, when one flat MethodConfig held
# every method's keys: every run still writes each of them, in this order (a key its method
# does not have with the value it read then, or this default), so that runs written before
# and after per-method options compare key for key (cldist report groups runs by config).
# Loading accepts them for any method and carries them through unchanged. Never grows: a new
# method's own keys follow these.
FORMAT1_METHOD_KEYS: dict[str, Any] = {
    "name": "pearl", "targets": ["k"], "epochs": 3, "lr": 1e-3, "weight_decay": 0.0,
    "optimizer": "adamw", "head_init": "default", "stage1_epochs": 1, "stage1_lr": 1e-3,
    "reference": "auto", "reference_epochs": 3, "threshold_rule": "squashed", "rule_params": {},
    "min_rank": 1, "max_rank": None, "reinit": True, "task_norms": True, "variant": "paper",
    "rank": 10, "blocks": None, "rank_schedule": [], "magnitude_init": None,
    "kd_threshold": 9e-4, "boundary": "continuous", "gpm_eps": 0.95, "kappa_max": 0.05,
    "dense_fraction": 0.5, "kappa_steps": 50,
}
# where a loaded options object keeps the format-1 keys its class does not have
_CARRIED = "_format1_keys"


def options_from_dict(d: dict) -> MethodOptions:
    """A method section (plain data, already typed) as its method's options object; format-1
    keys the method does not have are kept aside for `options_to_dict`."""
    cls = method_options_class(d.get("name", MethodOptions.name))
    own = {f.name for f in fields(cls)}
    opts = cls(**{k: v for k, v in d.items() if k in own or k not in FORMAT1_METHOD_KEYS})
    setattr(opts, _CARRIED, {k: v for k, v in d.items()
                             if k not in own and k in FORMAT1_METHOD_KEYS})
    return opts


def options_to_dict(opts: MethodOptions) -> dict:
    """The method section as config.json holds it: the format-1 keys first, then the
    method's own others (see FORMAT1_METHOD_KEYS)."""
    own = asdict(opts)
    carried = getattr(opts, _CARRIED, {})
    out = {k: own[k] if k in own else carried.get(k, v) for k, v in FORMAT1_METHOD_KEYS.items()}
    out.update((k, v) for k, v in own.items() if k not in out)
    return copy.deepcopy(out)


@dataclass
class ScenarioConfig:
    name: str = "fmnist_5t"
    source: str = "fashion_mnist"  # a `cldist data build` source
    # an already-built manifest.json, or its directory, locally or at a URL (http(s)://...)
    manifest: Optional[str] = None
    data_dir: str = "data/fmnist_5t"  # where to build the shards when `manifest` is unset
    root: Optional[str] = None  # raw data location for the source (default: the source's own)
    n_tasks: int = 5
    class_order_seed: int = 1993
    max_train_per_class: Optional[int] = None
    max_test_per_class: Optional[int] = None
    image_size: int = 32  # model input size
    augment: bool = True
    # training crop when augmenting: random (pad + crop, CIFAR-style) | random_resized
    # (RandomResizedCrop, as the ViT LoRA papers) | none (flip only)
    train_crop: str = "random"
    # evaluation: resize the shorter side to this, then centre-crop image_size (null: resize
    # straight to image_size)
    test_resize: Optional[int] = None
    normalize: str = "backbone"  # backbone (timm's mean/std for the weights) | none ([0, 1])
    # hosts a remote manifest or shard URL may name: HOST or HOST:PORT (http and https),
    # https://HOST (that scheme only), s3://BUCKET (an object store via fsspec); empty: local
    # data only. Never pipe: or other command schemes, never cloud metadata addresses.
    allowed_hosts: list[str] = field(default_factory=list)
    # the largest tar member (image or label) a shard may hold, checked from its header before
    # it is read (default 64 MiB, cldist.data.shards.MAX_MEMBER_BYTES)
    max_member_bytes: int = 64 << 20


@dataclass
class BackboneConfig:
    name: str = "tf_efficientnet_lite0"
    pretrained: bool = False  # timm hub download (needs internet)
    checkpoint: Optional[str] = None  # local weights, or package:efficientnet_lite0
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    family: str = "cnn"  # cnn | vit
    # role name -> glob patterns over module names; methods name roles in `method.targets`
    roles: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    num_workers: int = 1
    zero_stage: int = 0
    epochs: Optional[int] = None  # overrides method.epochs when set
    batch_size: int = 32
    eval_batch_size: int = 256
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    max_concurrent_tasks: Optional[int] = None  # None: as many as the cluster's resources allow
    max_failures: int = 1
    torch_threads: Optional[int] = None
    # independent tasks one Ray Train job learns back to back (ray runner): packing amortises
    # the job's start-up (placement group, worker processes, process group) over several tasks;
    # "auto": job slots - long-lived jobs that each learn whatever task is ready next
    tasks_per_job: Union[int, str] = 1
    # DataLoader processes that decode and augment a worker's training images ahead of its
    # steps; 0 decodes in the training process (a GPU worker waits on JPEG decoding)
    loader_workers: int = 0
    # how often each job's Ray Train controller polls its workers (Ray's
    # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, default 2 s): a report counts, a job ends and a dead
    # worker is noticed only at a poll, and packed jobs wait for it after every task
    poll_interval_s: float = 0.5
    # GPU share each training worker reserves when use_gpu (null: what the evaluators leave of
    # one GPU, see gpu_shares)
    gpus_per_worker: Optional[float] = None


@dataclass
class ClusterConfig:
    address: str = ""  # "" embedded local cluster; "auto"; "HOST:PORT"
    num_cpus: Optional[int] = None  # embedded cluster size (default: all cores)
    num_gpus: Optional[int] = None
    eval_actors: int = 2
    # GPU share each evaluator actor reserves; > 0 scores on that GPU (null: 0.05 when
    # trainer.use_gpu, else 0 - evaluators on CPU)
    eval_gpus: Optional[float] = None
    svd_task_cpus: float = 0.0  # CPUs each per-layer SVD task reserves (see distributed/actors.py)
    # a layer whose task vector (m x n) has m * n * min(m, n) at or below this is decomposed in
    # the coordinator instead of a Ray task (default: up to 256 x 256); 0 fans every layer out
    svd_inline_max_flops: int = 256 ** 3


@dataclass
class RouterConfig:
    """Class statistics on the reference network's features (cldist.eval.routing)."""
    shrinkage: float = 0.1  # Sigma + shrinkage * mean(diag Sigma) * I before inverting
    projection_dim: int = 0  # > 0: a seeded random projection + ReLU first (RanPAC); 0 = off


@dataclass
class EvalConfig:
    """How sub-network methods decide in Class-IL (both rules are always computed)."""
    class_il: str = "routed"  # routed | ensemble: which rule acc / accuracy_matrix report
    top_k: int = 2  # routed: sub-networks run per image, besides the reference
    combine: str = "lda_head"  # routed: lda_head | posterior_head | top1 (docs/RESULTS.md)


@dataclass
class RunConfig:
    # the method's own options class (MethodOptions subclass) once composed or loaded
    method: MethodOptions = field(default_factory=MethodOptions)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runner: str = "ray"
    seed: int = 0
    run_dir: Optional[str] = None
    report: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["method"] = options_to_dict(self.method)
        return d

    @staticmethod
    def from_dict(d: dict) -> "RunConfig":
        return RunConfig(method=options_from_dict(d["method"]), scenario=ScenarioConfig(**d["scenario"]),
                         backbone=BackboneConfig(**d["backbone"]), trainer=TrainerConfig(**d["trainer"]),
                         cluster=ClusterConfig(**d["cluster"]),
                         # runs made before routing existed have neither section
                         router=RouterConfig(**d.get("router", {})),
                         eval=EvalConfig(**d.get("eval", {})),
                         **{k: v for k, v in d.items()
                            if k not in ("method", "scenario", "backbone", "trainer", "cluster",
                                         "router", "eval")})

    @property
    def main_epochs(self) -> int:
        return self.trainer.epochs if self.trainer.epochs is not None else self.method.epochs


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value; raise one ConfigError that lists all problems (the method's own
    from its options class, `MethodOptions.problems`)."""
    p: list[str] = []
    try:
        cls = method_options_class(cfg.method.name)
    except KeyError as e:
        p.append(f"method={cfg.method.name}: {e.args[0]}")
    else:
        if not isinstance(cfg.method, cls):
            p.append(f"method={cfg.method.name}: its options are a {type(cfg.method).__name__}, "
                     f"not the method's {cls.__name__}")
    p += cfg.method.problems() + cfg.method.run_problems(cfg)
    if cfg.runner not in RUNNERS:
        p.append(f"runner={cfg.runner}: choose one of {', '.join(RUNNERS)}")
    for key, value, low in [("trainer.num_workers", cfg.trainer.num_workers, 1),
                            ("trainer.batch_size", cfg.trainer.batch_size, 1),
                            ("trainer.eval_batch_size", cfg.trainer.eval_batch_size, 1),
                            ("trainer.loader_workers", cfg.trainer.loader_workers, 0),
                            ("scenario.n_tasks", cfg.scenario.n_tasks, 1),
                            ("scenario.image_size", cfg.scenario.image_size, 8),
                            ("cluster.eval_actors", cfg.cluster.eval_actors, 1),
                            ("cluster.svd_inline_max_flops", cfg.cluster.svd_inline_max_flops, 0)]:
        if value < low:
            p.append(f"{key}={value}: must be >= {low}")
    if cfg.trainer.epochs is not None and cfg.trainer.epochs < 1:
        p.append(f"trainer.epochs={cfg.trainer.epochs}: must be >= 1")
    # seeds feed numpy's SeedSequence (no negatives) and torch generators (64-bit) after
    # being scaled per task: keep them to 32 bits
    if not 0 <= cfg.seed < 2 ** 32:
        p.append(f"seed={cfg.seed}: must be in 0..{2 ** 32 - 1}")
    if not cfg.trainer.cpus_per_worker >= 0:
        p.append(f"trainer.cpus_per_worker={cfg.trainer.cpus_per_worker}: must be >= 0")
    if cfg.trainer.torch_threads is not None and cfg.trainer.torch_threads < 1:
        p.append(f"trainer.torch_threads={cfg.trainer.torch_threads}: must be >= 1 (or null)")
    if cfg.trainer.zero_stage not in (0, 1, 2, 3):
        p.append(f"trainer.zero_stage={cfg.trainer.zero_stage}: choose 0, 1, 2 or 3")
    if cfg.scenario.normalize not in NORMALIZATIONS:
        p.append(f"scenario.normalize={cfg.scenario.normalize}: choose backbone or none")
    if cfg.scenario.max_member_bytes < 1:
        p.append(f"scenario.max_member_bytes={cfg.scenario.max_member_bytes}: must be >= 1 "
                 f"(bytes; default {64 << 20})")
    for host in cfg.scenario.allowed_hosts:
        if not _host_entry_ok(host):
            p.append(f"scenario.allowed_hosts: {host!r} is not HOST, HOST:PORT, "
                     f"http(s)://HOST[:PORT] or s3://BUCKET (gs, gcs, az, abfs, abfss, memory)")
    if cfg.backbone.family not in ("cnn", "vit"):
        p.append(f"backbone.family={cfg.backbone.family}: choose cnn or vit")
    for role in cfg.method.targets:
        if not _is_pattern(role) and role not in cfg.backbone.roles and "default" not in cfg.backbone.roles:
            p.append(f"method.targets: role {role!r} is not defined for backbone "
                     f"{cfg.backbone.name} (roles: {sorted(cfg.backbone.roles)}); use a role or a "
                     f"module-name pattern")
    per_job = cfg.trainer.tasks_per_job
    if per_job != "auto" and not (isinstance(per_job, int) and not isinstance(per_job, bool)
                                  and per_job >= 1):
        p.append(f"trainer.tasks_per_job={per_job}: must be a whole number >= 1, or auto "
                 f"(job slots that pull ready tasks until none is left)")
    if not cfg.trainer.poll_interval_s > 0:
        p.append(f"trainer.poll_interval_s={cfg.trainer.poll_interval_s}: must be > 0 (seconds)")
    shares_valid = cfg.cluster.eval_actors >= 1
    if cfg.cluster.eval_gpus is not None and not 0 <= cfg.cluster.eval_gpus < 1:
        shares_valid = False
        p.append(f"cluster.eval_gpus={cfg.cluster.eval_gpus}: must be in [0, 1) (a share of one "
                 f"GPU per evaluator; 0 scores on CPU)")
    if cfg.trainer.gpus_per_worker is not None and not 0.5 < cfg.trainer.gpus_per_worker <= 1:
        shares_valid = False
        p.append(f"trainer.gpus_per_worker={cfg.trainer.gpus_per_worker}: must be in (0.5, 1] "
                 f"(a worker owns its GPU: two ranks on one GPU break NCCL)")
    if cfg.trainer.use_gpu and shares_valid:
        per_worker, eval_gpus = gpu_shares(cfg)
        if per_worker <= 0.5 or per_worker + cfg.cluster.eval_actors * eval_gpus > 1 + 1e-9:
            p.append(f"trainer.gpus_per_worker={per_worker} + cluster.eval_actors="
                     f"{cfg.cluster.eval_actors} x cluster.eval_gpus={eval_gpus} exceeds one "
                     f"GPU: on a one-GPU machine the evaluators would hold the GPU that every "
                     f"later task job waits for; lower one of them (cluster.eval_gpus=0 scores "
                     f"on CPU)")
    if cfg.trainer.max_concurrent_tasks is not None and cfg.trainer.max_concurrent_tasks < 1:
        p.append(f"trainer.max_concurrent_tasks={cfg.trainer.max_concurrent_tasks}: must be >= 1")
    if not 0 <= cfg.router.shrinkage < math.inf:
        p.append(f"router.shrinkage={cfg.router.shrinkage}: must be a finite number >= 0")
    if not 0 <= cfg.router.projection_dim <= MAX_PROJECTION_DIM:
        p.append(f"router.projection_dim={cfg.router.projection_dim}: must be in "
                 f"0..{MAX_PROJECTION_DIM} (0 = no projection)")
    if cfg.eval.class_il not in CLASS_IL_RULES:
        p.append(f"eval.class_il={cfg.eval.class_il}: choose one of {', '.join(CLASS_IL_RULES)}")
    if cfg.eval.top_k < 1:
        p.append(f"eval.top_k={cfg.eval.top_k}: must be >= 1")
    if cfg.eval.combine not in ROUTED_COMBINE:
        p.append(f"eval.combine={cfg.eval.combine}: choose one of {', '.join(ROUTED_COMBINE)}")
    if p:
        raise ConfigError(p)
    return cfg


# GPU share of one evaluator on GPU runs: a ViT-B sub-network scores in a few hundred MB, and
# two of them beside a 0.9 training worker leave every GPU of a node usable for training
EVAL_GPU_SHARE = 0.05


def gpu_shares(cfg: RunConfig) -> tuple[float, float]:
    """(GPUs per training worker, GPUs per evaluator actor) with the nulls resolved.

    Evaluators live for the whole run, so on a one-GPU machine they must fit beside a training
    worker on that GPU or every later task job waits for them forever: by default a worker
    takes what `cluster.eval_actors` evaluators of `EVAL_GPU_SHARE` leave of one GPU.
    """
    eval_gpus = cfg.cluster.eval_gpus
    if eval_gpus is None:
        eval_gpus = EVAL_GPU_SHARE if cfg.trainer.use_gpu else 0.0
    per_worker = cfg.trainer.gpus_per_worker
    if per_worker is None:
        per_worker = round(1.0 - cfg.cluster.eval_actors * eval_gpus, 6) if cfg.trainer.use_gpu \
            else 0.0
    return float(per_worker), float(eval_gpus)


def has_pretrained_weights(cfg: RunConfig) -> bool:
    return bool(cfg.backbone.pretrained or cfg.backbone.checkpoint)


def _is_pattern(s: str) -> bool:
    return any(c in s for c in ".*?[")


def resolve_targets(cfg: RunConfig) -> list[str]:
    """Module-name patterns for the method's target roles on this backbone."""
    patterns: list[str] = []
    for role in cfg.method.targets:
        if _is_pattern(role):
            patterns.append(role)
        elif role in cfg.backbone.roles:
            patterns += list(cfg.backbone.roles[role])
        else:  # a CNN has no q/k/v: its 'default' role stands in for attention roles
            patterns += list(cfg.backbone.roles["default"])
    return list(dict.fromkeys(patterns))


def _host_entry_ok(entry) -> bool:
    """Whether `entry` has the form `scenario.allowed_hosts` documents."""
    from ..data.remote import HTTP_SCHEMES, OBJECT_STORE_SCHEMES
    if not isinstance(entry, str):
        return False
    kind, sep, rest = entry.strip().lower().rstrip("/").partition("://")
    if not sep:
        kind, rest = "http", kind
    if kind in OBJECT_STORE_SCHEMES:
        return bool(re.fullmatch(r"[a-z0-9][a-z0-9._-]*", rest))
    return kind in HTTP_SCHEMES and bool(
        re.fullmatch(r"([a-z0-9_.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?", rest))
