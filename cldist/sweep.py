"""Sweeps: `cldist run --multirun method=pearl,sdlora seed=0,1,2` runs a grid of streams.

    overrides -> Hydra's own override parser expands the grid (comma lists, range(), choice())
    -> every member composed and validated, its data located, before anything starts
    -> SWEEP/sweep.json (the grid, each member's status; written atomically)
    -> the members side by side on one Ray cluster: each is an ordinary `run_stream` in a
       thread of this driver, and its task jobs share one semaphore (`job_slots`), so
       `trainer.max_concurrent_tasks` (default: the cluster's CPUs per job) bounds the sweep
    -> SWEEP/comparison.md: `cldist report`'s comparison, plus the paired differences against
       `sweep.baseline` (cldist.report.paired)

Members are independent: one that fails is recorded and the others go on. `cldist resume
SWEEP` skips finished members, resumes interrupted ones from their last committed task and
starts the ones that never began. Each member's run directory is SWEEP/NAME, NAME made from
its swept overrides (`method=pearl,seed=0`), reduced to characters that are safe in a path.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

from .atomic_io import write_json_atomic
from .errors import ConfigError, Interrupted, UserError
from .rundir import RunDir, acquire_lock, foreign_entries, read_json, release_lock

SWEEP_FILE = "sweep.json"
SWEEP_FORMAT = "cldist-sweep"
SWEEP_FORMAT_VERSION = 1
COMPARISON_FILE = "comparison.md"
# keys of the sweep itself, not of its members' runs
SWEEP_DIR_KEY, BASELINE_KEY = "sweep_dir", "sweep.baseline"
# keys one sweep cannot vary: its members share one cluster and one bound on their jobs, and
# each member's run directory is the sweep's to choose
FIXED_KEYS = ("runner", "cluster", "trainer.max_concurrent_tasks", "run_dir")
STATUSES = ("queued", "running", "finished", "failed", "interrupted")
MAX_NAME = 120
SAFE_NAME = re.compile(r"[A-Za-z0-9._=,+~-]+")
MAX_MEMBERS = 10000
STATUS_EVERY_S = 30.0
# a Ray sweep keeps up to this many members in flight per job slot, so that a slot whose member
# is evaluating between two tasks finds another member's job ready
MEMBERS_PER_SLOT = 2


class SweepIncomplete(UserError):
    """A sweep ended with members that did not finish; `cldist resume SWEEP` continues it."""

    exit_code = 1


@dataclass
class Member:
    name: str
    overrides: list[str]             # everything the member's run is composed from
    swept: dict[str, str]            # the swept keys and this member's values
    status: str = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    acc: float | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "overrides": self.overrides, "swept": self.swept,
                "status": self.status, "started_at": self.started_at,
                "finished_at": self.finished_at, "error": self.error, "acc": self.acc}


@dataclass
class SweepSpec:
    common: list[str]                       # overrides every member gets
    swept: dict[str, list[str]]             # key -> its values, in the order given
    baseline: dict[str, str] | None = None  # the reference configuration's swept values
    baseline_text: str | None = None
    sweep_dir: str | None = None
    members: list[Member] = field(default_factory=list)


# ------------------------------------------------------------------------------ expansion
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    return OverridesParser.create()


def _parse(parser, text: str):
    """(Hydra's parsed override, None), or (None, the first line of Hydra's complaint)."""
    from hydra.errors import HydraException
    try:
        return parser.parse_override(text), None
    except HydraException as e:
        return None, str(e).splitlines()[0]


def is_sweep(overrides: list[str]) -> str | None:
    """The first override that only a sweep accepts (a value list, range(), sweep_dir=, ...),
    or None; overrides Hydra cannot parse are left for `compose` to report."""
    parser = _parser()
    for o in overrides:
        key = o.partition("=")[0]
        if key in (SWEEP_DIR_KEY, BASELINE_KEY):
            return o
        parsed, _ = _parse(parser, o)
        if parsed is not None and parsed.is_sweep_override():
            return o
    return None


def parse_sweep(overrides: list[str]) -> SweepSpec:
    """Split `overrides` into the common ones and the swept keys with their values (Hydra's
    grammar: `a=x,y`, `a=range(0,5)`, `a=choice(x,y)`); every problem in one ConfigError."""
    from hydra.errors import HydraException
    parser = _parser()
    problems: list[str] = []
    spec = SweepSpec(common=[], swept={})
    seen: set[str] = set()
    for o in overrides:
        key, sep, value = o.partition("=")
        if key == SWEEP_DIR_KEY and sep:
            spec.sweep_dir = value
            continue
        if key == BASELINE_KEY and sep:
            spec.baseline_text = _unquote(value)
            continue
        parsed, error = _parse(parser, o)
        if error:
            problems.append(f"{o}: {error}")
            continue
        key = parsed.get_key_element()
        if key.lstrip("+~") in seen:
            problems.append(f"{o}: {key} is given twice; give each key once (a sweep lists "
                            f"its values: {key}=A,B)")
            continue
        seen.add(key.lstrip("+~"))
        if not parsed.is_sweep_override():
            spec.common.append(o)
            continue
        if _fixed(key):
            problems.append(f"{o}: {key} cannot vary within one sweep (its members share one "
                            f"cluster, one bound on their jobs, and the sweep names their run "
                            f"directories); run one sweep per value")
            continue
        if not parsed.is_discrete_sweep():
            problems.append(f"{o}: interval() is a continuous range, not a grid; list the "
                            f"values or use range(START,STOP,STEP)")
            continue
        try:
            values = list(parsed.sweep_string_iterator())
        except HydraException as e:  # glob() needs Hydra's config loader
            problems.append(f"{o}: {str(e).splitlines()[0]}; list the values instead")
            continue
        if not values:
            problems.append(f"{o}: the sweep has no values")
            continue
        if len(set(values)) != len(values):
            problems.append(f"{o}: a value is listed twice")
            continue
        spec.swept[key] = values
    for o in spec.common:
        if o.partition("=")[0].lstrip("+~") == "run_dir":
            problems.append(f"{o}: a sweep names each member's run directory itself "
                            f"(SWEEP_DIR/NAME); give sweep_dir= instead")
    if spec.baseline_text is not None:
        spec.baseline = _parse_baseline(spec.baseline_text, spec.swept, problems)
    if problems:
        raise ConfigError(problems)
    spec.members = expand(spec)
    if len(spec.members) > MAX_MEMBERS:
        raise ConfigError([f"the grid has {len(spec.members)} members, more than "
                           f"{MAX_MEMBERS}; split the sweep"])
    return spec


def _fixed(key: str) -> bool:
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in FIXED_KEYS)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def _parse_baseline(text: str, swept: dict[str, list[str]], problems: list[str]) -> dict | None:
    """`sweep.baseline='method=seq_lora'` (several keys: space-separated) as {key: value},
    each key swept (not the seed) and each value one of its swept values."""
    parser = _parser()
    out: dict[str, str] = {}
    for part in text.split():
        parsed, error = _parse(parser, part)
        if error:
            problems.append(f"{BASELINE_KEY}={text!r}: {part}: {error}")
            continue
        key = parsed.get_key_element()
        if parsed.is_sweep_override():
            problems.append(f"{BASELINE_KEY}={text!r}: the reference is one configuration; "
                            f"give one value of {key}")
        elif key == "seed":
            problems.append(f"{BASELINE_KEY}={text!r}: pairs are made by seed; name the "
                            f"reference by its other keys")
        elif key not in swept:
            problems.append(f"{BASELINE_KEY}={text!r}: {key} is not swept (swept: "
                            f"{', '.join(swept) or 'nothing'}); name a value of a swept key")
        elif parsed.get_value_element_as_str() not in swept[key]:
            problems.append(f"{BASELINE_KEY}={text!r}: {key}="
                            f"{parsed.get_value_element_as_str()} is not among the swept "
                            f"values {','.join(swept[key])}")
        else:
            out[key] = parsed.get_value_element_as_str()
    if not out and not problems:
        problems.append(f"{BASELINE_KEY}={text!r}: name the reference configuration as "
                        f"KEY=VALUE, e.g. {BASELINE_KEY}='method=seq_lora'")
    return out or None


def expand(spec: SweepSpec) -> list[Member]:
    """The grid's members, the first swept key varying slowest (as Hydra's basic sweeper)."""
    keys = list(spec.swept)
    members, names = [], set()
    for values in itertools.product(*(spec.swept[k] for k in keys)):
        swept = dict(zip(keys, values))
        name = member_name(swept)
        if name in names:  # two values that sanitise alike
            name = f"{name[:MAX_NAME - 6]}~{len(members)}"
        names.add(name)
        members.append(Member(name, spec.common + [f"{k}={v}" for k, v in swept.items()],
                              swept))
    return members


def member_name(swept: dict[str, str]) -> str:
    """`method=pearl,seed=0`: a member's directory name from its swept overrides. The values
    are user text, so anything but [A-Za-z0-9._=,+~-] becomes `_` (no path separator), `..`
    cannot occur, the name never starts with a dot and is at most MAX_NAME characters."""
    text = ",".join(f"{k}={v}" for k, v in swept.items()) or "run"
    text = re.sub(r"[^A-Za-z0-9._=,+~-]", "_", text)
    text = re.sub(r"\.{2,}", "_", text).lstrip(".") or "run"
    return text[:MAX_NAME]


def safe_member_name(name) -> bool:
    return (isinstance(name, str) and 0 < len(name) <= MAX_NAME
            and SAFE_NAME.fullmatch(name) is not None and ".." not in name
            and not name.startswith("."))


# ----------------------------------------------------------------------------- validation
def compose_members(members: list[Member], sweep_dir: Path, extra: list[str] = ()) -> dict:
    """{name: RunConfig} for every member, composed in this thread (Hydra's global state is
    not thread-safe); one ConfigError naming each bad member and its problems."""
    from .config.compose import compose
    configs, problems = {}, []
    for m in members:
        try:
            # the run directory is set after Hydra: a path is no override grammar's business
            cfg = compose(list(m.overrides) + list(extra))
            cfg.run_dir = str(sweep_dir / m.name)
            configs[m.name] = cfg
        except ConfigError as e:
            problems += [f"member {m.name}: {p}" for p in e.problems]
        except UserError as e:
            problems.append(f"member {m.name}: {e}")
    if problems:
        raise ConfigError(problems)
    return configs


def locate_data(configs: dict) -> None:
    """Build or check each distinct scenario once, here, before any member starts (members
    started together must not build the same shards at the same time)."""
    from .stream import ensure_scenario
    problems, seen = [], {}
    for name, cfg in configs.items():
        key = json.dumps(cfg.to_dict()["scenario"], sort_keys=True, default=str)
        if key in seen:
            if seen[key] is not None:
                problems.append(f"member {name}: {seen[key]}")
            continue
        try:
            ensure_scenario(cfg)
            seen[key] = None
        except UserError as e:
            seen[key] = str(e)
            problems.append(f"member {name}: {e}")
    if problems:
        raise ConfigError(problems)


# ------------------------------------------------------------------------------ sweep.json
def _record(spec_or_data: dict, members: list[Member], status: str) -> dict:
    return {**spec_or_data, "format": SWEEP_FORMAT, "format_version": SWEEP_FORMAT_VERSION,
            "status": status, "members": [m.to_dict() for m in members]}


def load_sweep(sweep_dir: str | Path) -> tuple[dict, list[Member]]:
    """SWEEP/sweep.json read and checked as untrusted input: a bounded read, every field's
    type, member names that stay inside SWEEP (no separators, no `..`, no symlinks)."""
    root = Path(sweep_dir)
    path = root / SWEEP_FILE
    remedy = "the sweep directory is damaged: restore sweep.json or start a new sweep"
    try:
        data = read_json(path, remedy, max_bytes=64 << 20, max_depth=8)
    except FileNotFoundError:
        raise UserError(f"{sweep_dir} is not a cldist sweep directory (no {SWEEP_FILE}); give "
                        f"the directory `cldist run --multirun` wrote") from None
    bad = []
    if data.get("format") != SWEEP_FORMAT:
        bad.append(f"format is {data.get('format')!r}, not {SWEEP_FORMAT!r}")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        bad.append(f"format_version is {version!r}")
    elif version > SWEEP_FORMAT_VERSION:
        bad.append(f"format_version {version} was written by a newer cldist")
    raw = data.get("members")
    if not isinstance(raw, list) or not raw or len(raw) > MAX_MEMBERS:
        bad.append("members is not a list of 1.." + str(MAX_MEMBERS) + " members")
        raw = []
    baseline = data.get("baseline")
    if baseline is not None and not _str_dict(baseline):
        bad.append("baseline is not an object of strings")
    members, names = [], set()
    for i, m in enumerate(raw):
        where = f"members[{i}]"
        if not isinstance(m, dict):
            bad.append(f"{where} is not an object")
            continue
        name = m.get("name")
        if not safe_member_name(name):
            bad.append(f"{where}.name {str(name)[:80]!r} is not a member name cldist writes "
                       f"(it must stay inside the sweep directory)")
            continue
        if name in names:
            bad.append(f"{where}.name {name!r} appears twice")
            continue
        overrides = m.get("overrides")
        if not isinstance(overrides, list) or not all(
                isinstance(o, str) and len(o) <= 4096 for o in overrides):
            bad.append(f"{where}.overrides is not a list of overrides")
            continue
        if any(o.partition("=")[0].lstrip("+~") in ("run_dir", SWEEP_DIR_KEY, BASELINE_KEY)
               for o in overrides):
            bad.append(f"{where}.overrides sets run_dir=, which the sweep decides")
            continue
        if not _str_dict(m.get("swept")):
            bad.append(f"{where}.swept is not an object of strings")
            continue
        status = m.get("status")
        if status not in STATUSES:
            bad.append(f"{where}.status {str(status)[:40]!r} is not one of {', '.join(STATUSES)}")
            continue
        member_dir = root / name
        if member_dir.is_symlink() or (member_dir.exists() and not member_dir.is_dir()):
            bad.append(f"{member_dir} is not a plain directory")
            continue
        names.add(name)
        members.append(Member(name, list(overrides), dict(m["swept"]), status,
                              _num(m.get("started_at")), _num(m.get("finished_at")),
                              m.get("error") if isinstance(m.get("error"), str) else None,
                              _num(m.get("acc"))))
    if bad:
        raise UserError(f"{path} is not a sweep record cldist wrote ({'; '.join(bad[:5])}"
                        f"{'; ...' if len(bad) > 5 else ''}); {remedy}")
    keep = {k: data[k] for k in ("command", "common", "swept", "baseline", "baseline_text",
                                 "created_at") if k in data}
    return keep, members


def _str_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in value.items())


def _num(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


# ---------------------------------------------------------------------------------- output
class _LinePrefixer:
    """A text stream that writes each whole line to `target` with `prefix`, under a lock
    shared by every member, so members' lines interleave only as whole lines."""

    def __init__(self, target, prefix: str, lock: threading.Lock):
        self.target, self.prefix, self.lock, self.buffer = target, prefix, lock, ""

    def write(self, text: str) -> int:
        with self.lock:
            self.buffer += text
            if "\n" in self.buffer:
                *lines, self.buffer = self.buffer.split("\n")
                self.target.write("".join(f"{self.prefix}{line}\n" for line in lines))
                self.target.flush()
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def close_line(self) -> None:
        if self.buffer:
            self.write("\n")

    def isatty(self) -> bool:  # members print log lines, never a live status line
        return False


