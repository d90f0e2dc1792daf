"""Connect the driver to Ray: an embedded local cluster by default, or an existing one.

`connect()` with no address starts a private single-node cluster in this process, locked
down for a shared machine:

* every Ray server (GCS, raylet, object manager, workers, dashboard agent, metrics) listens
  on 127.0.0.1 only. Ray turns a loopback node address into the machine's routable IP
  unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (the switch Ray uses on laptops), so we set
  that for the cluster's lifetime; child processes inherit it;
* token authentication is on (`RAY_AUTH_MODE=token`, Ray 2.60's default for a local
  `ray.init()`); the token is read from `RAY_AUTH_TOKEN`, the file `RAY_AUTH_TOKEN_PATH`, or
  `~/.ray/auth_token`, which Ray creates on first start (we make it owner-only);
* no dashboard web UI; Ray's own logging at WARNING;
* no calls home: usage stats off (`RAY_USAGE_STATS_ENABLED=0`, inherited by every Ray
  process), and the API server Ray starts on the head even without a dashboard runs with
  its cloud-provider probe answered "unknown". In Ray 2.60 that probe (HTTP to
  169.254.169.254 and metadata.google.internal, in `UsageStatsHead.run()`) runs whether
  usage stats are on or off, and no setting skips it; see docs/SECURITY.md.

(Outside Ray's control: the TCPStore torch opens per Train job on MASTER_PORT listens on all
interfaces; see docs/notes-distributed.md.)

`connect("auto")` joins the cluster `ray start` recorded on this machine; `connect("HOST:PORT")`
joins that GCS. For a token-protected remote cluster set `RAY_AUTH_MODE=token` and the token
(`RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`): Ray never sends the local token to an explicit
address by itself. With an empty address and `RAY_ADDRESS` set (a Ray job's entrypoint),
that address is joined instead of starting a cluster.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import sys
from pathlib import Path

import ray

from cldist.errors import UserError

logger = logging.getLogger(__name__)

# Ray's switch for "single-machine cluster": node IP resolves to 127.0.0.1, so servers bind there.
_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
_AUTH_MODE_ENV = "RAY_AUTH_MODE"
# Ray's usage-stats switch. ray.init() turns stats off by itself for release wheels only;
# set explicitly (it outranks ~/.ray/config.json) so that no Ray process reports usage.
_USAGE_STATS_ENV = "RAY_USAGE_STATS_ENABLED"

# Runs Ray's API server (dashboard.py) with the one function that probes cloud metadata
# endpoints replaced. -c puts the current directory first on sys.path; the script's own
# directory goes there instead, as `python dashboard.py` would have it.
_API_SERVER_SHIM = (
    "import sys; sys.path[:1] = [{dirname!r}] if sys.path[:1] == [''] else sys.path[:1]; "
    "import ray._common.usage.usage_lib as usage_lib; "
    "usage_lib.get_cloud_from_metadata_requests = lambda: 'unknown'; "
    "import runpy; sys.argv[0] = {script!r}; "
    "runpy.run_path({script!r}, run_name='__main__')  # cldist: no cloud metadata probe"
)

# What connect() did, so shutdown() undoes only that.
_state: dict = {"owner": False, "started_local": False, "saved_env": {}, "saved_loopback": None}


class ClusterConnectionError(UserError):
    """No Ray cluster could be reached at the address the user gave."""


def connect(address: str = "", num_cpus: int | None = None, num_gpus: int | None = None,
            *, worker_logs_to_driver: bool = False) -> dict:
    """Start or join a Ray cluster and describe it; a no-op when Ray is already initialised.

    Args:
        address: "" starts the embedded local cluster (or joins `RAY_ADDRESS` when set);
            "auto" joins the cluster `ray start` left on this machine; "HOST:PORT" joins that
            cluster's GCS.
        num_cpus, num_gpus: resources of the embedded cluster (default: what the machine
            has); only valid when starting one.
        worker_logs_to_driver: stream workers' stdout/stderr to this process (they are
            always in the session's log directory).

    Returns:
        {"address", "cpus", "gpus", "nodes", "started_local", "auth"}.
    """
    address = (address or "").strip()
    if ray.is_initialized():
        info = cluster_info()
        if address not in ("", "auto", info["address"]):
            logger.warning("Ray is already connected to %s; connect(%r) keeps that connection "
                           "(call shutdown() first to switch)", info["address"], address)
        return info
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address == "auto" and not os.environ.get("RAY_ADDRESS"):
        # Ray's "auto" would otherwise fall back to any gcs_server it finds in `ps` - on a
        # shared machine, possibly someone else's cluster that accepts the same user's token
        from ray._private.utils import read_ray_address
        recorded = read_ray_address(None)  # written by `ray start` under Ray's temp dir
        if not recorded:
            raise ClusterConnectionError(
                "cluster.address=auto: no `ray start` cluster is recorded on this machine; "
                "give its HOST:PORT instead")
        if recorded.rpartition(":")[0] in ("127.0.0.1", "localhost"):
            _set_env(_LOOPBACK_ENV, "0")  # a loopback-bound cluster is only reachable there
    if address:
        if num_cpus is not None or num_gpus is not None:
            raise ValueError(f"connect({address!r}): num_cpus/num_gpus only size an embedded "
                             "cluster; drop them when joining an existing one")
        _join(address, worker_logs_to_driver)
    else:
        _start_local(num_cpus, num_gpus, worker_logs_to_driver)
    _state["owner"] = True
    return cluster_info()


def shutdown() -> None:
    """Disconnect (and stop the embedded cluster) if `connect()` set Ray up; else do nothing."""
    if not _state["owner"]:
        return
    if ray.is_initialized():
        ray.shutdown()
    _restore_env()
    _state.update(owner=False, started_local=False)


def cluster_info() -> dict:
    """Address, live resources and auth mode of the cluster this process is connected to."""
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    resources = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {
        "address": ray.get_runtime_context().gcs_address,
        "cpus": float(resources.get("CPU", 0.0)),
        "gpus": float(resources.get("GPU", 0.0)),
        "nodes": len(nodes),
        "started_local": _state["started_local"],
        "auth": "token" if is_token_auth_enabled() else "disabled",
    }


def _start_local(num_cpus: int | None, num_gpus: int | None, worker_logs: bool) -> None:
    _set_env(_LOOPBACK_ENV, "0")
    _set_env(_USAGE_STATS_ENV, "0")
    auth_mode = os.environ.get(_AUTH_MODE_ENV)
    if auth_mode is not None and auth_mode.lower() != "token":
        logger.warning("%s=%s: the embedded Ray cluster starts WITHOUT token authentication; "
                       "unset it (or set it to 'token') to require a token", _AUTH_MODE_ENV,
                       auth_mode)
    # With RAY_AUTH_MODE unset, ray.init() itself turns token auth on (sets the env var and
    # refreshes its cached C++ config) and creates the token file. Setting the env var here
    # instead would not reach the already-cached config: the GCS would demand a token the
    # driver never sends. Only Ray's "token auth enabled" notice is muted.
    token_setup_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    previous_level = token_setup_logger.level
    token_setup_logger.setLevel(logging.ERROR)
    try:
        # "local" (not None) so an unrelated `ray start` cluster here is never joined.
        with _api_server_without_cloud_probe():
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                     _node_ip_address="127.0.0.1", include_dashboard=False,
                     logging_level=logging.WARNING, log_to_driver=worker_logs)
    except BaseException:
        _restore_env()
        raise
    finally:
        token_setup_logger.setLevel(previous_level)
    _state["started_local"] = True
    _restrict_token_file()


@contextlib.contextmanager
def _api_server_without_cloud_probe():
    """While ray.init() starts the head's processes, start its API server through the shim."""
    from ray._private import ray_constants, services

    original = services.start_ray_process

    def start_ray_process(command, process_type, *args, **kwargs):
        if process_type == ray_constants.PROCESS_TYPE_DASHBOARD:
            command = api_server_command(command)
        return original(command, process_type, *args, **kwargs)

    services.start_ray_process = start_ray_process
    try:
        yield
    finally:
        services.start_ray_process = original


