#!/usr/bin/env bash
# The ctest kernel tests, plain and under compute-sanitizer memcheck and racecheck (GPU machine).
# Usage: bash benchmarks/sanitize_kernels.sh [BUILD_DIR]   (default build/py3-none-linux_x86_64)
set -uo pipefail
dir=${1:-build/py3-none-linux_x86_64}/cpp/tests
for t in test_block_mask test_quantize test_block_sparse_attention; do
  echo "== $t"; "$dir/$t" | tail -n 1
  for tool in memcheck racecheck; do
    echo "== $t under $tool"
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 99 "$dir/$t" 2>&1 | tail -n 2
    echo "exit ${PIPESTATUS[0]}"
  done
done
