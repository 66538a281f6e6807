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
//   - two consumer warpgroups (one when the CTA takes a single head) share the CTA's query heads;
//     each holds two accumulators and runs its jobs (stage, head) as a two-deep software pipeline:
//     while the tensor cores multiply one job's query codes (in shared memory, loaded once) by the
//     stage's keys (wgmma.m64nNk32.s8, SS, the accumulators starting at the bias in code units),
//     the warpgroup reduces the previous job to one integer max per row and block and compares it
//     with the row threshold. A warpgroup thus never waits for its own products, which a single
//     accumulator per head (four warpgroups, each waiting on its wgmma before its epilogue) did.
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

namespace sale {

namespace ws {

template <int D>
using CodeSmemAtom = std::conditional_t<D == 128, cute::GMMA::Layout_K_SW128_Atom<int8_t>,
                                        cute::GMMA::Layout_K_SW64_Atom<int8_t>>;

constexpr int kStep = 128;   // keys per pipeline stage (m64n128k32 wgmma)
constexpr int kStages = 4;   // ring depth
constexpr int kProducerThreads = 128;
// Consumer warpgroups for a CTA of `heads` query heads, and the heads each one takes.
template <int HEADS>
constexpr int consumer_wgs() { return HEADS == 1 ? 1 : 2; }
template <int HEADS>
constexpr int threads() { return 128 * consumer_wgs<HEADS>() + kProducerThreads; }
// setmaxnreg budgets with two consumer warpgroups: registers only move inside the CTA's launch
// allocation (384 threads x 168), so the producer must give up what the consumers take (two
// 64-register accumulators each). One consumer warpgroup (256 threads) needs no moving.
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(kProducerThreads * kProducerRegs + 2 * 128 * kConsumerRegs <= threads<2>() * 168,
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

}  // namespace ws

template <int D, int BK, int HEADS, bool VARLEN>
__global__ void __launch_bounds__(ws::threads<HEADS>(), 1)
    candidate_kernel_ws(const BlockMaskParams p, const __grid_constant__ ws::KeyMaps maps) {
  using namespace cute;
  using ws::kStages;
  using ws::kStep;
  using Barrier = cutlass::arch::ClusterBarrier;
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlocks = kStep / BK;  // candidate blocks per stage
  constexpr int kWGs = ws::consumer_wgs<HEADS>(), kHeadsPerWG = HEADS / kWGs;
  static_assert(kHeadsPerWG == 1 || kHeadsPerWG == 2, "a warpgroup alternates its two accumulators over its heads");
  constexpr int kConsumers = 128 * kWGs;
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

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&sm.full[s], 1);  // the producer thread's arrival plus the TMA bytes
      Barrier::init(&sm.empty[s], kConsumers);  // one arrival per consumer thread
    }
    cutlass::arch::fence_barrier_init();
  }
  // Query codes of every head (rows past Nq are zero) into their swizzled tiles.
  for (int c = threadIdx.x; c < HEADS * kBq * D / 16; c += blockDim.x) {
    const int hh = c / (kBq * D / 16), rest = c % (kBq * D / 16);
    const int row = rest / (D / 16), col = (rest % (D / 16)) * 16;
    const int qrow = m * kBq + row;
    const bool in = qrow < cta.s.nq;
    Tensor sQ = make_tensor(make_smem_ptr(sm.q[hh]), QLayout{});
    const int8_t* src = p.q_codes + (q_rows_of<VARLEN>(p, cta.s, b, h0 + hh) + (in ? qrow : 0)) * D + col;
    cp_async_16(raw_pointer_cast(&sQ(row, col)), src, in ? 16 : 0);
  }
  cp_async_commit();
  cp_async_wait<0>();
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async wrote, wgmma reads
  __syncthreads();  // also orders init_mask_rows' stores before the consumers' atomics

  // Map coordinates of the key-side rows; key0 is a multiple of 4, so each box's first key sits
  // at the same place for every stage.
  const int64_t kscale_at = maps.k_scale_shift + k_rows;
  auto bias_at = [&](int hh) { return maps.qk_bias_shift + k_rows_of<VARLEN>(p, cta.s, b, h0 + hh, p.q_heads); };

  if (threadIdx.x >= kConsumers) {
    // ---------------- producer warpgroup ----------------
    if constexpr (kWGs == 2) cutlass::arch::warpgroup_reg_dealloc<ws::kProducerRegs>();
    if (threadIdx.x != kConsumers) return;  // one thread issues every copy
    constexpr uint32_t kStageBytes = kStep * D + (HEADS + 1) * ws::kRowBox * sizeof(float);
    const uint64_t hint = static_cast<uint64_t>(TMA::CacheHintSm90::EVICT_NORMAL);
    for (int s = 0; s < steps; ++s) {
      const int stage = s % kStages;
      if (s >= kStages) Barrier::wait(&sm.empty[stage], ((s / kStages) & 1) ^ 1);
      FullBarrier::arrive_and_expect_tx(&sm.full[stage], kStageBytes);
      // Rows past this head's Nk (last stage only) bring the next head's keys, or zeros past the
      // tensor: they only reach blocks >= n_end, which are never looked at.
      const int key0 = BK + s * kStep;  // candidates start at block 1
      SM90_TMA_LOAD_2D::copy(&maps.k_codes, &sm.full[stage], hint, sm.k[stage], 0, int(k_rows + key0));
      SM90_TMA_LOAD_1D::copy(&maps.k_scale, &sm.full[stage], hint, sm.kscale[stage], int(kscale_at + key0) & ~3);
#pragma unroll
      for (int hh = 0; hh < HEADS; ++hh)
        SM90_TMA_LOAD_1D::copy(&maps.qk_bias, &sm.full[stage], hint, sm.bias[stage][hh],
                               int(bias_at(hh) + key0) & ~3);
    }
    // Leave only when every stage was consumed.
    for (int s = max(0, steps - kStages); s < steps; ++s) Barrier::wait(&sm.empty[s % kStages], (s / kStages) & 1);
    return;
  }
  if constexpr (kWGs == 2) cutlass::arch::warpgroup_reg_alloc<ws::kConsumerRegs>();

  // ---------------- consumer warpgroups: heads wg * kHeadsPerWG + hl ----------------
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int kscale_first = int(kscale_at & 3);

  auto tiled_mma = make_tiled_mma(SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN_SATURATE{});
  auto thr_mma = tiled_mma.get_slice(tid);
  using Acc = decltype(partition_fragment_C(tiled_mma, Shape<Int<kBq>, Int<kStep>>{}));
  static_assert(decltype(size(Acc{}))::value == kStep / 2, "64 x kStep over 128 threads");

  // Per head of this warpgroup: rows g and g + 8 of the warp share one query scale (SPEC §2); a
  // missing row never passes.
  struct HeadRows {
    float sq, thr[2];
    uint32_t* words;
    int bias_first;
    KeptBits kept;
  };
  HeadRows heads[kHeadsPerWG];
  const int row0 = m * kBq + warp * 16 + g;
