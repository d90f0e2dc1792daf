"""RUN/manifest.json: the scenario's manifest pinned into the run, and reading it back safely.

The data layer (cldist.data) is imported inside the functions: `import cldist.rundir` stays
light (no torch, no data readers).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import UserError
from ..atomic_io import write_json_atomic
from .files import read_json
from .layout import CONFIG_FILE, MANIFEST_FILE


def save_run_manifest(run_dir, manifest) -> None:
    """RUN/manifest.json: the scenario's manifest plus where its shards live (`shard_root`:
    an absolute directory, or the base URL the scenario's manifest came from)."""
    from ..data.remote import url_scheme
    data = manifest.to_dict()
    root = str(manifest.root)
    data["shard_root"] = root if url_scheme(root) else os.path.abspath(root or ".")
    write_json_atomic(Path(run_dir) / MANIFEST_FILE, data)


def _run_data_access(run_dir) -> tuple[list[str], int | None]:
    """`scenario.allowed_hosts` and `scenario.max_member_bytes` from the run's config.json -
    what every caller's RunConfig holds (it is read from, or written to, that file); a run
    written before these keys existed gets the defaults (no remote hosts)."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        scenario = json.loads(path.read_text()).get("scenario", {})
    except (OSError, ValueError, AttributeError):
        return [], None  # the callers report an unreadable config.json themselves
    if not isinstance(scenario, dict):
        return [], None
    hosts = scenario.get("allowed_hosts", [])
    cap = scenario.get("max_member_bytes")
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise UserError(f"{path}: scenario.allowed_hosts must be a list of host names, got "
                        f"{hosts!r}")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise UserError(f"{path}: scenario.max_member_bytes must be a positive integer, got "
                        f"{cap!r}")
    return hosts, cap


def load_run_manifest(run_dir, allowed_hosts=None, max_member_bytes=None):
    """The run's pinned manifest, its shards read from `shard_root`.

    The root is checked like a scenario's (`cldist.data.remote.check_location`): an absolute
    local directory, or a URL on `allowed_hosts` - never a command (`pipe:`) or another
    scheme. `allowed_hosts` / `max_member_bytes` default to the run's own config.json values.
    """
    from ..data.manifest import Manifest
    from ..data.remote import check_location, url_scheme
    path = Path(run_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; {run_dir} is not a cldist run directory")
    data = read_json(path, expect=None)  # size- and depth-capped (cldist.rundir.files)
    if allowed_hosts is None or max_member_bytes is None:
        hosts, cap = _run_data_access(run_dir)
        allowed_hosts = hosts if allowed_hosts is None else allowed_hosts
        max_member_bytes = cap if max_member_bytes is None else max_member_bytes
    root = data.get("shard_root") if isinstance(data, dict) else None
    damaged = (f"the run directory is damaged: restore {path} from a backup or start a new "
               f"run")
    if not isinstance(root, str) or not root:
        raise UserError(f"{path}: shard_root must be the shards' directory or base URL, got "
                        f"{root!r}; {damaged}")
    if url_scheme(root) is None and (not os.path.isabs(root) or os.path.normpath(root) != root):
        raise UserError(f"{path}: shard_root {root!r} is not an absolute, normalised directory "
                        f"(cldist writes the dataset's absolute path); {damaged}")
    try:
        check_location(root, allowed_hosts, what="shard_root")
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return Manifest.load(path, root=root, allowed_hosts=allowed_hosts,
                         max_member_bytes=max_member_bytes)
