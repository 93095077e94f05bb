#!/usr/bin/env bash
# The twenty-second session's lightning levers (2026-12-06), two rounds alternated on one H100: the README's command
# (base), the same with cuBLASLt preferred (lt), 192k tokens a step in one pass of 96 (b96) and inductor's
# aggressive_fusion (aggr); each prints bench train's line and the CUDA memory peak. Run from the repository root on
# the device, after .carry/install.sh with PYTHONPATH=/tmp/site:$PWD (it ran in the background, polled, as
# .devtmp/levers.sh). Output: $OUT/summary.txt and a table per run.
out=${OUT:-/tmp/out}; mkdir -p "$out"
cat > "$out/run.py" <<'PY'
import atexit, os, sys
import torch
if os.environ.get("LV_AGGR"):
    import torch._inductor.config as c
    c.aggressive_fusion = True
atexit.register(lambda: print(f"peak_gib {torch.cuda.max_memory_allocated() / 2**30:.1f}", flush=True))
from sweep.cli import main
sys.argv[0] = "slab"
main()
PY
COMMON="bench train --arch lightning --params 135M --seq-len 2048 --compile-mode reduce-overhead --steps 30"
B64="--tokens-per-step 131072 --microbatch 64"
for round in 1 2; do
  for v in base lt b96 aggr; do
    case $v in
      base) python "$out/run.py" $COMMON $B64 --out "$out/$v$round.csv" ;;
      lt) TORCH_BLAS_PREFER_CUBLASLT=1 python "$out/run.py" $COMMON $B64 --out "$out/$v$round.csv" ;;
      b96) python "$out/run.py" $COMMON --tokens-per-step 196608 --microbatch 96 --out "$out/$v$round.csv" ;;
      aggr) LV_AGGR=1 python "$out/run.py" $COMMON $B64 --out "$out/$v$round.csv" ;;
    esac > "$out/$v$round.log" 2>&1
    echo "$v$round rc $?: $(grep -h 'tokens/s' "$out/$v$round.log" | head -1) $(grep -h peak_gib "$out/$v$round.log")" | tee -a "$out/summary.txt"
  done
done
