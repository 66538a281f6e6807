// Variable-length (packed) batches, shared by every kernel, torch-free.
//
// With cu_seqlens (int32 [B + 1] on the device, cu[0] = 0), sequence b owns rows
// [cu[b], cu[b + 1]) of a packed [total, H, D] tensor; grids are sized from the longest
// sequence and each CTA looks its sequence up once, at setup. Without them (nullptr) every
// sequence has the batched length and starts at row 0 of its own [B, H, N, D] slice, so the
// batched path is the special case q0 = k0 = 0, nq = Nq, nk = Nk.
#pragma once

#include <cuda_runtime.h>

namespace sale {

// One sequence: its first row in the packed layout (0 when batched) and its lengths.
struct SeqSpan {
  int q0, k0, nq, nk;
};

// Lengths are clamped to [0, max_len] (the grid covers no more; a malformed cu_seqlens then
// cannot send a CTA past the rows it was sized for).
__device__ __forceinline__ SeqSpan seq_span(const int* cu_q, const int* cu_k, int b, int max_nq, int max_nk) {
  SeqSpan s{0, 0, max_nq, max_nk};
  if (cu_q != nullptr) {
    s.q0 = cu_q[b];
    s.nq = min(max(cu_q[b + 1] - s.q0, 0), max_nq);
  }
  if (cu_k != nullptr) {
    s.k0 = cu_k[b];
    s.nk = min(max(cu_k[b + 1] - s.k0, 0), max_nk);
  }
  return s;
}

// First row of (batch b, head h of `heads`) in a per-row buffer (codes, scales, bias, thresholds,
// lse) of `per_head` rows per head: [B, heads, N] batched (per_head = N, row0 = 0), [heads, total]
// packed (per_head = total, row0 = the sequence's first row).
__device__ __forceinline__ long long rows_base(bool packed, int b, int h, int heads, long long per_head, int row0) {
  return ((packed ? 0ll : static_cast<long long>(b) * heads) + h) * per_head + row0;
}

}  // namespace sale
