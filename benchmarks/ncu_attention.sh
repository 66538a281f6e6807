#!/usr/bin/env bash
# Throughput and stall profile of the block-sparse attention kernel under ncu (run on the GPU
# machine with PYTHONPATH=src): bash benchmarks/ncu_attention.sh N DENSITY
set -euo pipefail
n=${1:-16384}; density=${2:-1.0}
gmma=$(ncu --query-metrics 2>/dev/null | awk '{print $1}' | grep -E "^sm__pipe_tensor_op_gmma_cycles_active$|^sm__inst_executed_pipe_tensor_op_gmma$" | sed 's/$/.avg.pct_of_peak_sustained_active/' | paste -sd, -)
metrics="${gmma:+$gmma,}sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,gpu__time_duration.sum"
for r in long_scoreboard wait barrier math_pipe_throttle not_selected mio_throttle short_scoreboard; do
  metrics="$metrics,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"
done
ncu --kernel-name "regex:block_sparse_attention" --launch-skip 1 --launch-count 1 --metrics "$metrics" \
  python3 benchmarks/profile_attention.py "$n" "$density"
