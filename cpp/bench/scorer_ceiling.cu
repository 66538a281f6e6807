// How fast can the wgmma scorer's structure go on this GPU? (A benchmark, not a test: it prints a
// table and checks nothing but that the kernels ran.)
//
// candidate_kernel_ws (sale/block_mask_sm90.cuh) runs its candidate tiles at 51-57% of the int8
// tensor peak on an H100, and issue 3 asks for 73%. This program runs the scorer's skeleton alone:
// one producer thread streams kN-key stages (codes plus the per-head bias / key-scale rows) into a
// 4-deep mbarrier ring with bulk copies, and one consumer warpgroup per query head multiplies its
// 64 query codes by each stage, the warpgroups taking turns at issuing. What a consumer does around
// its product is then varied:
//   none   the product only (accumulators start at zero, nothing read back but one value);
//   start  the accumulators start at the folded bias minus the row cut-off (64 FFMA per thread and
//          128-key stage, the scorer's start values);
//   full   start + the scorer's approximate test (one max per block, decide_blocks_cut, a warp
//          vote): the scorer without its exact path, its prologue and its mask stores;
// and so is where the product's operands come from:
//   SS     query codes read from shared memory by every wgmma (the scorer today);
//   RS     query codes held in registers (16 more per thread), so a stage reads only its keys;
//   fp8    e4m3 codes with f32 or f16 accumulators (f16: half the registers, m64n256 possible).
// TOPS = 2 * 64 * kN * D per stage and head, over the whole launch.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "sale/block_mask_sm90.cuh"
#include "tests/test_common.cuh"

