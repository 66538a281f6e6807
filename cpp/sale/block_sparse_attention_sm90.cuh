// SPEC §5 block-sparse attention on Hopper warpgroup MMA (wgmma, sm_90a), torch-free.
//
// Persistent and warp-specialised: one CTA per SM takes work items, a pair of query blocks
// m0 = 2x, m0 + 1 of one (query head, batch), from a global counter in an L2-friendly order (see
// bsa90::work_item), so heads and query blocks of very different density still spread evenly
// over the SMs, and the producer fills the next item's stages while the consumers finish the
// current one:
//   - a producer warpgroup compacts the two mask rows into lists of kept key blocks by owner
//     (both rows, the first only, the second only; ascending, so the summation order and the
//     result are deterministic) and streams them, 64 or 128 keys of one owner per stage, into a
//     ring of shared-memory stages with cp.async (full/empty mbarriers);
//   - two consumer warpgroups, one per query block, hold Q in registers and compute
//     S = Q K^T and O += P V (wgmma RS) on the tiles their own row keeps, software-pipelined so
//     a tile's softmax overlaps the previous tile's P V: loads are shared by 128 query rows,
//     tensor-core work follows each row's own mask.
// P V runs in fp16: P is scaled by 2^kPShift so small probabilities stay normal numbers, and split
// into hi + lo fp16 parts (SPLIT_P, the default): one fp16 rounding of P (2^-11) leaves SPEC §7's
// elementwise bound in rare elements once |V| is large (a CPU emulation: 0 violations at |V| ~ 1,
// 1-4 per 5e5 outputs at |V| ~ 10, 13-52 at |V| ~ 100), so single rounding is an opt-in fast mode
// for bf16. bf16 V is first converted to fp16 (convert_v_to_half_kernel) with a power-of-two scale
// that keeps it inside fp16's range; the epilogue undoes it exactly.
#pragma once

#include <climits>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/arch/mma_sm90.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "sale/block_sparse_attention.cuh"