#pragma unroll
  for (int hl = 0; hl < kHeadsPerWG; ++hl) {
    const int hh = wg * kHeadsPerWG + hl;
    const int64_t q_rows = q_rows_of<VARLEN>(p, cta.s, b, h0 + hh);
    heads[hl].sq = row0 < cta.s.nq ? p.q_scale[q_rows + row0] : 1.f;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      heads[hl].thr[r] = row0 + 8 * r < cta.s.nq ? p.row_threshold[q_rows + row0 + 8 * r] : INFINITY;
    heads[hl].words = mask_words(p, cta, h0 + hh);
    heads[hl].bias_first = int(bias_at(hh) & 3);
  }
  static_assert(32 % kBlocks == 0, "stages tile KeptBits' 32-candidate words");

  // One job: the stage of step s times head hl's query codes into an accumulator, with the
  // block scales d = sq * sk and their reciprocals kept for the epilogue.
  struct Job {
    int s;
    float d[kBlocks], rd[kBlocks];
  };
  // Accumulators start at the biased b~ (see biased_bias): the tensor cores add the bias and the
  // epilogue is one integer max per element. Keys past Nk (last stage) give garbage in blocks
  // >= n_end, which are never looked at.
  auto wait_full = [&](int s) { FullBarrier::wait(&sm.full[s % kStages], (s / kStages) & 1); };
  auto prepare = [&](auto hl, Acc& acc, Job& job) {
    const int stage = job.s % kStages;
    const HeadRows& hr = heads[hl];
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      job.d[blk] = hr.sq * sm.kscale[stage][kscale_first + blk * BK + 2 * t];
      job.rd[blk] = bias_reciprocal(job.d[blk]);
    }
    const float* bias = &sm.bias[stage][wg * kHeadsPerWG + hl][hr.bias_first + 2 * t];  // column (nt, c) at bias[nt * 8 + c]