namespace sale::bench {

using namespace cute;

constexpr int kStages = 4;
constexpr int kHeads = 4;  // consumer warpgroups: Llama-3.1-8B's GQA group, as the scorer runs it
constexpr int kConsumers = 128 * kHeads;
constexpr int kThreads = kConsumers + 128;  // plus the producer warpgroup

enum class Work { kNone, kStart, kFull };

template <class Atom>
struct AtomInfo {
  using Shape = typename MMA_Traits<Atom>::Shape_MNK;
  static constexpr int kN = decltype(size<1>(Shape{}))::value;
  using ElemA = typename MMA_Traits<Atom>::ValTypeA;
  using ElemC = typename MMA_Traits<Atom>::ValTypeC;
};

template <class Elem, int D>
using SmemAtom = std::conditional_t<D == 128, GMMA::Layout_K_SW128_Atom<Elem>, GMMA::Layout_K_SW64_Atom<Elem>>;

// Rows of floats per stage: kHeads biases and one key-scale row, padded as the scorer pads them.
template <int N>
constexpr int row_stride() { return N + 32; }

template <int D, int N>
struct Smem {
  alignas(1024) uint8_t q[kHeads][kBq * D];
  alignas(1024) uint8_t k[kStages][N * D];
  alignas(128) float rows[kStages][kHeads + 1][row_stride<N>()];
  uint64_t full[kStages], empty[kStages];
};

__device__ __forceinline__ uint32_t bits_of(int32_t v) { return uint32_t(v); }
__device__ __forceinline__ uint32_t bits_of(float v) { return __float_as_uint(v); }
__device__ __forceinline__ uint32_t bits_of(cutlass::half_t v) { return v.raw(); }

template <class Atom, int D, bool RS, Work WORK, bool TURNS>
__global__ void __launch_bounds__(kThreads, 1)
    ceiling_kernel(const uint8_t* __restrict__ q_codes, const uint8_t* __restrict__ k_tiles,
                   const float* __restrict__ rows, int n_tiles, int steps, uint32_t* sink_out) {
  using Info = AtomInfo<Atom>;
  constexpr int kN = Info::kN;
  using ElemA = typename Info::ElemA;
  constexpr int kBK = 32;
  constexpr int kBlocks = kN / kBK;
  static_assert(WORK == Work::kNone || std::is_same_v<typename Info::ElemC, int32_t>,
                "start values and the approximate test are the int32 scorer's");
  using Barrier = cutlass::arch::ClusterBarrier;
  using FullBarrier = cutlass::arch::ClusterTransactionBarrier;
  using KLayout = decltype(tile_to_shape(SmemAtom<ElemA, D>{}, Shape<Int<kN>, Int<D>>{}));
  using QLayout = decltype(tile_to_shape(SmemAtom<ElemA, D>{}, Shape<Int<kBq>, Int<D>>{}));
  constexpr uint32_t kKBytes = kN * D;
  constexpr uint32_t kRowBytes = (kHeads + 1) * row_stride<kN>() * sizeof(float);

  extern __shared__ unsigned char smem_raw[];
  auto& sm = aligned_smem_1024<Smem<D, kN>>(smem_raw);

  // Query codes: the same bytes for every CTA (their layout is irrelevant to the timing).
  for (int i = threadIdx.x; i < kHeads * kBq * D / 16; i += kThreads)
    reinterpret_cast<uint4*>(&sm.q[0][0])[i] = __ldg(reinterpret_cast<const uint4*>(q_codes) + i);
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic stores, wgmma reads

  const bool producer = threadIdx.x == kConsumers;
  if (producer) {
    for (int s = 0; s < kStages; ++s) {
      FullBarrier::init(&sm.full[s], 1);
      Barrier::init(&sm.empty[s], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumers) {
    cutlass::arch::warpgroup_reg_dealloc<32>();
    if (!producer) return;
    for (int s = 0; s < steps; ++s) {
      const int stage = s % kStages;
      if (s >= kStages) Barrier::wait(&sm.empty[stage], ((s / kStages) & 1) ^ 1);
      FullBarrier::arrive_and_expect_tx(&sm.full[stage], kKBytes + kRowBytes);
      const int tile = (blockIdx.x + s) % n_tiles;
      SM90_BULK_COPY_G2S::copy(k_tiles + size_t(tile) * kKBytes, &sm.full[stage], sm.k[stage], kKBytes);
      SM90_BULK_COPY_G2S::copy(rows + size_t(tile) * kRowBytes / sizeof(float), &sm.full[stage], &sm.rows[stage][0][0],
                               kRowBytes);
    }
    for (int s = max(0, steps - kStages); s < steps; ++s) Barrier::wait(&sm.empty[s % kStages], (s / kStages) & 1);
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<112>();

  const int wg = cutlass::canonical_warp_group_idx(), tid = threadIdx.x % 128;
  const int lane = tid % 32, t = lane % 4;

  TiledMMA tiled_mma = make_tiled_mma(Atom{});
  auto thr_mma = tiled_mma.get_slice(tid);
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<ElemA*>(sm.q[wg])), QLayout{});
  Tensor tCsA = thr_mma.partition_A(sQ);
  Tensor tCrA = thr_mma.make_fragment_A(tCsA);  // SS: descriptors; RS: registers
  if constexpr (RS) copy(tCsA, tCrA);            // once: the query codes never change
  using Acc = decltype(partition_fragment_C(tiled_mma, Shape<Int<kBq>, Int<kN>>{}));
  Acc acc;
  clear(acc);

  // A row threshold and scale in the range the scorer sees (the values only steer the test).
  const float sq = 0.05f + 0.001f * (tid % 16);
  const float thr[2] = {3.f + 0.01f * tid, 2.5f - 0.01f * tid};
  const float d_min = folded_d_min(3.f + 0.01f * 128);
  uint32_t sink = 0;

  ws::IssueTurn<TURNS ? kHeads : 1> turn{wg};  // the scorer's token ring; one "head": no turns
  if (wg == kHeads - 1) turn.pass();

  for (int s0 = 0; s0 < steps; s0 += kStages) {
    const uint32_t phase = (s0 / kStages) & 1;
#pragma unroll
    for (int stage = 0; stage < kStages; ++stage) {
      const int s = s0 + stage;
      if (s >= steps) break;
      FullBarrier::wait(&sm.full[stage], phase);
      float d[kBlocks];
      if constexpr (WORK != Work::kNone) {
        // The scorer's start values (see candidate_kernel_ws): bias * rd + cut per element.
        float rd[kBlocks];
        const float* kscale = &sm.rows[stage][kHeads][2 * t];
        const float* bias = &sm.rows[stage][wg][2 * t];
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          d[blk] = sq * kscale[blk * kBK];
          rd[blk] = bias_reciprocal(d[blk]);
        }
        ws::start_values<kBK, true>(acc, bias, rd, thr);
      }
      Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<ElemA*>(sm.k[stage])), KLayout{});
      Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sK));
      warpgroup_fence_operand(acc);
      turn.wait();
      warpgroup_arrive();
      tiled_mma.accumulate_ = WORK == Work::kNone ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
#pragma unroll
      for (int kb = 0; kb < size<2>(tCrA); ++kb) {
        cute::gemm(tiled_mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
      warpgroup_commit_batch();
      turn.pass();
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc);
      if constexpr (WORK == Work::kFull) {
        int32_t best[kBlocks];
#pragma unroll
        for (int blk = 0; blk < kBlocks; ++blk) {
          int32_t vals[kBK / 2];
#pragma unroll
          for (int e = 0; e < kBK / 2; ++e) vals[e] = acc(blk * (kBK / 2) + e);
          best[blk] = max_tree(vals);
        }
        const uint32_t word = decide_blocks_cut(best, d, d_min);
        sink = (sink << 1 | sink >> 31) ^ __reduce_or_sync(0xffffffffu, word);
      } else {
        sink = (sink << 1 | sink >> 31) ^ bits_of(acc(0));
      }
      Barrier::arrive(&sm.empty[stage]);
    }
  }
  if (wg == 0) turn.wait();  // the last pass: every named barrier ends balanced
  if (sink == 0x9e3779b9u) atomicAdd(sink_out, 1u);  // keeps the work observable, almost never stores
  if (threadIdx.x == 0) atomicAdd(sink_out + 1, 1u);  // CTAs that finished
}

