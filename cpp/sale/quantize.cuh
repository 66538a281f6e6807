// SPEC §2 quantization (4-bit symmetric, smoothed) as CUDA kernels. Torch-free: raw pointers,
// sizes and strides in elements; callers own every buffer.
//
// Three stages (five launches) on one stream, no atomics, no host sync (CUDA-graph capturable):
//   1. mean_partial (q, then k): each CTA sums a chunk of rows of one (batch, head) into a double
//      partial sum per column (fp32 inside a thread over at most 32 rows, double across).
//   2. mean_finalize: fixed-order sum of the chunk partials -> q̄ (scratch) and k̄ (output).
//   3. quantize (q, then k): each warp loads a tile of rows (8 x 16-byte chunks per lane), reduces
//      the group amax with shuffles, writes codes and scales; key tiles also write
//      qk_bias = q̄_h · k̃_j for the g query heads of their kv head.
// The chunking depends on the shapes only, so a given input gives bit-identical output; the mean
// accumulates in double throughout, so it does not depend on the chunking either (to double
// rounding): a sequence gets the same mean alone and inside a (variable-length) batch.
//
// Variable-length batches: see QuantizeParams::cu_seqlens_q and sale/varlen.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sale/codes.cuh"

namespace sale {

enum class QuantizeDtype { kHalf, kBFloat16 };

struct QuantizeParams {
  // Inputs: q [B, Hq, Nq, D], k [B, Hkv, Nk, D], fp16 or bf16, last dim contiguous.
  const void* q = nullptr;
  const void* k = nullptr;
  QuantizeDtype dtype = QuantizeDtype::kBFloat16;
  int64_t B = 0, Hq = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0;
  int64_t q_stride_b = 0, q_stride_h = 0, q_stride_n = 0;  // elements
  int64_t k_stride_b = 0, k_stride_h = 0, k_stride_n = 0;
  int bk = 32;  // key block: 32 or 64
  // Outputs, contiguous. q_codes may be nullptr: the query pass then writes only the scales (the
  // wgmma scorer quantizes its query rows itself from them and the scratch q_mean, sale.select).
  int8_t* q_codes = nullptr;  // [B, Hq, Nq, D]
  float* q_scale = nullptr;   // [B, Hq, Nq]
  int8_t* k_codes = nullptr;  // [B, Hkv, Nk, D]
  float* k_scale = nullptr;   // [B, Hkv, Nk]
  float* qk_bias = nullptr;   // [B, Hq, Nk]
  float* k_mean = nullptr;    // [B, Hkv, D]
  // Scratch, sizes from quantize_workspace().
  double* partial = nullptr;
  float* q_mean = nullptr;
  // Variable-length batch (both or neither): sequence b is rows [cu[b], cu[b + 1]) of q and k
  // (packed [total, H, D]: batch strides 0) and of the per-row outputs, which are then laid out
  // [H, total, ...] (codes [H, total, D], scales [H, total], qk_bias [Hq, total_k]); k_mean stays
  // [B, Hkv, D] and Nq / Nk are the longest sequence's (they size the grids and the scratch).
  const int* cu_seqlens_q = nullptr;
  const int* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
};

namespace quantize_detail {

constexpr int kThreads = 256;  // every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kChunksPerLane = 8;  // 16-byte chunks a lane holds in the quantize pass
constexpr int kMaxSteps = 32;      // rows a mean_partial thread sums in fp32
constexpr int64_t kMinMeanCtas = 2048;

__host__ __device__ constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows summed per mean_partial CTA: the largest power of two of steps (<= kMaxSteps) that still
// gives kMinMeanCtas CTAs, so short sequences with few heads fill the GPU.
inline int64_t mean_rows_per_chunk(const QuantizeParams& p) {
  const int64_t rows_per_step = kThreads / (p.D / 8);
  int64_t steps = kMaxSteps;
  while (steps > 1 && p.B * (p.Hq * cdiv(p.Nq, steps * rows_per_step) +
                             p.Hkv * cdiv(p.Nk, steps * rows_per_step)) < kMinMeanCtas)
    steps /= 2;
  return steps * rows_per_step;
}

// 8 consecutive elements; VEC: one 16-byte load (the address is 16-byte aligned).
template <bool VEC>
__device__ __forceinline__ uint4 load8(const uint16_t* p) {
  if constexpr (VEC) {
    return __ldg(reinterpret_cast<const uint4*>(p));
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = static_cast<uint32_t>(__ldg(p + 2 * i)) | (static_cast<uint32_t>(__ldg(p + 2 * i + 1)) << 16);
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

struct Side {  // one of q / k, for one (batch, head)
  const uint16_t* x;  // the sequence's row 0
  int64_t n, stride_n;
  int64_t start;  // its first row in the packed layout (0 batched)
  int64_t out0;   // its row 0 in the per-row outputs
};

__device__ __forceinline__ Side side(const QuantizeParams& p, bool is_k, int64_t bh) {
  const int64_t H = is_k ? p.Hkv : p.Hq, max_n = is_k ? p.Nk : p.Nq;
  const int64_t b = bh / H, h = bh % H;
  const int* cu = is_k ? p.cu_seqlens_k : p.cu_seqlens_q;
  int64_t start = 0, n = max_n, out0 = bh * max_n;
  if (cu != nullptr) {  // lengths clamped to the grid's (sale/varlen.cuh)
    start = cu[b];
    n = min(max(int64_t(cu[b + 1]) - start, int64_t(0)), max_n);
    out0 = h * (is_k ? p.total_k : p.total_q) + start;
  }
  if (is_k)
    return {static_cast<const uint16_t*>(p.k) + b * p.k_stride_b + h * p.k_stride_h + start * p.k_stride_n, n,
            p.k_stride_n, start, out0};
  return {static_cast<const uint16_t*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + start * p.q_stride_n, n,
          p.q_stride_n, start, out0};
}

// Grid: B*H*chunks CTAs for one side (q or k); partial sums go to partial[offset + (bh*chunks + c)*D].
template <typename T, int D, bool VEC>
__global__ void __launch_bounds__(kThreads)
    mean_partial_kernel(const QuantizeParams p, bool is_k, int64_t rows_per_chunk, int64_t chunks, int64_t offset) {
  constexpr int TPR = D / 8, RPS = kThreads / TPR;
  __shared__ double red[RPS][D];
  const int64_t bh = blockIdx.x / chunks, chunk = blockIdx.x % chunks;
  const Side s = side(p, is_k, bh);
  const int col = threadIdx.x % TPR, r = threadIdx.x / TPR;

  double acc[8] = {};  // double: the sum must not depend on how rows are chunked
  const int64_t first = chunk * rows_per_chunk + r;
  const int64_t last = min(s.n, (chunk + 1) * rows_per_chunk);
#pragma unroll 4
  for (int64_t n = first; n < last; n += RPS) {
    float f[8];
    unpack8<T>(load8<VEC>(s.x + n * s.stride_n + col * 8), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] += f[e];
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) red[r][col * 8 + e] = acc[e];
  __syncthreads();
  if (threadIdx.x < D) {
    double sum = 0;
    for (int i = 0; i < RPS; ++i) sum += red[i][threadIdx.x];
    p.partial[offset + (bh * chunks + chunk) * D + threadIdx.x] = sum;
  }
}

// Grid: B*Hq + B*Hkv CTAs of D threads.
__global__ void mean_finalize_kernel(const QuantizeParams p, int64_t q_chunks, int64_t k_chunks) {
  const int64_t D = p.D, nq_heads = p.B * p.Hq;
  const bool is_k = blockIdx.x >= nq_heads;
  const int64_t bh = is_k ? blockIdx.x - nq_heads : blockIdx.x;
  const int64_t chunks = is_k ? k_chunks : q_chunks;
  const double* src = p.partial + ((is_k ? nq_heads * q_chunks : 0) + bh * chunks) * D + threadIdx.x;
  double sum = 0;
  for (int64_t c = 0; c < chunks; ++c) sum += src[c * D];
  float* dst = is_k ? p.k_mean : p.q_mean;
  const int64_t n = side(p, is_k, bh).n;  // an empty sequence (varlen) gets mean 0
  dst[bh * D + threadIdx.x] = n > 0 ? static_cast<float>(sum / static_cast<double>(n)) : 0.f;
}

// Scale groups are contiguous runs of R "virtual" rows; these map virtual row v to the real row.
// Q: inside each 16-row group, v = 2r + half -> row r + 8 half.
// K: inside each bk block, v = (gi * bk/4) + s -> offset 8 (s / 2) + 2 gi + s % 2.
template <bool IS_K, int BK>
__device__ __forceinline__ int64_t real_row(int64_t v) {
  if (!IS_K) return (v & ~int64_t(15)) + ((v & 15) >> 1) + 8 * (v & 1);
  const int64_t blk = v / BK, w = v % BK, gi = w / (BK / 4), s = w % (BK / 4);
  return blk * BK + 8 * (s >> 1) + 2 * gi + (s & 1);
}

template <typename T, int D, bool IS_K, int BK, bool VEC>
__device__ __forceinline__ void quantize_tile(const QuantizeParams& p, int64_t bh, int64_t tile, int lane) {
  constexpr int TPR = D / 8;                // lanes per row
  constexpr int RPI = 32 / TPR;             // rows per warp-wide load
  constexpr int CPL = kChunksPerLane;
  constexpr int RW = RPI * CPL;             // rows per tile
  constexpr int R = IS_K ? BK / 4 : 2;      // rows per scale group
  constexpr int W = R * TPR < 32 ? R * TPR : 32;  // lanes sharing a group in one load
  constexpr int IG = R * TPR / W;           // loads per group
  constexpr int NG = CPL / IG;              // groups a lane sees
  static_assert(CPL % IG == 0 && RW % R == 0, "tile must hold whole scale groups");

  const Side s = side(p, IS_K, bh);
  const int col = lane % TPR;
  const float* mean_ptr = (IS_K ? p.k_mean : p.q_mean) + bh * D + col * 8;
  float mu[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) mu[e] = __ldg(mean_ptr + e);

  uint4 raw[CPL];
  int row[CPL];  // -1: past the end (does not exist)
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    const int64_t n = real_row<IS_K, BK>(tile * RW + i * RPI + lane / TPR);
    row[i] = n < s.n ? static_cast<int>(n) : -1;
    raw[i] = row[i] >= 0 ? load8<VEC>(s.x + n * s.stride_n + col * 8) : make_uint4(0, 0, 0, 0);
  }

  float scale[NG];
#pragma unroll
  for (int j = 0; j < NG; ++j) scale[j] = 0.f;
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    float f[8];
    unpack8<T>(raw[i], f);
    float m = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) m = fmaxf(m, fabsf(f[e] - mu[e]));
    if (row[i] >= 0) scale[i / IG] = fmaxf(scale[i / IG], m);
  }
#pragma unroll
  for (int j = 0; j < NG; ++j) {
#pragma unroll
    for (int off = W / 2; off > 0; off /= 2) scale[j] = fmaxf(scale[j], __shfl_xor_sync(0xffffffffu, scale[j], off));
    scale[j] = scale[j] == 0.f ? 1.f : __fdiv_rn(scale[j], 7.f);
  }