namespace sale {

namespace bsa90 {

constexpr int kRows = 64;  // bq = wgmma M; each consumer warpgroup owns one query block
// Keys per pipeline stage: 128 (m64n128 S tiles) when P is rounded once; 64 when P is split into
// hi + lo (the second P fragment needs the registers).
template <bool SPLIT_P>
constexpr int keys_per_stage() { return SPLIT_P ? 64 : 128; }
// Stages that fit in about 200 KB of shared memory (K and V of a stage: 4 * keys * D bytes).
template <int D, int KEYS>
constexpr int stage_count() {
  const int n = 200 * 1024 / (4 * KEYS * D);
  return n < 2 ? 2 : n > 6 ? 6 : n;
}
constexpr int kChunk = 1024;  // mask entries compacted per pass (a multiple of the producer's threads)
constexpr int kProducerThreads = 128;
constexpr int kConsumerThreads = 256;
constexpr int kThreads = kProducerThreads + kConsumerThreads;
// setmaxnreg budgets: registers only move inside the launch allocation (384 threads x 168).
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(kProducerThreads * kProducerRegs + kConsumerThreads * kConsumerRegs <= kThreads * 168,
              "setmaxnreg budgets exceed the launch allocation (the consumers would wait forever)");
constexpr float kPShift = 15.f;  // P is stored as p * 2^15 in fp16: 1 -> 32768 < 65504
constexpr float kVLimit = 32768.f;  // |V| below this converts to fp16 without overflow

template <typename T>
using CuteType = std::conditional_t<std::is_same_v<T, __nv_bfloat16>, cutlass::bfloat16_t, cutlass::half_t>;

// A stage: keys_per_stage keys of K ([keys][D], K-major) and V ([D][keys] view, MN-major),
// 128-byte swizzled, made of keys / bk kept blocks of one owner.
template <typename T, int D, int KEYS, int STAGES = stage_count<D, KEYS>()>
struct Smem {
  alignas(1024) T k[STAGES][KEYS * D];
  alignas(1024) __half v[STAGES][KEYS * D];
  int list[3][kChunk];       // the producer's compacted kept blocks: of both rows, of m0, of m0 + 1
  int key0[STAGES][KEYS / 32];  // first key of each block of the stage's tile (Nk: missing block)
  int owner[STAGES];         // bit w: query block m0 + w computes the tile, | kNeedsMask; < 0: a mark (below)
  long long item[STAGES];    // kOwnerHeader: the work item that starts here
  long long next_item;       // the producer's latest draw from the work counter
  int warp_count[2][3][4];   // double-buffered so one barrier per compaction round suffices
  uint64_t full[STAGES], empty[STAGES];
};

// Work item w -> query blocks m0, m0 + 1 of head h, batch b. Items run KV head by KV head (batch,
// then KV head outermost), so the CTAs running at once read the K and V of one KV head, which stay
// in L2 (at 32K keys, 16 MB) instead of streaming every head's from memory once per pair; inside a
// KV head, heaviest (causal: last) pair first, the heads of the group adjacent.
struct WorkItem {
  int m0, h, b;
};
__device__ __forceinline__ WorkItem work_item(const BlockSparseAttentionParams& p, long long w) {
  const int group = p.q_heads / p.kv_heads, pairs = (p.nQ + 1) / 2;
  const long long per_kv_head = static_cast<long long>(pairs) * group;
  const int kv = int(w / per_kv_head), rest = int(w % per_kv_head);  // kv = b * Hkv + hk
  const int x = rest / group, h = (kv % p.kv_heads) * group + rest % group;
  return {2 * (pairs - 1 - x), h, kv / p.kv_heads};
}
// Position in the ring of N stages: the running index, its stage and the parity of its pass,
// stepped together (N need not be a power of two: no division per step).
template <int N>
struct RingCursor {
  int index = 0, stage = 0;
  uint32_t phase = 0;
  __device__ __forceinline__ void advance() {
    ++index;
    if (++stage == N) stage = 0, phase ^= 1;
  }
};

// Stages that carry no data, only a mark: a work item starts (its index in Smem::item), or no
// work is left.
constexpr int kOwnerHeader = -1;
constexpr int kOwnerFinish = -2;
// Owner flag: some key of the tile is missing or lies past an owner row's causal end, so the
// consumer masks S (a tile without it needs no look at its blocks' positions).
constexpr int kNeedsMask = 4;
// Keys [key0, key0 + BK) need masking for a query block whose first row sees keys up to row_end
// when one of them is missing (>= nk) or, causally, past that end. The producer asks it of a
// tile's last block (the flag), a consumer of each block of a flagged tile.
template <int BK>
__device__ __forceinline__ bool block_needs_mask(int key0, int nk, bool causal, int row_end) {
  const int last = key0 + BK - 1;
  return last >= nk || (causal && last > row_end);
}

// The power of two e with |V| * 2^-e < kVLimit for every V (0 when V already fits). amax_bits holds
// max |V| as float bits (non-negative floats order like their bits); inf/NaN give 0 (the output
// then carries them, as the reference's would).
__device__ __forceinline__ int v_exponent(const unsigned* amax_bits) {
  if (amax_bits == nullptr) return 0;
  const float a = __uint_as_float(*amax_bits);
  if (!(a >= kVLimit) || isinf(a)) return 0;
  int x;
  frexpf(a, &x);  // a = f * 2^x, f in [0.5, 1)
  return x - 15;  // a * 2^-e = f * 2^15 < 2^15
}

}  // namespace bsa90

// bf16 V [B, H, Nk, D] (any batch/head/row strides, rows 16-byte aligned) -> fp16 copy scaled by 2^-e.
struct ConvertVParams {
  const __nv_bfloat16* v;
  int64_t batch_stride, head_stride, row_stride;
  int heads, nk, d;
  __half* out;          // [B, H, Nk, D] contiguous
  unsigned* amax_bits;  // one word, zeroed before v_amax_kernel
  int64_t rows;         // B * H * Nk
};

__device__ __forceinline__ const __nv_bfloat16* convert_v_row(const ConvertVParams& p, int64_t r) {
  const int64_t n = r % p.nk, bh = r / p.nk;
  return p.v + (bh / p.heads) * p.batch_stride + (bh % p.heads) * p.head_stride + n * p.row_stride;
}

__global__ void v_amax_kernel(const ConvertVParams p) {
  const int per_row = p.d / 8;
  float mx = 0.f;
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < p.rows * per_row;
       c += int64_t(gridDim.x) * blockDim.x) {
    const uint4 raw = *reinterpret_cast<const uint4*>(convert_v_row(p, c / per_row) + (c % per_row) * 8);
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(x[i]);
      mx = fmaxf(mx, fmaxf(fabsf(f.x), fabsf(f.y)));  // fmaxf drops NaN; a NaN V shows in the output
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (threadIdx.x % 32 == 0) atomicMax(p.amax_bits, __float_as_uint(mx));
}

__global__ void convert_v_to_half_kernel(const ConvertVParams p) {
  const int per_row = p.d / 8;
  const float factor = exp2f(-float(bsa90::v_exponent(p.amax_bits)));  // exact power of two
  for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < p.rows * per_row;
       c += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = c / per_row;
    const uint4 raw = *reinterpret_cast<const uint4*>(convert_v_row(p, r) + (c % per_row) * 8);
    const __nv_bfloat162* x = reinterpret_cast<const __nv_bfloat162*>(&raw);
    uint4 res;
    uint32_t* o = reinterpret_cast<uint32_t*>(&res);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __bfloat1622float2(x[i]);
      o[i] = pack2<__half>(f.x * factor, f.y * factor);
    }
    *reinterpret_cast<uint4*>(p.out + r * p.d + (c % per_row) * 8) = res;
  }
}

