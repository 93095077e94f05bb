#!/usr/bin/env bash
# Softmax's 135M training speed at 128k and 256k tokens a step, alternated twice: the README's command, and the same
# with --tokens-per-step 262144 (two microbatches of 64 a step, the optimizer's step spread over twice the tokens).
# On the device, from the repository's root, after .carry/install.sh and PYTHONPATH=/tmp/site:$PWD:
#   bash docs/bench/softmax_batch_ab.sh        # logs and tables under $OUT
set -u
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv > "$out/gpu.txt" 2>&1
for i in 1 2; do
  for t in 131072 262144; do
    timeout 100 python -m sweep.cli bench train --arch softmax --params 135M --seq-len 2048 --compile-mode reduce-overhead \
      --tokens-per-step "$t" --microbatch 64 --steps 30 --out "$out/softmax_t${t}_r$i.csv" > "$out/softmax_t${t}_r$i.log" 2>&1
    echo "t $t run $i: $(grep MFU "$out/softmax_t${t}_r$i.log")" | tee -a "$out/summary.txt"
  done
done
