"""Hostile and broken inputs through the command line, one table of cases.

Every case must end the same way: ONE message on stderr that names the culprit (the shard,
the file, the key or the option), exit status 2, no traceback - and a run directory that is
either never created (the error came before the run started), left byte-for-byte as it was
(a damaged or foreign directory is refused, never "repaired" behind the user's back), or still
resumable: `cldist resume RUN_DIR` completes once the user has fixed what the message named.

The streams are two tasks of the session's tiny digits shards on timm's test ViT with the
inline runner, so a whole run takes about two seconds on a CPU.
"""
from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from cldist.cli import main

from tests.conftest import first_tasks, serve_directory, tiny_overrides, write_tar

NO_RUN = "no run dir"      # the error came before the run: RUN_DIR was never created
UNTOUCHED = "untouched"    # RUN_DIR (or the path given) is exactly as it was before the command
RESUMES = "resumes"        # RUN_DIR stopped at a task boundary; after `repair`, resume completes

CLDIST = Path(sys.executable).with_name("cldist")


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data2(digits_dir, tmp_path_factory) -> Path:
    """The first two tasks of the session's digits shards: a pristine copy, never damaged."""
    return first_tasks(digits_dir, tmp_path_factory.mktemp("hostile") / "digits_2t", 2)


@pytest.fixture(scope="module")
def finished_run(data2, tmp_path_factory) -> Path:
    """One finished two-task run, trained once; cases copy it before damaging it."""
    run_dir = tmp_path_factory.mktemp("hostile-finished") / "run"
    assert main(["run", *tiny_overrides(data2, run_dir, "runner=inline")]) == 0
    return run_dir


@dataclass
class World:
    """What one case may damage: its own copy of the shards, its own run directory."""

    tmp: Path
    good: Path           # the pristine shards (read only)
    data: Path           # this case's copy of them
    run_dir: Path
    finished: Path       # the module's finished run (read only)
    monkeypatch: pytest.MonkeyPatch
    culprits: list[str] = field(default_factory=list)  # names the message must contain

    def run(self, *extra: str) -> list[str]:
        return ["run", *tiny_overrides(self.data, self.run_dir, "runner=inline", *extra)]

    def manifest(self) -> dict:
        return json.loads((self.data / "manifest.json").read_text())

    def save_manifest(self, manifest: dict) -> None:
        (self.data / "manifest.json").write_text(json.dumps(manifest, indent=2))

    def shard(self, task: int = 1, split: str = "train") -> Path:
        """Task `task`'s first `split` shard in this case's data; it becomes a culprit."""
        rel = self.manifest()["tasks"][task][split][0]["path"]
        self.culprits.append(rel)
        return self.data / rel

    def copy_finished(self) -> Path:
        shutil.copytree(self.finished, self.run_dir)
        return self.run_dir


