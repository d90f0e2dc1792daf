#!/usr/bin/env bash
# A multi-node Ray cluster on this machine, for trying cldist's cluster path end to end.
#
#   launch/local-cluster.sh start [--workers N] [--cpus-per-node C] [--gpus-per-node G]
#   launch/local-cluster.sh status
#   launch/local-cluster.sh stop
#
# `start` runs one head node and N worker nodes (default 1), each its own `ray start --block`
# process (own raylet, object store, dashboard agent), so Ray schedules across them exactly as
# across machines. The cluster is locked down for a shared machine:
#   * every Ray listener binds 127.0.0.1 (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, Ray's
#     single-machine mode; see docs/notes-distributed.md);
#   * token authentication is on (RAY_AUTH_MODE=token) with this cluster's own token, a fresh
#     random one per start in $STATE_DIR/auth_token (owner-only), unless RAY_AUTH_TOKEN_PATH
#     names one - never ~/.ray/auth_token, which embedded clusters of this user share;
#   * the dashboard (it serves the Jobs API that `ray job submit` uses) binds 127.0.0.1 only.
# It keeps out of the way of embedded clusters (`cldist run`, the tests): its own Ray temp dir
# (so /tmp/ray/ray_current_cluster is never touched and `ray.init()` elsewhere never joins
# it), its own fixed ports (GCS 26379, dashboard 28265, ...; override with the env vars
# below), random ports for everything else. `stop` stops exactly the processes `start`
# recorded - never `ray stop`, which kills every Ray process of this user on the machine.
#
# Environment (all optional):
#   CLDIST_CLUSTER_DIR        state dir: pids, logs, token, Ray temp dir (/tmp/cldist-cluster-$UID)
#   CLDIST_CLUSTER_PORT       GCS port of the head (26379)
#   CLDIST_DASHBOARD_PORT     dashboard / Jobs API port (28265)
#   CLDIST_CLIENT_PORT        Ray Client server port on the head (20001)
#   CLDIST_AGENT_PORT         first dashboard-agent HTTP port; node i uses +i (25365)
#   CLDIST_OBJECT_STORE_MB    object store per node in MiB (512)
#   RAY_AUTH_TOKEN_PATH       use this token file instead of generating one
#   RAY                       the `ray` executable (default: .venv/bin/ray of this checkout, else PATH)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
STATE_DIR="${CLDIST_CLUSTER_DIR:-/tmp/cldist-cluster-$(id -u)}"
GCS_PORT="${CLDIST_CLUSTER_PORT:-26379}"
DASH_PORT="${CLDIST_DASHBOARD_PORT:-28265}"
CLIENT_PORT="${CLDIST_CLIENT_PORT:-20001}"
AGENT_PORT="${CLDIST_AGENT_PORT:-25365}"
OBJECT_STORE_MB="${CLDIST_OBJECT_STORE_MB:-512}"
HOST=127.0.0.1
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3 || true)"

# `ray start` refuses to add a worker node while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ("multi-
# node clusters are not supported on Windows and OSX"), yet that switch is what keeps every
# listener on 127.0.0.1. The check reads `ray_constants.ENABLE_RAY_CLUSTER` through the CLI
# module's own reference; the worker's CLI gets a copy of that module with the flag on, while
# the rest of Ray (address resolution, the node's processes via the env var) keeps loopback
# mode. This is what ray.cluster_utils.Cluster does in effect: it never runs that check.
WORKER_CLI='import sys, types
import ray._private.ray_constants as rc
import ray.scripts.scripts as cli
view = types.ModuleType(rc.__name__)
view.__dict__.update(rc.__dict__)
view.ENABLE_RAY_CLUSTER = True
cli.ray_constants = view
sys.argv[0] = "ray"
sys.exit(cli.main())'

usage() {
    sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}
