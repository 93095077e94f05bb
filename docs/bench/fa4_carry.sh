#!/usr/bin/env bash
# Builds the FlashAttention 4 packages for the lent GPU machine (Python 3.12, torch 2.11+cu130), which one device
# carry cannot hold (73 MB as xz, against 64 MiB for a call's working tree and carry together): two folders, .fa4a/
# (22 MB, carried with .carry in a first call, which copies it to /tmp/fa4parts) and .fa4b/ (the rest, carried in the
# next call while the machine is still warm; docs/bench/fa4_site.sh joins and unpacks them into /tmp/fa4/site-packages).
# Usage, from the project root:  bash docs/bench/fa4_carry.sh
#   call 1: carry [".carry", ".fa4a"], command
#     bash .carry/install.sh && mkdir -p /tmp/fa4parts && cp .fa4a/part_aa /tmp/fa4parts/
#   call 2, within 30 s of the first's end: carry [".fa4b"], command  bash docs/bench/fa4_verify.sh
set -euo pipefail
for d in .fa4a .fa4b; do grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude; done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --no-deps --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q "${plat[@]}" -d "$tmp/w" flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  "cuda-bindings>=13,<14" cuda-pathfinder apache-tvm-ffi torch-c-dlpack-ext quack-kernels==0.6.5 einops protobuf
mkdir -p "$tmp/site"
for w in "$tmp"/w/*.whl; do (cd "$tmp/site" && unzip -qo "$w"); done
# PYTHONPATH does not run .pth files: fa4_verify.sh puts nvidia_cutlass_dsl/dsl_packages on the path itself.
(cd "$tmp/site" && tar cf - . | xz -T0 -9 > "$tmp/fa4.tar.xz")
rm -rf .fa4a .fa4b && mkdir .fa4a .fa4b
split -b 22000000 "$tmp/fa4.tar.xz" "$tmp/part_"
mv "$tmp/part_aa" .fa4a/ && mv "$tmp"/part_a[b-z] .fa4b/
du -sh .fa4a .fa4b
