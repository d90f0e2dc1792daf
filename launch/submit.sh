#!/usr/bin/env bash
# Submit a cldist run to a Ray cluster as a Ray job, stream its logs, exit with its status.
#
#   launch/submit.sh [--address URL] [--workdir DIR] [--cldist CMD] [--env KEY=VALUE]...
#                    [--submission-id ID] [--no-wait] [-- OVERRIDES...]
#
# Runs `cldist run cluster.address=auto OVERRIDES...` as the job's entrypoint on the head node
# (the driver joins the cluster the job runs in; Ray Train puts the task workers on any node).
# Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED, 130 on Ctrl-C (which
# also stops the job), 2 for a bad option. With --no-wait it only submits and prints the id.
#
# Options:
#   --address URL    the cluster's Jobs API (dashboard) address. Default: the cluster
#                    launch/local-cluster.sh started, else $RAY_API_SERVER_ADDRESS, else
#                    $RAY_ADDRESS when it is an http(s) URL, else http://127.0.0.1:8265.
#   --workdir DIR    the job's working directory on the head node (relative run_dir= and
#                    data/ paths resolve there). Default: this directory for a cluster on
#                    127.0.0.1/localhost, else none (Ray's default; give absolute paths).
#   --cldist CMD     the cldist executable on the head node. Default: this checkout's
#                    .venv/bin/cldist for a local cluster, else `cldist` on the head's PATH.
#   --env KEY=VALUE  an environment variable for the job (repeatable), e.g. CLDIST_DATA_DIR=/data.
#   --submission-id  the job id (default cldist-<time>-<random>).
#
# Token auth (Ray >= 2.60 clusters started with RAY_AUTH_MODE=token): the token is taken from
# $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else the local cluster's token file (for
# its address), else ~/.ray/auth_token; it travels as an `Authorization: Bearer` header, so use
# https (or an SSH tunnel / port-forward) for any Jobs API that is not on loopback.
#
# No working_dir is uploaded: cldist must already be installed on every node (it is, for a
# cluster on this machine: every node runs this checkout's .venv). See docs/CLUSTER.md for
# multi-machine clusters.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
STATE_DIR="${CLDIST_CLUSTER_DIR:-/tmp/cldist-cluster-$(id -u)}"
if [[ -z "${RAY:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/ray" ]]; then RAY="$REPO/.venv/bin/ray"; else RAY="$(command -v ray || true)"; fi
fi
PYTHON="$(dirname "$RAY")/python"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3 || true)"

die() { echo "submit: $*" >&2; exit 2; }
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

address="" workdir="__default__" cldist="" submission_id="" no_wait=0
envs=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address="${2:?--address needs a URL}"; shift 2 ;;
        --address=*) address="${1#*=}"; shift ;;
        --workdir) workdir="${2?--workdir needs a directory}"; shift 2 ;;
        --workdir=*) workdir="${1#*=}"; shift ;;
        --cldist) cldist="${2:?--cldist needs a command}"; shift 2 ;;
        --cldist=*) cldist="${1#*=}"; shift ;;
        --env) envs+=("${2:?--env needs KEY=VALUE}"); shift 2 ;;
        --env=*) envs+=("${1#*=}"); shift ;;
        --submission-id) submission_id="${2:?--submission-id needs an id}"; shift 2 ;;
        --submission-id=*) submission_id="${1#*=}"; shift ;;
        --no-wait) no_wait=1; shift ;;
        -h|--help) usage 0 ;;
        --) shift; break ;;
        *) die "unknown option '$1' (cldist overrides go after '--'; see --help)" ;;
    esac
done
overrides=("$@")
for o in "${overrides[@]}"; do
    case "$o" in
        cluster.address=*) die "'$o': the job always runs with cluster.address=auto (the cluster it was submitted to)" ;;
    esac
done
[[ -x "$RAY" ]] || die "no 'ray' executable (run 'make install', or set RAY=/path/to/ray)"

# ---- where to submit, and with which token
local_url="" local_token=""
if [[ -f "$STATE_DIR/cluster.env" ]]; then
    local_url="$(sed -n 's/^DASHBOARD_URL=//p' "$STATE_DIR/cluster.env")"
    local_token="$(sed -n 's/^TOKEN_FILE=//p' "$STATE_DIR/cluster.env")"