#pragma unroll
    for (int nt = 0; nt < kStep / 8; ++nt) {
      // Two loads, not one 8-byte load: a head's row may start on an odd float, and a loop copy
      // per alignment of two heads makes nvcc outline the loop (local memory, a call).
      const float2 bj = make_float2(bias[nt * 8], bias[nt * 8 + 1]);
      const float r = job.rd[nt / (BK / 8)];
      // Written from temporaries: reading one accumulator register to fill another while the other
      // accumulator's wgmma runs makes ptxas serialise every wgmma.
      const int32_t b0 = biased_bias(bj.x, r), b1 = biased_bias(bj.y, r);
      acc(nt * 4 + 0) = b0;
      acc(nt * 4 + 2) = b0;
      acc(nt * 4 + 1) = b1;
      acc(nt * 4 + 3) = b1;
    }
  };
  // The product of a prepared job, as one wgmma batch (the caller fences and arrives first).
  auto issue_mma = [&](auto hl, Acc& acc, const Job& job) {
    auto tCrA = thr_mma.make_fragment_A(
        thr_mma.partition_A(make_tensor(make_smem_ptr(sm.q[wg * kHeadsPerWG + hl]), QLayout{})));
    auto tCrB = thr_mma.make_fragment_B(
        thr_mma.partition_B(make_tensor(make_smem_ptr(sm.k[job.s % kStages]), KLayout{})));
    gemm(tiled_mma, tCrA, tCrB, acc);
    warpgroup_commit_batch();
  };
  // Per block: the approximate test (branch-free, so it may overlap the other accumulator's
  // wgmma); a warp-wide OR of the step's bits decides, and only blocks some thread is unsure about
  // are decided again exactly, by `finish` once no wgmma is in flight.
  struct Verdict {
    uint32_t hits, unsure;
  };
  auto approx = [&](auto hl, const Acc& acc, const Job& job) {
    const HeadRows& hr = heads[hl];
    uint32_t hits = 0, unsure_bits = 0;
#pragma unroll
    for (int blk = 0; blk < kBlocks; ++blk) {
      int32_t best[2] = {acc(blk * (BK / 8) * 4), acc(blk * (BK / 8) * 4 + 2)};
#pragma unroll
      for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt) {
        best[0] = max3(best[0], acc(nt * 4), acc(nt * 4 + 1));
        best[1] = max3(best[1], acc(nt * 4 + 2), acc(nt * 4 + 3));
      }
      bool hit = false, unsure = false;
      approx_decide(best, job.d[blk], job.rd[blk], hr.thr, hit, unsure);
      hits |= uint32_t(hit) << blk;
      unsure_bits |= uint32_t(unsure) << blk;
    }
    return Verdict{hits, unsure_bits};
  };
  auto finish = [&](auto hl, const Acc& acc, const Job& job, Verdict v) {
    HeadRows& hr = heads[hl];
    if (__reduce_or_sync(0xffffffffu, v.unsure) != 0) {
      const float* bias = &sm.bias[job.s % kStages][wg * kHeadsPerWG + hl][hr.bias_first + 2 * t];
#pragma unroll
      for (int blk = 0; blk < kBlocks; ++blk) {
        if (!((v.unsure >> blk) & 1)) continue;
        float exact[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = blk * (BK / 8); nt < (blk + 1) * (BK / 8); ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            exact[0] = fmaxf(exact[0], exact_logit_units(acc(nt * 4 + c), bias[nt * 8 + c], job.d[blk], job.rd[blk]));
            exact[1] = fmaxf(exact[1], exact_logit_units(acc(nt * 4 + 2 + c), bias[nt * 8 + c], job.d[blk], job.rd[blk]));
          }
        const bool hit = exact[0] * job.d[blk] > hr.thr[0] || exact[1] * job.d[blk] > hr.thr[1];
        v.hits = (v.hits & ~(1u << blk)) | (uint32_t(hit) << blk);
      }
    }
    hr.kept.add(__reduce_or_sync(0xffffffffu, v.hits), job.s * kBlocks, kBlocks, n_end, hr.words, lane);
  };
  // Every consumer thread arrives once its reads of the stage are done (each read is ordered
  // before its own release).
  auto release = [&](const Job& job) { Barrier::arrive(&sm.empty[job.s % kStages]); };

  // Jobs j = 0 .. n_jobs - 1 run step j / kHeadsPerWG for head j % kHeadsPerWG, in accumulator
  // j % 2: with two heads each accumulator keeps its head, with one they take alternate steps.
  // A round prepares jobs j and j + 1, issues both products, reduces job j while j + 1 runs, then
  // finishes both with no wgmma in flight: ptxas serialises every wgmma of the kernel if a branch,
  // a call or an accumulator read sits between a wgmma and its wait. For the same reason both products are
  // issued unconditionally: past the last job, the last job's product is repeated and ignored
  // (its stage is never refilled: the producer has no step left).
  const int n_jobs = steps * kHeadsPerWG;
  using H0 = std::integral_constant<int, 0>;
  using H1 = std::integral_constant<int, kHeadsPerWG - 1>;  // the second accumulator's head
  Acc acc0, acc1;
  Job job0, job1;
  for (int j = 0; j < n_jobs; j += 2) {
    const bool has1 = j + 1 < n_jobs;
    job0.s = j / kHeadsPerWG;  // an even job starts a step
    job1.s = (has1 ? j + 1 : j) / kHeadsPerWG;
    wait_full(job0.s);
    if (kHeadsPerWG == 1) wait_full(job1.s);
    // Both accumulators are filled before either product starts: a register write between the
    // two batches makes ptxas wait for the first.
    prepare(H0{}, acc0, job0);
    prepare(H1{}, acc1, job1);
    warpgroup_fence_operand(acc0);
    warpgroup_fence_operand(acc1);
    warpgroup_arrive();
    issue_mma(H0{}, acc0, job0);
    issue_mma(H1{}, acc1, job1);
    warpgroup_wait<1>();
    warpgroup_fence_operand(acc0);
    const Verdict v0 = approx(H0{}, acc0, job0);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc1);
    finish(H0{}, acc0, job0, v0);
    if constexpr (kHeadsPerWG == 1) release(job0);
    // A repeated last job adds the same bits to the same words again (OR: no change), but must
    // not release its stage twice.
    finish(H1{}, acc1, job1, approx(H1{}, acc1, job1));
    if (has1) release(job1);
  }
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
  kernel<<<grid, ws::threads<HEADS>(), bytes, stream>>>(p, maps);
  return cudaGetLastError();
}

}  // namespace sale
