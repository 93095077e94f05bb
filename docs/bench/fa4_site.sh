# Sourced by the second device call's scripts (fa4_verify.sh, gemm_epilogue_verify.sh): checks the machine is the warm
# one the first call left (/tmp/site and /tmp/fa4parts/part_aa, see fa4_carry.sh), unpacks the FA4 packages into
# /tmp/fa4/site-packages once, and sets out (the logs' folder) and FA4 (a PYTHONPATH with them) and BASE (one without).
# The folder's name matters: quack fingerprints an epilogue's code down through every function it calls, except those
# under a site-packages folder, and the CUTLASS DSL's, reached from anywhere else, hold values it refuses (a TypeError
# at `import quack.epilogue.library`, seen on an H100 with the packages in /tmp/fa4site).
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -f /tmp/site/.done ] && [ -f /tmp/fa4parts/part_aa ] || { echo "not warm: no /tmp/site or part a" | tee "$out/summary.txt"; exit 3; }
site=/tmp/fa4/site-packages; mkdir -p $site
[ -f $site/.done ] || { cat /tmp/fa4parts/part_aa .fa4b/part_* | tar xJf - -C $site && touch $site/.done; }
git rev-parse HEAD > "$out/sha.txt" 2>&1
# PYTHONPATH runs no .pth file, so the cutlass DSL's own folder goes on the path by hand.
FA4=$site:$site/nvidia_cutlass_dsl/dsl_packages:/tmp/site:$PWD; BASE=/tmp/site:$PWD