inline cudaError_t launch_convert_v(const ConvertVParams& p, int sm_count, cudaStream_t stream) {
  const int64_t work = p.rows * (p.d / 8);
  const int blocks = int(std::min<int64_t>((work + 255) / 256, int64_t(sm_count) * 8));
  cudaError_t err = cudaMemsetAsync(p.amax_bits, 0, sizeof(unsigned), stream);
  if (err != cudaSuccess) return err;
  v_amax_kernel<<<blocks, 256, 0, stream>>>(p);
  convert_v_to_half_kernel<<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// p.v must point at fp16 values (the input for fp16, the converted copy for bf16) with strides in
// elements; v_amax_bits is the word launch_convert_v filled, or nullptr for unscaled V;
// item_counter is zero at launch and counts the work items handed out.
template <typename T, int D, int BK, bool SPLIT_P>
__global__ void __launch_bounds__(bsa90::kThreads, 1)
    block_sparse_attention_sm90_kernel(const BlockSparseAttentionParams p, const unsigned* v_amax_bits,
                                       unsigned long long* item_counter, long long n_items) {
  using namespace cute;
  using namespace bsa90;
  using CT = CuteType<T>;
  using Barrier = cutlass::arch::ClusterBarrier;
  constexpr bool kSplitP = SPLIT_P;
  constexpr int kKeys = keys_per_stage<kSplitP>(), kStages = stage_count<D, kKeys>();
  constexpr int kPer = kKeys / BK;   // blocks per tile
  constexpr int kRowChunks = D / 8;  // 16-byte pieces per row
  constexpr float kLog2e = 1.4426950408889634f;
  using KLayout = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<CT>{}, Shape<Int<kKeys>, Int<D>>{}));
  using VLayout = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<half_t>{}, Shape<Int<D>, Int<kKeys>>{}));

  extern __shared__ unsigned char smem_raw[];
  // Swizzled tiles need 1024-byte alignment; the launch asks for 1 KiB of slack.
  auto& sm = aligned_smem_1024<Smem<T, D, kKeys>>(smem_raw);
  static_assert(BK % 32 == 0 && kKeys % BK == 0, "whole key blocks per stage");
  const int group = p.q_heads / p.kv_heads;

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&sm.full[s], kProducerThreads + 1);  // cp.async arrivals + the tile description
      Barrier::init(&sm.empty[s], kConsumerThreads);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= kConsumerThreads) {
    // ---------------- producer warpgroup ----------------
    // Per work item: a header stage, then the kept blocks of either row, grouped by owner per
    // chunk of the mask row (both rows first, then tiles of row m0 only and of row m0 + 1 only
    // in turn; ascending inside a group, so the order and the result are deterministic): a tile
    // holds blocks of one owner, and a consumer computes the whole tiles it owns and skips the
    // others.
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    const int ptid = threadIdx.x - kConsumerThreads, lane = ptid % 32, warp = ptid / 32;
    auto producer_sync = [] { asm volatile("bar.sync 1, %0;\n" ::"n"(kProducerThreads)); };
    // Each thread copies the same 16-byte column piece of rows slot0, slot0 + kSlotStep, ... of
    // every stage; stepping kSlotStep (a multiple of 8) rows moves a swizzled address by a
    // constant, so destinations are a base plus compile-time offsets.
    constexpr int kSlotStep = kProducerThreads / kRowChunks, kCopiesPerBlock = BK / kSlotStep;
    static_assert(BK % kSlotStep == 0 && kSlotStep % 8 == 0, "a thread's rows of a block stay in that block");
    const int64_t k_row_step = kSlotStep * p.k_row_stride, v_row_step = kSlotStep * p.v_row_stride;
    const int slot0 = ptid / kRowChunks, col = (ptid % kRowChunks) * 8;
    Tensor sK0 = make_tensor(make_smem_ptr(reinterpret_cast<CT*>(sm.k[0])), KLayout{});
    Tensor sV0 = make_tensor(make_smem_ptr(reinterpret_cast<half_t*>(sm.v[0])), VLayout{});
    T* k_dst = reinterpret_cast<T*>(raw_pointer_cast(&sK0(slot0, col)));
    __half* v_dst = reinterpret_cast<__half*>(raw_pointer_cast(&sV0(col, slot0)));
    const int k_step = int(raw_pointer_cast(&sK0(kSlotStep, 0)) - raw_pointer_cast(&sK0(0, 0)));
    const int v_step = int(raw_pointer_cast(&sV0(0, kSlotStep)) - raw_pointer_cast(&sV0(0, 0)));
    RingCursor<kStages> ring;  // stages issued
    auto next_stage = [&]() {
      if (ring.index >= kStages) Barrier::wait(&sm.empty[ring.stage], ring.phase ^ 1);
      return ring.stage;
    };
    // A stage without data: only its mark (and the item a header starts).
    auto issue_mark = [&](int mark, long long item) {
      const int stage = next_stage();
      if (ptid == 0) sm.owner[stage] = mark, sm.item[stage] = item;
      Barrier::arrive(&sm.full[stage]);
      if (ptid == 0) Barrier::arrive(&sm.full[stage]);  // releases the mark written above
      ring.advance();
    };
    for (;;) {
      if (ptid == 0) sm.next_item = static_cast<long long>(atomicAdd(item_counter, 1ull));
      producer_sync();
      const long long item = sm.next_item;
      producer_sync();  // every thread has read it before the next draw
      if (item >= n_items) break;
      const WorkItem it = work_item(p, item);
      const int m0 = it.m0, h = it.h, b = it.b;
      const SeqSpan sp = bsa::seq_of<true>(p, b);  // a null cu_seqlens gives the batched shape
      const int nk = sp.nk, n_q_blocks = (sp.nq + kRows - 1) / kRows;
      if (m0 >= n_q_blocks) continue;  // both blocks past their sequence's end (varlen): no rows
      issue_mark(kOwnerHeader, item);
      auto blocks_of = [&](int m) { return m < n_q_blocks ? bsa::visible_key_blocks(p, sp, m, BK) : 0; };
      const int own_end0 = blocks_of(m0), own_end1 = blocks_of(m0 + 1), n_end = max(own_end0, own_end1);
      const int hk = h / group;
      const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + sp.k0 * p.k_row_stride;
      const __half* v =
          static_cast<const __half*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + sp.k0 * p.v_row_stride;
      const int64_t mask_row = b * p.mask_batch_stride + h * p.mask_head_stride + m0 * p.mask_row_stride;
      auto kept = [&](int w, int n) -> bool {
        if (n >= (w == 0 ? own_end0 : own_end1)) return false;
        return bsa::mask_block_kept(p, mask_row + w * p.mask_row_stride, n);
      };
      // Stream compaction of the blocks of [c0, c1) into one list per owner (both rows, row m0
      // only, row m0 + 1 only), in one pass over the two mask rows; returns the three counts.
      auto compact = [&](int c0, int c1, int (&count)[3]) {
        count[0] = count[1] = count[2] = 0;
        // All mask reads of the chunk first (independent loads, one latency), 2 bits per round.
        constexpr int kRounds = kChunk / kProducerThreads;
        static_assert(2 * kRounds <= 32, "ownership bits of a chunk fit in one word");
        uint32_t owns = 0;
#pragma unroll
        for (int round = 0; round < kRounds; ++round) {
          const int n = c0 + round * kProducerThreads + ptid;
          if (n < c1) owns |= uint32_t(int(kept(0, n)) | int(kept(1, n)) << 1) << (2 * round);
        }
        for (int base = c0, round = 0; base < c1; base += kProducerThreads, ++round) {
          const int n = base + ptid;
          const int own = (owns >> (2 * round)) & 3;  // 3, 1, 2 -> list 0, 1, 2
          const int which = own == 3 ? 0 : own;
          unsigned ballot[3];
#pragma unroll
          for (int l = 0; l < 3; ++l) {
            ballot[l] = __ballot_sync(0xffffffffu, own != 0 && which == l);
            if (lane == 0) sm.warp_count[round & 1][l][warp] = __popc(ballot[l]);
          }
          producer_sync();
#pragma unroll
          for (int l = 0; l < 3; ++l) {
            int before = count[l], total = 0;
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              const int cw = sm.warp_count[round & 1][l][w];
              total += cw;
              before += w < warp ? cw : 0;
            }
            if (own != 0 && which == l) sm.list[l][before + __popc(ballot[l] & ((1u << lane) - 1u))] = n;
            count[l] += total;
          }
        }
        producer_sync();
      };
      // Tile e0 / kPer of a list: its blocks' K and V into the next stage, and its description.
      auto issue_tile = [&](const int* list, int e0, int count, int owner) {
        const int stage = next_stage();
        T* kd = k_dst + stage * (kKeys * D);
        __half* vd = v_dst + stage * (kKeys * D);
        int key0[kPer];
#pragma unroll
        for (int blk = 0; blk < kPer; ++blk) {
          key0[blk] = e0 + blk < count ? list[e0 + blk] * BK : nk;
          // This thread's rows of the block: first, first + kSlotStep, ... (one address per block,
          // then constant steps: at low density the producer's instructions per tile set the pace).
          const int first = key0[blk] + slot0;
          const T* ks = k + first * p.k_row_stride + col;
          const __half* vs = v + first * p.v_row_stride + col;
          if (key0[blk] + BK <= nk) {  // the whole block is inside the sequence (warp-uniform)
#pragma unroll
            for (int c = 0; c < kCopiesPerBlock; ++c) {
              const int i = blk * kCopiesPerBlock + c;
              cp_async_16(kd + i * k_step, ks + c * k_row_step, 16);
              cp_async_16(vd + i * v_step, vs + c * v_row_step, 16);
            }
          } else {  // a missing block (key0 = nk) or the last one: rows past Nk are zero-filled
#pragma unroll
            for (int c = 0; c < kCopiesPerBlock; ++c) {
              const int i = blk * kCopiesPerBlock + c;
              const bool in = first + c * kSlotStep < nk;  // (P = 0 there; no NaN from stale memory)
              cp_async_16(kd + i * k_step, in ? ks + c * k_row_step : k, in ? 16 : 0);
              cp_async_16(vd + i * v_step, in ? vs + c * v_row_step : v, in ? 16 : 0);
            }
          }
        }
        if (ptid == 0) {
#pragma unroll
          for (int blk = 0; blk < kPer; ++blk) sm.key0[stage][blk] = key0[blk];
          // Blocks ascend (missing ones, key0 = nk, last): the last block decides, against the
          // first row of the owner's lower query block.
          const int row_end = (owner == 2 ? m0 + 1 : m0) * kRows + nk - sp.nq;
          sm.owner[stage] = owner | (block_needs_mask<BK>(key0[kPer - 1], nk, p.causal, row_end) ? kNeedsMask : 0);
        }
        cutlass::arch::cpasync_barrier_arrive_noinc(&sm.full[stage]);
        if (ptid == 0) Barrier::arrive(&sm.full[stage]);  // releases the description written above
        ring.advance();
      };
      for (int c0 = 0; c0 < n_end; c0 += kChunk) {
        const int c1 = min(c0 + kChunk, n_end);
        // Blocks both rows keep, then the blocks of one row only, alternating between the rows so
        // that both consumers stay busy.
        int count[3];
        compact(c0, c1, count);
        for (int e0 = 0; e0 < count[0]; e0 += kPer) issue_tile(sm.list[0], e0, count[0], 3);
        for (int e0 = 0; e0 < max(count[1], count[2]); e0 += kPer) {
          if (e0 < count[1]) issue_tile(sm.list[1], e0, count[1], 1);
          if (e0 < count[2]) issue_tile(sm.list[2], e0, count[2], 2);
        }
        producer_sync();  // the lists are rewritten by the next chunk
      }
    }
    issue_mark(kOwnerFinish, 0);
    cp_async_wait<0>();  // no copy may outlive its issuer
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();

  // ---------------- consumer warpgroups: wg computes query block m0 + wg of each item ----------------
  const int wg = threadIdx.x / 128, tid = threadIdx.x % 128;
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;

  auto mma_qk = make_tiled_mma(GMMA::rs_op_selector<CT, CT, float, Shape<Int<kRows>, Int<kKeys>, Int<D>>>());
  auto mma_pv = make_tiled_mma(GMMA::rs_op_selector<half_t, half_t, float, Shape<Int<kRows>, Int<D>, Int<kKeys>>,
                                                    GMMA::Major::K, GMMA::Major::MN>());
  auto thr_qk = mma_qk.get_slice(tid);
  auto thr_pv = mma_pv.get_slice(tid);

  Tensor tSrQ = make_tensor<CT>(partition_shape_A(mma_qk, Shape<Int<kRows>, Int<D>>{}));
  static_assert(decltype(size(tSrQ))::value == D / 2, "64 x D over 128 threads");
  // S (c, r, n8 tile) flat, and P in the same order as the A operand of P.V.
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<Int<kRows>, Int<kKeys>>{});
  Tensor tOrP = make_tensor<half_t>(partition_shape_A(mma_pv, Shape<Int<kRows>, Int<kKeys>>{}));
  Tensor tOrPlo = make_tensor<half_t>(partition_shape_A(mma_pv, Shape<Int<kRows>, Int<kSplitP ? kKeys : 16>>{}));  // unused unless kSplitP
  static_assert(decltype(size(tSrS))::value == kKeys / 2 && decltype(size(tOrP))::value == kKeys / 2,
                "P's A fragment holds the S accumulator's elements in the same order");
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<Int<kRows>, Int<D>>{});  // (c, r, d8 tile) flat
  const float sl2 = p.scale * kLog2e;
  const float v_factor = exp2f(float(v_exponent(v_amax_bits)));

  // The tiles of an item follow its header; the next header (or the finish mark) ends it.
  // A warpgroup that holds tile `cur` may look only up to cur + kStages - 1: the producer refills
  // cur's stage next.
  constexpr int kEnd = -1, kNone = -2;
  RingCursor<kStages> scan;  // stages [0, scan.index) are behind this warpgroup
  auto issue_qk = [&](int stage) {
    Tensor tSrK = thr_qk.partition_fragment_B(make_tensor(make_smem_ptr(reinterpret_cast<CT*>(sm.k[stage])), KLayout{}));
    mma_qk.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      gemm(mma_qk, tSrQ(_, _, kb), tSrK(_, _, kb), tSrS);
      mma_qk.accumulate_ = GMMA::ScaleOut::One;
    }
  };
  auto issue_pv = [&](int stage) {
    Tensor tOrV = thr_pv.partition_fragment_B(make_tensor(make_smem_ptr(reinterpret_cast<half_t*>(sm.v[stage])), VLayout{}));
    gemm(mma_pv, tOrP, tOrV, tOrO);
    if constexpr (kSplitP) gemm(mma_pv, tOrPlo, tOrV, tOrO);
  };

  for (;;) {
    // The next item's header, or the end of all work.
    long long item;
    {
      Barrier::wait(&sm.full[scan.stage], scan.phase);
      const int mark = sm.owner[scan.stage];
      item = sm.item[scan.stage];
      Barrier::arrive(&sm.empty[scan.stage]);
      scan.advance();
      if (mark == kOwnerFinish) break;
    }
    const WorkItem it = work_item(p, item);
    const int h = it.h, b = it.b, m = it.m0 + wg;
    const SeqSpan sp = bsa::seq_of<true>(p, b);  // a null cu_seqlens gives the batched shape
    const int nq = sp.nq, nk = sp.nk, n_q_blocks = (nq + kRows - 1) / kRows;
    const int shift = nk - nq;  // causal: row i sees keys j <= i + shift
    const int row0 = m * kRows + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
    const int first_row_end = m * kRows + shift;  // last key the block's first row sees

    // Q as the A operand in registers, straight from global memory: value (c, r, half) of k-step
    // kb is row row0 + 8r, column 16 kb + 8 half + 2t + c (rows past Nq are zero, never stored).
    {
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + sp.q0 * p.q_row_stride;
      uint32_t* qr = reinterpret_cast<uint32_t*>(raw_pointer_cast(tSrQ.data()));
#pragma unroll
      for (int i = 0; i < D / 4; ++i) {  // i = r + 2 half + 4 kb
        const int row = row0 + 8 * (i % 2), col = 16 * (i / 4) + 8 * ((i / 2) % 2) + 2 * t;
        qr[i] = m < n_q_blocks && row < nq ? *reinterpret_cast<const uint32_t*>(q + row * p.q_row_stride + col) : 0u;
      }
    }
    clear(tOrO);
    float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this thread's part

    // The first tile in [scan.index, limit) this warpgroup owns, releasing the ones it skips: its
    // index (its stage in `stage`), kEnd at the item's end (the next mark, left for the loop
    // above), kNone if there is none before limit.
    auto next_tile = [&](int limit, int& stage, int& flags) -> int {
      for (; scan.index < limit; scan.advance()) {
        Barrier::wait(&sm.full[scan.stage], scan.phase);
        const int owner = sm.owner[scan.stage];
        if (owner < 0) return kEnd;
        if ((owner >> wg) & 1) {
          asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // cp.async wrote, wgmma reads
          stage = scan.stage, flags = owner;
          const int index = scan.index;
          scan.advance();
          return index;
        }
        Barrier::arrive(&sm.empty[scan.stage]);
      }
      return kNone;
    };
    // Masks, then the online softmax on S in place (exponents in fp32); returns the rescale factors.
    auto softmax = [&](int stage, bool masked, float (&alpha)[2]) {
      // Element i: column 8 (i / 4) + 2t + i % 2 of the tile, row + 8 ((i / 2) % 2).
#pragma unroll
      for (int blk = 0; blk < kPer && masked; ++blk) {
        const int key0 = sm.key0[stage][blk];
        if (block_needs_mask<BK>(key0, nk, p.causal, first_row_end)) {
#pragma unroll
          for (int e = 0; e < BK / 2; ++e) {
            const int j = key0 + (e / 4) * 8 + 2 * t + e % 2, r = (e / 2) % 2;
            if (j >= nk || (p.causal && j > row0 + 8 * r + shift)) tSrS(blk * BK / 2 + e) = -INFINITY;
          }
        }
      }
      // A row with nothing visible yet keeps max -inf; its base is taken as 0 so every term is 0.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) mx = fmaxf(mx, fmaxf(tSrS(nt * 4 + 2 * r), tSrS(nt * 4 + 2 * r + 1)));
        mx = quad_max(mx);
        const float base = mx == -INFINITY ? 0.f : mx * sl2;
        alpha[r] = mx == row_max[r] ? 1.f : fast_exp2(row_max[r] * sl2 - base);  // exactly 1: O kept as is
        row_max[r] = mx;
        const float shifted = base - kPShift;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float e = fast_exp2(fmaf(tSrS(nt * 4 + 2 * r + c), sl2, -shifted));
            tSrS(nt * 4 + 2 * r + c) = e;
            sum += e;
          }
        row_sum[r] = row_sum[r] * alpha[r] + sum;
      }
    };
    auto rescale_and_convert = [&](const float (&alpha)[2]) {
      // Once the running maxima settle, most tiles change no row maximum of a warp: skipping the
      // multiplications by 1 saves a D / 2-wide FMUL pass (an eighth of the consumer's instructions).
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < size(tOrO); ++i) tOrO(i) *= alpha[(i / 2) % 2];
      }
      uint32_t* hi = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrP.data()));
      uint32_t* lo = reinterpret_cast<uint32_t*>(raw_pointer_cast(tOrPlo.data()));
