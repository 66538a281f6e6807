// SPEC §3-4.4 candidate scoring on Hopper warpgroup MMA (wgmma, sm_90a), torch-free.
//
// Same contract as candidate_kernel in block_mask.cuh (thresholds come from
// row_threshold_kernel), organised as a warp-specialised pipeline:
//   - one thread of a producer warpgroup streams key tiles (kStep keys of int8 codes, their key
//     scales and the qk_bias of every head) into a ring of kStages shared-memory stages with TMA
//     (the tensor maps are built at launch), each stage guarded by a "full" (transaction count)
//     and an "empty" mbarrier; the warpgroup gives most of its registers to the consumers
//     (setmaxnreg). TMA writes through the async proxy, so wgmma may read a full stage without a
//     proxy fence, and one thread issues a stage in a handful of instructions;
//   - one consumer warpgroup per query head of the GQA group multiplies its 64 query codes
//     (in shared memory, loaded once) by the stage's keys with wgmma.m64nNk32.s8 (SS), the
//     accumulators starting at the bias minus the row threshold in code units (row_cut), then
//     reduces each candidate block to one integer max and compares it with zero.
// The warpgroups take turns at issuing their products (IssueTurn) and otherwise wait only on
// the stage barriers, so one warpgroup's epilogue overlaps the others' tensor-core work.
//
// The accumulator of wgmma m64nN gives warp w rows 16w + g and 16w + g + 8 and columns
// 8i + 2t, 8i + 2t + 1 (g = lane / 4, t = lane % 4): the ownership SPEC §2's scale groups follow,
// so one (query scale, key scale) pair serves every element a thread holds in a key block.
#pragma once

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/cuda_host_adapter.hpp>
#include <cutlass/arch/reg_reconfig.h>

#include <type_traits>

#include "sale/block_mask.cuh"
#include "sale/codes.cuh"

