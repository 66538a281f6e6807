#!/usr/bin/env bash
# The sm8x path (issue 7) on any 8.0+ GPU, e.g. an H100, where the driver JIT-compiles its
# compute_80 PTX: the *_sm8x kernel tests (built as PTX only) and the GPU-marked pytest suite with
# SALE_OPS_FORCE_SM8X=1 (`pytest --sm8x`). Builds nothing: needs src/sale_ops/_C.so and the test
# binaries (directory $SALE_TEST_BIN, default build-dev/cpp/tests) carried from the dev machine.
# Usage: bash benchmarks/gpu_check_sm8x.sh [ctest|pytest|all] [pytest paths/args, default: tests]
# Logs under $OUT (device tool) or ./gpu-logs; exit status 0 only if every part passed.
set -uo pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
BIN=${SALE_TEST_BIN:-build-dev/cpp/tests}
PART=${1:-all}; [ $# -gt 0 ] && shift
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
{
  date -u; nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
  SALE_OPS_FORCE_SM8X=1 python3 -c "import torch, sale_ops; print('torch', torch.__version__, 'lib', sale_ops._library.library_path()); print(sale_ops.backend_summary('cuda'))"
} 2>&1 | tee "$OUT/env_sm8x.txt"
if [ "$PART" = ctest ] || [ "$PART" = all ]; then
  for t in test_quantize_sm8x test_block_mask_sm8x test_block_sparse_attention_sm8x; do
    start=$SECONDS
    "$BIN/$t" > "$OUT/$t.txt" 2>&1
    rc=$?
    echo "$t: exit $rc ($((SECONDS - start)) s; 0 pass, 77 skipped, else fail); $(tail -n 1 "$OUT/$t.txt")" | tee -a "$OUT/ctest_sm8x.txt"
    [ $rc -eq 0 ] || status=1
  done
fi
if [ "$PART" = pytest ] || [ "$PART" = all ]; then
  [ $# -gt 0 ] || set -- tests
  python3 -m pytest -q -p no:cacheprovider --sm8x -m gpu "$@" 2>&1 | tee "$OUT/pytest_sm8x.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
fi
exit $status