def api_server_command(command: list[str]) -> list[str]:
    """Ray's `python .../dashboard/dashboard.py ARGS` as the same process without the
    cloud-metadata probe; any other shape (e.g. under Ray's memray profiler) unchanged."""
    if (len(command) >= 2 and command[0] == sys.executable
            and command[1].endswith(os.path.join("dashboard", "dashboard.py"))):
        script = command[1]
        shim = _API_SERVER_SHIM.format(dirname=os.path.dirname(script), script=script)
        return [command[0], "-c", shim, *command[2:]]
    logger.warning("Ray's API server starts as %r, not as cldist expects: its cloud-metadata "
                   "probe (169.254.169.254, metadata.google.internal) stays on", command[:2])
    return command


def _join(address: str, worker_logs: bool) -> None:
    if address != "auto" and not address.startswith("ray://"):
        host, port = _split_host_port(address)
        if host in ("127.0.0.1", "localhost", "::1"):
            # A loopback-bound cluster is only reachable at 127.0.0.1; without this Ray
            # rewrites the address to this machine's routable IP.
            _set_env(_LOOPBACK_ENV, "0")
        _check_reachable(address, host, port)
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=worker_logs)
    except Exception as e:
        _restore_env()
        # Ray reports a refused token as a ConnectionError from a RuntimeError that carries
        # the AuthenticationError only as text (after ~20 s of retries).
        if _mentions(e, ("AuthenticationError", "InvalidAuthToken")):
            raise ClusterConnectionError(
                f"the Ray cluster at {address!r} rejected this driver's token (none sent, or a wrong one): "
                "start the driver with RAY_AUTH_MODE=token and the cluster's token in "
                "RAY_AUTH_TOKEN (or in a file named by RAY_AUTH_TOKEN_PATH; default "
                "~/.ray/auth_token)") from e
        if isinstance(e, ConnectionError):
            raise ClusterConnectionError(
                f"no Ray cluster reachable at address {address!r} ({e}). Start one there "
                "(`ray start --head`), fix cluster.address, or leave it empty to start an "
                "embedded local cluster") from e
        raise


