"""Running on a cluster: the launch scripts and cluster templates, and a real two-node stream.

Static checks (fast): the cluster templates are valid YAML with the fields their tools need,
every shell script parses (`bash -n`; plus `shellcheck -S error` where installed), and the
launch scripts reject bad options without starting anything.

`test_two_node_stream_matches_inline` (slow: 2 min per method on the 2-core dev machine, 5 min
at load 11) brings up a two-node Ray cluster on this machine with `ray.cluster_utils.Cluster`
(head + 1 worker node, 1 CPU each, loopback only, token auth) and runs a 2-task PEARL stream,
then a 2-task SD-LoRA stream, with
`trainer.num_workers=2 trainer.zero_stage=2` through `cldist.stream.run_stream`: every Train
job needs 2 CPUs, so each one must place a worker on each node. The cluster lives in a
subprocess with its own Ray temp dir (RAY_TMPDIR), so it neither joins nor disturbs the
session's embedded cluster (`ray_cluster` in conftest.py) and never writes
/tmp/ray/ray_current_cluster.

Equivalence with the inline runner: the Ray run uses `trainer.batch_size=16` per worker on 2
workers, the inline run `trainer.batch_size=32`. The loader deals one common seeded stream to
the ranks by position (`rank mod world_size`), so global batch i of the 2-worker job holds
exactly the samples of the inline run's batch i, and DeepSpeed averages the two equal-sized
halves' gradients: the same AdamW updates up to float reduction order. So the test asks for
the same rank decisions, every saved tensor (reference, adapters, heads) within WEIGHT_TOL of
the inline run's (measured: 5e-5 after the 3-epoch reference training, 1e-6 on the task-1
adapter), and accuracy matrices within MATRIX_TOL percentage points per cell (a task's test
set here is 60 images, 1.67 pp each).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]
MATRIX_TOL = 5.0  # percentage points per accuracy-matrix cell (3 of 60 test images)
WEIGHT_TOL = 1e-3  # max |w_2node - w_inline| over every saved tensor (measured: 5e-5)
SHELL_SCRIPTS = ["launch/local-cluster.sh", "launch/submit.sh", "cluster/slurm.sbatch"]


# ------------------------------------------------------------------ static checks

def _load_yaml(rel: str) -> dict:
    data = yaml.safe_load((REPO / rel).read_text())
    assert isinstance(data, dict), f"{rel} is not a YAML mapping"
    return data


def test_ray_cluster_launcher_yaml():
    cfg = _load_yaml("cluster/ray-cluster.yaml")
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in cfg, f"cluster/ray-cluster.yaml lacks {key!r}"
    types_ = cfg["available_node_types"]
    assert cfg["head_node_type"] in types_
    workers = [t for name, t in types_.items() if name != cfg["head_node_type"]]
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers), \
        "the worker node types should be GPU nodes"
    setup = "\n".join(cfg["setup_commands"])
    assert "constraints.txt" in setup and "pip install" in setup
    start = "\n".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start, "the cluster must start with token auth"
    assert "--dashboard-host" in "\n".join(cfg["head_start_ray_commands"])


def test_kuberay_rayjob_yaml():
    job = _load_yaml("cluster/rayjob.yaml")
    assert job["apiVersion"].startswith("ray.io/") and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "cldist run" in spec["entrypoint"] and "cluster.address=auto" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in head.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"], \
        "the token must come from a Secret, not a literal"
    for group in cluster["workerGroupSpecs"]:
        worker = group["template"]["spec"]["containers"][0]
        names = {e["name"] for e in worker.get("env", [])}
        assert {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_parse(script):
    path = REPO / script
    assert path.is_file(), f"{script} is missing"
    result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"bash -n {script}: {result.stderr}"
    if shutil.which("shellcheck"):
        lint = subprocess.run(["shellcheck", "-S", "error", str(path)], capture_output=True,
                              text=True)
        assert lint.returncode == 0, lint.stdout


def test_slurm_template_starts_head_and_workers():
    text = (REPO / "cluster/slurm.sbatch").read_text()
    assert text.startswith("#!/bin/bash") and "#SBATCH" in text
    assert "ray start --head" in text and "srun" in text
    assert "cluster.address=" in text and "RAY_AUTH_MODE=token" in text


@pytest.mark.parametrize("cmd", [["launch/local-cluster.sh", "bogus"],
                                 ["launch/local-cluster.sh", "start", "--bogus"],
                                 ["launch/submit.sh", "--bogus"]])
def test_launch_scripts_reject_bad_options(cmd, tmp_path):
    env = dict(os.environ, CLDIST_CLUSTER_DIR=str(tmp_path / "state"))
    result = subprocess.run([str(REPO / cmd[0]), *cmd[1:]], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode in (1, 2), result
    assert "bogus" in result.stderr
    assert not (tmp_path / "state" / "pids").exists(), "a bad option must not start anything"


def test_local_cluster_status_when_stopped(tmp_path):
    env = dict(os.environ, CLDIST_CLUSTER_DIR=str(tmp_path / "state"))
    result = subprocess.run([str(REPO / "launch/local-cluster.sh"), "status"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 3 and "no local cluster running" in result.stdout


# ------------------------------------------------------------------ a real two-node stream

# Runs in a fresh interpreter whose environment (set by the test) puts Ray in loopback mode
# with token auth and a private temp dir. Prints one RESULT line of JSON.
TWO_NODE_SCRIPT = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster

overrides = json.loads(sys.argv[1])
node_args = dict(num_cpus=1, object_store_memory=200 * 1024 * 1024,
                 dashboard_agent_listen_port=None)  # random ports: no clash with other clusters
cluster = Cluster(initialize_head=True, head_node_args=dict(node_args, include_dashboard=False))
try:
    cluster.add_node(**node_args)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    from ray._private.authentication.authentication_utils import is_token_auth_enabled

    from cldist.config.compose import compose
    from cldist.stream import run_stream
    metrics = run_stream(compose(overrides))  # joins the connected cluster (cluster.address="")

    # every Ray Train worker actor this run created, with the node it ran on
    train_workers = [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
                     if "RayTrainWorker" in a.get("ActorClassName", "")]
    print("RESULT " + json.dumps({"metrics": metrics, "nodes": nodes,
                                  "train_worker_nodes": train_workers,
                                  "auth": is_token_auth_enabled()}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def _two_task_manifest(digits_dir: Path, out: Path) -> Path:
    """The first two tasks of the digits shards (as tests/system/test_stream.py does)."""
    shutil.copytree(digits_dir, out)
    data = json.loads((out / "manifest.json").read_text())
    data["tasks"] = data["tasks"][:2]
    (out / "manifest.json").write_text(json.dumps(data))
    return out


def _overrides(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    # the method decides which of tiny_overrides' method keys apply (PEARL's only to PEARL)
    method = [e for e in extra if e.startswith("method=")]
    return [o for o in tiny_overrides(data_dir, run_dir, *method)
            if not o.startswith(("trainer.batch_size=", "method="))] + list(extra)


def _run_two_node_cluster(overrides: list[str], timeout_s: float = 600,
                          script: str = TWO_NODE_SCRIPT) -> dict:
    """Run `script` (a two-node cluster driver printing one RESULT line) in a subprocess."""
    # A short temp dir: Ray's unix sockets live under it (108-byte path limit).
    ray_tmp = tempfile.mkdtemp(prefix="cldist-mn-", dir="/tmp")
    token = Path(ray_tmp) / "auth_token"
    token.write_text(os.urandom(32).hex())
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=ray_tmp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               RAY_DEDUP_LOGS="0")
    # Its own session: on a timeout the whole process group (driver, GCS, raylets, workers)
    # is killed, and nothing else.
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=str(REPO), start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"two-node run did not finish in {timeout_s:.0f} s; "
                    f"output tail:\n{out[-6000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, \
        f"two-node run failed (exit {proc.returncode}); output tail:\n{out[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pearl", "sdlora"])
def test_two_node_stream_matches_inline(tmp_path, digits_dir, method):
    """PEARL (independent tasks after a trained reference) and SD-LoRA (a chain: directions
    frozen, magnitudes trained across tasks) give the inline runner's model on two nodes."""
    from cldist.config.compose import compose
    from cldist.stream import run_stream

    data = _two_task_manifest(digits_dir, tmp_path / "data")
    inline = run_stream(compose(_overrides(data, tmp_path / "inline", "runner=inline",
                                           "trainer.batch_size=32", f"method={method}")))

    run_dir = tmp_path / "ray"
    result = _run_two_node_cluster(_overrides(
        data, run_dir, "runner=ray", "trainer.num_workers=2", "trainer.zero_stage=2",
        f"method={method}",
        "trainer.batch_size=16", "trainer.cpus_per_worker=1"))
    metrics = result["metrics"]
    assert result["auth"] is True, "the two-node cluster should run with token auth"

    # both nodes did work: two nodes alive, and the Train workers ran on both of them
    assert len(result["nodes"]) == 2
    workers = result["train_worker_nodes"]
    assert len(workers) == 2 * 2, f"expected 2 jobs x 2 workers, got {workers}"
    assert set(workers) == set(result["nodes"]), "a 2-worker job must use both 1-CPU nodes"
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["completed_tasks"] == [0, 1]
    assert {m["node_id"] for m in state["task_meta"].values()} <= set(result["nodes"])
    assert all(m["world_size"] == 2 for m in state["task_meta"].values())

    # every task finished and was scored
    assert metrics["n_tasks"] == 2
    assert [len(r) for r in metrics["accuracy_matrix"]] == [1, 2]
    for t in range(2):
        files = {p.name for p in (run_dir / "tasks" / f"{t:03d}").iterdir()}
        assert {"head.safetensors", "meta.json"} <= files
    assert json.loads((run_dir / "metrics.json").read_text())["acc"] == \
        pytest.approx(metrics["acc"])

    # the same model as the inline runner's, up to float noise (see the module docstring):
    # identical rank decisions, the same weights in every file, the same accuracy matrix
    inline_dir = tmp_path / "inline"
    assert state["ranks"] == json.loads((inline_dir / "state.json").read_text())["ranks"]
    files = sorted(p.relative_to(inline_dir) for p in inline_dir.rglob("*.safetensors"))
    assert files and files == sorted(p.relative_to(run_dir) for p in run_dir.rglob("*.safetensors")
                                     if "ray_train" not in p.parts)
    for rel in files:
        diff = _max_abs_diff(inline_dir / rel, run_dir / rel)
        assert diff <= WEIGHT_TOL, f"{rel}: 2-node weights differ from inline by {diff:.2e}"
    for row_inline, row_ray in zip(inline["accuracy_matrix"], metrics["accuracy_matrix"]):
        assert row_ray == pytest.approx(row_inline, abs=MATRIX_TOL), \
            (inline["accuracy_matrix"], metrics["accuracy_matrix"])


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys(), f"{a.name}: tensor names differ: {sorted(ta.keys() ^ tb.keys())}"
    return max(((ta[k].double() - tb[k].double()).abs().max().item()
                for k in ta if ta[k].numel()), default=0.0)
