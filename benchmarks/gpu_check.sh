#!/usr/bin/env bash
# The GPU checks, prepared as one script for a machine with a CUDA device (issue 27): at most
# 8 minutes in all, each step under its own limit so one that hangs costs only itself.
#
#   1. pytest -m cuda                      the tests that need a GPU (memory tiers, placement)
#   2. benchmarks/placement.py --device cuda   source tiers on the device, host and disk
#   3. benchmarks/merge_speed.py --shape 7b    per-method merge time on Llama-2-7B-shaped layers,
#                                              against the device's copy (HBM) bandwidth
#   4. benchmarks/eval_speed.py --device cuda  evaluation throughput against bare `generate`
#
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]   (logs to OUT_DIR, default $OUT or /tmp/gpu_check)
# The figures go to docs/benchmarks.md ("GPU" section) by hand, with this command.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/gpu_check}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
started=$(date +%s)

step() {  # step NAME SECONDS COMMAND...: runs it under its limit, keeps its log, never stops the script
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$out/$name.log"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s"
  echo
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee -a "$out/gpu.txt"

step pytest-cuda 90 python -m pytest -m cuda -q -p no:cacheprovider -x
step placement 90 python benchmarks/placement.py --device cuda --reps 3 --no-cold
step merge-speed-7b 150 python benchmarks/merge_speed.py --device cuda --dtype bfloat16 --shape 7b --layers 2 \
  --no-mergekit --reps 3
step eval-speed 120 python benchmarks/eval_speed.py --device cuda --candidates 4
echo "gpu_check: $(( $(date +%s) - started )) s in all; logs in $out"
