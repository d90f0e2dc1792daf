"""DeepSpeed step engine: the Ray runner's optimiser back-end (see `cldist.train.engine`).

`DeepSpeedStepEngine` wraps the caller's model in a DeepSpeed engine for one training phase
(one fixed trainable set): a client torch optimiser (AdamW or SGD, `method.optimizer`) plus a
cosine schedule over `total_steps`, ZeRO stage 0-3, no gradient clipping - so that with one
process it computes the same update as `TorchStepEngine`. Precision: fp32 on CPU; on GPU the
weights and the optimiser state stay fp32 and the forward runs under DeepSpeed's
`torch_autocast` (bf16), so fp32 inputs work unchanged and `finish()` hands back fp32 weights.

`engine.module` is the DeepSpeed engine itself (an `nn.Module`): call it for the forward pass,
because that is where DeepSpeed enters autocast and, under ZeRO-3, gathers partitioned
parameters. Attribute reads it does not know (`engine.module.head`) fall through to the
wrapped model. After `finish()`, `module` is the plain model the caller passed in, holding
full, trained weights and none of DeepSpeed's hooks or parameter attributes, so a fresh
engine for the next phase (another trainable set of the same model) starts clean.

Communication: DeepSpeed's comm layer is put on top of an existing `torch.distributed`
process group (Ray Train creates one per job); with none, a single-process group on an
in-memory store is created (no sockets, no env vars). CPU uses gloo, GPU nccl.
"""
from __future__ import annotations

import logging
import os
import warnings
from typing import Any, Iterable

import torch
from torch import nn

from ..train.engine import make_optimizer


def _quiet_deepspeed() -> None:
    # DeepSpeed logs each engine's set-up at INFO, and ZeRO calls torch collectives that
    # torch 2.14 flags as deprecated, on every step: keep a training log readable.
    from deepspeed.utils import logger as ds_logger
    if ds_logger.level < logging.WARNING:
        ds_logger.setLevel(logging.WARNING)
    warnings.filterwarnings(
        "ignore", category=FutureWarning,
        message=r".*torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor).* is deprecated")


_SHM_COMM_OP = "deepspeed_shm_comm"


def ensure_process_group(use_gpu: bool) -> str:
    """Make sure `torch.distributed` and DeepSpeed's comm layer are initialised.

    Reuses a process group that already exists (Ray Train's); otherwise creates a
    single-process group on a `HashStore`, which needs no address, port or env vars.
    Returns the backend name in force.
    """
    import deepspeed
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed's engine asserts LOCAL_RANK is set (launchers set it; we are the launcher).
        os.environ.setdefault("LOCAL_RANK", "0")
    else:
        backend = dist.get_backend()
        if "LOCAL_RANK" not in os.environ:
            raise RuntimeError(
                "DeepSpeedStepEngine: a torch.distributed group exists but LOCAL_RANK is not set; "
                "DeepSpeed needs it - run inside a Ray Train worker (which sets it) or set "
                "LOCAL_RANK to this process's index on its node")
    # DeepSpeed's comm layer would JIT-compile its CPU shared-memory all-reduce op here
    # (g++, 1-1.5 min per machine on 2 cores). Only tensor-parallel *inference* uses it;
    # training collectives go through torch.distributed, so mark it unavailable.
    deepspeed.ops.__compatible_ops__[_SHM_COMM_OP] = False
    # With a group in place DeepSpeed only wraps it (it never creates its own here).
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return backend


def deepspeed_config(zero_stage: int, micro_batch_size: int, use_bf16: bool) -> dict[str, Any]:
    """The DeepSpeed config for one phase; optimiser and scheduler come from the client."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "gradient_accumulation_steps": 1,
        # This DeepSpeed defaults gradient_clipping to 1.0; 0 keeps updates equal to AdamW's.
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": zero_stage},
        # A client torch optimizer under ZeRO needs this opt-in (it is tested with DS's own).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if use_bf16:
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


class _ModuleSnapshot:
    """What a model looked like before DeepSpeed touched it, so `restore` can undo it.

    ZeRO-3 partitions parameters in place (empties `p.data`, adds `ds_*` attributes and
    methods), swaps each submodule's `_parameters` for a `ZeROOrderedDict` and registers
    hooks; ZeRO-1/2 turn `p.data` into views of a flat buffer; autocast tags parameters with
    `comm_dtype`. A second engine on the same model must not see any of that.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.param_attrs = {id(p): set(vars(p)) for p in model.parameters()}
        self.module_attrs = {id(m): set(vars(m)) for m in model.modules()}
        self.hook_ids = {
            id(m): {name: set(getattr(m, name)) for name in _HOOK_DICTS if hasattr(m, name)}
            for m in model.modules()
        }

    def restore(self, full_data: dict[int, torch.Tensor]) -> None:
        for m in self.model.modules():
            params = m._parameters
            if type(params) is not dict:  # ZeROOrderedDict -> the plain dict torch expects
                m._parameters = {k: dict.__getitem__(params, k) for k in params.keys()}
            for name in set(vars(m)) - self.module_attrs.get(id(m), set()):
                delattr(m, name)
            for name, before in self.hook_ids.get(id(m), {}).items():
                hooks = getattr(m, name)
                for key in set(hooks) - before:
                    del hooks[key]
        for p in self.model.parameters():
            for name in set(vars(p)) - self.param_attrs.get(id(p), set()):
                delattr(p, name)
            if id(p) in full_data:
                p.data = full_data[id(p)]