class _ThreadStdout:
    """sys.stdout while a sweep runs: a member thread's prints go through its prefixer."""

    def __init__(self, base):
        self.base, self.local = base, threading.local()

    def _stream(self):
        return getattr(self.local, "stream", None) or self.base

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        stream = self._stream()
        return stream.isatty() if hasattr(stream, "isatty") else False

    def __getattr__(self, name):
        return getattr(self.base, name)


# ---------------------------------------------------------------------------------- driver
# what a member runs: (job_slots, progress stream) -> metrics
MemberJob = Callable[[object, object], dict]


class SweepDriver:
    """Runs the members' jobs side by side and keeps sweep.json current."""

    def __init__(self, sweep_dir: Path, header: dict, members: list[Member],
                 jobs: dict[str, MemberJob], job_slots: int | None, member_slots: int):
        self.sweep_dir, self.header, self.members, self.jobs = sweep_dir, header, members, jobs
        self.job_slots = threading.BoundedSemaphore(job_slots) if job_slots else None
        self.n_job_slots = job_slots
        self.member_slots = max(1, member_slots)
        self.lock = threading.Lock()
        self.out_lock = threading.Lock()
        self.queue = [m for m in members if m.name in jobs]
        self.changed = threading.Event()
        self.started = time.monotonic()
        self.done_here = 0  # members finished by this process (the ETA's rate)

    def save(self, status: str) -> None:
        with self.lock:
            write_json_atomic(self.sweep_dir / SWEEP_FILE,
                              _record(self.header, self.members, status))

    def _set(self, m: Member, **values) -> None:
        with self.lock:
            for k, v in values.items():
                setattr(m, k, v)
        self.save("running")
        self.changed.set()

    def _worker(self, stdout: _ThreadStdout) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    return
                m = self.queue.pop(0)
            self._run_member(m, stdout)

    def _run_member(self, m: Member, stdout: _ThreadStdout) -> None:
        out = _LinePrefixer(stdout.base, f"[{m.name}] ", self.out_lock)
        stdout.local.stream = out
        self._set(m, status="running", started_at=time.time(), finished_at=None, error=None)
        self.say(f"member {m.name} started")
        try:
            metrics = self.jobs[m.name](self.job_slots, out)
            values = dict(status="finished", acc=_num(metrics.get("acc")))
            self.done_here += 1
        except Interrupted as e:
            values = dict(status="interrupted", error=f"interrupted ({e})")
        except BaseException as e:  # noqa: BLE001 - members are independent: record, go on
            first = (str(e).strip().splitlines() or [""])[0][:300]
            values = dict(status="failed", error=f"{type(e).__name__}: {first}")
        finally:
            out.close_line()
            stdout.local.stream = None
        self._set(m, finished_at=time.time(), **values)
        tail = f": {m.error}" if m.error else (f" (Acc {m.acc:.2f}%)" if m.acc is not None else "")
        self.say(f"member {m.name} {m.status}{tail}")
        self.say(f"[status] {self.status_line()}")

    def say(self, text: str) -> None:
        with self.out_lock:
            self.base.write(f"[sweep] {text}\n")
            self.base.flush()

    def status_line(self) -> str:
        with self.lock:
            counts = {s: sum(1 for m in self.members if m.status == s) for s in STATUSES}
            running = [m.name for m in self.members if m.status == "running"]
        total = len(self.members)
        elapsed = time.monotonic() - self.started
        left = total - counts["finished"] - counts["failed"]
        eta = "?"
        if self.done_here and left:
            from .report.summary import format_duration
            eta = format_duration(left * elapsed / self.done_here)
        elif not left:
            eta = "0s"
        from .report.summary import format_duration
        shown = ", ".join(running[:4]) + (f", +{len(running) - 4} more" if len(running) > 4 else "")
        return (f"{counts['finished']}/{total} members done | running {len(running)}"
                f"{': ' + shown if shown else ''} | queued "
                f"{counts['queued'] + counts['interrupted']} | failed {counts['failed']} | "
                f"elapsed {format_duration(elapsed)} | ETA {eta}")

    def run(self) -> None:
        """Run every member with a job; SIGINT/SIGTERM mark the running ones interrupted
        and raise Interrupted (the members' jobs end with this process)."""
        self.base = sys.stdout
        stdout = _ThreadStdout(self.base)
        previous = {}

        def handle(signum, frame):
            raise Interrupted(signum)

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                previous[s] = signal.signal(s, handle)
        sys.stdout = stdout
        try:
            bound = f", at most {self.n_job_slots} task jobs at once" if self.n_job_slots else ""
            self.say(f"{len(self.queue)} of {len(self.members)} members to run in "
                     f"{self.sweep_dir}, {min(self.member_slots, len(self.queue))} side by "
                     f"side{bound}")
            threads = [threading.Thread(target=self._worker, args=(stdout,), daemon=True,
                                        name=f"cldist-sweep-{i}")
                       for i in range(min(self.member_slots, len(self.queue)))]
            self.save("running")
            for t in threads:
                t.start()
            last = time.monotonic()
            while any(t.is_alive() for t in threads):
                self.changed.wait(timeout=1.0)
                self.changed.clear()
                if time.monotonic() - last >= STATUS_EVERY_S:
                    self.say(f"[status] {self.status_line()}")
                    last = time.monotonic()
            for t in threads:
                t.join()
        except Interrupted:
            with self.lock:
                for m in self.members:
                    if m.status == "running":
                        m.status, m.error = "interrupted", "the sweep was interrupted"
            self.save("interrupted")
            raise
        finally:
            sys.stdout = self.base
            for s, old in previous.items():
                signal.signal(s, old if old is not None else signal.SIG_DFL)
        unfinished = [m for m in self.members if m.status != "finished"]
        self.save("finished" if not unfinished else "incomplete")