fi
if [[ -z "$address" ]]; then
    if [[ -n "$local_url" ]]; then address="$local_url"
    elif [[ -n "${RAY_API_SERVER_ADDRESS:-}" ]]; then address="$RAY_API_SERVER_ADDRESS"
    elif [[ "${RAY_ADDRESS:-}" == http*://* ]]; then address="$RAY_ADDRESS"
    else address="http://127.0.0.1:8265"; fi
fi
[[ "$address" == *://* ]] || address="http://$address"
hostport="${address#*://}"; hostport="${hostport%%/*}"; host="${hostport%:*}"
is_local=0
case "$host" in 127.0.0.1|localhost|\[::1\]) is_local=1 ;; esac

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
unset RAY_ADDRESS RAY_API_SERVER_ADDRESS  # the address is --address, nothing else
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
    if [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]]; then :
    elif [[ -n "$local_token" && "$address" == "$local_url"* ]]; then export RAY_AUTH_TOKEN_PATH="$local_token"
    elif [[ -f "$HOME/.ray/auth_token" ]]; then export RAY_AUTH_TOKEN_PATH="$HOME/.ray/auth_token"
    else die "no Ray auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token (or RAY_AUTH_MODE=disabled for a cluster without auth)"; fi
    [[ -r "$RAY_AUTH_TOKEN_PATH" ]] || die "cannot read the token file RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
fi
if [[ "$is_local" == 0 && "$address" == http://* && "$RAY_AUTH_MODE" == token ]]; then
    echo "submit: warning: sending the cluster token over plain http to $hostport; prefer https or an SSH tunnel / kubectl port-forward to 127.0.0.1" >&2
fi

# ---- the entrypoint
if [[ -z "$cldist" ]]; then
    if [[ "$is_local" == 1 && -x "$REPO/.venv/bin/cldist" ]]; then cldist="$REPO/.venv/bin/cldist"; else cldist="cldist"; fi
fi
if [[ "$workdir" == "__default__" ]]; then
    if [[ "$is_local" == 1 ]]; then workdir="$PWD"; else workdir=""; fi
fi
entry=()
[[ -n "$workdir" ]] && entry+=(env "--chdir=$workdir")
entry+=("$cldist" run cluster.address=auto "${overrides[@]}")

runtime_env=()
if [[ ${#envs[@]} -gt 0 ]]; then
    json="$("$PYTHON" -c 'import json, sys
env = {}
for kv in sys.argv[1:]:
    k, sep, v = kv.partition("=")
    if not sep or not k:
        sys.exit(f"submit: --env {kv!r} is not KEY=VALUE")
    env[k] = v
print(json.dumps({"env_vars": env}))' "${envs[@]}")" || exit 2
    runtime_env=(--runtime-env-json "$json")
fi
submission_id="${submission_id:-cldist-$(date +%Y%m%d-%H%M%S)-$(od -An -tx1 -N3 /dev/urandom | tr -d ' \n')}"

echo "submit: job $submission_id to $address: ${entry[*]}"
if [[ "$no_wait" == 1 ]]; then
    exec "$RAY" job submit --address "$address" --submission-id "$submission_id" \
        ${runtime_env[@]+"${runtime_env[@]}"} --no-wait -- "${entry[@]}"
fi

job_status() {  # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED, or nothing if unknown
    "$PYTHON" - "$address" "$submission_id" 2>/dev/null <<'PY' || true
import sys
from ray.job_submission import JobSubmissionClient
print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)
PY
}
on_interrupt() {
    trap - INT TERM
    echo "submit: interrupted - stopping job $submission_id" >&2
    "$RAY" job stop --address "$address" --no-wait "$submission_id" >/dev/null 2>&1 || true
    exit 130
}
trap on_interrupt INT TERM

t0=$SECONDS
# `ray job submit` (without --no-wait) tails the job's logs until it ends.
"$RAY" job submit --address "$address" --submission-id "$submission_id" \
    ${runtime_env[@]+"${runtime_env[@]}"} -- "${entry[@]}" &
submit_pid=$!
wait "$submit_pid" || true  # its exit code is 0 for STOPPED too: ask for the status instead
trap - INT TERM
status="$(job_status)"
for _ in 1 2 3 4 5 6 7 8 9 10; do  # a job just submitted (or a failed submit) may not show yet
    [[ -z "$status" || "$status" == PENDING || "$status" == RUNNING ]] || break
    sleep 1; status="$(job_status)"
done
echo "submit: job $submission_id ${status:-UNKNOWN} after $((SECONDS - t0)) s (logs: $RAY job logs --address $address $submission_id)"
[[ "$status" == SUCCEEDED ]]
