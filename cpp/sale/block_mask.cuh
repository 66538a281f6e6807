// SPEC §4 block selection on tensor cores, torch-free: two kernels per call.
//
//  1. row_threshold_kernel: per query row, the exact statistics of its dense set (sink block +
//     local window, causally masked) with f16/bf16 mma.sync and fp32 accumulation, turned into
//     the threshold T_i = m_i + ln(tau_h l_i) / scale (SPEC §4.2-4.3).
//  2. candidate_kernel: per (query block, candidate key block) the 4-bit estimate with s8
//     mma.sync (codes held in int8 give the exact integer product), kept iff some row has
//     max_j (E_ij + b_ij) * sq_i * sk_j > T_i (SPEC §3-4.4).
//
// Launch: one CTA of 4 warps per (query block of 64 rows, query head, batch); warp w owns rows
// 16w .. 16w + 15 of the block. bq is fixed at 64.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "sale/warp_mma.cuh"

namespace sale {

struct BlockMaskParams {
  const void* q;  // [B, Hq, Nq, D] f16/bf16, last dim contiguous
  const void* k;  // [B, Hkv, Nk, D] f16/bf16, last dim contiguous
  int64_t q_batch_stride, q_head_stride, q_row_stride;  // in elements
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const int8_t* q_codes;  // [B, Hq, Nq, D] contiguous
  const float* q_scale;   // [B, Hq, Nq]
  const int8_t* k_codes;  // [B, Hkv, Nk, D] contiguous
  const float* k_scale;   // [B, Hkv, Nk]
  const float* qk_bias;   // [B, Hq, Nk]
  const float* k_mean;    // [B, Hkv, D]
  const float* tau;       // [Hq]
  float* row_threshold;   // [B, Hq, Nq] scratch written by kernel 1
  bool* mask;             // [B, Hq, nQ, nK] output
  int batch, q_heads, kv_heads, nq, nk, bk, window;
  int nQ, nK;
  float scale;
};

constexpr int kBq = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// Exclusive causal end of query block m's last row (SPEC §4, e_m).
__device__ __forceinline__ int block_end(const BlockMaskParams& p, int m) {
  return min((m + 1) * kBq, p.nq) + (p.nk - p.nq);
}

// First key block of the local window; the dense set is {0} and [window_first, last causal].
__device__ __forceinline__ int window_first_block(const BlockMaskParams& p, int e) {
  return max(0, e - p.window) / p.bk;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ------------------------------------------------------------------------------------------
// Kernel 1: thresholds from the dense set.
// ------------------------------------------------------------------------------------------

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) row_threshold_kernel(const BlockMaskParams p) {
  constexpr int kKeys = 32;       // keys per smem tile
  constexpr int kPad = 8;         // 16 bytes: rows land on distinct banks for the B loads
  __shared__ __align__(16) T ks[kKeys][D + kPad];

  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.q_heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = m * kBq + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
  const int rows[2] = {row0, row0 + 8};

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const float* kmean = p.k_mean + (int64_t(b) * p.kv_heads + hk) * D;

  // A fragments of the warp's 16 query rows, and this thread's share of q_i . k_mean.
  uint32_t a[D / 16][4];
  float qk_mean[2] = {0.f, 0.f};
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // columns 2t (+1) and 8 + 2t (+1)
      const int col = kk * 16 + half * 8 + 2 * t;
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        uint32_t v = 0;
        if (rows[r] < p.nq) {
          v = *reinterpret_cast<const uint32_t*>(q + rows[r] * p.q_row_stride + col);
          const T* e = reinterpret_cast<const T*>(&v);
          qk_mean[r] += to_float(e[0]) * kmean[col] + to_float(e[1]) * kmean[col + 1];
        }
        a[kk][half * 2 + r] = v;
      }
    }
  }
  qk_mean[0] = quad_sum(qk_mean[0]);
  qk_mean[1] = quad_sum(qk_mean[1]);

  const int e = block_end(p, m);
  const int lo = window_first_block(p, e) * p.bk;
  // Dense keys: [0, bk) when the window does not reach it, then [lo, e).
  const int ranges[2][2] = {{0, lo > 0 ? p.bk : 0}, {lo, e}};

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  const float scale = p.scale;

  for (int ri = 0; ri < 2; ++ri) {
    for (int k0 = ranges[ri][0]; k0 < ranges[ri][1]; k0 += kKeys) {
      // Stage 32 keys (zero past Nk) into shared memory.
      for (int c = threadIdx.x; c < kKeys * D / 8; c += kThreads) {
        const int key = c / (D / 8), col = (c % (D / 8)) * 8;
        const bool in = k0 + key < p.nk;
        cp_async_16(&ks[key][col], k + (in ? (k0 + key) * p.k_row_stride + col : 0), in ? 16 : 0);
      }
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();

      float s[kKeys / 8][4];
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const uint32_t bf[2] = {*reinterpret_cast<const uint32_t*>(&ks[nt * 8 + g][kk * 16 + 2 * t]),
                                  *reinterpret_cast<const uint32_t*>(&ks[nt * 8 + g][kk * 16 + 8 + 2 * t])};
          mma_16x8x16<T>(s[nt], a[kk], bf);
        }
      }
      // Smoothed logits s_ij = q_i.k_j - q_i.k_mean; hide what row i cannot see or does not exist.
      const int end = ranges[ri][1];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float chunk_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int j = k0 + nt * 8 + 2 * t + c;
            const bool visible = rows[r] < p.nq && j < end && j <= rows[r] + (p.nk - p.nq);
            float& v = s[nt][2 * r + c];
            v = visible ? v - qk_mean[r] : -INFINITY;
            chunk_max = fmaxf(chunk_max, v);
          }
        }
        const float new_max = fmaxf(row_max[r], quad_max(chunk_max));
        if (new_max == -INFINITY) continue;  // nothing visible yet
        float sum = row_sum[r] * expf(scale * (row_max[r] - new_max));
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) {
          sum += expf(scale * (s[nt][2 * r] - new_max)) + expf(scale * (s[nt][2 * r + 1] - new_max));
        }
        row_max[r] = new_max;
        row_sum[r] = sum;
      }
      __syncthreads();  // the tile is overwritten next
    }
  }

  const float tau = p.tau[h];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    if (t == 0 && rows[r] < p.nq) {
      p.row_threshold[(int64_t(b) * p.q_heads + h) * p.nq + rows[r]] = row_max[r] + logf(tau * l) / scale;
    }
  }
}

