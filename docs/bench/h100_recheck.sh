#!/usr/bin/env bash
# The measurements issues 4 and 8 still need on an H100, each part sized for one 10-minute device call:
#   bash docs/bench/h100_recheck.sh speed   # 135M training MFU (the README's command), per-channel / constant
#                                           # fwd+bwd at 2k/8k/32k (twice), slab bench kernels, the grid/CE guards
#   bash docs/bench/h100_recheck.sh smoke   # the smoke study on one GPU: launch, then the report
# On the device, after .carry/install.sh and PYTHONPATH=/tmp/site:$PWD; every log goes under $OUT, each step has a
# time limit so that the call's other steps still run and come back.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out"
SLAB=(python -m sweep.cli)  # timeout runs programs, not shell functions
step() {  # step NAME LIMIT_S COMMAND...: run it with a limit, its output and wall time in $out/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1; local rc=$?
  echo "$name rc $rc wall_s $((SECONDS - start))" | tee -a "$out/summary.txt"
}
[[ ${1:-} == speed || ${1:-} == smoke ]] || { echo "usage: bash docs/bench/h100_recheck.sh speed|smoke" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt" 2>&1
case $1 in
  speed)
    step train 200 "${SLAB[@]}" bench train --arch softmax --arch lightning --params 135M --seq-len 2048 \
      --compile-mode reduce-overhead --tokens-per-step 131072 --microbatch 64 --steps 30 --out "$out/train_135m.csv"
    step study_gpu 60 python docs/bench/linear_attention_study.py gpu
    step study_gpu2 60 python docs/bench/linear_attention_study.py gpu
    step kernels 200 "${SLAB[@]}" bench kernels --no-peers --out "$out/kernels"
    step grid 40 python docs/bench/grid_and_ce_check.py
    ;;
  smoke)
    step launch 420 "${SLAB[@]}" --db "sqlite:///$out/smoke.db" launch plans/smoke-h100.csv --ckpt-dir /tmp/smoke-ckpt
    step report 60 "${SLAB[@]}" --db "sqlite:///$out/smoke.db" report --plan smoke-h100 --out "$out/smoke" \
      --throughput docs/smoke/throughput.csv
    ;;
esac
