// SPEC §3-4.4 candidate scoring on Ampere/Ada 4-bit tensor cores (mma.sync m16n8k64 .s4), torch-free.
//
// Same contract as candidate_kernel in block_mask.cuh (thresholds from row_threshold_kernel, the
// same bias-in-the-accumulator trick and per-element test), with the codes multiplied as packed
// 4-bit values: half the bytes per key tile and half the MMA instructions of the 8-bit scorer.
//   1. pack_codes_kernel packs the int8 key codes of sale.quantize two per byte into a scratch
//      buffer (code 2j in the low nibble of byte j), once per call;
//   2. candidate_kernel_s4 streams packed key tiles through shared memory (cp.async, three
//      stages) and packs the query codes into its A fragments while loading them.
// Which of the two codes of a byte comes first in the MMA's k order does not matter: A and B are
// packed the same way, so the dot product sums the same products.
//
// Fragment ownership of m16n8k64 .s4 (PTX ISA), g = lane / 4, t = lane % 4: a[0] holds row g, codes
// 8t .. 8t + 7 of the k64 step, a[1] row g + 8, a[2] / a[3] the same rows at codes 32 + 8t ..;
// b[0] holds key g, codes 8t .. 8t + 7, b[1] codes 32 + 8t ..; the accumulators are those of
// m16n8k32 (warp_mma.cuh). In packed bytes a k64 step is 32 bytes and a register's 8 codes are
// bytes 4t .. 4t + 3 of a 16-byte half: the byte layout of the s8 k32 fragments, so ldmatrix
// serves B as in the 8-bit scorer.
//
// Only sm_80 features: the kernels run on sm_80/86/89 and, through PTX JIT, on later GPUs (sm_90
// has no 4-bit tensor cores: ptxas emulates the s4 MMA there, correct but slow).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "sale/block_mask.cuh"

namespace sale {

namespace s4 {

// D(16x8, s32) += A(16x64, s4, row) * B(64x8, s4, col), saturating like the 8-bit scorer.
__device__ __forceinline__ void mma_16x8x64(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.satfinite.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D = A * B + C with C given per column pair (c0, c1), the same for rows g and g + 8 (the bias).
__device__ __forceinline__ void mma_16x8x64_from(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 int32_t c0, int32_t c1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.satfinite.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%10,%11};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c0), "r"(c1));
}

// Four int8 codes (bytes of w, each in [-8, 7]) as four nibbles in the low 16 bits, byte 0 lowest.
__host__ __device__ __forceinline__ uint32_t pack_nibbles(uint32_t w) {
  w &= 0x0F0F0F0Fu;                      // nibble e at bits 8e
  w = (w | (w >> 4)) & 0x00FF00FFu;      // bytes 0 and 2 hold nibble pairs (0, 1) and (2, 3)
  return (w | (w >> 8)) & 0x0000FFFFu;
}

// Eight int8 codes -> one s4 register (code e at bits 4e).
__device__ __forceinline__ uint32_t pack8(uint2 codes) {
  return pack_nibbles(codes.x) | (pack_nibbles(codes.y) << 16);
}

constexpr int kPackThreads = 256;

// codes: `chunks` runs of 16 int8 codes (16-byte aligned) -> packed: 8 bytes each.
__global__ void __launch_bounds__(kPackThreads) pack_codes_kernel(const int8_t* __restrict__ codes,
                                                                 uint2* __restrict__ packed, int64_t chunks) {
  for (int64_t i = int64_t(blockIdx.x) * kPackThreads + threadIdx.x; i < chunks;
       i += int64_t(gridDim.x) * kPackThreads) {
    const int4 c = reinterpret_cast<const int4*>(codes)[i];
    packed[i] = make_uint2(pack8(make_uint2(uint32_t(c.x), uint32_t(c.y))), pack8(make_uint2(uint32_t(c.z), uint32_t(c.w))));
  }
}

}  // namespace s4

// Bytes of the packed key codes launch_block_mask_s4 needs as scratch.
inline size_t block_mask_s4_scratch_bytes(int64_t batch, int64_t kv_heads, int64_t nk, int64_t head_dim) {
  return size_t(batch * kv_heads * nk * head_dim / 2);
}

