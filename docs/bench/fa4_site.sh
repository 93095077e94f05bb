# Sourced by the second device call's scripts (fa4_verify.sh, gemm_epilogue_verify.sh): checks the machine is the warm
# one the first call left (/tmp/site and /tmp/fa4parts/part_aa, see fa4_carry.sh), unpacks the FA4 packages into
# /tmp/fa4site once, and sets out (the logs' folder) and FA4 (a PYTHONPATH with them) and BASE (one without).
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -f /tmp/site/.done ] && [ -f /tmp/fa4parts/part_aa ] || { echo "not warm: no /tmp/site or part a" | tee "$out/summary.txt"; exit 3; }
mkdir -p /tmp/fa4site
[ -f /tmp/fa4site/.done ] || { cat /tmp/fa4parts/part_aa .fa4b/part_* | tar xJf - -C /tmp/fa4site && touch /tmp/fa4site/.done; }
git rev-parse HEAD > "$out/sha.txt" 2>&1
# PYTHONPATH runs no .pth file, so the cutlass DSL's own folder goes on the path by hand.
FA4=/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD; BASE=/tmp/site:$PWD