die() { echo "local-cluster: $*" >&2; exit 1; }
alive() { [[ -n "${1:-}" ]] && kill -0 "$1" 2>/dev/null; }
cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }
# A recorded pid is only ours while it is a `ray start` of this state dir (pids get reused).
ours() { alive "$1" && [[ "$(cmdline "$1")" == *" start "*"--temp-dir $STATE_DIR/ray "* ]]; }
group_is_ours() {  # some member of process group $1 is a Ray process of this state dir
    local p c
    for p in $(pgrep -g "$1" 2>/dev/null); do
        c="$(cmdline "$p")"
        [[ "$c" == *"$STATE_DIR/ray"* || "$c" == ray::* ]] && return 0
    done
    return 1
}

pid_files() {  # workers first (highest index first), then the head
    ls -1 "$STATE_DIR"/pids/*.pid 2>/dev/null | sort -r -V || true
}

running_pids() {
    local f pid
    for f in $(pid_files); do
        pid="$(cat "$f" 2>/dev/null || true)"
        if ours "$pid"; then echo "$pid"; fi
    done
    return 0
}

cluster_env() {
    # What every process of this cluster (and every client of it) must see. Exported before
    # Python starts: Ray reads these at import time (see docs/notes-distributed.md).
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    export RAY_AUTH_MODE=token
    export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
    unset RAY_AUTH_TOKEN RAY_ADDRESS RAY_API_SERVER_ADDRESS
    export RAY_USAGE_STATS_ENABLED=0
    # `ray start --block` drains its node for 30 s on SIGTERM (for Ray Serve); nothing here
    # needs that, so `stop` takes seconds.
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
}

load_state() {
    [[ -f "$STATE_DIR/cluster.env" ]] || return 1
    # shellcheck disable=SC1091
    source "$STATE_DIR/cluster.env"
}

start_node() {  # start_node NAME ARGS... : one `ray start --block`, in its own session
    local name="$1"; shift
    local launcher=("$RAY")
    [[ "$name" == *head ]] || launcher=("$PYTHON" -c "$WORKER_CLI")
    local log="$STATE_DIR/logs/$name.log" pidf="$STATE_DIR/pids/$name.pid"
    # setsid: its own process group, so `stop` can sweep up exactly this node's processes.
    setsid bash -c 'echo $$ > "$0"; exec "$@"' "$pidf" \
        "${launcher[@]}" start --block --disable-usage-stats --node-ip-address "$HOST" \
        --temp-dir "$RAY_TMP" --num-cpus "$CPUS" ${GPUS:+--num-gpus "$GPUS"} \
        --object-store-memory $((OBJECT_STORE_MB * 1024 * 1024)) \
        --min-worker-port 0 --max-worker-port 0 "$@" \
        </dev/null >"$log" 2>&1 &
    local i
    for i in $(seq 1 300); do  # up to 150 s: `ray start` prints this once the node is registered
        if grep -q "Ray runtime started" "$log" 2>/dev/null; then return 0; fi
        local pid; pid="$(cat "$pidf" 2>/dev/null || true)"
        if [[ -n "$pid" ]] && ! alive "$pid"; then
            echo "---- $log" >&2; tail -n 30 "$log" >&2
            return 1
        fi
        sleep 0.5
    done
    echo "---- $log" >&2; tail -n 30 "$log" >&2
    return 1
}

wait_for_jobs_api() {
    local i code
    for i in $(seq 1 120); do  # up to 60 s
        code="$(curl -s -o /dev/null -w '%{http_code}' -H "@$STATE_DIR/auth_header" \
                "http://$HOST:$DASH_PORT/api/jobs/" || true)"
        [[ "$code" == 200 ]] && return 0
        sleep 0.5
    done
    return 1
}

cmd_start() {
    local workers=1 cpus=1 gpus=""
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --workers) workers="$2"; shift 2 ;;
            --workers=*) workers="${1#*=}"; shift ;;
            --cpus-per-node) cpus="$2"; shift 2 ;;
            --cpus-per-node=*) cpus="${1#*=}"; shift ;;
            --gpus-per-node) gpus="$2"; shift 2 ;;
            --gpus-per-node=*) gpus="${1#*=}"; shift ;;
            -h|--help) usage 0 ;;
            *) die "unknown option '$1' (valid: --workers N, --cpus-per-node C, --gpus-per-node G)" ;;
        esac
    done
    [[ "$workers" =~ ^[0-9]+$ ]] || die "--workers must be a whole number, not '$workers'"
    [[ "$cpus" =~ ^[0-9]+$ && "$cpus" -ge 1 ]] || die "--cpus-per-node must be >= 1, not '$cpus'"
    [[ -z "$gpus" || "$gpus" =~ ^[0-9]+$ ]] || die "--gpus-per-node must be a whole number, not '$gpus'"
    [[ -x "$RAY" ]] || die "no 'ray' executable (run 'make install', or set RAY=/path/to/ray)"
    if [[ -n "$(running_pids)" ]]; then
        die "a cluster from $STATE_DIR is already running (pids: $(running_pids | tr '\n' ' ')); '$0 stop' first"
    fi
    for port in "$GCS_PORT" "$DASH_PORT" "$CLIENT_PORT"; do
        if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
            die "port $port is in use; pick others with CLDIST_CLUSTER_PORT / CLDIST_DASHBOARD_PORT / CLDIST_CLIENT_PORT"
        fi
    done

    local old_umask; old_umask="$(umask)"
    umask 077  # the state dir holds the token: owner-only (the run's own files keep the usual umask)
    # The state dir is ours alone: refuse a non-empty directory this script did not create.
    if [[ -d "$STATE_DIR" && ! -f "$STATE_DIR/.cldist-local-cluster" && -n "$(ls -A "$STATE_DIR")" ]]; then
        die "$STATE_DIR exists and was not made by this script; point CLDIST_CLUSTER_DIR at a new directory"
    fi
    mkdir -p "$STATE_DIR"
    touch "$STATE_DIR/.cldist-local-cluster"
    chmod 700 "$STATE_DIR"
    RAY_TMP="$STATE_DIR/ray"
    rm -rf "$STATE_DIR/pids" "$STATE_DIR/logs" "$RAY_TMP"  # leftovers of a stopped cluster
    mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs" "$RAY_TMP"
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
        TOKEN_FILE="$RAY_AUTH_TOKEN_PATH"
        [[ -s "$TOKEN_FILE" ]] || die "RAY_AUTH_TOKEN_PATH=$TOKEN_FILE is missing or empty"
    else
        TOKEN_FILE="$STATE_DIR/auth_token"  # a fresh token for every start
        od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$TOKEN_FILE"
    fi
    printf 'Authorization: Bearer %s\n' "$(cat "$TOKEN_FILE")" >"$STATE_DIR/auth_header"
    umask "$old_umask"
    cluster_env
    CPUS="$cpus"; GPUS="$gpus"

    local t0=$SECONDS
    echo "starting head node (127.0.0.1:$GCS_PORT, $cpus CPU) ..."
    if ! start_node 00-head --head --port "$GCS_PORT" \
            --include-dashboard true --dashboard-host "$HOST" --dashboard-port "$DASH_PORT" \
            --ray-client-server-port "$CLIENT_PORT" \
            --dashboard-agent-listen-port "$AGENT_PORT"; then
        cmd_stop >/dev/null 2>&1 || true
        die "the head node did not start (log above: $STATE_DIR/logs/00-head.log)"
    fi
    local i name
    for i in $(seq 1 "$workers"); do
        name="$(printf '%02d-worker' "$i")"
        echo "starting worker node $i ($cpus CPU) ..."
        if ! start_node "$name" --address "$HOST:$GCS_PORT" \
                --dashboard-agent-listen-port $((AGENT_PORT + i)); then
            cmd_stop >/dev/null 2>&1 || true
            die "worker node $i did not start (log above: $STATE_DIR/logs/$name.log)"
        fi
    done
    if ! wait_for_jobs_api; then
        cmd_stop >/dev/null 2>&1 || true
        die "the Jobs API at http://$HOST:$DASH_PORT did not come up (see $STATE_DIR/ray/session_latest/logs/dashboard.log)"
    fi
    cat >"$STATE_DIR/cluster.env" <<EOF
# written by launch/local-cluster.sh start; read by launch/submit.sh and '$0 status|stop'
GCS_ADDRESS=$HOST:$GCS_PORT
DASHBOARD_URL=http://$HOST:$DASH_PORT
TOKEN_FILE=$TOKEN_FILE
RAY_TMP=$RAY_TMP
NODES=$((workers + 1))
CPUS_PER_NODE=$cpus
EOF
    cat <<EOF
local Ray cluster up in $((SECONDS - t0)) s: $((workers + 1)) node(s) x $cpus CPU, loopback only, token auth
  GCS address      $HOST:$GCS_PORT        (cldist run cluster.address=$HOST:$GCS_PORT)
  Jobs API         http://$HOST:$DASH_PORT
  token file       $TOKEN_FILE
  logs             $STATE_DIR/logs, $RAY_TMP/session_latest/logs
submit a run:
  launch/submit.sh -- scenario=digits_5t backbone=test_vit run_dir=/tmp/cluster-run
or drive it from this shell:
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$TOKEN_FILE \\
    cldist run cluster.address=$HOST:$GCS_PORT trainer.num_workers=$((workers + 1)) ...
stop it:
  $0 stop
EOF
}

cmd_status() {
    local pids; pids="$(running_pids)"
    if [[ -z "$pids" ]]; then
        echo "no local cluster running (state dir $STATE_DIR)"
        return 3
    fi
    load_state || true
    echo "local Ray cluster: ${NODES:-?} node(s) started, ${CPUS_PER_NODE:-?} CPU each"
    echo "  GCS ${GCS_ADDRESS:-?}   Jobs API ${DASHBOARD_URL:-?}   token ${TOKEN_FILE:-?}"
    local f pid
    for f in $(pid_files | sort -V); do
        pid="$(cat "$f" 2>/dev/null || true)"
        if ours "$pid"; then echo "  $(basename "$f" .pid): pid $pid running"
        else echo "  $(basename "$f" .pid): pid ${pid:-?} NOT running"; fi
    done
    if [[ -n "${TOKEN_FILE:-}" && -n "${GCS_ADDRESS:-}" ]]; then
        cluster_env
        # (the autoscaler's view: a node that joined seconds ago may not be listed yet)
        "$RAY" status --address "$GCS_ADDRESS" 2>/dev/null | sed -n '/^Node status/,$p' || true
    fi
}

cmd_stop() {
    local f pid pids=() i
    for f in $(pid_files); do  # workers first, then the head
        pid="$(cat "$f" 2>/dev/null || true)"
        [[ -n "$pid" ]] || continue
        pids+=("$pid")
        if ours "$pid"; then
            echo "stopping $(basename "$f" .pid) (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true  # `ray start --block` stops its node's processes
            for i in $(seq 1 60); do alive "$pid" || break; sleep 0.5; done
        fi
    done
    # Sweep what is left in each node's own process group (setsid gave each one; the group
    # id is the recorded pid), e.g. workers that outlived their raylet.
    for pid in ${pids[@]+"${pids[@]}"}; do
        if group_is_ours "$pid"; then kill -TERM -- "-$pid" 2>/dev/null || true; fi
    done
    for pid in ${pids[@]+"${pids[@]}"}; do
        for i in $(seq 1 20); do group_is_ours "$pid" || break; sleep 0.5; done
        if group_is_ours "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    done
    rm -f "$STATE_DIR"/pids/*.pid "$STATE_DIR/cluster.env" "$STATE_DIR/auth_header"
    if [[ ${#pids[@]} -eq 0 ]]; then
        echo "no local cluster was running (state dir $STATE_DIR)"
    else
        echo "stopped; logs kept in $STATE_DIR/logs and $STATE_DIR/ray"
    fi
}

[[ $# -ge 1 ]] || usage 2
command="$1"; shift
case "$command" in
    start) cmd_start "$@" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    -h|--help|help) usage 0 ;;
    *) echo "local-cluster: unknown command '$command' (valid: start, stop, status)" >&2; exit 2 ;;
esac