# ------------------------------------------------------------------------------ top level
def default_sweep_dir() -> Path:
    return Path("runs") / f"sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _slots(configs: dict) -> tuple[int | None, int]:
    """(job slots, members in flight): the Ray cluster is connected here, once, in the main
    thread; every member's runner then joins it."""
    cfg = next(iter(configs.values()))
    if cfg.runner == "inline":  # in this process: one member at a time unless told otherwise
        return None, int(cfg.trainer.max_concurrent_tasks or 1)
    from .distributed.cluster import connect
    info = connect(cfg.cluster.address, cfg.cluster.num_cpus, cfg.cluster.num_gpus)
    if cfg.trainer.max_concurrent_tasks:
        slots = int(cfg.trainer.max_concurrent_tasks)
    else:
        per_member = []
        for c in configs.values():
            n = int(info["cpus"] // max(c.trainer.num_workers * c.trainer.cpus_per_worker, 1e-9))
            if c.trainer.use_gpu:
                n = min(n, int(info["gpus"] // c.trainer.num_workers))
            per_member.append(max(1, n))
        slots = min(per_member)
    return slots, MEMBERS_PER_SLOT * slots


def _fresh_job(cfg) -> MemberJob:
    def job(job_slots, out):
        from .stream import run_stream
        return run_stream(cfg, job_slots=job_slots, progress_stream=out)
    return job


def _resume_job(cfg, run_dir: Path) -> MemberJob:
    def job(job_slots, out):
        from .stream import run_stream
        return run_stream(cfg, resume_dir=run_dir, job_slots=job_slots, progress_stream=out)
    return job


def run_sweep(overrides: list[str]) -> int:
    """`cldist run --multirun OVERRIDES`: expand, validate every member, run, compare."""
    spec = parse_sweep(overrides)
    sweep_dir = Path(spec.sweep_dir) if spec.sweep_dir else default_sweep_dir()
    configs = compose_members(spec.members, sweep_dir)
    locate_data(configs)
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"sweep_dir={sweep_dir} is not a directory; choose another sweep_dir=")
    if sweep_dir.is_dir() and foreign_entries(sweep_dir):
        hint = (f"; `cldist resume {sweep_dir}` continues the sweep it holds"
                if (sweep_dir / SWEEP_FILE).is_file() else "")
        raise UserError(f"sweep_dir={sweep_dir} is not empty{hint}; a sweep starts in a new or "
                        f"empty directory - choose another sweep_dir=")
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create sweep_dir={sweep_dir} ({e.strerror or e}); choose "
                        f"another sweep_dir=") from None
    header = {"command": list(overrides), "common": spec.common, "swept": spec.swept,
              "baseline": spec.baseline, "baseline_text": spec.baseline_text,
              "created_at": time.time()}
    jobs = {m.name: _fresh_job(configs[m.name]) for m in spec.members}
    return _drive(sweep_dir, header, spec.members, jobs, configs)


def resume_sweep(sweep_dir: str | Path, overrides: list[str]) -> int:
    """`cldist resume SWEEP`: finished members are kept, interrupted or failed ones resume
    from their last committed task, members that never started start now. `overrides` may
    change only where and how the members run (config.overrides.RESUME_OVERRIDABLE)."""
    from .config.overrides import apply_overrides
    from .config.compose import config_from_dict
    sweep_dir = Path(sweep_dir)
    acquire_lock(sweep_dir)
    try:
        header, members = load_sweep(sweep_dir)
        fresh, configs, jobs, problems = [], {}, {}, []
        for m in members:
            run_dir = sweep_dir / m.name
            run = RunDir(run_dir)
            state = None
            if run_dir.is_dir() and run.foreign_entries():
                try:
                    state = run.require()
                except UserError as e:
                    problems.append(f"member {m.name}: {e}")
                    continue
            if state is None:
                fresh.append(m)
                continue
            if state.get("status") == "finished" and run.metrics_path.is_file():
                m.status = "finished"
                continue
            try:
                path, data = run.config_path, run.read_config()
                apply_overrides(data, overrides, False)
                cfg = config_from_dict(data, origin=str(path))
            except UserError as e:
                problems.append(f"member {m.name}: {e}")
                continue
            configs[m.name], jobs[m.name] = cfg, _resume_job(cfg, run_dir)
            m.status = "queued"
        try:
            composed = compose_members(fresh, sweep_dir, overrides) if fresh else {}
        except ConfigError as e:
            problems += e.problems
            composed = {}
        if problems:
            raise ConfigError(problems)
        if composed:
            locate_data(composed)
        for m in fresh:
            configs[m.name], jobs[m.name] = composed[m.name], _fresh_job(composed[m.name])
            m.status = "queued"
        if not jobs:
            print(f"[sweep] every member of {sweep_dir} has finished", flush=True)
        return _drive(sweep_dir, header, members, jobs, configs)
    finally:
        release_lock(sweep_dir)


def _drive(sweep_dir: Path, header: dict, members: list[Member], jobs: dict,
           configs: dict) -> int:
    acquire_lock(sweep_dir)  # re-entrant: a resume holds it already
    try:
        if jobs:
            job_slots, member_slots = _slots(configs)
            SweepDriver(sweep_dir, header, members, jobs, job_slots, member_slots).run()
        else:
            write_json_atomic(sweep_dir / SWEEP_FILE, _record(header, members, "finished"))
        report = write_sweep_report(sweep_dir, header, members)
        if report is not None:
            from .report.report import html_path
            print(f"comparison: {report}", flush=True)
            print(f"comparison: {html_path(report)}", flush=True)
        failed = [m for m in members if m.status != "finished"]
        if failed:
            lines = "\n".join(f"  - {m.name}: {m.status}{': ' + m.error if m.error else ''}"
                              for m in failed)
            raise SweepIncomplete(f"{len(failed)} of {len(members)} members did not finish:\n"
                                  f"{lines}\nonce the cause is fixed, `cldist resume "
                                  f"{sweep_dir}` finishes the sweep (finished members are "
                                  f"kept)")
        print(f"sweep directory: {sweep_dir}", flush=True)
        return 0
    finally:
        release_lock(sweep_dir)


# ---------------------------------------------------------------------------------- report
def paired_comparisons(members: list[Member], baseline: dict[str, str], metrics: dict):
    """Pair each finished member with the member that differs from it only in the baseline's
    keys (same seed, same other swept values): [PairedComparison], one per configuration."""
    from .report.paired import PairedComparison
    by_swept = {json.dumps(m.swept, sort_keys=True): m for m in members if m.name in metrics}
    comparisons: dict[str, PairedComparison] = {}
    for m in members:
        if m.name not in metrics or all(m.swept.get(k) == v for k, v in baseline.items()):
            continue
        partner = by_swept.get(json.dumps({**m.swept, **baseline}, sort_keys=True))
        label = " ".join(f"{k}={v}" for k, v in m.swept.items() if k != "seed") or m.name
        comparison = comparisons.setdefault(label, PairedComparison(label))
        if partner is not None:
            seed = m.swept.get("seed", str(metrics[m.name].get("seed", "-")))
            comparison.pairs.append((seed, metrics[m.name], metrics[partner.name]))
    return list(comparisons.values())


def write_sweep_report(sweep_dir: Path, header: dict, members: list[Member]) -> Path | None:
    """SWEEP/comparison.md (+ .html): the comparison of the finished members, with the paired
    table when the sweep names a baseline. None when no member has finished."""
    from .report.report import write_comparison
    finished = [m for m in members if m.status == "finished"]
    if not finished:
        return None
    metrics = {m.name: RunDir(sweep_dir / m.name).read_metrics() for m in finished}
    extra = []
    baseline = header.get("baseline")
    if baseline:
        from .report.paired import paired_section
        comparisons = paired_comparisons(members, baseline, metrics)
        if comparisons:
            reference = " ".join(f"{k}={v}" for k, v in baseline.items())
            extra.append(paired_section(comparisons, reference))
            from .report.summary import render_plain_table
            table = extra[0].table
            print(f"Paired against {reference} (per seed; mean ± sd (t); better on k of n):",
                  flush=True)
            print(render_plain_table(table.headers, table.rows), flush=True)
    return write_comparison([sweep_dir / m.name for m in finished],
                            sweep_dir / COMPARISON_FILE, extra_sections=extra)