#pragma unroll
      for (int i = 0; i < kKeys / 4; ++i) {
        if constexpr (kSplitP) {
          pack2_split<__half>(tSrS(2 * i), tSrS(2 * i + 1), hi[i], lo[i]);
        } else {
          hi[i] = pack2<__half>(tSrS(2 * i), tSrS(2 * i + 1));
        }
      }
    };

    // Software pipeline: S of the next tile is computed while this tile's P V runs, and the next
    // softmax overlaps that P V on the tensor cores. Every iteration issues both products, so no
    // wgmma sits on a data-dependent branch (ptxas would serialise them all): with no tile pending
    // P is zero and its P V adds nothing; with no next tile the S product is computed and ignored.
    float alpha[2];
    clear(tOrP);
    clear(tOrPlo);
    int cur = -1, cur_stage = 0;  // the tile whose P is in tOrP (-1: none, P = 0) and its stage
    for (;;) {
      int nxt_stage = 0, nxt_flags = 0;
      const int nxt = next_tile(cur >= 0 ? cur + kStages : INT_MAX, nxt_stage, nxt_flags);
      if (cur < 0 && nxt == kEnd) break;
      // Both products read real tiles only (a mark's stage is never an operand).
      const int qk_stage = nxt >= 0 ? nxt_stage : cur_stage, pv_stage = cur >= 0 ? cur_stage : nxt_stage;
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tOrP);
      warpgroup_fence_operand(tOrPlo);
      warpgroup_fence_operand(tOrO);
      warpgroup_arrive();
      issue_qk(qk_stage);
      warpgroup_commit_batch();
      issue_pv(pv_stage);
      warpgroup_commit_batch();
      warpgroup_wait<1>();  // S of the next tile is ready; P V may still run
      warpgroup_fence_operand(tSrS);
      if (nxt >= 0) softmax(nxt_stage, nxt_flags & kNeedsMask, alpha);
      warpgroup_wait<0>();
      warpgroup_fence_operand(tOrO);
      if (cur >= 0) Barrier::arrive(&sm.empty[cur_stage]);  // every consumer thread releases it
      if (nxt < 0) {  // end, or no owned tile within reach: drained, look further with nothing pending
        if (nxt == kEnd) break;
        cur = -1;
        clear(tOrP);
        clear(tOrPlo);
        continue;
      }
      rescale_and_convert(alpha);
      cur = nxt, cur_stage = nxt_stage;
    }
    if (m < n_q_blocks) {  // the odd last query block has no partner
      // Epilogue: O and l both carry the 2^kPShift of P; O also V's 2^-e, undone here exactly.
      bsa::store_output_rows<T, D>(p, p.cu_seqlens_q != nullptr, sp, b, h, row0, t, row_sum, row_max, sl2, v_factor,
                                   kPShift, [&](int i) { return tOrO(i); });
    }
  }
}

