#!/usr/bin/env bash
# The softmax mixer on FlashAttention 4 (kernels/flash_attention.py) on a Hopper GPU: the README's training command
# with FA4 and with SDPA alternated, the mixer's attention against SDPA's at odd shapes, and eager training twice in
# two processes (the second should load FA4's kernels from its disk cache). The second of two device calls: see
# docs/bench/fa4_carry.sh for the first, which leaves the FA4 packages' first part in /tmp/fa4parts.
# On the device:  bash docs/bench/fa4_verify.sh   (carry [".fa4b"]); every log under $OUT, a summary in summary.txt.
set -uo pipefail
. docs/bench/fa4_site.sh
step() {  # step NAME LIMIT_S PYTHONPATH COMMAND...: its output in $out/NAME.log, its exit code, wall time and speed in summary.txt
  local name=$1 limit=$2 path=$3; shift 3; local s=$SECONDS
  PYTHONPATH=$path timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc $? wall_s $((SECONDS - s))" | tee -a "$out/summary.txt"
  grep -h "tokens/s\|SHAPE" "$out/$name.log" | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > "$out/gpu.txt" 2>&1
CMD=(python -m sweep.cli bench train --arch softmax --params 135M --seq-len 2048 --compile-mode reduce-overhead
     --tokens-per-step 131072 --microbatch 64 --steps 30)
EAGER=(python -m sweep.cli bench train --arch softmax --arch hybrid --params 135M --seq-len 2048 --steps 12)
# In order of need, should the device time end mid-call: one round of each, the shapes, the eager path, a second round.
step fa4_1 150 "$FA4" "${CMD[@]}" --out "$out/train_135m_fa4_1.csv"
step sdpa_1 90 "$BASE" "${CMD[@]}" --out "$out/train_135m_sdpa_1.csv"
step shapes 150 "$FA4" python docs/bench/fa4_study.py shapes
step eager_fa4_1 120 "$FA4" "${EAGER[@]}"
step eager_fa4_2 90 "$FA4" "${EAGER[@]}"
step fa4_2 90 "$FA4" "${CMD[@]}" --out "$out/train_135m_fa4_2.csv"
step sdpa_2 90 "$BASE" "${CMD[@]}" --out "$out/train_135m_sdpa_2.csv"
ls -la "/tmp/$(whoami)/flash_attention_cute_dsl_cache" > "$out/cache_ls.txt" 2>&1