  const bool write_codes = IS_K || p.q_codes != nullptr;
  int8_t* codes = write_codes ? (IS_K ? p.k_codes : p.q_codes) + s.out0 * D + col * 8 : nullptr;
  float* scales = (IS_K ? p.k_scale : p.q_scale) + s.out0;
#pragma unroll
  for (int i = 0; i < CPL; ++i) {
    if (row[i] < 0) continue;
    if (col == 0) scales[row[i]] = scale[i / IG];
    if (!write_codes) continue;
    float f[8];
    unpack8<T>(raw[i], f);
    uint32_t packed[2] = {0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = code_of(f[e], mu[e], scale[i / IG]);
      packed[e / 4] |= (static_cast<uint32_t>(c) & 0xffu) << (8 * (e % 4));
    }
    *reinterpret_cast<uint2*>(codes + static_cast<int64_t>(row[i]) * D) = make_uint2(packed[0], packed[1]);
  }

  if constexpr (IS_K) {
    // qk_bias[b, h, j] = q̄_h · (k_j − k̄) for the g query heads h of this kv head.
    const int64_t g = p.Hq / p.Hkv, b = bh / p.Hkv, hkv = bh % p.Hkv;
    for (int64_t hh = 0; hh < g; ++hh) {
      const int64_t qh = b * p.Hq + hkv * g + hh;
      const float* qm_ptr = p.q_mean + qh * D + col * 8;
      float qm[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) qm[e] = __ldg(qm_ptr + e);
      float dot[CPL];
#pragma unroll
      for (int i = 0; i < CPL; ++i) {
        float f[8];
        unpack8<T>(raw[i], f);
        dot[i] = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot[i] = fmaf(f[e] - mu[e], qm[e], dot[i]);
      }
#pragma unroll
      for (int off = TPR / 2; off > 0; off /= 2) {
#pragma unroll
        for (int i = 0; i < CPL; ++i) dot[i] += __shfl_xor_sync(0xffffffffu, dot[i], off);
      }
      // [B, Hq, Nk] batched, [Hq, total_k] packed
      float* bias = p.qk_bias + (p.cu_seqlens_k ? (hkv * g + hh) * p.total_k + s.start : qh * p.Nk);
#pragma unroll
      for (int i = 0; i < CPL; ++i)
        if (row[i] >= 0 && col == 0) bias[row[i]] = dot[i];
    }
  }
}

template <int D, bool IS_K, int BK>
__host__ __device__ constexpr int64_t tiles_per_head(int64_t n) {
  constexpr int64_t RW = (32 / (D / 8)) * kChunksPerLane;
  return cdiv(cdiv(n, IS_K ? BK : 16) * (IS_K ? BK : 16), RW);
}

// Grid: B*H*ctas CTAs; warp w of a CTA does one tile.
template <typename T, int D, bool IS_K, int BK, bool VEC>
__global__ void __launch_bounds__(kThreads) quantize_kernel(const QuantizeParams p, int64_t ctas) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  quantize_tile<T, D, IS_K, BK, VEC>(p, blockIdx.x / ctas, (blockIdx.x % ctas) * kWarps + warp, lane);
}