# ------------------------------------------------------------------------ shard surgery
def _members(path: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _reseal(w: World, path: Path, n_samples: int | None = None) -> None:
    """Make the manifest agree with a damaged shard (its sha256, and its count if given), as
    a builder that wrote bad data would: only the content itself can then be refused."""
    manifest = w.manifest()
    rel = path.relative_to(w.data).as_posix()
    for task in manifest["tasks"]:
        for split in ("train", "test"):
            for shard in task[split]:
                if shard["path"] == rel:
                    shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                    if n_samples is not None:
                        shard["n_samples"] = n_samples
                    task[f"n_{split}"] = sum(s["n_samples"] for s in task[split])
    w.save_manifest(manifest)


def _rewrite_shard(w: World, edit: Callable[[list[tuple[str, bytes]]], list], task: int = 1,
                   split: str = "train") -> Path:
    path = w.shard(task, split)
    members = edit(_members(path))
    write_tar(path, members)
    _reseal(w, path, n_samples=len({name.split(".")[0] for name, _ in members}))
    return path


class _Payload:
    """Unpickling this creates a marker file: proof that something unpickled a member."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickled(w: World) -> bytes:
    return pickle.dumps(_Payload(w.tmp / "UNPICKLED"))


# ----------------------------------------------------------------- setups: data and manifests
def shard_corrupt(w: World):
    path = w.shard()
    raw = bytearray(path.read_bytes())
    raw[700] ^= 0xFF  # inside the first image
    path.write_bytes(bytes(raw))
    return w.run()


def shard_truncated(w: World):
    path = w.shard()
    path.write_bytes(path.read_bytes()[: 512 * 9 + 100])  # mid-member, cut in transfer
    return w.run()


def shard_truncated_resealed(w: World):
    path = w.shard()
    path.write_bytes(path.read_bytes()[: 512 * 9 + 100])
    _reseal(w, path)  # a manifest written from the truncated file: the tar itself must tell
    return w.run()


def shard_empty(w: World):
    path = w.shard()
    path.write_bytes(b"")
    _reseal(w, path)
    return w.run()


def shard_missing(w: World):
    w.shard().unlink()
    return w.run()


def manifest_checksum_mismatch(w: World):
    w.shard()
    manifest = w.manifest()
    manifest["tasks"][1]["train"][0]["sha256"] = "0" * 64
    w.save_manifest(manifest)
    return w.run()


def manifest_count_mismatch(w: World):
    w.shard()
    manifest = w.manifest()
    task = manifest["tasks"][1]
    task["train"][0]["n_samples"] += 5
    task["n_train"] += 5
    w.save_manifest(manifest)
    return w.run()


def _pickle_member(ext: str):
    def setup(w: World):
        def add_payload(members):
            key = members[0][0].split(".")[0]
            return members[:2] + [(f"{key}.{ext}", _pickled(w))] + members[2:]
        _rewrite_shard(w, add_payload)
        return w.run()
    setup.__name__ = f"shard_{ext}_member"
    return setup


def shard_unexpected_member(w: World):
    _rewrite_shard(w, lambda members: members + [("notes.txt", b"hello")])
    return w.run()


def shard_label_outside_task(w: World):
    foreign = w.manifest()["tasks"][0]["classes"][0]

    def relabel(members):
        name, _ = members[1]
        assert name.endswith(".cls")
        return [members[0], (name, str(foreign).encode())] + members[2:]
    _rewrite_shard(w, relabel)
    return w.run()


def shard_bad_image(w: World):
    def garble(members):
        name, _ = members[0]
        assert name.endswith(".png")
        w.culprits.append(name.split(".")[0])  # the sample's key
        return [(name, b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)] + members[1:]
    _rewrite_shard(w, garble)
    return w.run()


def manifest_not_json(w: World):
    (w.data / "manifest.json").write_text('{"format_version": 1, "tasks": [')
    w.culprits.append(str(w.data / "manifest.json"))
    return w.run()


def manifest_missing(w: World):
    w.culprits.append(str(w.tmp / "nowhere"))
    return ["run", *tiny_overrides(w.tmp / "nowhere", w.run_dir, "runner=inline")]


def manifest_class_in_two_tasks(w: World):
    manifest = w.manifest()
    shared = manifest["tasks"][0]["classes"][0]
    manifest["tasks"][1]["classes"][0] = shared
    w.save_manifest(manifest)
    w.culprits.append(f"class {shared} is also in task 0")
    return w.run()


def manifest_empty_task(w: World):
    manifest = w.manifest()
    manifest["tasks"][1]["classes"] = []
    w.save_manifest(manifest)
    return w.run()


def _shard_path(bad: str):
    def setup(w: World):
        manifest = w.manifest()
        manifest["tasks"][1]["train"][0]["path"] = bad
        w.save_manifest(manifest)
        w.culprits.append(bad)
        return w.run()
    return setup


# ------------------------------------------------------------------------ setups: config
def _overrides(*extra: str):
    def setup(w: World):
        return w.run(*extra)
    return setup


def key_misspelt_subprocess(w: World):
    # a real process: the exit status the shell sees, and no traceback on its stderr
    return ["subprocess", *w.run("trainer.epochz=1")]


# ---------------------------------------------------------------------- setups: run dirs
def run_dir_holds_a_run(w: World):
    w.copy_finished()
    w.culprits.append(str(w.run_dir))
    return w.run()


def run_dir_is_a_file(w: World):
    w.run_dir.write_text("not a directory")
    w.culprits.append(str(w.run_dir))
    return w.run()


def run_dir_foreign_files(w: World):
    w.run_dir.mkdir()
    (w.run_dir / "thesis.tex").write_text("years of work")
    w.culprits.append(str(w.run_dir))
    return w.run()


def resume_not_a_run_dir_subprocess(w: World):
    w.run_dir.mkdir()
    (w.run_dir / "notes.txt").write_text("hello")
    w.culprits.append(str(w.run_dir))
    return ["subprocess", "resume", str(w.run_dir)]


def resume_path_is_a_file(w: World):
    w.run_dir.write_text("not a directory")
    w.culprits.append(str(w.run_dir))
    return ["resume", str(w.run_dir)]


def resume_unreadable(w: World):
    run = w.copy_finished()
    config = run / "config.json"
    config.chmod(0)
    try:
        config.read_bytes()
        readable = True  # root: permissions do not stop reads
    except PermissionError:
        readable = False
    if readable:  # the same failure (an OSError reading the file) by other means
        config.chmod(0o644)
        config.unlink()
        config.mkdir()
    w.culprits.append("config.json")
    return ["resume", str(run)]


def state_json_corrupt(w: World):
    run = w.copy_finished()
    (run / "state.json").write_text('{"completed_tasks": [0, 1')
    w.culprits.append(str(run / "state.json"))
    return ["resume", str(run)]


def state_json_hostile_task_id(w: World):
    run = w.copy_finished()
    state = json.loads((run / "state.json").read_text())
    state["completed_tasks"] = [0, "../../etc"]
    (run / "state.json").write_text(json.dumps(state))
    w.culprits += [str(run / "state.json"), "completed_tasks"]
    return ["resume", str(run)]


def run_manifest_path_traversal(w: World):
    run = w.copy_finished()
    pinned = json.loads((run / "manifest.json").read_text())
    pinned["tasks"][1]["test"][0]["path"] = "../../etc/passwd"
    (run / "manifest.json").write_text(json.dumps(pinned))
    w.culprits += [str(run / "manifest.json"), "../../etc/passwd"]
    return ["resume", str(run)]


def config_json_unknown_key(w: World):
    run = w.copy_finished()
    config = json.loads((run / "config.json").read_text())
    config["trainer"]["epochz"] = 1
    (run / "config.json").write_text(json.dumps(config))
    w.culprits += [str(run / "config.json"), "trainer.epochz"]
    return ["resume", str(run)]


def config_json_bad_type(w: World):
    run = w.copy_finished()
    config = json.loads((run / "config.json").read_text())
    config["trainer"]["batch_size"] = "lots"
    (run / "config.json").write_text(json.dumps(config))
    w.culprits += [str(run / "config.json"), "trainer.batch_size"]
    return ["resume", str(run)]


def config_json_not_json(w: World):
    run = w.copy_finished()
    (run / "config.json").write_text("method: pearl\n")
    w.culprits.append(str(run / "config.json"))
    return ["eval", str(run)]


def eval_not_a_run_dir(w: World):
    w.run_dir.mkdir()
    w.culprits.append(str(w.run_dir))
    return ["eval", str(w.run_dir)]


def resume_override_refused(w: World):
    run = w.copy_finished()
    w.culprits.append("method.rank=4")
    return ["resume", str(run), "method.rank=4"]


def resume_lr_without_flag(w: World):
    run = w.copy_finished()
    w.culprits.append("method.lr=1e-4")
    return ["resume", str(run), "method.lr=1e-4"]


def resume_lr_key_of_another_method(w: World):
    """--allow-lr-change with PEARL's stage-1 rate on a finished run of a method without one
    (slda: a statistics pass per task, seconds)."""
    assert main(w.run("method=slda")) == 0
    w.culprits += ["method.stage1_lr", "slda", str(w.run_dir)]
    return ["resume", str(w.run_dir), "--allow-lr-change", "method.stage1_lr=1e-4"]


def resume_override_unknown(w: World):
    run = w.copy_finished()
    w.culprits.append("cluster.adress")
    return ["resume", str(run), "cluster.adress=auto"]


def checkpoint_not_safetensors(w: World):
    run = w.copy_finished()
    target = run / "tasks" / "001" / "adapter.safetensors"
    target.write_bytes(_pickled(w))  # a pickle under a safetensors name
    w.culprits.append(str(target))
    return ["eval", str(run)]


def checkpoint_pickle_file(w: World):
    run = w.copy_finished()
    task = run / "tasks" / "001"
    (task / "adapter.safetensors").unlink()
    (task / "adapter.pt").write_bytes(_pickled(w))  # what torch.save would leave
    w.culprits.append(str(task / "adapter.pt"))
    return ["resume", str(run)]


def delete_task_1(w: World):
    """The fix both checkpoint messages give: delete the task's files and resume."""
    shutil.rmtree(w.run_dir / "tasks" / "001")


# ---------------------------------------------------------------- setups: failures mid-run
def nan_loss(w: World):
    w.culprits.append("task 1")
    return w.run("method.lr=1e30")  # task 0 (PEARL's reference) trains with stage1_lr


def lr_change_recorded(w: World):
    """The new learning rate is the run's config now, and the record says from when."""
    config = json.loads((w.run_dir / "config.json").read_text())
    assert config["method"]["lr"] == pytest.approx(3e-3)
    (record,) = json.loads((w.run_dir / "state.json").read_text())["resume_overrides"]
    assert record["overrides"] == {"method.lr": pytest.approx(3e-3)}
    assert record["tasks_finished_before"] == [0]


def disk_full_on_commit(w: World):
    """ENOSPC from the atomic writer while state.json records task 1 as finished."""
    # The trigger is what is written (the first state that lists task 1), not a write count,
    # so the case still hits the commit if the driver writes state.json more or less often.
    import cldist.atomic_io as atomic
    real = atomic._write_and_sync

    def full(fh, data: bytes):
        try:
            state = json.loads(data)
        except ValueError:
            state = None
        if isinstance(state, dict) and 1 in state.get("completed_tasks", ()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fh, data)
    w.monkeypatch.setattr(atomic, "_write_and_sync", full)
    w.culprits.append(str(w.run_dir / "state.json"))
    return w.run()


def disk_has_space_again(w: World):
    w.monkeypatch.undo()


def restore_shards(w: World):
    """Put back the shards the run's manifest pins: the good ones, and - for a run that pinned
    a damaged shard - the good shard's checksum too. cldist has no command that re-pins a
    rebuilt dataset into a run yet, so the test stands in for one; what it shows is that the
    run directory itself was left at a task boundary."""
    shutil.rmtree(w.data)
    shutil.copytree(w.good, w.data)
    run_manifest = w.run_dir / "manifest.json"
    pinned = json.loads(run_manifest.read_text())
    pinned["tasks"] = json.loads((w.good / "manifest.json").read_text())["tasks"]
    run_manifest.write_text(json.dumps(pinned, indent=2))


# ------------------------------------------------- setups: shard locations and sizes
def _pin_root(w: World, root: str, hosts: list[str] | None = None) -> Path:
    """The finished run, its manifest's shard_root replaced (and its allowed hosts set)."""
    run = w.copy_finished()
    pinned = json.loads((run / "manifest.json").read_text())
    pinned["shard_root"] = root
    (run / "manifest.json").write_text(json.dumps(pinned))
    if hosts is not None:
        config = json.loads((run / "config.json").read_text())
        config["scenario"]["allowed_hosts"] = hosts
        (run / "config.json").write_text(json.dumps(config))
    w.culprits.append(str(run / "manifest.json"))
    return run


def run_manifest_pipe_root(w: World):
    # what gopen would run with a shell: proof in PWNED, and good shards, so the old reader
    # finished without a word
    _pin_root(w, f"pipe:touch {w.tmp / 'PWNED'}; cat {w.good}")
    w.culprits.append("pipe:")
    return ["eval", str(w.run_dir)]


def _run_manifest_root(root: str, hosts: list[str] | None = None, culprit: str | None = None):
    def setup(w: World):
        _pin_root(w, root, hosts)
        w.culprits.append(culprit or root)
        return ["eval", str(w.run_dir)]
    return setup


def run_manifest_relative_root(w: World):
    _pin_root(w, os.path.relpath(w.good))  # resolved against wherever cldist is started
    return ["eval", str(w.run_dir)]


def _loopback(directory: Path, redirect_to: str | None = None) -> str:
    """Serve `directory` (or redirect every request to `redirect_to`) on 127.0.0.1 for the
    rest of the test session; its base URL."""
    return serve_directory(directory, redirect_to)[1]


def scenario_http_host_not_allowed(w: World):
    url = _loopback(w.data)  # served fine: only the missing allow-list entry refuses it
    w.culprits += [url, "scenario.allowed_hosts=[127.0.0.1]"]
    return ["run", *tiny_overrides(url, w.run_dir, "runner=inline")]


def scenario_http_redirect_off_host(w: World):
    # 127.0.0.1 is allowed; it redirects to `localhost`, which is not
    target = _loopback(w.data).replace("127.0.0.1", "localhost")
    url = _loopback(w.data, redirect_to=target)
    w.culprits += [url, target]
    return ["run", *tiny_overrides(url, w.run_dir, "runner=inline",
                                   "scenario.allowed_hosts=[127.0.0.1]")]


def scenario_pipe_manifest(w: World):
    bad = f"pipe:touch {w.tmp / 'PWNED'}; cat {w.data / 'manifest.json'}"
    w.culprits.append("pipe:")
    return ["run", *tiny_overrides(f"'{bad}'", w.run_dir, "runner=inline")]  # Hydra quoting


def _tar_header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(tarfile.GNU_FORMAT)


def _forged_shard(w: World, raw: bytes, n_samples: int = 1) -> Path:
    path = w.shard()
    path.write_bytes(raw)
    _reseal(w, path, n_samples=n_samples)
    return path


def shard_sparse_member(w: World):
    # a GNU sparse .png of 8 MiB of holes in a 2.5 KB file (the same trick scales to 1 GiB in 10 KB)
    key = _members(w.data / w.manifest()["tasks"][1]["train"][0]["path"])[0][0].split(".")[0]
    header = bytearray(_tar_header(f"{key}.png", 0, tarfile.GNUTYPE_SPARSE))
    header[483:495] = tarfile.itn(8 << 20, 12, tarfile.GNU_FORMAT)  # the expanded size
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    label = b"1"
    raw = bytes(header) + _tar_header(f"{key}.cls", len(label)) + label.ljust(512, b"\0")
    _forged_shard(w, raw + b"\0" * 1024)
    return w.run()


def shard_member_claims_a_gibibyte(w: World):
    # the header says 1 GiB; the file is 1.5 KB: refused from the header, nothing allocated
    _forged_shard(w, _tar_header("big.png", 1 << 30) + b"\0" * 1024)
    w.culprits.append("1073741824 bytes")
    return w.run()


def shard_gzip_compressed(w: World):
    path = w.shard()
    path.write_bytes(gzip.compress(path.read_bytes()))  # a tar.gz under the .tar name
    _reseal(w, path)
    return w.run()


def shard_label_too_long(w: World):
    def relabel(members):
        name, _ = members[1]
        return [members[0], (name, b"7" * 5000)] + members[2:]
    _rewrite_shard(w, relabel)
    return w.run()


def shard_directory_member(w: World):
    path = w.shard()
    with tarfile.open(path, "a") as tar:
        info = tarfile.TarInfo("extra")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
    _reseal(w, path)
    return w.run()


def member_cap_from_config(w: World):
    w.shard(task=0, split="train")
    return w.run("scenario.max_member_bytes=100")  # every digits PNG is larger


# ------------------------- setups: run directory ownership, lock, damaged files
def run_dir_foreign_config(w: World):
    w.run_dir.mkdir()
    (w.run_dir / "config.json").write_text('{"api_key": "x"}')  # someone's, not a run's
    w.culprits += [str(w.run_dir), "config.json"]
    return w.run()


def run_dir_foreign_state(w: World):
    w.run_dir.mkdir()
    (w.run_dir / "state.json").write_text('{"api_key": "x"}')
    w.culprits += [str(w.run_dir), "state.json"]
    return w.run()


def resume_foreign_state(w: World):
    w.run_dir.mkdir()
    for name in ("config.json", "state.json"):
        (w.run_dir / name).write_text('{"api_key": "x"}')
    w.culprits.append(str(w.run_dir / "state.json"))
    return ["resume", str(w.run_dir)]


def resume_while_locked(w: World):
    """A second writer while the lock is held the way a running cldist holds it."""
    import fcntl
    run = w.copy_finished()
    holder = open(run / "cldist.lock", "a+")  # closed, and so unlocked, with the World
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder.write(f"pid {os.getpid()} on testhost\n")
    holder.flush()
    w.lock_holder = holder
    w.culprits += [str(run), f"pid {os.getpid()}"]
    return ["subprocess", "resume", str(run), "--allow-lr-change", "method.lr=5e-2"]


def _damaged_run_file(name: str, damage: Callable[[Path], None], command: str = "resume",
                      culprits: tuple[str, ...] = ()):
    def setup(w: World):
        run = w.copy_finished()
        damage(run / name)
        w.culprits += [str(run / name), *culprits]
        return [command, str(run)]
    return setup


def _edit_json(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(path: Path):
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))
    return damage