def _trim_step_overhead(engine, trainable: list[nn.Parameter], zero_stage: int) -> None:
    """Drop two per-step costs of a ZeRO-0 engine that change no number (`cldist bench step`
    measured them at ~5% of a small model's step on a CPU):

    * with one data-parallel rank, the gradient all-reduce (flatten every gradient into a
      buffer, all-reduce it over one rank, copy it back) - an average over one rank is the
      gradient itself;
    * its `zero_grad` walks every parameter of the whole model (`named_parameters`) each step
      to set `.grad = None`; only the trainable set ever gets gradients, so clear just those.

    ZeRO 1-3 reduce and clear gradients inside their own optimiser wrapper: left as they are.
    """
    import torch.distributed as dist

    if zero_stage != 0:
        return
    if dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False

    def zero_grad() -> None:
        for p in trainable:
            p.grad = None

    engine.zero_grad = zero_grad


class DeepSpeedStepEngine:
    """A `StepEngine` backed by `deepspeed.initialize` (one engine per training phase).

    Args:
        module: the model; all of it is wrapped, only `params` are trained.
        params: the trainable parameters (those with `requires_grad` are kept).
        lr, weight_decay, optimizer: the client optimiser (`cldist.train.engine.make_optimizer`:
            adamw or sgd); the schedule is cosine over `total_steps` (as torch's).
        total_steps: optimiser steps in this phase.
        zero_stage: ZeRO stage 0-3.
        micro_batch_size: per-worker batch size (DeepSpeed bookkeeping only; the loop
            decides the real batch).
        use_bf16: bf16 autocast; default: on exactly when DeepSpeed runs on a GPU.

    Attributes:
        module: what to call for the forward pass - the DeepSpeed engine until `finish()`,
            then the plain model.
        model: the plain model, always (its `state_dict()` has no "module." prefix).

    With several ranks every method is collective: all ranks call it, in the same order.
    """

    def __init__(self, module: nn.Module, params: Iterable[nn.Parameter], lr: float,
                 weight_decay: float, total_steps: int, zero_stage: int = 0,
                 micro_batch_size: int = 1, use_bf16: bool | None = None,
                 optimizer: str = "adamw"):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        _quiet_deepspeed()
        self.model = module  # the plain model, also after finish()
        trainable = [p for p in params if p.requires_grad]
        if not trainable:
            raise ValueError("DeepSpeedStepEngine: no trainable parameters were given "
                             "(pass the phase's parameters with requires_grad=True)")
        # DeepSpeed moves the model to its accelerator's device, whatever device it is on now.
        on_gpu = get_accelerator().device_name() != "cpu"
        if use_bf16 is None:
            use_bf16 = on_gpu
        if use_bf16 and not on_gpu:
            raise ValueError("DeepSpeedStepEngine: use_bf16=True needs a GPU (DeepSpeed found "
                             "none); on CPU leave use_bf16=None, which trains in fp32")
        ensure_process_group(use_gpu=on_gpu)
        self.zero_stage = zero_stage
        self._snapshot = _ModuleSnapshot(module)

        client_optimizer = make_optimizer(optimizer, trainable, lr, weight_decay)
        steps = max(1, total_steps)
        engine, _, _, _ = deepspeed.initialize(
            model=module,
            model_parameters=trainable,
            optimizer=client_optimizer,
            # A callable, so the scheduler is built on the optimiser DeepSpeed keeps.
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
            config=deepspeed_config(zero_stage, micro_batch_size, use_bf16),
        )
        self._engine = engine
        self.module: nn.Module = engine
        _trim_step_overhead(engine, trainable, zero_stage)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        if self._engine is None:
            raise RuntimeError("DeepSpeedStepEngine: backward_and_step() after finish(); "
                               "create a new engine for the next phase")
        self._engine.backward(loss)
        self._engine.step()  # optimiser step, scheduler step, zero_grad

    def lr(self) -> float:
        if self._engine is None:
            raise RuntimeError("DeepSpeedStepEngine: lr() after finish()")
        return float(self._engine.get_lr()[0])

    def finish(self) -> None:
        """Gather the weights into the caller's plain model and drop the DeepSpeed engine."""
        import deepspeed

        engine = self._engine
        if engine is None:
            return
        params = list(self.model.parameters())
        if self.zero_stage == 3:
            # Partitioned: every rank gathers (a collective) and keeps a full copy.
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                full = {id(p): p.data.detach().clone() for p in params}
        else:
            # ZeRO-1/2 leave p.data as views of flat buffers: copy out so those can be freed.
            full = {id(p): p.data.detach().clone() for p in params}
        if engine.optimizer is not None:
            engine.optimizer.zero_grad(set_to_none=True)
        engine.destroy()  # removes ZeRO's module and gradient hooks
        self._snapshot.restore(full)
        for p in params:
            p.grad = None
        self._engine = None
        self.module = self.model