inline bool aligned16(const void* ptr, int64_t B, int64_t H, int64_t N, int64_t sb, int64_t sh, int64_t sn) {
  // 16-byte vector loads need a 16-byte aligned base and strides of whole 8-element chunks
  // (the strides of size-1 dimensions are never used).
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (B == 1 || sb % 8 == 0) && (H == 1 || sh % 8 == 0) &&
         (N == 1 || sn % 8 == 0);
}

inline unsigned grid(int64_t ctas) { return static_cast<unsigned>(ctas); }

template <typename T, int D, int BK>
cudaError_t launch(const QuantizeParams& p, cudaStream_t stream) {
  const int64_t rows = mean_rows_per_chunk(p);
  const int64_t q_chunks = cdiv(p.Nq, rows), k_chunks = cdiv(p.Nk, rows);
  // Packed sequences start at any row: the row stride matters unless there is one row in all.
  const int64_t q_rows = p.cu_seqlens_q ? p.total_q : p.Nq, k_rows = p.cu_seqlens_k ? p.total_k : p.Nk;
  const bool q_vec = aligned16(p.q, p.B, p.Hq, q_rows, p.q_stride_b, p.q_stride_h, p.q_stride_n);
  const bool k_vec = aligned16(p.k, p.B, p.Hkv, k_rows, p.k_stride_b, p.k_stride_h, p.k_stride_n);
  const int64_t q_heads = p.B * p.Hq, k_heads = p.B * p.Hkv;
  if (q_heads + k_heads == 0) return cudaSuccess;
  // Each kernel comes in a 16-byte-load (VEC) and an element-wise variant for unaligned strides.
  if (q_heads > 0) {
    if (q_vec)
      mean_partial_kernel<T, D, true><<<grid(q_heads * q_chunks), kThreads, 0, stream>>>(p, false, rows, q_chunks, 0);
    else
      mean_partial_kernel<T, D, false><<<grid(q_heads * q_chunks), kThreads, 0, stream>>>(p, false, rows, q_chunks, 0);
  }
  if (k_heads > 0) {
    const int64_t off = q_heads * q_chunks * D;
    if (k_vec)
      mean_partial_kernel<T, D, true><<<grid(k_heads * k_chunks), kThreads, 0, stream>>>(p, true, rows, k_chunks, off);
    else
      mean_partial_kernel<T, D, false><<<grid(k_heads * k_chunks), kThreads, 0, stream>>>(p, true, rows, k_chunks, off);
  }
  mean_finalize_kernel<<<grid(q_heads + k_heads), D, 0, stream>>>(p, q_chunks, k_chunks);
  // Q tiles do not depend on bk: one instantiation (BK = 32) serves both.
  const int64_t q_ctas = cdiv(tiles_per_head<D, false, 32>(p.Nq), kWarps);
  const int64_t k_ctas = cdiv(tiles_per_head<D, true, BK>(p.Nk), kWarps);
  if (q_heads > 0) {
    if (q_vec)
      quantize_kernel<T, D, false, 32, true><<<grid(q_heads * q_ctas), kThreads, 0, stream>>>(p, q_ctas);
    else
      quantize_kernel<T, D, false, 32, false><<<grid(q_heads * q_ctas), kThreads, 0, stream>>>(p, q_ctas);
  }
  if (k_heads > 0) {
    if (k_vec)
      quantize_kernel<T, D, true, BK, true><<<grid(k_heads * k_ctas), kThreads, 0, stream>>>(p, k_ctas);
    else
      quantize_kernel<T, D, true, BK, false><<<grid(k_heads * k_ctas), kThreads, 0, stream>>>(p, k_ctas);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const QuantizeParams& p, cudaStream_t stream) {
  if (p.D == 64) return p.bk == 32 ? launch<T, 64, 32>(p, stream) : launch<T, 64, 64>(p, stream);
  return p.bk == 32 ? launch<T, 128, 32>(p, stream) : launch<T, 128, 64>(p, stream);
}

}  // namespace quantize_detail