template <typename T, int D, int BK, bool SPLIT_P>
inline cudaError_t launch_block_sparse_attention_sm90_impl(const BlockSparseAttentionParams& p,
                                                           const unsigned* v_amax_bits,
                                                           unsigned long long* item_counter, int sm_count,
                                                           cudaStream_t stream) {
  auto kernel = block_sparse_attention_sm90_kernel<T, D, BK, SPLIT_P>;
  constexpr int smem = int(sizeof(bsa90::Smem<T, D, bsa90::keys_per_stage<SPLIT_P>()>)) + 1024;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  const long long n_items = static_cast<long long>((p.nQ + 1) / 2) * p.q_heads * p.batch;
  if (n_items == 0) return cudaSuccess;
  if ((err = cudaMemsetAsync(item_counter, 0, sizeof(unsigned long long), stream)) != cudaSuccess) return err;
  const int ctas = int(std::min<long long>(n_items, sm_count));  // persistent: one CTA per SM
  kernel<<<ctas, bsa90::kThreads, smem, stream>>>(p, v_amax_bits, item_counter, n_items);
  return cudaGetLastError();
}

// p.v: fp16 values (see the kernel); the caller validated everything else as for
// launch_block_sparse_attention. item_counter: one device word of scratch (zeroed here, on the
// stream); sm_count: the device's SMs (the persistent grid). fast_p (bf16 only): P rounded once to
// fp16 instead of hi + lo, with 128-key stages (dense tiles ~30% faster on the H100, low densities
// slower); the output then can leave SPEC §7's elementwise bound in rare elements when |V| is large
// (benchmarks/RESULTS.md, session 3), so it is opt-in.
inline cudaError_t launch_block_sparse_attention_sm90(const BlockSparseAttentionParams& p, const unsigned* v_amax_bits,
                                                      unsigned long long* item_counter, int sm_count, bool is_bf16,
                                                      int head_dim, int bk, bool fast_p, cudaStream_t stream) {
  return dispatch_dtype_dim_block(is_bf16, head_dim, bk, [&](auto type, auto dim, auto block) {
    using T = typename decltype(type)::type;
    constexpr int kD = decltype(dim)::value, kBk = decltype(block)::value;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      if (fast_p) return launch_block_sparse_attention_sm90_impl<T, kD, kBk, false>(p, v_amax_bits, item_counter, sm_count, stream);
    }
    return launch_block_sparse_attention_sm90_impl<T, kD, kBk, true>(p, v_amax_bits, item_counter, sm_count, stream);
  });
}

}  // namespace sale