namespace sale {

namespace ws {

template <int D>
using CodeSmemAtom = std::conditional_t<D == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;

constexpr int kStep = 128;   // keys per pipeline stage (m64n128k32 wgmma)
constexpr int kStages = 4;   // ring depth
constexpr int kProducerThreads = 128;
// setmaxnreg budgets with 4 consumer warpgroups: registers only move inside the CTA's launch
// allocation (640 threads x 96), so the producer must give up what the consumers take.
constexpr int kProducerRegs = 32;
constexpr int kConsumerRegs = 112;
static_assert(kProducerThreads * kProducerRegs + 4 * 128 * kConsumerRegs <= (4 * 128 + kProducerThreads) * 96,
              "setmaxnreg budgets exceed the launch allocation (the consumers would wait forever)");

// TMA needs a box of a 1D map to start on 16 bytes: the per-row buffers (row stride Nk floats)
// are copied from the 4-float boundary at or below the stage's first key, 4 floats more, and read
// from `first` = the stage's first key's place in the box (the same for every stage of a CTA).
// TMA also wants 128-byte aligned destinations: rows of kRowStride floats.
constexpr int kRowBox = kStep + 4;
constexpr int kRowStride = kStep + 32;

template <int D, int HEADS>
struct Smem {
  alignas(1024) int8_t q[HEADS][kBq * D];        // query codes of each head, swizzled
  alignas(1024) int8_t k[kStages][kStep * D];    // key codes, swizzled
  alignas(128) float bias[kStages][HEADS][kRowStride];  // qk_bias of the stage's keys, per head
  alignas(128) float kscale[kStages][kRowStride];       // key scales of the stage's keys
  uint64_t full[kStages], empty[kStages];        // mbarriers
};

// TMA descriptors of the key side: codes as a 2D [rows, D] byte tensor (swizzled like the wgmma
// operand), scales and biases as 1D float tensors over all their rows, since a per-head row
// stride of Nk floats need not be a multiple of 16 bytes. A 1D map starts at the 16-byte
// boundary at or below its pointer; *_shift (elements) moves the coordinates onto it.
struct KeyMaps {
  CUtensorMap k_codes, k_scale, qk_bias;
  int k_scale_shift, qk_bias_shift;
};

// A token passed round the consumer warpgroups on named barriers 1 .. HEADS: warpgroup w waits on
// barrier 1 + w (its own 128 threads plus the previous warpgroup's 128 arrivals) and passes to
// the next one's. Named barrier 0 is __syncthreads'. One warpgroup: no turns.
template <int HEADS>
struct IssueTurn {
  int wg;
  __device__ __forceinline__ void wait() const {
    if constexpr (HEADS > 1) asm volatile("bar.sync %0, 256;\n" ::"r"(1 + wg) : "memory");
  }
  __device__ __forceinline__ void pass() const {
    if constexpr (HEADS > 1) asm volatile("bar.arrive %0, 256;\n" ::"r"(1 + (wg + 1) % HEADS) : "memory");
  }
};

// The inputs of the codes of 16 consecutive columns [col, col + 16) of row `qrow` of head h of
// sequence b (whose scale sits at q_scale[q_row]): loaded for several pieces before any is
// converted, so their memory latencies overlap (the stores to shared memory in between would
// otherwise keep the compiler from hoisting the next piece's loads).
struct QueryPiece {
  uint4 x[2];     // 16 values of q, fp16 or bf16
  float4 mu[4];   // their columns' query means
  float scale;    // the row's group scale
};

template <int D>
__device__ __forceinline__ QueryPiece load_query_piece(const BlockMaskParams& p, const SeqSpan& s, int b, int h,
                                                       int qrow, int64_t q_row, int col) {
  QueryPiece piece;
  const uint16_t* x = static_cast<const uint16_t*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride +
                      (int64_t(s.q0) + qrow) * p.q_row_stride + col;
  const float4* mu = reinterpret_cast<const float4*>(p.q_mean + (int64_t(b) * p.q_heads + h) * D + col);
#pragma unroll
  for (int half = 0; half < 2; ++half) piece.x[half] = __ldg(reinterpret_cast<const uint4*>(x + 8 * half));
#pragma unroll
  for (int i = 0; i < 4; ++i) piece.mu[i] = __ldg(mu + i);
  piece.scale = __ldg(p.q_scale + q_row);
  return piece;
}

// The piece's codes as sale.quantize makes them (code_of on the centred value and the row's group
// scale): bit-identical, so the mask is the same whether or not the codes were stored.
__device__ __forceinline__ uint4 query_piece_codes(const QueryPiece& piece, bool bf16) {
  const float* mu = reinterpret_cast<const float*>(piece.mu);
  uint32_t packed[4] = {0u, 0u, 0u, 0u};
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float f[8];
    if (bf16) unpack8<__nv_bfloat16>(piece.x[half], f);
    else unpack8<__half>(piece.x[half], f);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int c = code_of(f[e], mu[8 * half + e], piece.scale);
      packed[2 * half + e / 4] |= (static_cast<uint32_t>(c) & 0xffu) << (8 * (e % 4));
    }
  }
  return make_uint4(packed[0], packed[1], packed[2], packed[3]);
}

// The accumulators' start values for one stage: the bias minus the row threshold in code units
// (see row_cut), so the tensor cores add the bias and the epilogue is one integer max per element.
// Column pair (nt, c) of row r of the thread's fragment is acc(nt * 4 + 2 r + c); bias[nt * 8 + c]
// is its bias, rd[blk] = 1 / (sq * sk) for its block, thr[r] the row's threshold. ALIGNED: the
// pairs may be read as 8-byte words. (Also the start of cpp/bench's ceiling kernel.)
template <int BK, bool ALIGNED, int N, class Acc>
__device__ __forceinline__ void start_values(Acc& acc, const float* bias, const float (&rd)[N], const float (&thr)[2]) {
#pragma unroll
  for (int blk = 0; blk < N; ++blk) {
    const float cut0 = row_cut(thr[0], rd[blk]), cut1 = row_cut(thr[1], rd[blk]);
#pragma unroll
    for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt) {
      float2 bj;
      if constexpr (ALIGNED) bj = *reinterpret_cast<const float2*>(bias + nt * 8);
      else bj = make_float2(bias[nt * 8], bias[nt * 8 + 1]);
      acc(nt * 4 + 0) = cut_biased_bias(bj.x, rd[blk], cut0);
      acc(nt * 4 + 1) = cut_biased_bias(bj.y, rd[blk], cut0);
      acc(nt * 4 + 2) = cut_biased_bias(bj.x, rd[blk], cut1);
      acc(nt * 4 + 3) = cut_biased_bias(bj.y, rd[blk], cut1);
    }
  }
}

}  // namespace ws