// ------------------------------------------------------------------------------------------
// Kernel 2: candidate blocks against the thresholds.
// ------------------------------------------------------------------------------------------

template <int D, int BK>
__global__ void __launch_bounds__(kThreads) candidate_kernel(const BlockMaskParams p) {
  constexpr int kPad = 16;  // bytes: rows land on distinct banks for the B loads
  constexpr int kChunks = BK * D / 16;  // 16-byte copies per key block
  __shared__ __align__(16) int8_t ks[2][BK][D + kPad];

  // Heaviest query blocks (most candidates) first.
  const int m = p.nQ - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.q_heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = m * kBq + warp * 16 + g;
  const int rows[2] = {row0, row0 + 8};
  const int64_t bh = int64_t(b) * p.q_heads + h;
  const int64_t bhk = int64_t(b) * p.kv_heads + hk;

  const int e = block_end(p, m);
  const int first_window = window_first_block(p, e);
  const int last_causal = (e - 1) / BK;

  // The whole mask row: dense blocks kept, the rest cleared (candidates set below).
  bool* mask_row = p.mask + (bh * p.nQ + m) * p.nK;
  for (int n = threadIdx.x; n < p.nK; n += kThreads) {
    mask_row[n] = n == 0 || (n >= first_window && n <= last_causal);
  }
  // Candidates are 1 .. first_window - 1: wholly before e - W, so every existing row sees them.
  const int n_end = first_window;
  if (n_end <= 1) return;

  const int8_t* kc = p.k_codes + bhk * p.nk * D;
  auto load_tile = [&](int n, int buf) {
    for (int c = threadIdx.x; c < kChunks; c += kThreads) {
      const int key = c / (D / 16), col = (c % (D / 16)) * 16;
      cp_async_16(&ks[buf][key][col], kc + int64_t(n * BK + key) * D + col, 16);
    }
    cp_async_commit();
  };
  load_tile(1, 0);

  uint32_t a[D / 32][4];
  const int8_t* qc = p.q_codes + bh * p.nq * D;
#pragma unroll
  for (int kk = 0; kk < D / 32; ++kk) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        a[kk][half * 2 + r] =
            rows[r] < p.nq ? *reinterpret_cast<const uint32_t*>(qc + int64_t(rows[r]) * D + kk * 32 + half * 16 + 4 * t) : 0u;
      }
    }
  }
  // Rows g and g + 8 share one query scale (SPEC §2); a missing row never passes (+inf).
  const float sq = rows[0] < p.nq ? p.q_scale[bh * p.nq + rows[0]] : 1.f;
  float thr[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) thr[r] = rows[r] < p.nq ? p.row_threshold[bh * p.nq + rows[r]] : INFINITY;
  const float* bias = p.qk_bias + bh * p.nk;
  const float* kscale = p.k_scale + bhk * p.nk;

  for (int n = 1; n < n_end; ++n) {
    const int buf = (n - 1) & 1;
    if (n + 1 < n_end) {
      load_tile(n + 1, buf ^ 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    int32_t acc[BK / 8][4];
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
      acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0;
#pragma unroll
      for (int kk = 0; kk < D / 32; ++kk) {
        const uint32_t bf[2] = {*reinterpret_cast<const uint32_t*>(&ks[buf][nt * 8 + g][kk * 32 + 4 * t]),
                                *reinterpret_cast<const uint32_t*>(&ks[buf][nt * 8 + g][kk * 32 + 16 + 4 * t])};
        mma_s8_16x8x32(acc[nt], a[kk], bf);
      }
    }
    // Every column this thread holds is in key-scale group t of the block (SPEC §2).
    const float d = sq * kscale[n * BK + 2 * t];
    float best[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < BK / 8; ++nt) {
      const float* bj = bias + n * BK + nt * 8 + 2 * t;  // not float2: Nk may be odd
      const float b0 = rintf(__fdiv_rn(bj[0], d)), b1 = rintf(__fdiv_rn(bj[1], d));
      best[0] = fmaxf(best[0], fmaxf(float(acc[nt][0]) + b0, float(acc[nt][1]) + b1));
      best[1] = fmaxf(best[1], fmaxf(float(acc[nt][2]) + b0, float(acc[nt][3]) + b1));
    }
    // d > 0, so max_j((E + b) d) = (max_j (E + b)) d: one multiply per row.
    const bool hit = best[0] * d > thr[0] || best[1] * d > thr[1];
    if (__any_sync(0xffffffffu, hit) && lane == 0) mask_row[n] = true;
    __syncthreads();  // the buffer is refilled next iteration
  }
}

