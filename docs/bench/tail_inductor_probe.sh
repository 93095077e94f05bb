#!/usr/bin/env bash
# Lightning's training (train_study.py's 20-step run of the README's shape) without and with the block's tail as one op
# (the option tail, models.lm.Block.fused_tail), each with its own inductor cache, keeping the generated kernels of the
# RMSNorm backwards and the graphs' code (one tarball per run: the device tool returns a limited number of files);
# then eager training on its default kernels ("auto") against "gemm". The second of two device calls, as
# gemm_epilogue_verify.sh is (docs/bench/fa4_carry.sh says the first).
# On the device:  bash docs/bench/tail_inductor_probe.sh   (carry [".fa4b"]); logs under $OUT; SKIP_EAGER=1 stops
# after the compiled runs.
. docs/bench/fa4_site.sh
export PYTHONPATH=$FA4
for v in base tail; do
  opt=""; [ $v = tail ] && opt=tail
  TORCHINDUCTOR_CACHE_DIR=/tmp/ind_$v timeout 120 python docs/bench/train_study.py variant $v lightning ro b64 $opt \
    > "$out/ind_$v.log" 2>&1
  echo "$v rc $?"; grep RESULT "$out/ind_$v.log" | cut -c1-300
  (cd /tmp/ind_$v && { grep -rl "rms_norm_backward" --include=*.py . | head -40; grep -rl "def call(args)" --include=*.py . \
    | head -4; } | tar czf "$out/ind_$v.tgz" -T -)
done
[ "${SKIP_EAGER:-0}" = 1 ] && exit 0  # SKIP_EAGER=1: the two compiled runs only
EAGER=(python -m sweep.cli bench train --params 135M --seq-len 2048 --tokens-per-step 32768 --steps 30 --arch lightning
       --arch softmax)
timeout 150 "${EAGER[@]}" > "$out/eager_auto.log" 2>&1; echo "eager_auto rc $?"; grep "tokens/s" "$out/eager_auto.log"
timeout 150 "${EAGER[@]}" --kernels gemm > "$out/eager_gemm.log" 2>&1; echo "eager_gemm rc $?"
grep "tokens/s" "$out/eager_gemm.log"
