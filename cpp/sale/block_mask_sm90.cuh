// SPEC §3-4.4 candidate scoring on Hopper warpgroup MMA (wgmma, sm_90a), torch-free.
//
// Same contract as candidate_kernel in block_mask.cuh (thresholds come from
// row_threshold_kernel), but the 4-bit codes (held in int8) are multiplied with
// wgmma.m64nNk32.s32.s8.s8: query codes in registers (A, loaded once per CTA), key codes in
// 128B/64B-swizzled shared memory (B). One warpgroup per query head of the GQA group scores the
// head's 64-row query block against kStep keys (several candidate blocks) per instruction group.
//
// The accumulator of wgmma m64nN gives warp w rows 16w + g and 16w + g + 8 and columns
// 8i + 2t, 8i + 2t + 1 (g = lane / 4, t = lane % 4): the ownership SPEC §2's scale groups follow,
// so one (query scale, key scale) pair serves every element a thread holds in a key block.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "sale/block_mask.cuh"

namespace sale {

template <int D>
using KCodeSmemAtom = std::conditional_t<D == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                         cute::GMMA::Layout_K_SW64_Atom<int8_t>>;

template <int kStep>
struct WgmmaS8;
template <>
struct WgmmaS8<64> { using Op = cute::SM90::GMMA::MMA_64x64x32_S32S8S8_RS_TN_SATURATE; };  // see approx_bias

template <int D, int BK, int HEADS>
__global__ void __launch_bounds__(128 * HEADS, 1) candidate_kernel_sm90(const BlockMaskParams p) {
  using namespace cute;
  constexpr int kStep = 64;                // keys per wgmma group (m64n64k32)
  constexpr int kBlocks = kStep / BK;      // candidate blocks per step
  constexpr int kThreadsC = 128 * HEADS;
  constexpr int kStages = 3;               // copying s + 1, multiplying s, epilogue of s - 1
  using SmemLayout = decltype(tile_to_shape(KCodeSmemAtom<D>{}, Shape<Int<kStep>, Int<D>>{}));
  __shared__ __align__(1024) int8_t smem[kStages][kStep * D];
  __shared__ float sbias[kStages][HEADS][kStep];  // qk_bias of the step's keys, per head
  __shared__ float sscale[kStages][kStep];         // k_scale of the step's keys

  const CandidateCta cta = candidate_cta<HEADS>(p);
  const int m = cta.m, b = cta.b, hk = cta.hk, h0 = cta.h0, first_window = cta.first_window;
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int h = h0 + wg;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = int64_t(b) * p.q_heads + h;
  const int64_t bhk = int64_t(b) * p.kv_heads + hk;
  init_mask_rows<HEADS>(p, cta);
  bool* mask_row = p.mask + (bh * p.nQ + m) * p.nK;
  const int n_end = first_window;  // candidates: blocks 1 .. first_window - 1
  if (n_end <= 1) return;

  // Stage kStep keys from key0 on; keys past Nk (possible in the last step) are zero-filled.
  const int8_t* kc = p.k_codes + bhk * p.nk * D;
  auto load_step = [&](int key0, int stage) {
    constexpr int kChunks = kStep * D / 16;
    // The swizzle permutes whole 16-byte chunks, so each chunk stays one 16-byte copy.
    Tensor sK = make_tensor(make_smem_ptr(smem[stage]), SmemLayout{});
    for (int c = threadIdx.x; c < kChunks; c += kThreadsC) {
      const int key = c / (D / 16), col = (c % (D / 16)) * 16;
      const bool in = key0 + key < p.nk;
      cp_async_16(raw_pointer_cast(&sK(key, col)), kc + (in ? int64_t(key0 + key) * D + col : 0), in ? 16 : 0);
    }
    // The bias rows start anywhere (Nk may be odd): 4-byte copies; zero past Nk.
    for (int c = threadIdx.x; c < HEADS * kStep; c += kThreadsC) {
      const int hh = c / kStep, key = c % kStep;
      const bool in = key0 + key < p.nk;
      const float* src = p.qk_bias + (int64_t(b) * p.q_heads + h0 + hh) * p.nk + (in ? key0 + key : 0);
      cp_async_4(&sbias[stage][hh][key], src, in ? 4 : 0);
    }
    for (int key = threadIdx.x; key < kStep; key += kThreadsC) {
      const bool in = key0 + key < p.nk;
      cp_async_4(&sscale[stage][key], p.k_scale + bhk * p.nk + (in ? key0 + key : 0), in ? 4 : 0);
    }
    cp_async_commit();
  };

  auto tiled_mma = make_tiled_mma(typename WgmmaS8<kStep>::Op{});
  auto thr_mma = tiled_mma.get_slice(tid);
  // A: the head's 64 query codes (rows past Nq read as zero) straight into registers.
  Tensor gA = make_tensor(make_gmem_ptr(p.q_codes + bh * p.nq * D + int64_t(m) * kBq * D),
                          make_shape(Int<kBq>{}, Int<D>{}), make_stride(Int<D>{}, Int<1>{}));
  Tensor tCgA = thr_mma.partition_A(gA);
  Tensor tCrA = thr_mma.make_fragment_A(tCgA);
  Tensor cA = thr_mma.partition_A(make_identity_tensor(make_shape(Int<kBq>{}, Int<D>{})));
  const int rows_here = min(kBq, p.nq - m * kBq);
  CUTE_UNROLL
  for (int i = 0; i < size(tCrA); ++i) tCrA(i) = get<0>(cA(i)) < rows_here ? tCgA(i) : int8_t(0);

  const int row0 = m * kBq + warp * 16 + g;
  const int rows[2] = {row0, row0 + 8};
  // Rows g and g + 8 of a warp share one query scale (SPEC §2); a missing row never passes.
  const float sq = rows[0] < p.nq ? p.q_scale[bh * p.nq + rows[0]] : 1.f;
  float thr[2];
  for (int r = 0; r < 2; ++r) thr[r] = rows[r] < p.nq ? p.row_threshold[bh * p.nq + rows[r]] : INFINITY;

  // Software pipeline over steps of kStep keys with two accumulators: while the tensor cores
  // multiply step s, the warpgroup runs the epilogue of step s - 1.
  using Acc = decltype(partition_fragment_C(tiled_mma, Shape<Int<kBq>, Int<kStep>>{}));
  static_assert(decltype(size(Acc{}))::value == kStep / 2, "64 x kStep over 128 threads");
  struct StepState {
    float d[kBlocks], rd[kBlocks];
  };
  const int steps = (n_end - 1 + kBlocks - 1) / kBlocks;  // candidates 1 .. n_end - 1

  // Wait for step s's copies, refill the stage freed two steps ago, start step s's wgmma.
  auto issue = [&](int s, Acc& acc, StepState& st) {
    const int stage = s % kStages;
    cp_async_wait<0>();
    // cp.async writes are generic-proxy writes; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();  // also: every warpgroup has finished step s - 2 (its stage is free)
    if (s + 1 < steps) load_step((1 + (s + 1) * kBlocks) * BK, (s + 1) % kStages);
    else cp_async_commit();  // an empty group keeps the wait counts uniform
    // Accumulators start at b~_j = rint(bias_j / d) (approximate; see block_mask.cuh), so the
    // tensor cores add the bias and the epilogue is one integer max per element.
    CUTE_UNROLL
    for (int blk = 0; blk < kBlocks; ++blk) {
      st.d[blk] = sq * sscale[stage][blk * BK + 2 * t];  // 1.0 x sq past Nk: never candidates
      st.d[blk] = st.d[blk] > 0.f ? st.d[blk] : sq;
      st.rd[blk] = __frcp_rn(st.d[blk]);
    }
    CUTE_UNROLL
    for (int nt = 0; nt < kStep / 8; ++nt) {
      const int blk = nt / (BK / 8);
      CUTE_UNROLL
      for (int c = 0; c < 2; ++c) {
        const float x = sbias[stage][wg][nt * 8 + 2 * t + c] * st.rd[blk];
        acc(nt * 4 + c) = acc(nt * 4 + 2 + c) = approx_bias(x);
      }
    }
    Tensor sB = make_tensor(make_smem_ptr(smem[stage]), SmemLayout{});
    Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(tiled_mma, tCrA, tCrB, acc);
    warpgroup_commit_batch();
  };

  // Decide the candidate blocks of step s from its finished accumulators.
  auto finish = [&](int s, Acc& acc, const StepState& st) {
    warpgroup_fence_operand(acc);
    const int stage = s % kStages, n = 1 + s * kBlocks;
    CUTE_UNROLL
    for (int blk = 0; blk < kBlocks; ++blk) {
      int32_t best[2] = {acc(blk * (BK / 8) * 4), acc(blk * (BK / 8) * 4 + 2)};
      CUTE_UNROLL
      for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt) {
        best[0] = max3(best[0], acc(nt * 4), acc(nt * 4 + 1));
        best[1] = max3(best[1], acc(nt * 4 + 2), acc(nt * 4 + 3));
      }
      const bool small = abs(best[0]) < kApproxLimit && abs(best[1]) < kApproxLimit;
      bool hit = false, unsure = !small;
      CUTE_UNROLL
      for (int r = 0; r < 2; ++r) {
        const float v = float(best[r]);
        const bool surely = small && (v - 1.f) * st.d[blk] > thr[r];
        hit |= surely;
        unsure |= !surely && (v + 1.f) * st.d[blk] > thr[r];
      }
      if (__any_sync(0xffffffffu, unsure) && unsure) {
        float exact[2] = {-INFINITY, -INFINITY};
        CUTE_UNROLL
        for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt) {
          CUTE_UNROLL
          for (int c = 0; c < 2; ++c) {
            const float bj = sbias[stage][wg][nt * 8 + 2 * t + c];
            const int32_t approx_b = approx_bias(bj * st.rd[blk]);
            const float bb = rintf(__fdiv_rn(bj, st.d[blk]));
            exact[0] = fmaxf(exact[0], float(acc(nt * 4 + c) - approx_b) + bb);
            exact[1] = fmaxf(exact[1], float(acc(nt * 4 + 2 + c) - approx_b) + bb);
          }
        }
        hit = exact[0] * st.d[blk] > thr[0] || exact[1] * st.d[blk] > thr[1];
      }
      // Any warp of the head may set the flag: the same value, so the race is benign.
      if (__any_sync(0xffffffffu, hit) && lane == 0 && n + blk < n_end) mask_row[n + blk] = true;
    }
  };

  // The loop issues and retires wgmma groups in a fixed pattern (no branch around them, so
  // ptxas keeps them asynchronous); steps past the last one multiply stale shared memory and
  // their results are dropped by finish.
  Acc acc0, acc1;
  StepState st0, st1;
  load_step(BK, 0);
  issue(0, acc0, st0);
  for (int s = 0; s < steps; s += 2) {
    issue(s + 1, acc1, st1);
    warpgroup_wait<1>();
    finish(s, acc0, st0);
    issue(s + 2, acc0, st0);
    warpgroup_wait<1>();
    if (s + 1 < steps) finish(s + 1, acc1, st1);
  }
  warpgroup_wait<0>();
}

}  // namespace sale
