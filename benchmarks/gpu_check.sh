#!/usr/bin/env bash
# One device call: environment, the GPU-marked tests and the demo, logs under $OUT (device tool)
# or ./gpu-logs. Needs src/sale_ops/_C.so (built on the dev machine and carried).
set -uo pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, sale_ops; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lib', sale_ops._library.library_path())"
} 2>&1 | tee "$OUT/env.txt"
python3 -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee "$OUT/pytest.txt"
python3 -m sale_ops.demo --seq-len 8192 2>&1 | tee "$OUT/demo.txt"
