"""The embedded Ray cluster makes no calls home: no usage stats, no cloud-metadata probe.

Ray 2.60's API server (started on the head even without a dashboard) asks Azure's, GCP's and
AWS's metadata endpoints which cloud it runs on, whatever the usage-stats setting; cldist
starts it through a shim that answers "unknown" instead (cldist/distributed/cluster.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import psutil

from cldist.distributed.cluster import api_server_command

METADATA_HOSTS = {"169.254.169.254", "metadata.google.internal"}

# Stands in for Ray's dashboard.py: records every attempt to resolve or connect to a
# metadata host (refusing it, so nothing leaves the machine) while Ray's own cluster-config
# probe runs, as UsageStatsHead.run() calls it on a machine without a launcher config.
FAKE_API_SERVER = textwrap.dedent("""
    import json, socket, sys
    import ray  # puts its thirdparty_files first on sys.path, whichever way it starts
    path = list(sys.path)
    attempts = []
    METADATA = {hosts!r}

    def refuse(event, args):
        host = None
        if event == "socket.getaddrinfo":
            host = args[0]
        elif event == "socket.connect" and isinstance(args[1], tuple):
            host = args[1][0]
        if isinstance(host, bytes):
            host = host.decode()
        if host in METADATA:
            attempts.append([event, host])
            raise ConnectionRefusedError("test: no metadata requests")

    sys.addaudithook(refuse)
    import ray._common.usage.usage_lib as usage_lib
    config = usage_lib.get_cluster_config_to_report("/nonexistent/ray_bootstrap_config.yaml")
    print(json.dumps({{"attempts": attempts, "cloud": config.cloud_provider,
                      "argv": sys.argv, "path": path}}))
""").format(hosts=METADATA_HOSTS)


def _run(command):
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_api_server_shim_keeps_ray_off_the_metadata_endpoints(tmp_path):
    script = tmp_path / "dashboard" / "dashboard.py"
    script.parent.mkdir()
    script.write_text(FAKE_API_SERVER)
    ray_command = [sys.executable, str(script), "--gcs-address=127.0.0.1:1"]

    unpatched = _run(ray_command)
    # Ray itself probes (if this stops, the shim and docs/SECURITY.md can go)
    assert {host for _, host in unpatched["attempts"]} == METADATA_HOSTS

    patched = _run(api_server_command(ray_command))
    assert patched["attempts"] == [] and patched["cloud"] == "unknown"
    # otherwise the same process: arguments, argv[0], and sys.path with the script's
    # directory first (not -c's current directory)
    assert patched["argv"] == unpatched["argv"] == [str(script), "--gcs-address=127.0.0.1:1"]
    assert patched["path"] == unpatched["path"] and "" not in patched["path"]


def test_api_server_command_leaves_unknown_shapes_alone():
    # e.g. Ray's memray profiler wraps the interpreter: not ours to rewrite
    command = [sys.executable, "-m", "memray", "run", "/x/dashboard/dashboard.py", "--a=1"]
    assert api_server_command(command) == command


def test_embedded_cluster_runs_its_api_server_without_the_probe(ray_cluster):
    import ray
    from ray._private import ray_constants

    node = ray._private.worker._global_node
    api_server = node.all_processes[ray_constants.PROCESS_TYPE_DASHBOARD][0].process
    cmdline = psutil.Process(api_server.pid).cmdline()
    assert cmdline[1] == "-c"
    assert "get_cloud_from_metadata_requests = lambda: 'unknown'" in cmdline[2]
    assert any(a.startswith("--gcs-address=") for a in cmdline[3:])
    # usage stats off in the environment every Ray process of the cluster inherits
    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process
    assert psutil.Process(raylet.pid).environ().get("RAY_USAGE_STATS_ENABLED") == "0"