struct QuantizeWorkspace {
  int64_t partial_doubles;  // QuantizeParams::partial
  int64_t q_mean_floats;    // QuantizeParams::q_mean
};

// Scratch the launch needs; depends on the shapes only.
inline QuantizeWorkspace quantize_workspace(const QuantizeParams& p) {
  using namespace quantize_detail;
  const int64_t rows = mean_rows_per_chunk(p);
  return {p.B * (p.Hq * cdiv(p.Nq, rows) + p.Hkv * cdiv(p.Nk, rows)) * p.D, p.B * p.Hq * p.D};
}

// Returns cudaErrorInvalidValue for unsupported shapes (D not 64/128, bk not 32/64, Hq not a
// multiple of Hkv, a sequence of length 0, more than 2^31 - 1 rows, or only one of the two
// cu_seqlens); else the launch status.
inline cudaError_t launch_quantize(const QuantizeParams& p, cudaStream_t stream) {
  if ((p.D != 64 && p.D != 128) || (p.bk != 32 && p.bk != 64) || p.Hkv < 1 || p.Hq % p.Hkv != 0 || p.Nq < 1 ||
      p.Nk < 1 || p.Nq > INT32_MAX || p.Nk > INT32_MAX || p.B < 0 || p.Hq < 0 ||
      (p.cu_seqlens_q == nullptr) != (p.cu_seqlens_k == nullptr) || p.total_q > INT32_MAX || p.total_k > INT32_MAX)
    return cudaErrorInvalidValue;
  if (p.dtype == QuantizeDtype::kHalf) return quantize_detail::launch_dtype<__half>(p, stream);
  return quantize_detail::launch_dtype<__nv_bfloat16>(p, stream);
}

}  // namespace sale
