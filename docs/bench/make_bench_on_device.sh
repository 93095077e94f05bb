#!/usr/bin/env bash
# Runs chosen lines of `make bench`'s recipe, exactly as the Makefile prints them, on the lent GPU machine, where
# `make setup` cannot reach a package index and one call may not run past 10 minutes (the whole recipe takes longer).
# Usage, on the device (after .carry/install.sh and PYTHONPATH=/tmp/site:$PWD):
#   bash docs/bench/make_bench_on_device.sh 3 4 9     # the recipe's 3rd, 4th and 9th lines
# Each line's output goes to $OUT/make_bench_N.log with its wall time and exit status; the CSVs and PNGs it
# wrote under docs/bench/ are copied to $OUT/docs_bench/ at the end.
set -uo pipefail
out=${OUT:-/tmp/out}; mkdir -p "$out/docs_bench" /tmp/slab-bin
printf '#!/usr/bin/env bash\nexec python -m sweep.cli "$@"\n' > /tmp/slab-bin/slab; chmod +x /tmp/slab-bin/slab
# -o .venv/.stamp: the package is already importable from the working tree; BIN: a `slab` that runs it.
mapfile -t lines < <(make -s -n -o setup -o .venv/.stamp bench BIN=/tmp/slab-bin)
for n in "$@"; do  # every line number checked before anything runs
  [[ $n =~ ^[1-9][0-9]*$ && $n -le ${#lines[@]} ]] || { echo "make_bench_on_device.sh: no line $n; the recipe has ${#lines[@]} (1-${#lines[@]})" >&2; exit 2; }
done
echo "recipe: ${#lines[@]} lines" | tee "$out/make_bench_recipe.txt"
printf '%s\n' "${lines[@]}" >> "$out/make_bench_recipe.txt"
touch /tmp/make_bench_start
for n in "$@"; do
  cmd=${lines[$((n - 1))]}
  start=$(date +%s.%N)
  bash -c "$cmd" > "$out/make_bench_$n.log" 2>&1; rc=$?
  wall=$(python -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
  echo "line $n rc $rc wall_s $wall: $cmd" | tee -a "$out/make_bench_summary.txt"
done
find docs/bench -maxdepth 1 -newer /tmp/make_bench_start -type f -exec cp {} "$out/docs_bench/" \;
