#!/usr/bin/env bash
# The SwiGLU MLP and lightning's q, k, v SiLU in quack's GEMM epilogues (kernels/gemm_epilogue.py) on a Hopper GPU:
# the fused ops checked against fp32 math, then the README's training command on its default ("gemm" since 0ba7b50)
# and with `--kernels loss` alternated, for lightning, softmax (on FA4) and the hybrid, and the ops timed alone. The
# second of two device calls, as docs/bench/fa4_verify.sh is: docs/bench/fa4_carry.sh builds the packages
# (quack-kernels is among them) and says the first call, which leaves their first part in /tmp/fa4parts.
# On the device:  bash docs/bench/gemm_epilogue_verify.sh   (carry [".fa4b"]); logs under $OUT, summary.txt.
set -uo pipefail
. docs/bench/fa4_site.sh
export PYTHONPATH=$FA4
export TRAIN_STUDY_OUT=$out  # train_study.py's profiles and traces come back with the logs
DEADLINE=${DEADLINE:-570}  # seconds from the start: a device call ends at 600
# STEPS="check light_gemm_1 ..." runs only those steps, in this script's order (not STEPS'): shorter calls lose less
# when a lent machine is taken back.
STEPS=${STEPS:-all}
# A call brings back at most 8 files from $OUT: at exit (also on SIGTERM) every log, profile and cache goes into one
# archive, logs.tgz, beside summary.txt and gpu.txt.
pack() {
  (cd "$out" && find . -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name gpu.txt ! -name logs.tgz -printf '%P\n' \
     | tar czf /tmp/verify_logs.tgz -T - && find . -mindepth 1 -maxdepth 1 ! -name summary.txt ! -name gpu.txt \
     -exec rm -rf {} + && mv /tmp/verify_logs.tgz logs.tgz)
}
trap pack EXIT
trap 'exit 143' TERM
step() {  # step NAME LIMIT_S COMMAND...: its output in $out/NAME.log; exit code, wall time and key lines in summary.txt
  local name=$1 limit=$2; shift 2; local s=$SECONDS left=$((DEADLINE - SECONDS))
  [ "$STEPS" = all ] || [[ " $STEPS " == *" $name "* ]] || return 0
  [ "$left" -lt 30 ] && { echo "$name skipped: ${left}s left" | tee -a "$out/summary.txt"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name rc $? wall_s $((SECONDS - s))" | tee -a "$out/summary.txt"
  grep -h "tokens/s\|CHECK\|TIME\|TILES\|WINNER\|RESULT\|ENERGY\|Error" "$out/$name.log" | tail -12 | tee -a "$out/summary.txt"
}
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv | tee "$out/gpu.txt"
CMD=(python -m sweep.cli bench train --params 135M --seq-len 2048 --compile-mode reduce-overhead
     --tokens-per-step 131072 --microbatch 64 --steps 30)
# In order of need, should the call end early: the check, lightning's pair, the ops alone, softmax's and the hybrid's
# pairs, a second lightning pair, then each epilogue GEMM against cuBLAS's plain one, default config and autotuned.
step check 100 python docs/bench/gemm_epilogue_study.py check
# Training's own default (no --kernels; "gemm" compiled since 2026-12-07) for the three archs, as one command.
step default 240 "${CMD[@]}" --arch softmax --arch lightning --arch hybrid
step light_gemm_1 150 "${CMD[@]}" --arch lightning --kernels gemm
step light_loss_1 80 "${CMD[@]}" --arch lightning --kernels loss
step time 100 python docs/bench/gemm_epilogue_study.py time
step soft_gemm_1 110 "${CMD[@]}" --arch softmax --kernels gemm
step soft_loss_1 80 "${CMD[@]}" --arch softmax --kernels loss
step hyb_gemm_1 110 "${CMD[@]}" --arch hybrid --kernels gemm
step hyb_loss_1 80 "${CMD[@]}" --arch hybrid --kernels loss
step light_gemm_2 80 "${CMD[@]}" --arch lightning --kernels gemm
step light_loss_2 80 "${CMD[@]}" --arch lightning --kernels loss
step tiles 400 env QUACK_CACHE_DIR="$out/quack_cache" python docs/bench/gemm_epilogue_study.py tiles
step plain 300 python docs/bench/gemm_epilogue_study.py plain
# Eager training (what sweep tasks run; its default is "auto", the Triton norms and SwiGLU gate) against "gemm" eager,
# whose ops run about as fast eagerly as compiled since 0702961: should eager training take the epilogues too?
EAGER=(python -m sweep.cli bench train --params 135M --seq-len 2048 --tokens-per-step 32768 --steps 30)
step eager_auto 150 "${EAGER[@]}" --arch lightning --arch softmax
step eager_gemm 150 "${EAGER[@]}" --arch lightning --arch softmax --kernels gemm
# The block's tail as one op (kernels.gemm_epilogue.residual_norm_mlp, quack's deferred-norm epilogues): checked against
# fp32 math, timed alone against the current "gemm" tail, its GEMMs' tiles, and lightning's training without and with it
# (train_study.py's 20-step run of the README's shape; the option tail sets models.lm.Block.fused_tail), alternated.
step tail_check 150 python docs/bench/gemm_epilogue_study.py tail_check
step tail_time 150 python docs/bench/gemm_epilogue_study.py tail_time
VARIANT=(python docs/bench/train_study.py variant)
pair() {  # pair PREFIX LABEL I ARCH OPTION [LIMIT]: steps PREFIX_base_I then PREFIX_LABEL_I (LIMIT s, default 100),
          # ARCH's run without then with OPTION
  step "${1}_base_$3" 100 "${VARIANT[@]}" base "$4" ro b64
  step "${1}_${2}_$3" "${6:-100}" "${VARIANT[@]}" "$5" "$4" ro b64 "$5"
}
pair light tail 1 lightning tail
pair light tail 2 lightning tail
pair soft tail 1 softmax tail
step tail_prof 120 "${VARIANT[@]}" ptail lightning ro b64 tail prof
step tail_energy 200 python docs/bench/gemm_epilogue_study.py tail_energy
step plain_energy 400 python docs/bench/gemm_epilogue_study.py plain_energy
step tail_tiles 400 env QUACK_CACHE_DIR="$out/quack_cache" python docs/bench/gemm_epilogue_study.py tail_tiles
# The head + loss on quack's scaled-exp linear cross-entropy (kernels.gemm_epilogue.linear_cross_entropy_epilogue)
# against kernels.fused's: checked against fp32 math, timed alone (graph replays, then looped at the cap), and in
# training (train_study.py's option qlce sets models.lm.LM.epilogue_loss), alternated with runs without it.
step lce_check 100 python docs/bench/lce_study.py check
step lce_time 150 python docs/bench/lce_study.py time
pair lq qlce 1 lightning qlce
pair lq qlce 2 lightning qlce
step lq_soft_base 100 "${VARIANT[@]}" base softmax ro b64
step lq_soft_qlce 100 "${VARIANT[@]}" qlce softmax ro b64 qlce
step lq_both 100 "${VARIANT[@]}" both lightning ro b64 qlce tail
step lce_energy 150 python docs/bench/lce_study.py energy
step lce_tiles 150 python docs/bench/lce_study.py tiles
# The same pipeline with each of its three GEMMs on other tiles (lce_study.PIPE_VARIANTS), checked and timed.
step lce_pipetiles 450 python docs/bench/lce_study.py pipetiles
# The loss's logits GEMM on quack's own tile width (256 for V 32,000) against the default of 128 since the thirty-third
# session (up to e9bbcd1 these pairs ran as lt_base_N / lt_128_N: 256 then, against the option lce128).
pair lt 256 1 lightning lce256
pair lt 256 2 lightning lce256
pair lt 256 3 lightning lce256
# Why the next norm's backward splits in two behind the tail (thirty-first session): inductor's mixed-order reductions
# made and refused (RESULT's mix_order) without and with the tail, then the tail with the limit on a kernel's reads
# lifted (moreads) and with the size checks off (monostrict), each in its own inductor cache.
for v in "base" "tail tail" "reads tail moreads" "nonstrict tail monostrict"; do
  set -- $v; name=$1; shift
  step "mo_$name" 120 env TORCHINDUCTOR_CACHE_DIR=/tmp/ind_mo_$name "${VARIANT[@]}" "$name" lightning ro b64 "$@"
done
# The two residual adds of each block in the epilogues of the GEMMs whose outputs they add (quack's gemm_add,
# models.lm.Block.residual_gemm), the default since the thirty-fifth session on the autotuner's tiles pinned in
# kernels.gemm_epilogue.TILES (add_wo, add_w2), against the adds apart (train_study.py's option norg), alternated.
# (Before eb06448, opt-in and autotuned, steps rg_base_N / rg_resgemm_N ran them with train_study.py's option resgemm.)
pair rgp norg 1 lightning norg
pair rgp norg 2 lightning norg
pair rgp norg 3 lightning norg
step rgp_soft_base 100 "${VARIANT[@]}" base softmax ro b64
step rgp_soft_norg 100 "${VARIANT[@]}" norg softmax ro b64 norg
# The SwiGLU MLP keeping its gate's output from the forward for w2's gradient (kernels.gemm_epilogue.MLP_KEEPS_GATE,
# the default since the thirty-seventh session; the backward's gate-gradient GEMM on
# kernels.quack_epilogues.dswiglu_epi, which does not write it again), against the MLP writing it again in the
# backward (quack's gemm_dact, train_study.py's option nokeepgate), alternated; `check` and `time` cover it alone.
pair kg nokeepgate 1 lightning nokeepgate
pair kg nokeepgate 2 lightning nokeepgate
pair kg nokeepgate 3 lightning nokeepgate
step kg_soft_base 100 "${VARIANT[@]}" base softmax ro b64
step kg_soft_nokeepgate 100 "${VARIANT[@]}" nokeepgate softmax ro b64 nokeepgate
step kg_tiles 300 env QUACK_CACHE_DIR="$out/quack_cache" python docs/bench/gemm_epilogue_study.py gate_tiles
# A profile of training's default, its table in $out/prof_p.txt. Its RESULT read about 2% high twice (likely the
# profiler's flush idling the GPU, whose power cap then lets the next steps run faster): not a speed (kernels.md).
step prof 100 "${VARIANT[@]}" p lightning ro b64 prof
# Where the GPU waits in the default's steps: a chrome trace of three steps (after nine) and its idle gaps between
# kernels (train_study.py gaps).
step trace 120 "${VARIANT[@]}" t lightning ro b64 trace
step gaps 60 python docs/bench/train_study.py gaps "$out/trace_t.json"
