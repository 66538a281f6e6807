#!/usr/bin/env bash
# Stall breakdown of one kernel under ncu: bash benchmarks/ncu_stalls.sh REGEX -- python3 SCRIPT ARGS
# (writes the report to stdout; run on the GPU machine with PYTHONPATH=src).
set -euo pipefail
regex=$1; shift 2
reasons="barrier long_scoreboard short_scoreboard mio_throttle math_pipe_throttle wait not_selected selected dispatch_stall lg_throttle no_instruction branch_resolving"
metrics="sm__pipe_tensor_op_imma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active,smsp__issue_active.avg.pct_of_peak_sustained_active"
for r in $reasons; do metrics="$metrics,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
ncu --kernel-name "regex:$regex" --launch-skip 1 --launch-count 1 --metrics "$metrics" "$@"