// Bytes of codes in [-7, 7], as int8 or as their e4m3 encodings.
std::vector<uint8_t> code_bytes(size_t n, bool fp8, std::mt19937& rng) {
  static const uint8_t kE4m3[8] = {0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E};  // 0 .. 7
  std::uniform_int_distribution<int> pick(-7, 7);
  std::vector<uint8_t> out(n);
  for (auto& b : out) {
    const int c = pick(rng);
    b = fp8 ? uint8_t(kE4m3[c < 0 ? -c : c] | (c < 0 ? 0x80 : 0)) : uint8_t(int8_t(c));
  }
  return out;
}

struct Result {
  double ms, tops;
};

template <class Atom, int D, bool RS, Work WORK, bool TURNS>
Result run(int sms, int steps, int repeats) {
  using Info = AtomInfo<Atom>;
  constexpr int kN = Info::kN;
  constexpr bool kFp8 = !std::is_same_v<typename Info::ElemA, int8_t>;
  constexpr int kTiles = 64;  // distinct key tiles, L2-resident like a kv head's codes
  std::mt19937 rng(1234);
  const auto q = code_bytes(size_t(kHeads) * kBq * D, kFp8, rng);
  const auto k = code_bytes(size_t(kTiles) * kN * D, kFp8, rng);
  std::vector<float> rows(size_t(kTiles) * (kHeads + 1) * row_stride<kN>());
  std::uniform_real_distribution<float> bias(-2.f, 2.f), scale(0.02f, 0.2f);
  for (size_t i = 0; i < rows.size(); ++i)
    rows[i] = (i / row_stride<kN>()) % (kHeads + 1) == kHeads ? scale(rng) : bias(rng);

  uint8_t *dq, *dk;
  float* drows;
  uint32_t* dsink;
  CUDA_OK(cudaMalloc(&dq, q.size()));
  CUDA_OK(cudaMalloc(&dk, k.size()));
  CUDA_OK(cudaMalloc(&drows, rows.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&dsink, 2 * sizeof(uint32_t)));
  CUDA_OK(cudaMemcpy(dq, q.data(), q.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(dk, k.data(), k.size(), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemcpy(drows, rows.data(), rows.size() * sizeof(float), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dsink, 0, 2 * sizeof(uint32_t)));

  auto kernel = ceiling_kernel<Atom, D, RS, WORK, TURNS>;
  const int bytes = int(sizeof(Smem<D, kN>)) + 1024;
  CUDA_OK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  cudaEvent_t start, stop;
  CUDA_OK(cudaEventCreate(&start));
  CUDA_OK(cudaEventCreate(&stop));
  std::vector<float> times;
  for (int r = 0; r < repeats + 2; ++r) {
    CUDA_OK(cudaEventRecord(start));
    kernel<<<sms, kThreads, bytes>>>(dq, dk, drows, kTiles, steps, dsink);
    CUDA_OK(cudaGetLastError());
    CUDA_OK(cudaEventRecord(stop));
    CUDA_OK(cudaEventSynchronize(stop));
    float ms = 0.f;
    CUDA_OK(cudaEventElapsedTime(&ms, start, stop));
    if (r >= 2) times.push_back(ms);  // two warm-up launches
  }
  uint32_t sink[2];
  CUDA_OK(cudaMemcpy(sink, dsink, sizeof(sink), cudaMemcpyDeviceToHost));
  if (sink[1] != uint32_t(sms) * (repeats + 2)) {
    std::printf("FAIL: %u of %d CTAs finished\n", sink[1], sms * (repeats + 2));
    std::exit(1);
  }
  CUDA_OK(cudaEventDestroy(start));
  CUDA_OK(cudaEventDestroy(stop));
  CUDA_OK(cudaFree(dq));
  CUDA_OK(cudaFree(dk));
  CUDA_OK(cudaFree(drows));
  CUDA_OK(cudaFree(dsink));
  std::sort(times.begin(), times.end());
  const double ms = times[times.size() / 2];
  const double ops = 2.0 * kBq * kN * D * double(kHeads) * steps * sms;
  return {ms, ops / (ms * 1e-3) / 1e12};
}

// Runs the variant unless `only` is set and not part of "<name> D<d>" (to profile one variant).
template <class Atom, int D, bool RS, Work WORK, bool TURNS>
void row(const char* name, int sms, int steps, int repeats, double peak, const std::string& only) {
  if (!only.empty() && (std::string(name) + " D" + std::to_string(D)).find(only) == std::string::npos) return;
  const Result r = run<Atom, D, RS, WORK, TURNS>(sms, steps, repeats);
  std::printf("| %-44s | %3d | %8.3f | %7.0f | %5.1f%% |\n", name, D, r.ms, r.tops, 100.0 * r.tops / peak);
  std::fflush(stdout);
}

}  // namespace sale::bench

int main(int argc, char** argv) {
  using namespace sale::bench;
  if (sale_test::skip_unless_sm90()) return sale_test::kSkip;
  cudaDeviceProp prop{};
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  int clock_khz = 0;
  CUDA_OK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, 0));
  // Dense 8-bit peak as NVIDIA quotes it: 8,192 operations per clock and SM at 1,830 MHz (1,979
  // TOPS on an H100 SXM's 132 SMs); the device's own maximum clock is printed beside it.
  const double peak = 8192.0 * prop.multiProcessorCount * 1.83e9 / 1e12;
  const int steps = argc > 1 ? std::atoi(argv[1]) : 2048;
  const int repeats = argc > 2 ? std::atoi(argv[2]) : 5;
  const std::string only = argc > 3 ? argv[3] : "";  // e.g. "s8 RS, full, turns D128"
  if (steps < 1 || repeats < 1) {
    std::printf("usage: %s [stages per CTA >= 1] [repeats >= 1] [variant filter]\n", argv[0]);
    return 2;
  }
  const int sms = prop.multiProcessorCount;
  std::printf("device: %s, %d SMs, max clock %.0f MHz; 8-bit dense peak %.0f TOPS (at 1,830 MHz)\n", prop.name, sms,
              clock_khz / 1e3, peak);
  std::printf("one CTA per SM, %d stages of each head per CTA, %d consumer warpgroups, %d-deep ring; median of %d\n\n",
              steps, kHeads, kStages, repeats);
  std::printf("| variant | D | ms | TOPS | of peak |\n|---|---|---|---|---|\n");

  using S8 = SM90::GMMA::MMA_64x128x32_S32S8S8_SS_TN_SATURATE;
  using S8RS = SM90::GMMA::MMA_64x128x32_S32S8S8_RS_TN_SATURATE;
  using E4F32 = SM90::GMMA::MMA_64x128x32_F32E4M3E4M3_SS_TN<>;
  using E4F16 = SM90::GMMA::MMA_64x128x32_F16E4M3E4M3_SS_TN<>;
  using E4F16N256 = SM90::GMMA::MMA_64x256x32_F16E4M3E4M3_SS_TN<>;
  row<S8, 128, false, Work::kNone, true>("s8 SS, none, turns", sms, steps, repeats, peak, only);
  row<S8, 128, false, Work::kNone, false>("s8 SS, none, no turns", sms, steps, repeats, peak, only);
  row<S8RS, 128, true, Work::kNone, true>("s8 RS, none, turns", sms, steps, repeats, peak, only);
  row<S8, 128, false, Work::kStart, true>("s8 SS, start, turns", sms, steps, repeats, peak, only);
  row<S8RS, 128, true, Work::kStart, true>("s8 RS, start, turns", sms, steps, repeats, peak, only);
  row<S8, 128, false, Work::kFull, true>("s8 SS, full (the scorer's loop), turns", sms, steps, repeats, peak, only);
  row<S8, 128, false, Work::kFull, false>("s8 SS, full, no turns", sms, steps, repeats, peak, only);
  row<S8RS, 128, true, Work::kFull, true>("s8 RS, full, turns", sms, steps, repeats, peak, only);
  row<E4F32, 128, false, Work::kNone, true>("e4m3 -> f32 SS m64n128, none, turns", sms, steps, repeats, peak, only);
  row<E4F16, 128, false, Work::kNone, true>("e4m3 -> f16 SS m64n128, none, turns", sms, steps, repeats, peak, only);
  row<E4F16N256, 128, false, Work::kNone, true>("e4m3 -> f16 SS m64n256, none, turns", sms, std::max(1, steps / 2), repeats, peak, only);
  row<S8, 64, false, Work::kNone, true>("s8 SS, none, turns", sms, steps, repeats, peak, only);
  row<S8, 64, false, Work::kFull, true>("s8 SS, full (the scorer's loop), turns", sms, steps, repeats, peak, only);
  row<S8RS, 64, true, Work::kFull, true>("s8 RS, full, turns", sms, steps, repeats, peak, only);
  return 0;
}