def _nest(wrap: str) -> Callable[[Path], None]:
    def damage(path: Path):
        path.write_text(wrap.replace("DEEP", "[" * 100_000 + "]" * 100_000))
    return damage


def _reshape_head(path: Path):
    """A valid safetensors file whose head bias has one class too many."""
    import torch
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(path))
    tensors["bias"] = torch.zeros(tensors["bias"].shape[0] + 1)
    save_file(tensors, str(path))


def task_0_deleted(w: World):
    """Task 0 (PEARL's reference) gone while task 1, trained on top of it, is finished."""
    run = w.copy_finished()
    shutil.rmtree(run / "tasks" / "000")
    w.culprits += [str(run / "state.json"), str(run / "tasks" / "000"),
                   str(run / "tasks" / "001")]
    return ["resume", str(run)]


# -------------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[World], list[str]]  # damages something; returns the failing argv
    expect: tuple[str, ...]              # fragments of the message besides the culprits
    after: str = NO_RUN
    repair: Callable[[World], None] | None = None  # RESUMES: what the user fixes first
    resume_args: tuple[str, ...] = ()
    resumed: Callable[[World], None] | None = None  # RESUMES: more checks after the resume
    marks: tuple = ()


CASES = [
    # shards and manifests: refused before the run directory exists
    Case("shard-corrupt", shard_corrupt, ("fails its checksum",)),
    Case("shard-truncated", shard_truncated, ("fails its checksum",)),
    Case("shard-truncated-resealed", shard_truncated_resealed, ("truncated",)),
    Case("shard-empty", shard_empty, ("empty file",)),
    Case("shard-missing", shard_missing, ("is missing",)),
    Case("manifest-checksum-mismatch", manifest_checksum_mismatch, ("fails its checksum",)),
    Case("manifest-count-mismatch", manifest_count_mismatch, ("holds 120 samples", "125")),
    Case("shard-pickle-pyd-member", _pickle_member("pyd"), ("'.pyd'", "never unpickles")),
    Case("shard-pickle-pth-member", _pickle_member("pth"), ("'.pth'", "never unpickles")),
    Case("shard-unexpected-member", shard_unexpected_member, ("'.txt'", "notes")),
    Case("shard-label-outside-task", shard_label_outside_task, ("not one of this task's classes",)),
    Case("manifest-not-json", manifest_not_json, ("not readable JSON",)),
    Case("manifest-missing", manifest_missing, ("no dataset manifest",)),
    Case("manifest-class-in-two-tasks", manifest_class_in_two_tasks, ("tasks[1].classes",)),
    Case("manifest-empty-task", manifest_empty_task, ("tasks[1].classes", "empty task")),
    Case("manifest-path-traversal", _shard_path("../../etc/passwd"), ("escapes the dataset",)),
    Case("manifest-absolute-path", _shard_path("/etc/passwd"), ("is absolute",)),
    # the shard reads fine but an image does not decode: found mid-run, in task 1
    Case("shard-bad-image", shard_bad_image, ("cannot be decoded", "cldist resume"),
         after=RESUMES, repair=restore_shards),
    # configuration: refused before anything is read or written
    Case("key-misspelt", key_misspelt_subprocess, ("trainer.epochz", "trainer.epochs")),
    # PEARL's rank is its rank rule's (min_rank/max_rank): a fixed-rank method's rank here
    Case("lora-rank-zero", _overrides("method=sdlora", "method.rank=0"),
         ("method.rank=0", ">= 1")),
    Case("max-rank-negative", _overrides("method.max_rank=-3"), ("method.max_rank=-3",)),
    Case("epochs-zero", _overrides("trainer.epochs=0"), ("trainer.epochs=0", ">= 1")),
    Case("batch-size-negative", _overrides("trainer.batch_size=-8"), ("trainer.batch_size=-8",)),
    Case("batch-size-not-a-number", _overrides("trainer.batch_size=lots"),
         ("trainer.batch_size",)),
    Case("workers-zero", _overrides("trainer.num_workers=0"), ("trainer.num_workers=0",)),
    Case("poll-interval-zero", _overrides("trainer.poll_interval_s=0"),
         ("trainer.poll_interval_s=0", "> 0")),
    Case("gpu-evaluators-crowd-out-the-worker",
         _overrides("trainer.use_gpu=true", "trainer.gpus_per_worker=1"),
         ("trainer.gpus_per_worker=1.0", "cluster.eval_gpus=0.05", "exceeds one GPU")),
    Case("lr-zero", _overrides("method.lr=0"), ("method.lr=0", "> 0")),
    Case("lr-infinite", _overrides("method.lr=inf"), ("method.lr=inf", "finite")),
    Case("seed-negative", _overrides("seed=-1"), ("seed=-1",)),
    Case("method-misspelt", _overrides("method=pearll"), ("method=pearll", "pearl, sdlora")),
    Case("backbone-unknown", _overrides("backbone=vit_huge"), ("backbone=vit_huge", "test_vit")),
    Case("scenario-unknown", _overrides("scenario=cifar"), ("scenario=cifar", "digits_5t")),
    Case("runner-unknown", _overrides("runner=spark"), ("runner=spark", "inline")),
    Case("targets-match-nothing", _overrides("method.targets=[blocks.*.nothing]"),
         ("blocks.*.nothing", "blocks.0.attn")),
    # run directories: refused, and left exactly as they were
    Case("run-dir-holds-a-run", run_dir_holds_a_run, ("already holds a run", "cldist resume"),
         after=UNTOUCHED),
    Case("run-dir-is-a-file", run_dir_is_a_file, ("not a directory",), after=UNTOUCHED),
    Case("run-dir-foreign-files", run_dir_foreign_files, ("not empty",), after=UNTOUCHED),
    Case("resume-not-a-run-dir", resume_not_a_run_dir_subprocess,
         ("not a cldist run directory",), after=UNTOUCHED),
    Case("resume-path-is-a-file", resume_path_is_a_file, ("not a cldist run directory",),
         after=UNTOUCHED),
    Case("resume-unreadable", resume_unreadable, ("cannot read",), after=UNTOUCHED),
    Case("state-json-corrupt", state_json_corrupt, ("not valid JSON",), after=UNTOUCHED),
    Case("state-json-hostile-task-id", state_json_hostile_task_id, ("'../../etc'",),
         after=UNTOUCHED),
    Case("run-manifest-path-traversal", run_manifest_path_traversal,
         ("escapes the dataset directory",), after=UNTOUCHED),
    Case("config-json-unknown-key", config_json_unknown_key, ("does not exist",),
         after=UNTOUCHED),
    Case("config-json-bad-type", config_json_bad_type, ("lots",), after=UNTOUCHED),
    Case("config-json-not-json", config_json_not_json, ("not valid JSON",), after=UNTOUCHED),
    Case("eval-not-a-run-dir", eval_not_a_run_dir, ("not a cldist run directory",),
         after=UNTOUCHED),
    Case("resume-override-refused", resume_override_refused, ("start a new run",),
         after=UNTOUCHED),
    Case("resume-lr-without-flag", resume_lr_without_flag, ("--allow-lr-change",),
         after=UNTOUCHED),
    Case("resume-lr-key-of-another-method", resume_lr_key_of_another_method,
         ("not an option of method", "its learning rate is method.lr"), after=UNTOUCHED),
    Case("resume-override-unknown", resume_override_unknown, ("does not exist",
                                                              "cluster.address"),
         after=UNTOUCHED),
    # checkpoints: never unpickled; the named fix (delete the task, resume) works
    Case("checkpoint-not-safetensors", checkpoint_not_safetensors,
         ("not a readable safetensors file", "cldist resume"), after=RESUMES,
         repair=delete_task_1),
    Case("checkpoint-pickle-file", checkpoint_pickle_file, ("never unpickles", "cldist resume"),
         after=RESUMES, repair=delete_task_1),
    # failures mid-run: the run stops at a task boundary and says how to go on
    Case("nan-loss", nan_loss, ("loss became nan", "lower method.lr",
                                "--allow-lr-change method.lr=LOWER"),
         after=RESUMES, resume_args=("--allow-lr-change", "method.lr=3e-3"),
         resumed=lr_change_recorded),
    Case("disk-full-on-commit", disk_full_on_commit, ("No space left on device",
                                                      "cldist resume"),
         after=RESUMES, repair=disk_has_space_again),
    # shard locations and sizes - never a shell, only allowed hosts, bounded members
    Case("run-manifest-pipe-root", run_manifest_pipe_root, ("shard_root", "never pipe:"),
         after=UNTOUCHED),
    Case("run-manifest-gs-root", _run_manifest_root("gs://bucket/ds"),
         ("shard_root", "scenario.allowed_hosts"), after=UNTOUCHED),
    Case("run-manifest-hf-root", _run_manifest_root("hf://datasets/x/y"),
         ("shard_root", "the hf: scheme is refused"), after=UNTOUCHED),
    Case("run-manifest-http-host-not-allowed", _run_manifest_root("http://127.0.0.1:9/ds"),
         ("shard_root", "not an allowed host", "scenario.allowed_hosts=[127.0.0.1]"),
         after=UNTOUCHED),
    Case("run-manifest-metadata-address",
         _run_manifest_root("http://169.254.169.254/latest", hosts=["169.254.169.254"]),
         ("link-local", "whatever scenario.allowed_hosts says"), after=UNTOUCHED),
    Case("run-manifest-file-url-other-host", _run_manifest_root("file://fileserver/share"),
         ("shard_root", "not host 'fileserver'"), after=UNTOUCHED),
    Case("run-manifest-relative-root", run_manifest_relative_root,
         ("shard_root", "not an absolute, normalised directory"), after=UNTOUCHED),
    Case("scenario-pipe-manifest", scenario_pipe_manifest, ("never pipe:",)),
    Case("scenario-http-host-not-allowed", scenario_http_host_not_allowed,
         ("not an allowed host",)),
    Case("scenario-http-redirect-off-host", scenario_http_redirect_off_host,
         ("redirects", "another host")),
    Case("shard-sparse-member", shard_sparse_member, ("GNU sparse file",)),
    Case("shard-member-claims-a-gibibyte", shard_member_claims_a_gibibyte,
         ("67108864-byte limit", "scenario.max_member_bytes", "refused unread")),
    Case("shard-gzip-compressed", shard_gzip_compressed, ("gzip-compressed", "plain")),
    Case("shard-label-too-long", shard_label_too_long, ("label too long", "5000 bytes")),
    Case("shard-directory-member", shard_directory_member, ("'extra', a directory",)),
    Case("member-cap-from-config", member_cap_from_config,
         ("100-byte limit", "scenario.max_member_bytes")),
    # run directory ownership, lock, damaged files - refused by name, never a trace
    Case("run-dir-foreign-config", run_dir_foreign_config, ("holds no cldist run",),
         after=UNTOUCHED),
    Case("run-dir-foreign-state", run_dir_foreign_state, ("holds no cldist run",),
         after=UNTOUCHED),
    Case("resume-foreign-state", resume_foreign_state, ("not a cldist run",), after=UNTOUCHED),
    Case("resume-while-locked", resume_while_locked, ("in use by another cldist process",),
         after=UNTOUCHED),
    Case("state-json-nested-deep", _damaged_run_file("state.json", _nest("DEEP")),
         ("nested deeper than",), after=UNTOUCHED),
    Case("run-manifest-nested-deep", _damaged_run_file("manifest.json", _nest('{"x": DEEP}')),
         ("nested deeper than",), after=UNTOUCHED),
    Case("run-manifest-shard-root-int",
         _damaged_run_file("manifest.json", _edit_json(lambda d: d.update(shard_root=5))),
         ("shard_root", "got 5"), after=UNTOUCHED),
    Case("state-json-task-meta-not-object",
         _damaged_run_file("state.json", _edit_json(lambda d: d["task_meta"].update({"0": "oops"}))),
         ("task_meta['0']", "'oops'"), after=UNTOUCHED),
    Case("config-json-method-changed",
         _damaged_run_file("config.json",
                           _edit_json(lambda d: d["method"].update(name="linear_probe"))),
         ("method.name is 'linear_probe'", "method=pearl"), after=UNTOUCHED),
    Case("config-json-interpolation",
         _damaged_run_file("config.json", _edit_json(lambda d: d.update(seed="${oc.env:HOME}"))),
         ("seed holds the interpolation", "${oc.env:HOME}"), after=UNTOUCHED),
    Case("checkpoint-wrong-shape",
         _damaged_run_file("tasks/001/head.safetensors", _reshape_head, command="eval",
                           culprits=("'bias'",)),
         ("does not fit the run's model", "cldist resume"), after=RESUMES, repair=delete_task_1),
    Case("task-0-deleted-under-finished-task-1", task_0_deleted,
         ("trained on top of them", "retrains tasks [0, 1]"), after=UNTOUCHED),
]