template <int D, int BK, int HEADS, bool VARLEN>
__global__ void __launch_bounds__(128 * HEADS + ws::kProducerThreads, 1)
    candidate_kernel_ws(const BlockMaskParams p, const __grid_constant__ ws::KeyMaps maps) {
  using namespace cute;
  using ws::kStages;
  using ws::kStep;
  using Barrier = cutlass::arch::ClusterBarrier;
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlocks = kStep / BK;  // candidate blocks per stage
  constexpr int kConsumers = 128 * HEADS;
  using KLayout = decltype(tile_to_shape(ws::CodeSmemAtom<D>{}, Shape<Int<kStep>, Int<D>>{}));
  using QLayout = decltype(tile_to_shape(ws::CodeSmemAtom<D>{}, Shape<Int<kBq>, Int<D>>{}));

  extern __shared__ unsigned char smem_raw[];
  // Swizzled tiles need 1024-byte alignment; the launch asks for 1 KiB of slack.
  auto& sm = aligned_smem_1024<ws::Smem<D, HEADS>>(smem_raw);

  const CandidateCta cta = candidate_cta<HEADS, VARLEN>(p);
  const int m = cta.m, b = cta.b, hk = cta.hk, h0 = cta.h0;
  const int64_t k_rows = k_rows_of<VARLEN>(p, cta.s, b, hk, p.kv_heads);
  init_mask_rows<HEADS>(p, cta);
  const int n_end = cta.first_window;  // candidates: blocks 1 .. n_end - 1, all keys exist
  if (n_end <= 1) return;
  const int steps = (n_end - 1 + kBlocks - 1) / kBlocks;

  // Map coordinates of the key-side rows; key0 is a multiple of 4, so each box's first key sits
  // at the same place for every stage.
  const int64_t kscale_at = maps.k_scale_shift + k_rows;
  auto bias_at = [&](int hh) { return maps.qk_bias_shift + k_rows_of<VARLEN>(p, cta.s, b, h0 + hh, p.q_heads); };
  // One thread of the producer warpgroup issues every copy of stage s (TMA, see KeyMaps).
  const bool producer = threadIdx.x == kConsumers;
  auto issue_stage = [&](int s) {
    constexpr uint32_t kStageBytes = kStep * D + (HEADS + 1) * ws::kRowBox * sizeof(float);
    const uint64_t hint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
    const int stage = s % kStages;
    FullBarrier::arrive_and_expect_tx(&sm.full[stage], kStageBytes);
    // Rows past this head's Nk (last stage only) bring the next head's keys, or zeros past the
    // tensor: they only reach blocks >= n_end, which are never looked at.
    const int key0 = BK + s * kStep;  // candidates start at block 1
    SM90_TMA_LOAD_2D::copy(&maps.k_codes, &sm.full[stage], hint, sm.k[stage], 0, int(k_rows + key0));
    SM90_TMA_LOAD_1D::copy(&maps.k_scale, &sm.full[stage], hint, sm.kscale[stage], int(kscale_at + key0) & ~3);
#pragma unroll
    for (int hh = 0; hh < HEADS; ++hh)
      SM90_TMA_LOAD_1D::copy(&maps.qk_bias, &sm.full[stage], hint, sm.bias[stage][hh], int(bias_at(hh) + key0) & ~3);
  };
  // The producer thread sets up the barriers and starts the first stages' copies at once, so
  // they land while every thread (itself included) loads the query codes below.
  const int preissued = min(kStages, steps);
  if (producer) {
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&sm.full[s], 1);  // the producer thread's arrival plus the TMA bytes
      Barrier::init(&sm.empty[s], kConsumers);  // one arrival per consumer thread
    }
    cutlass::arch::fence_barrier_init();
    for (int s = 0; s < preissued; ++s) issue_stage(s);
  }
  // Query codes of every head (rows past Nq are zero) into their swizzled tiles: copied, or made
  // here from q when sale.select did not store them (ws::load_query_piece / query_piece_codes,
  // kBatch pieces' loads in flight at a time).
  constexpr int kThreads = kConsumers + ws::kProducerThreads;
  constexpr int kPieces = HEADS * kBq * D / 16, kPerThread = (kPieces + kThreads - 1) / kThreads;
  auto piece_of = [&](int c, int& hh, int& row, int& col) {
    hh = c / (kBq * D / 16);
    const int rest = c % (kBq * D / 16);
    row = rest / (D / 16), col = (rest % (D / 16)) * 16;
  };
  auto piece_dst = [&](int hh, int row, int col) {
    Tensor sQ = make_tensor(make_smem_ptr(sm.q[hh]), QLayout{});
    return raw_pointer_cast(&sQ(row, col));
  };
  if (p.q_codes != nullptr) {
    for (int c = threadIdx.x; c < kPieces; c += kThreads) {
      int hh, row, col;
      piece_of(c, hh, row, col);
      const int qrow = m * kBq + row;
      const bool in = qrow < cta.s.nq;
      const int64_t q_row = q_rows_of<VARLEN>(p, cta.s, b, h0 + hh) + (in ? qrow : 0);
      cp_async_16(piece_dst(hh, row, col), p.q_codes + q_row * D + col, in ? 16 : 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async wrote, wgmma reads
  } else {
    constexpr int kBatch = 2;
#pragma unroll
    for (int i0 = 0; i0 < kPerThread; i0 += kBatch) {
      ws::QueryPiece pieces[kBatch];
      bool in[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int c = threadIdx.x + (i0 + j) * kThreads;
        int hh, row, col;
        piece_of(c, hh, row, col);
        const int qrow = m * kBq + row;
        in[j] = c < kPieces && i0 + j < kPerThread && qrow < cta.s.nq;
        if (in[j]) pieces[j] = ws::load_query_piece<D>(p, cta.s, b, h0 + hh, qrow,
                                                       q_rows_of<VARLEN>(p, cta.s, b, h0 + hh) + qrow, col);
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        const int c = threadIdx.x + (i0 + j) * kThreads;
        if (c >= kPieces || i0 + j >= kPerThread) continue;
        int hh, row, col;
        piece_of(c, hh, row, col);
        st_shared_16(piece_dst(hh, row, col), in[j] ? ws::query_piece_codes(pieces[j], p.q_bf16) : uint4{});
      }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic-proxy stores, wgmma reads
  }
  __syncthreads();  // also orders init_mask_rows' stores before the consumers' atomics

  if (threadIdx.x >= kConsumers) {
    // ---------------- producer warpgroup ----------------
    if constexpr (HEADS == 4) cutlass::arch::warpgroup_reg_dealloc<ws::kProducerRegs>();
    if (!producer) return;
    for (int s = preissued; s < steps; ++s) {
      Barrier::wait(&sm.empty[s % kStages], ((s / kStages) & 1) ^ 1);
      issue_stage(s);
    }
    // Leave only when every stage was consumed.
    for (int s = max(0, steps - kStages); s < steps; ++s) Barrier::wait(&sm.empty[s % kStages], (s / kStages) & 1);
    return;
  }
  if constexpr (HEADS == 4) cutlass::arch::warpgroup_reg_alloc<ws::kConsumerRegs>();

  // ---------------- consumer warpgroups: one per query head ----------------
  // wg from lane 0 (CUTLASS's canonical index): the compiler then knows it is warp-uniform and keeps
  // the query tile's wgmma descriptors in uniform registers instead of moving them there per stage.
  const int wg = cutlass::canonical_warp_group_idx(), tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int h = h0 + wg;
  const int64_t q_rows = q_rows_of<VARLEN>(p, cta.s, b, h);
  uint32_t* words = mask_words(p, cta, h);
  const int kscale_first = int(kscale_at & 3), bias_first = int(bias_at(wg) & 3);

  auto tiled_mma = make_tiled_mma(SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN_SATURATE{});
  auto thr_mma = tiled_mma.get_slice(tid);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(make_tensor(make_smem_ptr(sm.q[wg]), QLayout{})));
  using Acc = decltype(partition_fragment_C(tiled_mma, Shape<Int<kBq>, Int<kStep>>{}));
  static_assert(decltype(size(Acc{}))::value == kStep / 2, "64 x kStep over 128 threads");
  Acc acc;

  // Rows g and g + 8 of the warp share one query scale (SPEC §2); a missing row never passes.
  const int row0 = m * kBq + warp * 16 + g;
  const float sq = row0 < cta.s.nq ? p.q_scale[q_rows + row0] : 1.f;
  float thr[2], tmax = 0.f;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool in = row0 + 8 * r < cta.s.nq;
    thr[r] = in ? p.row_threshold[q_rows + row0 + 8 * r] : INFINITY;
    if (in && isfinite(thr[r])) tmax = fmaxf(tmax, fabsf(thr[r]));
  }
  const float d_min = folded_d_min(tmax);
  static_assert(32 % kBlocks == 0, "stages tile KeptBits' 32-candidate words");
  KeptBits kept;

  // The warpgroups take turns to issue their stage's wgmmas (a token ring of named barriers, as
  // FlashAttention-3's ping-pong): a stage's product is several wgmmas (one per 32 of D), and
  // when all warpgroups issue at once the tensor cores interleave them, so they all finish
  // together and all reduce together while the tensor cores idle. In turn, they finish one after
  // another and each reduction overlaps the others' products.
  ws::IssueTurn<HEADS> issue_turn{wg};
  if (wg == HEADS - 1) issue_turn.pass();  // warpgroup 0 goes first
  // The loop comes in two copies, for an even and an odd bias_first (uniform per warpgroup): only
  // an even one lets a thread read its column pairs of biases as 8-byte words; choosing once
  // keeps the choice, and the addresses either copy needs, out of the loop.
  auto consume = [&](auto aligned_pairs) {
    // Unrolled over the ring, so each stage's shared-memory addresses are constants.
    for (int s0 = 0; s0 < steps; s0 += kStages) {
      const uint32_t phase = (s0 / kStages) & 1;
#pragma unroll
      for (int stage = 0; stage < kStages; ++stage) {
        const int s = s0 + stage;
        if (s >= steps) break;
        FullBarrier::wait(&sm.full[stage], phase);

        // Accumulators start at the bias minus the row threshold (ws::start_values). Keys past Nk
        // (last stage) give garbage in blocks >= n_end, which are never looked at.
        float d[kBlocks], rd[kBlocks];
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          d[blk] = sq * sm.kscale[stage][kscale_first + blk * BK + 2 * t];
          rd[blk] = bias_reciprocal(d[blk]);
        }
        const float* bias = &sm.bias[stage][wg][bias_first + 2 * t];  // column (nt, c) at bias[nt * 8 + c]
        ws::start_values<BK, decltype(aligned_pairs)::value>(acc, bias, rd, thr);
        auto tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(make_tensor(make_smem_ptr(sm.k[stage]), KLayout{})));
        warpgroup_fence_operand(acc);
        issue_turn.wait();
        warpgroup_arrive();
        gemm(tiled_mma, tCrA, tCrB, acc);
        warpgroup_commit_batch();
        issue_turn.pass();
        warpgroup_wait<0>();
        warpgroup_fence_operand(acc);

        // Per block: the approximate test on one max over both rows; a warp-wide OR of the step's
        // word decides (decide_blocks_cut: hits in bits 0 .. kBlocks - 1, unsure blocks in the next
        // kBlocks bits, one reduction).
        // Blocks that no thread keeps surely and some thread is unsure about are decided again,
        // row by row, by refine_row, and per element only in rows it leaves open.
        int32_t best[kBlocks];
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          int32_t vals[BK / 2];
#pragma unroll
          for (int e = 0; e < BK / 2; ++e) vals[e] = acc(blk * (BK / 2) + e);
          best[blk] = max_tree(vals);
        }
        static_assert(2 * kBlocks <= 32, "hits and unsure bits share one word");
        constexpr uint32_t kAll = (1u << kBlocks) - 1u;
        const uint32_t word = decide_blocks_cut(best, d, d_min);
        uint32_t hits = word & kAll;
        const uint32_t unsure_bits = word >> kBlocks;
        uint32_t votes = __reduce_or_sync(0xffffffffu, word);
        const uint32_t open = (votes >> kBlocks) & ~votes & kAll;  // warp-uniform
        if (open != 0) {
#pragma unroll
          for (int blk = 0; blk < kBlocks; ++blk) {
            if (!(((open & unsure_bits) >> blk) & 1)) continue;
            bool hit = false;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              // Row r's columns of the block: elements nt * 4 + 2r + c.
              const float cut = row_cut(thr[r], rd[blk]);
              int32_t vals[BK / 4];
#pragma unroll
              for (int nt = 0; nt < BK / 8; ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c) vals[nt * 2 + c] = acc((blk * (BK / 8) + nt) * 4 + 2 * r + c);
              const RowVerdict v = refine_row(max_tree(vals), cut, thr[r], d[blk], rd[blk]);
              if (v != RowVerdict::kExact) {
                hit |= v == RowVerdict::kHit;
                continue;
              }
              float exact = -INFINITY;
#pragma unroll
              for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                  exact = fmaxf(exact, exact_logit_units_cut(acc(nt * 4 + 2 * r + c), bias[nt * 8 + c], d[blk], rd[blk], cut));
              hit |= exact * d[blk] > thr[r];
            }
            hits |= uint32_t(hit) << blk;
          }
          votes = __reduce_or_sync(0xffffffffu, hits);
        }
        kept.add(votes & kAll, s * kBlocks, kBlocks, n_end, words, lane);
        Barrier::arrive(&sm.empty[stage]);  // this thread is done with the stage (every thread arrives:
                                            // each read is ordered before its own release)
      }
    }
  };
  if (bias_first % 2 == 0) consume(std::true_type{});
  else consume(std::false_type{});
  if (wg == 0) issue_turn.wait();  // the last warpgroup's last pass: every barrier ends balanced
}