// One CTA scores query block m of HEADS query heads that share a kv head; each warp owns 32 rows
// (two m16 tiles) of one head; a step scores one candidate block (BK keys). k_packed: the key
// codes packed two per byte, [B, Hkv, Nk, D / 2].
template <int D, int BK, int HEADS>
__global__ void __launch_bounds__(64 * HEADS, 8 / HEADS)
    candidate_kernel_s4(const BlockMaskParams p, const uint8_t* __restrict__ k_packed) {
  constexpr int kThreadsC = 64 * HEADS;
  constexpr int kTiles = BK / 8;         // n8 tiles per step
  constexpr int kRowBytes = D / 2;       // packed bytes per key
  constexpr int kChunks = kRowBytes / 16;  // 16-byte ldmatrix rows per key: 2 or 4
  constexpr int kTilesPerLd = 4 / kChunks;  // n8 tiles one ldmatrix.x4 covers: 2 or 1
  constexpr int kPad = 16;               // bytes: row strides of 48 / 80 bytes keep ldmatrix conflict-free
  constexpr int kCopies = BK * kRowBytes / 16;
  constexpr int kStages = 3;             // as in candidate_kernel: one barrier per step
  static_assert(kTiles % kTilesPerLd == 0, "whole ldmatrix.x4 per step");
  __shared__ __align__(16) uint8_t ks[kStages][BK][kRowBytes + kPad];
  __shared__ __align__(16) float sbias[kStages][HEADS][BK];

  const CandidateCta cta = candidate_cta<HEADS, false>(p);  // the sm8x path has no varlen entry
  const int m = cta.m, b = cta.b, hk = cta.hk, h0 = cta.h0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int h = h0 + warp / 2;
  const int64_t bh = int64_t(b) * p.q_heads + h;
  const int64_t bhk = int64_t(b) * p.kv_heads + hk;
  init_mask_rows<HEADS>(p, cta);
  uint32_t* words = mask_words(p, cta, h);
  // Candidates are blocks 1 .. first_window - 1: every existing row sees all of their keys.
  const int n_end = cta.first_window;
  if (n_end <= 1) return;

  const uint8_t* kc = k_packed + bhk * p.nk * kRowBytes;
  auto load_step = [&](int key0, int buf) {
#pragma unroll
    for (int c = threadIdx.x; c < kCopies; c += kThreadsC) {
      const int key = c / kChunks, col = (c % kChunks) * 16;
      cp_async_16(&ks[buf][key][col], kc + int64_t(key0 + key) * kRowBytes + col, 16);
    }
    for (int c = threadIdx.x; c < HEADS * BK; c += kThreadsC) {
      cp_async_4(&sbias[buf][c / BK][c % BK],
                 p.qk_bias + (int64_t(b) * p.q_heads + h0 + c / BK) * p.nk + key0 + c % BK, 4);
    }
    cp_async_commit();
  };
  load_step(BK, 0);
  if (2 < n_end) load_step(2 * BK, 1);

  // A fragments of the warp's two m16 tiles, packed from the int8 query codes on the way in.
  int rows[2][2];
  uint32_t a[2][D / 64][4];
  const int8_t* qc = p.q_codes + bh * p.nq * D;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    rows[mt][0] = m * kBq + (warp % 2) * 32 + mt * 16 + g;
    rows[mt][1] = rows[mt][0] + 8;
#pragma unroll
    for (int kk = 0; kk < D / 64; ++kk)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          a[mt][kk][half * 2 + r] =
              rows[mt][r] < p.nq
                  ? s4::pack8(*reinterpret_cast<const uint2*>(qc + int64_t(rows[mt][r]) * D + kk * 64 + half * 32 + 8 * t))
                  : 0u;
  }
  float sq[2], thr[2][2];
  load_tile_rows(p, bh * p.nq, p.nq, rows, sq, thr);
  const float* kscale = p.k_scale + bhk * p.nk + 2 * t;
  KeptBits kept;

  for (int n = 1, step = 0; n < n_end; ++n, ++step) {
    const int buf = step % kStages;
    if (n + 1 < n_end) cp_async_wait<1>();
    else cp_async_wait<0>();
    __syncthreads();  // stage s is visible to all; every warp is done with stage s - 1
    if (n + 2 < n_end) load_step((n + 2) * BK, (step + 2) % kStages);

    // One d = sq * sk per (m16 tile, block) (SPEC §2 groups follow the accumulator ownership);
    // accumulators start at the biased b~ (block_mask.cuh, biased_bias).
    float d[2], rd[2];
    tile_block_scales(sq, kscale[n * BK], d, rd);
    const float* bj = &sbias[buf][warp / 2][2 * t];  // column (nt, c) at bj[nt * 8 + c]
    int32_t acc[2][kTiles][4];
#pragma unroll
    for (int nl = 0; nl < kTiles / kTilesPerLd; ++nl) {
      // Matrix i of the x4: key tile nl * kTilesPerLd + i / kChunks, 16-byte chunk i % kChunks.
      uint32_t bf[4];
      const int i = lane >> 3;
      ldmatrix_x4(bf, &ks[buf][(nl * kTilesPerLd + i / kChunks) * 8 + (lane & 7)][(i % kChunks) * 16]);
#pragma unroll
      for (int o = 0; o < kTilesPerLd; ++o) {
        const int nt = nl * kTilesPerLd + o;
        const float2 bias = *reinterpret_cast<const float2*>(bj + nt * 8);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
          for (int kk = 0; kk < D / 64; ++kk) {
            const uint32_t bk2[2] = {bf[o * kChunks + 2 * kk], bf[o * kChunks + 2 * kk + 1]};
            if (kk == 0) {
              s4::mma_16x8x64_from(acc[mt][nt], a[mt][0], bk2, biased_bias(bias.x, rd[mt]),
                                   biased_bias(bias.y, rd[mt]));
            } else {
              s4::mma_16x8x64(acc[mt][nt], a[mt][kk], bk2);
            }
          }
        }
      }
    }
    // The decision, exactly as candidate_kernel makes it.
    kept.add(decide_block_mma(acc, bj, d, rd, thr), n - 1, 1, n_end, words, lane);
  }
}

