#!/usr/bin/env bash
# One device call for sale.select: its kernel test and GPU tests, then the selection's time against
# the two-op path (quantize + block_mask_bits). Needs src/sale_ops/_C.so and the ctest binaries in
# $TESTS (default build/py3-none-linux_x86_64/cpp/tests); logs under $OUT or ./gpu-logs.
# First passed on an H100 on 2026-12-07 (benchmarks/RESULTS.md, session 12).
set -uo pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
TESTS=${TESTS:-build/py3-none-linux_x86_64/cpp/tests}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/env.txt"
for t in test_block_mask test_quantize; do
  echo "== $t"; "$TESTS/$t" 2>&1 | tail -n 3
done 2>&1 | tee "$OUT/ctest.txt"
timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 "$TESTS/test_block_mask" 2>&1 | tail -n 2 | tee -a "$OUT/ctest.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_select_cuda.py tests/test_block_mask_cuda.py tests/test_varlen_cuda.py \
  tests/test_ops.py tests/test_varlen.py 2>&1 | tail -n 4 | tee "$OUT/pytest.txt"
python3 benchmarks/profile_selection.py 32768 131072 2>&1 | grep -v "^| 0.0" | tee "$OUT/profile_selection.txt"
(cd benchmarks && python3 bench_estimate.py --lengths 32768 131072 --no-mma --repeats 3) 2>&1 | tee "$OUT/bench_estimate.txt"
