#!/usr/bin/env bash
# cldist's GPU check: one JSON with ViT-B/16 LoRA training throughput and MFU (bf16, DeepSpeed
# engine beside a plain PyTorch loop), a 3-task PEARL stream through the Ray runner on the GPU,
# and Class-IL scoring throughput (ensemble and routed). Under 8 minutes on one H100; needs no
# internet (random-init ViT-B/16, synthetic images). See cldist/bench/gpu.py.
#
#   launch/gpu-check.sh [OUT_DIR] [-- EXTRA ARGS for python -m cldist.bench.gpu]
#   launch/gpu-check.sh runs/gpu-check -- --parts train          # one part only
#   launch/gpu-check.sh /tmp/dry -- --device cpu --tiny          # the logic, on a CPU
#
# Writes OUT_DIR/gpu.json (default runs/gpu-check/gpu.json; rewritten after each part, so a
# check stopped from outside keeps what it finished) and OUT_DIR/gpu-check.log. Exit status:
# 0 when every part passed, 1 when one failed (its error is in the JSON), 2 for a refusal
# (no GPU without --device cpu --tiny, an unknown part), 124 when the whole check ran out of
# its 9-minute guard.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUT="${1:-runs/gpu-check}"
[[ $# -gt 0 ]] && shift
[[ "${1:-}" == "--" ]] && shift
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
# The GPU machine has no internet: never reach for timm's hub or Ray's usage stats.
export HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
export RAY_DEDUP_LOGS=0
status=0
timeout --signal=TERM --kill-after=30 540 \
    "$PYTHON" -m cldist.bench.gpu --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu-check.log" \
    || status=${PIPESTATUS[0]}
if [[ -f "$OUT/gpu.json" ]]; then
    echo "gpu check: JSON at $OUT/gpu.json, log at $OUT/gpu-check.log (exit $status)"
else
    echo "gpu check: no JSON written, see $OUT/gpu-check.log (exit $status)"
fi
exit "$status"
