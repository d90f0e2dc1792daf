"""A run directory's task files: staging, committing, reading them back, loading them into a model.

    RUN/tasks/TTT/<stem>.safetensors    a finished task's tensors (adapter, head, stats, ...)
    RUN/tasks/TTT/meta.json             its meta, with `tensor_files` listing the tensor files
    RUN/tasks/.staging-TTT-xxxxxxxx/    a task being written (never read as finished)
    RUN/reference.safetensors           PEARL's trained reference (when not pre-trained)

A task is committed by writing its files into `tasks/.staging-*`, fsyncing them and renaming the
directory to `tasks/TTT`; state.json is rewritten only after that (cldist.rundir.state). A crash
leaves either the old state or the new one, never a half-written task that looks finished.
Nothing here is unpickled: tensors are safetensors, everything else JSON.

Callers go through `cldist.rundir.RunDir`; this module holds its torch-dependent half, imported
only when task files are touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import StorageError, UserError
from ..atomic_io import fsync_dir
from .files import read_json
from .layout import REFERENCE_FILE, staging_dir, task_dir


def write_task_dir(staging: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: dict,
                   reference: dict[str, torch.Tensor] | None = None) -> None:
    """Write a finished task's files into `staging` (fsynced, not yet visible as finished)."""
    # meta.json lists the tensor files, so a reader can tell a missing one from an old layout
    meta = {**meta, "tensor_files": sorted(f"{stem}.safetensors" for stem in tensors)}
    target = staging
    try:
        staging.mkdir(parents=True, exist_ok=False)
        for stem, group in tensors.items():
            target = staging / f"{stem}.safetensors"
            save_file({k: v.contiguous() for k, v in group.items()}, str(target))
        if reference is not None:
            target = staging / REFERENCE_FILE
            save_file({k: v.contiguous() for k, v in reference.items()}, str(target))
        target = staging / "meta.json"
        target.write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
        for f in staging.iterdir():
            target = f
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except (OSError, SafetensorError) as e:  # a full disk, most likely: name the file
        reason = getattr(e, "strerror", None) or str(e)
        raise StorageError(f"cannot write {target}: {reason}; free space on that file system "
                           f"and retry") from None
    fsync_dir(staging)


def stage_copy(run_dir, task_id: int, source: str | Path) -> Path:
    """Copy a finished task's files from `source` into a new `tasks/.staging-*` (fsynced).

    For files that must stay where they are: a Ray Train checkpoint committed while its job
    still runs is what a retry of that job resumes from.
    """
    staging = staging_dir(run_dir, task_id)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copytree(source, staging)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise StorageError(f"cannot copy task {task_id} from {source} to {staging}: "
                           f"{e.strerror or e}; free space on that file system and retry") from None
    fsync_dir(staging)
    return staging