// SPEC §4.4 alone with the 4-bit scorer, on the row thresholds already in p.row_threshold: packs
// the key codes into k_packed, then scores.
template <int D, int BK>
inline cudaError_t launch_candidates_s4(const BlockMaskParams& p, uint8_t* k_packed, cudaStream_t stream) {
  // The packed keys first (same stream: the scorer sees them).
  const int64_t chunks = int64_t(p.batch) * p.kv_heads * p.nk * (D / 16);
  if (chunks > 0) {
    const int64_t ctas = (chunks + s4::kPackThreads - 1) / s4::kPackThreads;
    s4::pack_codes_kernel<<<unsigned(ctas < 8192 ? ctas : 8192), s4::kPackThreads, 0, stream>>>(
        p.k_codes, reinterpret_cast<uint2*>(k_packed), chunks);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int heads = scorer_heads_per_cta(p.q_heads, p.kv_heads);
  const dim3 grid(p.nQ, p.q_heads / heads, p.batch);
  if (heads == 4) candidate_kernel_s4<D, BK, 4><<<grid, 256, 0, stream>>>(p, k_packed);
  else if (heads == 2) candidate_kernel_s4<D, BK, 2><<<grid, 128, 0, stream>>>(p, k_packed);
  else candidate_kernel_s4<D, BK, 1><<<grid, 64, 0, stream>>>(p, k_packed);
  return cudaGetLastError();
}

template <typename T, int D, int BK>
inline cudaError_t launch_block_mask_s4_impl(const BlockMaskParams& p, uint8_t* k_packed, cudaStream_t stream) {
  const cudaError_t err = launch_row_thresholds<T, D>(p, stream);
  return err != cudaSuccess ? err : launch_candidates_s4<D, BK>(p, k_packed, stream);
}

// SPEC §4 selection with the 4-bit scorer: the bit-packed mask of p.mask_bits (p.use_wgmma is
// ignored). k_packed: block_mask_s4_scratch_bytes of device memory, 16-byte aligned; p.k_codes
// must be 16-byte aligned and p.q_codes 8-byte aligned (contiguous tensors from the caching
// allocator are). Dtype, head dim and key block were validated by the caller.
inline cudaError_t launch_block_mask_s4(const BlockMaskParams& p, uint8_t* k_packed, bool is_bf16, int head_dim,
                                        cudaStream_t stream) {
  return dispatch_dtype_dim_block(is_bf16, head_dim, p.bk, [&](auto type, auto dim, auto bk) {
    return launch_block_mask_s4_impl<typename decltype(type)::type, decltype(dim)::value, decltype(bk)::value>(
        p, k_packed, stream);
  });
}

// The same selection with the 8-bit mma.sync scorer (candidate_kernel) of block_mask.cuh, for
// GPUs without wgmma: launch_block_mask would also refer to the wgmma scorer, which is built for
// sm_90a only. Decides identically to launch_block_mask_s4.
inline cudaError_t launch_block_mask_s8(const BlockMaskParams& p, bool is_bf16, int head_dim, cudaStream_t stream) {
  return dispatch_dtype_dim_block(is_bf16, head_dim, p.bk, [&](auto type, auto dim, auto bk) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value, kBk = decltype(bk)::value;
    const cudaError_t err = launch_row_thresholds<T, kD>(p, stream);
    return err != cudaSuccess ? err : launch_candidates_mma<kD, kBk, false>(p, stream);
  });
}

}  // namespace sale