def _mentions(error: BaseException, needles: tuple[str, ...]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        text = f"{type(seen).__name__}: {seen}"
        if any(n in text for n in needles):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterConnectionError(
            f"cluster address {address!r} is not HOST:PORT; use e.g. 10.0.0.5:6379, 'auto' "
            "for the cluster `ray start` left on this machine, or '' for an embedded one")
    return host.strip("[]"), int(port)


def _check_reachable(address: str, host: str, port: int, timeout_s: float = 5.0) -> None:
    # Ray retries an unreachable GCS for a long time; fail fast with the fix instead.
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterConnectionError(
            f"no Ray cluster reachable at address {address!r}: {e}. Start one there "
            "(`ray start --head --port PORT`), fix cluster.address, or leave it empty to start "
            "an embedded local cluster") from e


def _restrict_token_file() -> None:
    # Ray writes ~/.ray/auth_token world-readable (0644); the token is the cluster's only lock.
    if os.environ.get("RAY_AUTH_TOKEN"):
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        if path.is_file() and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            path.chmod(0o600)
    except OSError as e:  # not ours to fix (e.g. a read-only mount); say so and go on
        logger.warning("could not make Ray token file %s owner-only: %s", path, e)


def _set_env(name: str, value: str) -> None:
    _state["saved_env"].setdefault(name, os.environ.get(name))
    os.environ[name] = value
    if name == _LOOPBACK_ENV:
        # Ray reads this into a module constant at import; the driver needs it now too.
        import ray._private.ray_constants as ray_constants
        if _state["saved_loopback"] is None:
            _state["saved_loopback"] = ray_constants.ENABLE_RAY_CLUSTER
        ray_constants.ENABLE_RAY_CLUSTER = value != "0"


def _restore_env() -> None:
    for name, value in _state["saved_env"].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if _state["saved_loopback"] is not None:
        import ray._private.ray_constants as ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = _state["saved_loopback"]
    _state.update(saved_env={}, saved_loopback=None)