namespace ws {

inline cudaError_t encode_result(CUresult r) { return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue; }

// A 1D float map over `count` elements from ptr, boxes of kRowBox (see KeyMaps for the shift).
inline cudaError_t encode_rows(CUtensorMap* map, int* shift, const float* ptr, int64_t count) {
  const auto addr = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t base = addr & ~uintptr_t(15);
  *shift = int((addr - base) / sizeof(float));
  const cuuint64_t dim[1] = {cuuint64_t(count + *shift)};
  const cuuint64_t stride[1] = {dim[0] * sizeof(float)};  // rank 1: not read
  const cuuint32_t box[1] = {kRowBox}, elem[1] = {1};
  return encode_result(CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 1, reinterpret_cast<void*>(base), dim, stride, box, elem,
      CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
}

// Key codes [rows, D] bytes, boxes of kStep rows, swizzled as CodeSmemAtom<D> (128-byte rows:
// 128B swizzle; 64-byte rows: 64B).
template <int D>
inline cudaError_t encode_codes(CUtensorMap* map, const int8_t* ptr, int64_t rows) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return cudaErrorMisalignedAddress;
  const cuuint64_t dim[2] = {cuuint64_t(D), cuuint64_t(rows)};
  const cuuint64_t stride[1] = {cuuint64_t(D)};
  const cuuint32_t box[2] = {cuuint32_t(D), cuuint32_t(kStep)}, elem[2] = {1, 1};
  return encode_result(CUTLASS_CUDA_DRIVER_WRAPPER_CALL(cuTensorMapEncodeTiled)(
      map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<int8_t*>(ptr), dim, stride, box, elem,
      CU_TENSOR_MAP_INTERLEAVE_NONE, D == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE));
}

}  // namespace ws