# ------------------------------------------------------------------------------ the test
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of `cldist ARGV`, in-process or (argv[0] == 'subprocess') not."""
    if argv[0] == "subprocess":
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([str(CLDIST), *argv[1:]], capture_output=True, text=True,
                              env=env, timeout=120)
        return proc.returncode, proc.stderr
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    return code, capsys.readouterr().err


def _snapshot(path: Path) -> dict[str, str]:
    """Every file (and directory) under `path` with a hash of its content."""
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_dir():
            out[rel] = "dir"
        else:
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            except PermissionError:
                out[rel] = f"unreadable {p.stat().st_mode:o}"
    return out


def _check_message(code: int, err: str, case: Case, w: World) -> None:
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert err.count("error:") == 1, f"not one message:\n{err}"
    for text in (*case.expect, *w.culprits):
        assert text in err, f"{text!r} missing from:\n{err}"


def _check_task_boundary(run_dir: Path) -> list[int]:
    """state.json is valid and every task it calls finished has its files."""
    state = json.loads((run_dir / "state.json").read_text())
    done = state["completed_tasks"]
    assert done == list(range(len(done)))
    for t in done:
        files = {p.name for p in (run_dir / "tasks" / f"{t:03d}").iterdir()}
        assert {"adapter.safetensors", "head.safetensors", "meta.json"} <= files
    return done


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_hostile_input(case: Case, tmp_path, data2, finished_run, capsys, monkeypatch):
    w = World(tmp=tmp_path, good=data2, data=Path(shutil.copytree(data2, tmp_path / "data")),
              run_dir=tmp_path / "run", finished=finished_run, monkeypatch=monkeypatch)
    argv = case.setup(w)
    before = _snapshot(w.run_dir) if w.run_dir.exists() else None

    code, err = _cli(argv, capsys)
    _check_message(code, err, case, w)
    assert not (w.tmp / "UNPICKLED").exists(), "a pickle was loaded"
    assert not (w.tmp / "PWNED").exists(), "a shell command ran"

    if case.after == NO_RUN:
        assert not w.run_dir.exists(), "an error before the run left a run directory"
    elif case.after == UNTOUCHED:
        assert before is not None and _snapshot(w.run_dir) == before
    else:
        assert case.after == RESUMES
        if argv[0] == "run":  # the failure itself left state.json at a task boundary
            _check_task_boundary(w.run_dir)
            assert not list(w.run_dir.rglob(".*.tmp")), "a failed write left its temp file"
        if case.repair is not None:
            # nothing fixed yet: resume fails again, the same clear way, and harms nothing
            code, err = _cli(["resume", str(w.run_dir)], capsys)
            _check_message(code, err, case, w)
            case.repair(w)
        code, err = _cli(["resume", str(w.run_dir), *case.resume_args], capsys)
        assert code == 0, err
        assert _check_task_boundary(w.run_dir) == [0, 1]
        metrics = json.loads((w.run_dir / "metrics.json").read_text())
        assert [len(row) for row in metrics["accuracy_matrix"]] == [1, 2]
        assert json.loads((w.run_dir / "state.json").read_text())["status"] == "finished"
        assert not (w.tmp / "UNPICKLED").exists(), "a pickle was loaded"
        if case.resumed is not None:
            case.resumed(w)


def test_the_table_is_big_enough():
    assert len(CASES) >= 20 and len({c.id for c in CASES}) == len(CASES)


# run directory ownership, lock, damaged files - signals and older run directories
def test_sigterm_records_interrupted_and_the_run_resumes(data2, tmp_path, capsys):
    """SIGTERM once task 0 is committed: one message, exit 143, state.json says
    "interrupted" at a task boundary, the lock is gone, and `cldist resume` finishes."""
    import signal
    import time
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # task 1 learns for 8 epochs: time enough to be stopped in the middle
    driver = subprocess.Popen([str(CLDIST), "run", *tiny_overrides(data2, run_dir, "runner=inline",
                                                                   "method.epochs=8")],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and driver.poll() is None:
            try:
                if json.loads((run_dir / "state.json").read_text())["completed_tasks"]:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            time.sleep(0.05)
        assert driver.poll() is None, "the run ended before it could be stopped"
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert "SIGTERM" in err and f"cldist resume {run_dir}" in err, err
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "interrupted" and state["completed_tasks"] == [0]
    assert main(["resume", str(run_dir)]) == 0
    assert _check_task_boundary(run_dir) == [0, 1]
    assert json.loads((run_dir / "state.json").read_text())["status"] == "finished"


def test_a_run_dir_from_before_the_marker_still_resumes(finished_run, tmp_path):
    """Runs written before state.json carried format_version (and the lock file) are
    cldist's by their state.json's keys: they resume, and gain the marker."""
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    (run / "cldist.lock").unlink()
    state = json.loads((run / "state.json").read_text())
    for key in ("format_version", "method", "backbone"):
        state.pop(key)
    (run / "state.json").write_text(json.dumps(state))
    assert main(["resume", str(run)]) == 0
    state = json.loads((run / "state.json").read_text())
    assert state["format_version"] == 1 and state["status"] == "finished"