def commit_task(run_dir, task_id: int, staging: str | Path) -> Path:
    """Make a staged task final: rename it to tasks/TTT (and its reference to RUN/)."""
    run_dir, staging = Path(run_dir), Path(staging)
    final = task_dir(run_dir, task_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # a retried job finished twice: keep the first commit, drop the duplicate
        shutil.rmtree(staging, ignore_errors=True)
        return final
    ref = staging / REFERENCE_FILE
    if ref.exists():
        os.replace(ref, run_dir / REFERENCE_FILE)
        fsync_dir(run_dir)
    os.replace(staging, final)
    fsync_dir(final.parent)
    return final


def _retrain_hint(run_dir, task_id: int) -> str:
    return (f"delete {task_dir(run_dir, task_id)} and `cldist resume {run_dir}` retrains "
            f"task {task_id} (it names any finished task trained on top of it, to delete too)")


def read_task_weights(run_dir, task_id: int) -> dict[str, dict[str, torch.Tensor]]:
    """A finished task's tensors by file stem. Only safetensors are read: a file of any other
    kind in the task's directory (a torch.save pickle, say) is refused, never loaded."""
    d = task_dir(run_dir, task_id)
    if not d.is_dir():
        raise UserError(f"task {task_id} has no files in {d}; the run directory is incomplete - "
                        f"`cldist resume {run_dir}` retrains it")
    expected: list[str] = []
    for f in sorted(d.iterdir()):
        if f.name.startswith("."):  # NFS silly-renames and editor droppings, never ours
            continue
        if f.name == "meta.json":
            expected = read_json(f, _retrain_hint(run_dir, task_id)).get("tensor_files", [])
            if not isinstance(expected, list) or not all(isinstance(n, str) for n in expected):
                raise UserError(f"{f}: tensor_files must be a list of file names; "
                                f"{_retrain_hint(run_dir, task_id)}")
        elif f.suffix != ".safetensors" or not f.is_file():
            raise UserError(f"{f} is not a safetensors file; cldist writes only safetensors and "
                            f"meta.json into a task's directory and never unpickles a "
                            f"checkpoint; {_retrain_hint(run_dir, task_id)}")
    for name in expected:
        if not (d / name).is_file():
            raise UserError(f"{d / name} is missing; {_retrain_hint(run_dir, task_id)}")
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        try:
            out[f.stem] = load_file(str(f))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise UserError(f"{f} is not a readable safetensors file ({e}); "
                            f"{_retrain_hint(run_dir, task_id)}") from None
    return out


def read_reference(run_dir) -> dict[str, torch.Tensor] | None:
    p = Path(run_dir) / REFERENCE_FILE
    if not p.is_file():
        return None
    try:
        return load_file(str(p))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise UserError(f"{p} is not a readable safetensors file ({e}); every task starts "
                        f"from it: {_retrain_hint(run_dir, 0)}") from None


def load_task_into(method, model, run_dir, task_id: int) -> None:
    """Load a finished task's files into `model` through `method`: the boundary where files
    that do not fit the model (a tensor of another shape, a missing tensor, a config whose
    method was changed) become one message naming the file and tensor."""
    tensors = read_task_weights(run_dir, task_id)
    with _Loading(run_dir, task_id, tensors):
        method.load_task_state(model, task_id, tensors)


def load_reference_into(method, model, run_dir) -> None:
    """Load RUN/reference.safetensors (when there) into `model`, like load_task_into."""
    reference = read_reference(run_dir)
    if reference is not None:
        with _Loading(run_dir, None, {"reference": reference}):
            method.load_reference_state(model, reference)


class _Loading:
    """Turns what load_state_dict and the methods raise on files that do not fit the model
    into a UserError naming the file and the tensor."""

    def __init__(self, run_dir, task_id: int | None, tensors: dict):
        self.run_dir, self.task_id, self.tensors = Path(run_dir), task_id, tensors

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None or isinstance(error, UserError) or not issubclass(
                kind, (RuntimeError, KeyError, ValueError, NotImplementedError)):
            return False
        task = self.task_id if self.task_id is not None else 0
        where = (task_dir(self.run_dir, task) if self.task_id is not None
                 else self.run_dir / REFERENCE_FILE)
        if issubclass(kind, NotImplementedError):
            raise UserError(f"{where}: the run's method cannot load these files - was "
                            f"config.json's method.name changed after they were written? "
                            f"Restore it, or start a new run") from None
        text = " ".join(str(error).strip("'\"").split())
        match = re.search(r"size mismatch for ([^:\s]+): copying a param with shape "
                          r"torch\.Size\(\[([^\]]*)\]\)", text)
        if match:
            name = match.group(1)
            shape = [int(x) for x in match.group(2).split(",") if x.strip()]
            for stem, group in self.tensors.items():
                for key, value in group.items():
                    if (key == name or key.endswith("." + name)) and list(value.shape) == shape:
                        culprit = where / f"{stem}.safetensors" if self.task_id is not None else where
                        raise UserError(f"{culprit}: tensor {key!r} has shape {shape}, which does "
                                        f"not fit the run's model ({match.group(0)}, ...); "
                                        f"{_retrain_hint(self.run_dir, task)}") from None
        raise UserError(f"{where}: the files do not fit the run's model ({text[:300]}); "
                        f"{_retrain_hint(self.run_dir, task)}") from None