// Needs key_rows_fit_tma(p) (launch_block_mask_impl falls back to the mma.sync scorer otherwise).
template <int D, int BK, int HEADS>
cudaError_t launch_candidate_ws(const BlockMaskParams& p, cudaStream_t stream) {
  static_assert(D == 64 || D == 128, "code rows of 64 or 128 bytes");
  ws::KeyMaps maps;
  cudaError_t err = ws::encode_codes<D>(&maps.k_codes, p.k_codes, key_side_rows(p, p.kv_heads));
  if (err == cudaSuccess) err = ws::encode_rows(&maps.k_scale, &maps.k_scale_shift, p.k_scale, key_side_rows(p, p.kv_heads));
  if (err == cudaSuccess) err = ws::encode_rows(&maps.qk_bias, &maps.qk_bias_shift, p.qk_bias, key_side_rows(p, p.q_heads));
  if (err != cudaSuccess) return err;
  const int bytes = int(sizeof(ws::Smem<D, HEADS>)) + 1024;
  auto kernel =
      p.cu_seqlens_q != nullptr ? candidate_kernel_ws<D, BK, HEADS, true> : candidate_kernel_ws<D, BK, HEADS, false>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(p.nQ, p.q_heads / HEADS, p.batch);
  kernel<<<grid, 128 * HEADS + ws::kProducerThreads, bytes, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace sale