template <typename T, int D, int BK>
inline cudaError_t launch_block_mask_impl(const BlockMaskParams& p, cudaStream_t stream) {
  const dim3 grid(p.nQ, p.q_heads, p.batch);
  row_threshold_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  candidate_kernel<D, BK><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// Dispatch on dtype (is_bf16), head dim (64/128) and key block (32/64); the caller validated them.
inline cudaError_t launch_block_mask(const BlockMaskParams& p, bool is_bf16, int head_dim, cudaStream_t stream) {
#define SALE_BM_CASE(T, D, BK) \
  if (head_dim == D && p.bk == BK) return launch_block_mask_impl<T, D, BK>(p, stream);
  if (is_bf16) {
    SALE_BM_CASE(__nv_bfloat16, 64, 32)
    SALE_BM_CASE(__nv_bfloat16, 64, 64)
    SALE_BM_CASE(__nv_bfloat16, 128, 32)
    SALE_BM_CASE(__nv_bfloat16, 128, 64)
  } else {
    SALE_BM_CASE(__half, 64, 32)
    SALE_BM_CASE(__half, 64, 64)
    SALE_BM_CASE(__half, 128, 32)
    SALE_BM_CASE(__half, 128, 64)
  }
#undef SALE_BM_CASE
  return cudaErrorInvalidValue;
}

}  // namespace sale
