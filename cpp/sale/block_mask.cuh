// SPEC §4 block selection on tensor cores, torch-free: two kernels per call.
//
//  1. row_threshold_kernel: per query row, the exact statistics of its dense set (sink block +
//     local window, causally masked) with f16/bf16 mma.sync and fp32 accumulation, turned into
//     the threshold T_i = m_i + ln(tau_h l_i) / scale (SPEC §4.2-4.3).
//  2. a candidate scorer: per (query block, candidate key block) the 4-bit estimate on 8-bit
//     tensor cores (codes held in int8 give the exact integer product), kept iff some row has
//     max_j (E_ij + b_ij) * sq_i * sk_j > T_i (SPEC §3-4.4). Two implementations decide
//     identically: candidate_kernel below (mma.sync) and candidate_kernel_ws in
//     block_mask_sm90.cuh (warp-specialised wgmma, the default on sm_90a).
//
// The mask leaves as bits (nW = ceil(nK / 32) words per query block): 1/8 of a bool mask, and
// what block_sparse_attention reads directly; expand_mask_kernel gives the bool view.
// bq is fixed at 64. Variable-length (packed) batches: see BlockMaskParams::cu_seqlens_q.
#pragma once

#include <cfloat>
#include <cstdint>
#include <cuda_runtime.h>

#include "sale/varlen.cuh"
#include "sale/warp_mma.cuh"

namespace sale {

struct BlockMaskParams {
  const void* q;  // [B, Hq, Nq, D] f16/bf16, last dim contiguous
  const void* k;  // [B, Hkv, Nk, D] f16/bf16, last dim contiguous
  int64_t q_batch_stride, q_head_stride, q_row_stride;  // in elements
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  const int8_t* q_codes;  // [B, Hq, Nq, D] contiguous; nullptr: see q_mean
  const float* q_scale;   // [B, Hq, Nq]
  // With q_codes == nullptr (sale.select, wgmma scorer only) each scorer CTA quantizes its query
  // rows itself from q, q_scale and the query means [B, Hq, D] (quantize's scratch q_mean), exactly
  // as sale.quantize would: the codes (0.33x the bytes of q + k + v at D 128) are never stored.
  const float* q_mean;
  bool q_bf16;  // q's dtype (bf16, else fp16), for that quantization
  const int8_t* k_codes;  // [B, Hkv, Nk, D] contiguous
  const float* k_scale;   // [B, Hkv, Nk]
  const float* qk_bias;   // [B, Hq, Nk]
  const float* k_mean;    // [B, Hkv, D]
  const float* tau;       // [Hq]
  float* row_threshold;   // [B, Hq, Nq] scratch written by kernel 1
  uint32_t* mask_bits;    // [B, Hq, nQ, nW] output: bit n % 32 of word n / 32 <=> key block n kept
  int batch, q_heads, kv_heads, nq, nk, bk, window;
  int nQ, nK, nW;
  float scale;
  bool use_wgmma;  // score candidates with wgmma (block_mask_sm90.cuh) instead of mma.sync
  // Variable-length batch (both or neither; nullptr: batched): sequence b is rows [cu[b], cu[b + 1])
  // of q and k (packed [total, H, D], batch strides 0) and of the per-row buffers, which are then
  // [H, total(, D)] (k_mean stays [B, Hkv, D]); nq, nk, nQ, nK, nW are the longest sequence's, and
  // mask rows of query blocks past a sequence's end are 0.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int64_t total_q, total_k;
  int dense_below;  // a sequence with fewer keys keeps every causal block (no candidates scored)
};

constexpr int kBq = 64;
constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;

// The kernels come in a batched and a packed (VARLEN: cu_seqlens set) instantiation, so the
// batched code keeps addresses that the compiler can rebuild from parameters (no extra registers).

// This CTA's sequence (sale/varlen.cuh): the batched shape, or its rows of the packed batch.
template <bool VARLEN>
__device__ __forceinline__ SeqSpan seq_of(const BlockMaskParams& p, int b) {
  if constexpr (VARLEN) return seq_span(p.cu_seqlens_q, p.cu_seqlens_k, b, p.nq, p.nk);
  return SeqSpan{0, 0, p.nq, p.nk};
}

// First row of (b, query head h) in the query-side per-row buffers (codes, scales, thresholds).
template <bool VARLEN>
__device__ __forceinline__ int64_t q_rows_of(const BlockMaskParams& p, const SeqSpan& s, int b, int h) {
  return rows_base(VARLEN, b, h, p.q_heads, VARLEN ? p.total_q : p.nq, s.q0);
}

// First row of (b, head h of `heads`) in the key-side per-row buffers: k codes and scales (kv heads),
// qk_bias (query heads); key_rows_per_head() apart per head.
template <bool VARLEN>
__device__ __forceinline__ int64_t key_rows_per_head(const BlockMaskParams& p) {
  return VARLEN ? p.total_k : p.nk;
}
template <bool VARLEN>
__device__ __forceinline__ int64_t k_rows_of(const BlockMaskParams& p, const SeqSpan& s, int b, int h, int heads) {
  return rows_base(VARLEN, b, h, heads, key_rows_per_head<VARLEN>(p), s.k0);
}

// Exclusive causal end of query block m's last row (SPEC §4, e_m).
__device__ __forceinline__ int block_end(const SeqSpan& s, int m) {
  return min((m + 1) * kBq, s.nq) + (s.nk - s.nq);
}

// First key block of the local window; the dense set is {0} and [window_first, last causal].
__device__ __forceinline__ int window_first_block(const BlockMaskParams& p, int e) {
  return max(0, e - p.window) / p.bk;
}

// ------------------------------------------------------------------------------------------
// Kernel 1: thresholds from the dense set.
// ------------------------------------------------------------------------------------------

// One CTA of 4 warps per (query block of 64 rows, query head, batch); warp w owns rows
// 16w .. 16w + 15 of the block.
template <typename T, int D, bool VARLEN>
__global__ void __launch_bounds__(kThreads) row_threshold_kernel(const BlockMaskParams p) {
  constexpr int kKeys = 32;       // keys per smem tile
  constexpr int kPad = 8;         // 16 bytes: rows land on distinct banks for the B loads
  __shared__ __align__(16) T ks[2][kKeys][D + kPad];  // two chunks: one loads while the other is used

  const int m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_of<VARLEN>(p, b);
  if (VARLEN && m * kBq >= sp.nq) return;  // past its sequence's end: no rows
  const int nq = sp.nq, nk = sp.nk;
  const int hk = h / (p.q_heads / p.kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = m * kBq + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
  const int rows[2] = {row0, row0 + 8};

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + sp.q0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + sp.k0 * p.k_row_stride;
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
        if (rows[r] < nq) {
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

  const int e = block_end(sp, m);
  const int lo = window_first_block(p, e) * p.bk;
  // Dense keys in chunks of kKeys: [0, sink_end) when the window does not reach the sink block,
  // then [lo, e); the next chunk loads while this one is used.
  const int sink_end = lo > 0 ? p.bk : 0;
  const int n_sink = (sink_end + kKeys - 1) / kKeys, n_chunks = n_sink + (e - lo + kKeys - 1) / kKeys;
  auto chunk_start = [&](int i) { return i < n_sink ? i * kKeys : lo + (i - n_sink) * kKeys; };
  auto load_chunk = [&](int i) {
    const int k0 = chunk_start(i);
    for (int c = threadIdx.x; c < kKeys * D / 8; c += kThreads) {  // zeros past Nk
      const int key = c / (D / 8), col = (c % (D / 8)) * 8;
      const bool in = k0 + key < nk;
      cp_async_16(&ks[i % 2][key][col], k + (in ? (k0 + key) * p.k_row_stride + col : 0), in ? 16 : 0);
    }
    cp_async_commit();
  };

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};
  // exp(scale (s - m)) as exp2((s - m) scale log2 e): MUFU.EX2 without expf's range reduction.
  const float scale = p.scale, sl2 = p.scale * 1.4426950408889634f;

  if (n_chunks > 0) load_chunk(0);
  for (int i = 0; i < n_chunks; ++i) {
    if (i + 1 < n_chunks) {
      load_chunk(i + 1);
      cp_async_wait<1>();  // chunk i has landed; i + 1 may still be in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const auto& kc = ks[i % 2];
    const int k0 = chunk_start(i), end = i < n_sink ? sink_end : e;

    float s[kKeys / 8][4];
#pragma unroll
    for (int nt = 0; nt < kKeys / 8; ++nt) {
      s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t bf[2] = {*reinterpret_cast<const uint32_t*>(&kc[nt * 8 + g][kk * 16 + 2 * t]),
                                *reinterpret_cast<const uint32_t*>(&kc[nt * 8 + g][kk * 16 + 8 + 2 * t])};
        mma_16x8x16<T>(s[nt], a[kk], bf);
      }
    }
    // Smoothed logits s_ij = q_i.k_j - q_i.k_mean; hide what row i cannot see or does not exist.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float chunk_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int j = k0 + nt * 8 + 2 * t + c;
          const bool visible = rows[r] < nq && j < end && j <= rows[r] + (nk - nq);
          float& v = s[nt][2 * r + c];
          v = visible ? v - qk_mean[r] : -INFINITY;
          chunk_max = fmaxf(chunk_max, v);
        }
      }
      const float new_max = fmaxf(row_max[r], quad_max(chunk_max));
      if (new_max == -INFINITY) continue;  // nothing visible yet
      float sum = row_sum[r] * exp2f((row_max[r] - new_max) * sl2);
#pragma unroll
      for (int nt = 0; nt < kKeys / 8; ++nt) {
        sum += exp2f((s[nt][2 * r] - new_max) * sl2) + exp2f((s[nt][2 * r + 1] - new_max) * sl2);
      }
      row_max[r] = new_max;
      row_sum[r] = sum;
    }
    __syncthreads();  // chunk i's buffer is refilled by load_chunk(i + 2)
  }

  const float tau = p.tau[h];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    if (t == 0 && rows[r] < nq) {
      p.row_threshold[q_rows_of<VARLEN>(p, sp, b, h) + rows[r]] = row_max[r] + logf(tau * l) / scale;
    }
  }
}

// SPEC §4.2-4.3: the row thresholds into p.row_threshold (every scorer's first kernel).
template <typename T, int D>
inline cudaError_t launch_row_thresholds(const BlockMaskParams& p, cudaStream_t stream) {
  const dim3 grid(p.nQ, p.q_heads, p.batch);
  if (p.cu_seqlens_q != nullptr) row_threshold_kernel<T, D, true><<<grid, kThreads, 0, stream>>>(p);
  else row_threshold_kernel<T, D, false><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------------------
// Kernel 2: candidate blocks against the thresholds. Shared pieces of both scorers first.
// ------------------------------------------------------------------------------------------

// What a candidate-scoring CTA works on: query block m (heaviest first) of `heads` consecutive
// query heads h0.. that share kv head hk, and the block's dense set {0} + [first_window,
// last_causal]; candidates are blocks 1 .. first_window - 1.
// In a variable-length batch a query block past its sequence's end is `empty`: its mask rows are 0.
struct CandidateCta {
  int m, b, hk, h0, first_window, last_causal;
  SeqSpan s;
  bool empty;
};

template <int HEADS, bool VARLEN>
__device__ __forceinline__ CandidateCta candidate_cta(const BlockMaskParams& p) {
  CandidateCta c;
  c.m = p.nQ - 1 - blockIdx.x;
  c.b = blockIdx.z;
  const int group = p.q_heads / p.kv_heads;
  c.hk = blockIdx.y / (group / HEADS);
  c.h0 = c.hk * group + (blockIdx.y % (group / HEADS)) * HEADS;
  c.s = seq_of<VARLEN>(p, c.b);
  c.empty = VARLEN && c.m * kBq >= c.s.nq;
  const int e = block_end(c.s, c.m);
  c.first_window = window_first_block(p, e);
  c.last_causal = (e - 1) / p.bk;
  if constexpr (VARLEN) {
    // A sequence shorter than dense_below keeps every causal block: all dense, no candidates.
    // An empty block keeps nothing (init_mask_rows writes zeros) and has no candidates either.
    if (c.s.nk < p.dense_below || c.empty) c.first_window = 0;
    if (c.empty) c.last_causal = -1;
  }
  return c;
}

__device__ __forceinline__ uint32_t* mask_words(const BlockMaskParams& p, const CandidateCta& c, int h) {
  return p.mask_bits + ((int64_t(c.b) * p.q_heads + h) * p.nQ + c.m) * p.nW;
}

// The CTA's mask rows hold the dense set and nothing else; the scorers then OR in the kept
// candidates (after a CTA barrier, so these plain stores are visible to their atomics).
template <int HEADS>
__device__ __forceinline__ void init_mask_rows(const BlockMaskParams& p, const CandidateCta& c) {
  for (int i = threadIdx.x; i < HEADS * p.nW; i += blockDim.x) {
    const int w = i % p.nW, n0 = 32 * w;
    // Bits of [first_window, last_causal] inside this word, plus the sink.
    const int lo = max(c.first_window, n0), hi = min(c.last_causal, n0 + 31);
    uint32_t bits = hi >= lo ? ((hi - lo == 31 ? 0xffffffffu : (1u << (hi - lo + 1)) - 1u) << (lo - n0)) : 0u;
    if (w == 0 && !c.empty) bits |= 1u;
    mask_words(p, c, c.h0 + i / p.nW)[w] = bits;
  }
}

// Bias in code units as the accumulator's start value: the bits of the float 1.5 * 2^23 + x
// are kBiasedZero + rint(x) for |x| < 2^22 (one FFMA, no conversion instruction); beyond that
// they stay monotonic in x. x = bias * (1 / d) is within 1 of the exact b = rint(bias / d) for
// |x| < 2^21. The MMAs accumulate with saturation, so nothing wraps (|E| <= 6272 and float bits
// stay between INT_MIN + 2^30 and INT_MAX - 2^23).
constexpr float kBiasMagic = 12582912.f;       // 1.5 * 2^23
constexpr int32_t kBiasedZero = 0x4B400000;   // its bits
constexpr int32_t kApproxLimit = 1 << 20;     // |max - kBiasedZero| below this: the +-1 bound holds
// The bits of fma(bias, rd, start): start = kBiasMagic gives the biased bias above; the wgmma
// scorer's start also carries the row threshold (row_cut, below).
__device__ __forceinline__ int32_t cut_biased_bias(float bias, float rd, float start) {
  return __float_as_int(fmaf(bias, rd, start));
}
__device__ __forceinline__ int32_t biased_bias(float bias, float rd) { return cut_biased_bias(bias, rd, kBiasMagic); }

// rd = 1 / d for biased_bias. It only has to keep rint(bias * rd) within 1 of b = rint(bias / d):
// with rcp.approx's error of at most 1 ulp, the two reals differ by at most 2^21 * 2^-23 < 1 for
// |bias / d| < 2^21, and the rints of two reals less than 1 apart differ by at most 1. The exact
// path subtracts biased_bias with the same rd, so E stays exact; a correctly rounded reciprocal
// (MUFU plus a refinement and a slow path, per block and step) buys nothing. The .ftz form is one
// MUFU: a d below FLT_MIN (zero or subnormal) gives +inf, clamped to FLT_MAX so that bias * rd is
// never 0 * inf = NaN (whose bits would saturate the accumulator); approx_decide sends such blocks
// to the exact test.
__device__ __forceinline__ float bias_reciprocal(float d) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(r) : "f"(d));
  return fminf(r, FLT_MAX);
}

__device__ __forceinline__ int32_t max3(int32_t a, int32_t b, int32_t c) { return __vimax3_s32(a, b, c); }
// Max of N values as a tree of three-input maxima: (N - 1) / 2 instructions, depth log3 N (the
// scorer's epilogue is latency-bound, so short chains matter).
template <int N>
__device__ __forceinline__ int32_t max_tree(const int32_t (&v)[N]) {
  if constexpr (N == 1) {
    return v[0];
  } else if constexpr (N == 2) {
    return max(v[0], v[1]);
  } else {
    int32_t w[(N + 2) / 3];
#pragma unroll
    for (int i = 0; i < N / 3; ++i) w[i] = max3(v[3 * i], v[3 * i + 1], v[3 * i + 2]);
    if constexpr (N % 3 == 1) w[N / 3] = v[N - 1];
    if constexpr (N % 3 == 2) w[N / 3] = max(v[N - 2], v[N - 1]);
    return max_tree(w);
  }
}

// Query heads of one kv group that a scorer CTA takes: as many as divide the group, up to 4.
inline int scorer_heads_per_cta(int q_heads, int kv_heads) {
  const int group = q_heads / kv_heads;
  return group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
}

// The mma.sync scorers' row statistics: rows g and g + 8 of each of the warp's two m16 tiles
// share one query scale (SPEC §2); a row past nq never passes. q_rows: the first row of the
// (batch, head) in the per-row buffers.
__device__ __forceinline__ void load_tile_rows(const BlockMaskParams& p, int64_t q_rows, int nq,
                                               const int (&rows)[2][2], float (&sq)[2], float (&thr)[2][2]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    sq[mt] = rows[mt][0] < nq ? p.q_scale[q_rows + rows[mt][0]] : 1.f;
#pragma unroll
    for (int r = 0; r < 2; ++r)
      thr[mt][r] = rows[mt][r] < nq ? p.row_threshold[q_rows + rows[mt][r]] : INFINITY;
  }
}

// One d = sq * sk per (m16 tile, key block) and its reciprocal for biased_bias.
__device__ __forceinline__ void tile_block_scales(const float (&sq)[2], float sk, float (&d)[2], float (&rd)[2]) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    d[mt] = sq[mt] * sk;
    rd[mt] = bias_reciprocal(d[mt]);
  }
}

// The approximate test of one candidate block for the two rows a thread holds (g and g + 8 of a
// 16-row group, one query scale): best[r] = max over the thread's columns of E + b~ (biased),
// d = sq * sk, rd = bias_reciprocal(d). Integer compares only: with t = thr / d, the row surely
// passes when best >= bits(1.5 * 2^23 + t + kCutMargin) and surely fails when best is below
// bits(1.5 * 2^23 + t - kCutMargin). Why that is sound (x = the exact max of E + b, |x - v| <= 1
// for v = best - kBiasedZero; the exact test is fl(x * d) > thr): thr * rd is t within 2^-23
// relative, the fma rounds by at most 1/2 where it matters (|t| < 2^22), and fl(x * d) moves x * d
// by 2^-24 relative, so with |t| < kApproxLimit + kCutMargin every error together stays below
// 1 + 1/2 + 2^-21 |t| < 2.5 < kCutMargin; for larger |t| the in-range v is far from t on the
// right side. Floats of either sign keep the order of their bits against an in-range best (a negative
// cut-off is a negative integer: always passed; +inf: never). `unsure` when neither holds, when
// the max is outside kApproxLimit (a bias outside the approximation's range), or when d is below
// FLT_MIN (rd clamped).
constexpr float kCutMargin = 4.f;
__device__ __forceinline__ void approx_decide(const int32_t (&best)[2], float d, float rd, const float (&thr)[2],
                                              bool& hit, bool& unsure) {
  // One unsigned compare per row: best - kBiasedZero in (-kApproxLimit, kApproxLimit).
  const bool valid = uint32_t(best[0] - (kBiasedZero - kApproxLimit)) < uint32_t(2 * kApproxLimit) &&
                     uint32_t(best[1] - (kBiasedZero - kApproxLimit)) < uint32_t(2 * kApproxLimit) &&
                     d >= FLT_MIN;
  bool surely = false, maybe = false;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    surely |= best[r] >= __float_as_int(fmaf(thr[r], rd, kBiasMagic + kCutMargin));
    maybe |= best[r] >= __float_as_int(fmaf(thr[r], rd, kBiasMagic - kCutMargin));
  }
  hit |= valid && surely;
  unsure |= !valid || (!surely && maybe);
}

// The wgmma scorer folds the row threshold into the start value as well, so that one integer max
// over both rows of a block and two compares decide it (no per-row cut-off arithmetic after the
// product). With cut_r = row_cut(thr_r, rd) = fl(1.5 * 2^23 - thr_r * rd), an integer while
// |thr_r * rd| < 2^22, row r's accumulator of column j starts at the bits of
// fma(bias_j, rd, cut_r) = kBiasedZero + rint(bias_j * rd) - rint(thr_r * rd) while the sum stays
// in [2^23, 2^24) (ties may round either way), so after the product v = acc - kBiasedZero is
// E + b - t (t = thr / d) up to the errors bounded at decide_blocks_cut.
__device__ __forceinline__ float row_cut(float thr, float rd) { return fmaf(-thr, rd, kBiasMagic); }
// Smallest d = sq * sk for which the folded test is sound: |t| = |thr / d| <= 2^20 for every
// finite threshold of the thread's rows (tmax = their largest |thr|) and d a normal number (rd
// accurate). An infinite threshold needs no bound: -inf starts every element at +inf, a hit, and
// +inf (a row past Nq) at -inf, a miss. Smaller d (a key scale a millionth of the threshold)
// goes to the exact test.
__device__ __forceinline__ float folded_d_min(float tmax) { return fmaxf(FLT_MIN, tmax * 0x1p-20f); }
// The approximate test of the N blocks of a wgmma stage, each on best[b] = max over the thread's
// rows and columns of the block's folded accumulators (v = best - kBiasedZero): a hit when v >= 4,
// a miss when v < -4, unsure in between, as one word (bit b a hit, bit N + b unsure). Sound: with
// |t| <= 2^20 and the sum in range, |bias * rd| < 3 * 2^21, so rint(bias * rd) is within
// 1/2 + 3 * 2^21 * 2^-22 = 2 of b = rint(bias / d) (rd within 2^-22 relative), rint(thr * rd) within
// 1/2 + 2^-22 |t| of t, and fl((E + b) * d) > thr moves the boundary by 2^-23 |t|: all together
// below 3 < 4. A sum above range (v >= 2^22) needs bias * rd > 3 * 2^20 above t: a hit; below
// range: a miss. The bound needs d >= d_min; a stage with any block below it (a key scale below a
// millionth of the threshold) is unsure in every block, which the exact test then settles: one
// compare per block, and the bits come out of predicates without select chains.
constexpr int32_t kFoldedMargin = 4;
template <int N>
__device__ __forceinline__ uint32_t decide_blocks_cut(const int32_t (&best)[N], const float (&d)[N], float d_min) {
  bool ok = true;
  uint32_t word = 0;
#pragma unroll
  for (int b = 0; b < N; ++b) {
    ok &= d[b] >= d_min;
    word |= uint32_t(best[b] >= kBiasedZero + kFoldedMargin) << b;
    word |= uint32_t(uint32_t(best[b] - (kBiasedZero - kFoldedMargin)) < uint32_t(2 * kFoldedMargin)) << (N + b);
  }
  return ok ? word : ((1u << N) - 1u) << N;
}
// The second test of a row that the approximate test left unsure, before any per-element division.
// best = max over the row's columns of the accumulators, which started at cut_biased_bias(bias,
// rd, start) for an integer-valued start in [2^23, 2^24) (kBiasMagic, or row_cut's). In range,
// top = best - bits(start) is x' = E + B' for the row's largest column, B' = rint(bias * rd); with
// |B'| < 2^21, rd within 2^-23 relative puts bias * rd within 1/4 of bias / d, so B' is within 1 of
// b = rint(bias / d) and x' within 1 of x = E + b. The exact test fl(x * d) > thr is monotonic in the
// integer x, i.e. x >= c for the integer cut-off c of exact_row_cut: top >= c + 1 is a hit,
// top <= c - 2 a miss (any column of the row: x <= x' + 1 <= c - 1), and only top in {c - 1, c}
// needs each column's exact b. A best below bits(2^23) or from bits(2^24) on is a miss or a hit
// (its sum is out of range: |bias * rd - t| >= 2^22 - 1 with |t| <= 2^20 + 1, far from c; and a
// best pushed out of range by E is >= 2^22 - 2^20 - 1 from c on the same side). Needs a finite
// thr with |thr / d| <= 2^20 and d normal (d >= folded_d_min(|thr|)); otherwise kExact.
enum class RowVerdict { kMiss, kHit, kExact };
// Smallest integer x with fl(x * d) > thr, for |thr / d| <= 2^20 and d normal: thr * rd is within 1/4
// of thr / d, so c0 = floor(thr * rd) has c0 - 1 failing and c0 + 2 passing (fl moves x * d by
// less than d / 8), and two products as the exact test computes them settle it.
__device__ __forceinline__ int32_t exact_row_cut(float thr, float d, float rd) {
  const float c0 = floorf(thr * rd);
  return int32_t(c0) + (c0 * d > thr ? 0 : (c0 + 1.f) * d > thr ? 1 : 2);
}
__device__ __forceinline__ RowVerdict refine_row(int32_t best, float start, float thr, float d, float rd) {
  if (!(d >= folded_d_min(fabsf(thr)))) return RowVerdict::kExact;  // also an infinite thr
  constexpr int32_t kRangeLo = 0x4B000000, kRangeHi = 0x4B800000;  // bits of 2^23 and 2^24
  if (best < kRangeLo) return RowVerdict::kMiss;
  if (best >= kRangeHi) return RowVerdict::kHit;
  const int32_t top = best - __float_as_int(start), c = exact_row_cut(thr, d, rd);
  return top > c ? RowVerdict::kHit : top < c - 1 ? RowVerdict::kMiss : RowVerdict::kExact;
}

// The exact logit (code units) of one accumulator that started at cut_biased_bias(bias, rd, start):
// E = acc - start value exactly (integers), then E + b in fp32 with b = rint(bias / d), as the
// reference sums it.
__device__ __forceinline__ float exact_logit_units_cut(int32_t acc, float bias, float d, float rd, float start) {
  return float(acc - cut_biased_bias(bias, rd, start)) + rintf(__fdiv_rn(bias, d));
}

// The same for the mma.sync scorers' biased bias (start kBiasMagic).
__device__ __forceinline__ float exact_logit_units(int32_t acc, float bias, float d, float rd) {
  return exact_logit_units_cut(acc, bias, d, rd, kBiasMagic);
}

// The kept test of one candidate block in the mma.sync scorers (8-bit: candidate_kernel; int4:
// block_mask_sm80.cuh): acc = E + b~ of the warp's two m16 tiles, bj = this thread's column biases
// (column (nt, c) at bj[nt * 8 + c]), d = sq * sk per tile. The approximate test first; a block that
// no thread keeps surely and some thread is unsure about is decided again, row by row, by
// refine_row and, for rows it leaves open, per element. Returns the warp's verdict.
template <int kTiles>
__device__ __forceinline__ bool decide_block_mma(const int32_t (&acc)[2][kTiles][4], const float* bj,
                                                 const float (&d)[2], const float (&rd)[2],
                                                 const float (&thr)[2][2]) {
  bool hit = false, unsure = false;
  int32_t best[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    best[mt][0] = acc[mt][0][0], best[mt][1] = acc[mt][0][2];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      best[mt][0] = max3(best[mt][0], acc[mt][nt][0], acc[mt][nt][1]);
      best[mt][1] = max3(best[mt][1], acc[mt][nt][2], acc[mt][nt][3]);
    }
    approx_decide(best[mt], d[mt], rd[mt], thr[mt], hit, unsure);
  }
  // A block some thread keeps surely needs no second look.
  if (__any_sync(0xffffffffu, hit)) return true;
  if (!__any_sync(0xffffffffu, unsure)) return false;
  if (unsure) {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const RowVerdict v = refine_row(best[mt][r], kBiasMagic, thr[mt][r], d[mt], rd[mt]);
        if (v != RowVerdict::kExact) {
          hit |= v == RowVerdict::kHit;
          continue;
        }
        float exact = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c)
            exact = fmaxf(exact, exact_logit_units(acc[mt][nt][2 * r + c], bj[nt * 8 + c], d[mt], rd[mt]));
        hit |= exact * d[mt] > thr[mt][r];
      }
  }
  return __any_sync(0xffffffffu, hit);
}

// Per warp, warp-uniform: kept candidates in candidate order c = n - 1 (block n = 1 + c; the
// candidates are blocks 1 .. n_end - 1). Steps add `count` candidates at once, count dividing 32,
// so a step never straddles a word in c; a full word goes out as two atomics (mask bits n = 32 w + 1
// .. 32 w + 31 of word w and bit 0 of word w + 1).
struct KeptBits {
  uint32_t bits = 0;
  // Candidates c0 .. c0 + count - 1: bit i of warp_hits is candidate c0 + i (block c0 + 1 + i);
  // blocks from n_end on are not candidates and are dropped. Only the last step holds such bits
  // (c0 < n_end - 1 on every step), so they are cleared once, when the last word goes out.
  __device__ __forceinline__ void add(uint32_t warp_hits, int c0, int count, int n_end, uint32_t* words,
                                      int lane) {
    bits |= warp_hits << (c0 & 31);
    const bool last = c0 + count >= n_end - 1;
    if (((c0 + count) & 31) == 0 || last) {
      if (last) bits &= (2u << ((n_end - 2) & 31)) - 1u;  // candidates up to n_end - 2 in this word
      const int w = c0 >> 5;
      if (lane == 0 && (bits << 1) != 0) atomicOr(words + w, bits << 1);
      if (lane == 0 && (bits >> 31) != 0) atomicOr(words + w + 1, bits >> 31);
      bits = 0;
    }
  }
};

// mma.sync scorer. One CTA scores query block m of HEADS query heads that share a kv head
// (GQA), so every K tile staged in shared memory feeds HEADS * 64 rows; each warp owns 32 rows
// (two m16 tiles) of one head. A step scores one candidate block.
template <int D, int BK, int HEADS, bool VARLEN>
__global__ void __launch_bounds__(64 * HEADS, 8 / HEADS) candidate_kernel(const BlockMaskParams p) {
  constexpr int kThreadsC = 64 * HEADS;
  constexpr int kTiles = BK / 8;           // n8 tiles per step
  constexpr int kPad = 16;                 // bytes: rows land on distinct banks for ldmatrix
  constexpr int kCopies = BK * D / 16;     // 16-byte copies per step
  // Three stages: step s computes on stage s % 3 while s + 1 and s + 2 are in flight, so one
  // barrier per step suffices (the stage refilled at step s was last read at step s - 1).
  constexpr int kStages = 3;
  __shared__ __align__(16) int8_t ks[kStages][BK][D + kPad];
  __shared__ __align__(16) float sbias[kStages][HEADS][BK];  // qk_bias of the step's keys

  const CandidateCta cta = candidate_cta<HEADS, VARLEN>(p);
  const int m = cta.m, b = cta.b, hk = cta.hk, h0 = cta.h0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int h = h0 + warp / 2;
  const int64_t q_rows = q_rows_of<VARLEN>(p, cta.s, b, h);
  const int64_t k_rows = k_rows_of<VARLEN>(p, cta.s, b, hk, p.kv_heads);
  init_mask_rows<HEADS>(p, cta);
  uint32_t* words = mask_words(p, cta, h);
  // Candidates are blocks 1 .. first_window - 1: wholly before e - W, so every existing row of
  // the query block sees all of their keys, and all of their keys exist.
  const int n_end = cta.first_window;
  if (n_end <= 1) return;

  const int8_t* kc = p.k_codes + k_rows * D;
  auto load_step = [&](int key0, int buf) {
#pragma unroll
    for (int c = threadIdx.x; c < kCopies; c += kThreadsC) {
      const int key = c / (D / 16), col = (c % (D / 16)) * 16;
      cp_async_16(&ks[buf][key][col], kc + int64_t(key0 + key) * D + col, 16);
    }
    // Bias rows start anywhere (Nk may be odd): 4-byte copies.
    for (int c = threadIdx.x; c < HEADS * BK; c += kThreadsC) {
      // k_rows_of(.., h0 + c / BK, ..) + key, associated as the batched code always was (ptxas then
      // keeps its spill count; other groupings of the same sum spill more)
      const int64_t row = ((VARLEN ? 0 : int64_t(b) * p.q_heads) + h0 + c / BK) * key_rows_per_head<VARLEN>(p);
      cp_async_4(&sbias[buf][c / BK][c % BK], p.qk_bias + (row + cta.s.k0 + key0 + c % BK), 4);
    }
    cp_async_commit();
  };
  load_step(BK, 0);
  if (2 < n_end) load_step(2 * BK, 1);

  // A fragments (int8 query codes) of the warp's two m16 tiles.
  int rows[2][2];
  uint32_t a[2][D / 32][4];
  const int8_t* qc = p.q_codes + q_rows * D;
  const int nq = cta.s.nq;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    rows[mt][0] = m * kBq + (warp % 2) * 32 + mt * 16 + g;
    rows[mt][1] = rows[mt][0] + 8;
#pragma unroll
    for (int kk = 0; kk < D / 32; ++kk)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int r = 0; r < 2; ++r)
          a[mt][kk][half * 2 + r] = rows[mt][r] < nq
              ? *reinterpret_cast<const uint32_t*>(qc + int64_t(rows[mt][r]) * D + kk * 32 + half * 16 + 4 * t)
              : 0u;
  }
  float sq[2], thr[2][2];
  load_tile_rows(p, q_rows, nq, rows, sq, thr);
  const float* kscale = p.k_scale + k_rows + 2 * t;
  KeptBits kept;

  for (int n = 1, step = 0; n < n_end; ++n, ++step) {
    const int buf = step % kStages;
    if (n + 1 < n_end) cp_async_wait<1>();  // step s + 1's copies may stay in flight
    else cp_async_wait<0>();
    __syncthreads();  // stage s is visible to all; every warp is done with stage s - 1
    if (n + 2 < n_end) load_step((n + 2) * BK, (step + 2) % kStages);

    // Every column this thread holds is in key-scale group t of the block (SPEC §2), so one
    // d = sq * sk serves a (m16 tile, block) pair, and the kept test is
    // max_j (E_ij + b_ij) * d > T_i with b_ij = rint(bias_j / d) (d > 0: max before multiply).
    // The accumulators start at the biased b~_j, so the tensor cores add the bias and the
    // epilogue is one integer max per element.
    float d[2], rd[2];
    tile_block_scales(sq, kscale[n * BK], d, rd);
    const float* bj = &sbias[buf][warp / 2][2 * t];  // column (nt, c) at bj[nt * 8 + c]
    int32_t acc[2][kTiles][4];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
      const float2 bias = *reinterpret_cast<const float2*>(bj + nt * 8);
#pragma unroll
      for (int k4 = 0; k4 < D / 64; ++k4) {  // one ldmatrix.x4 = B for two k32 steps
        uint32_t bf[4];
        ldmatrix_x4(bf, &ks[buf][nt * 8 + (lane & 7)][k4 * 64 + (lane >> 3) * 16]);
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          if (k4 == 0) {
            mma_s8_16x8x32_from(acc[mt][nt], a[mt][0], {bf[0], bf[1]}, biased_bias(bias.x, rd[mt]),
                                biased_bias(bias.y, rd[mt]));
          } else {
            mma_s8_16x8x32(acc[mt][nt], a[mt][2 * k4], {bf[0], bf[1]});
          }
          mma_s8_16x8x32(acc[mt][nt], a[mt][2 * k4 + 1], {bf[2], bf[3]});
        }
      }
    }
    kept.add(decide_block_mma(acc, bj, d, rd, thr), n - 1, 1, n_end, words, lane);
  }
}

// Rows of the key-side buffers: codes and scales [B, Hkv, Nk] ([Hkv, total] packed), biases
// [B, Hq, Nk] ([Hq, total]).
inline int64_t key_side_rows(const BlockMaskParams& p, int heads) {
  return int64_t(heads) * (p.cu_seqlens_k != nullptr ? p.total_k : int64_t(p.batch) * p.nk);
}
// The wgmma scorer copies them with TMA, whose coordinates are int32 (plus a stage of slack).
inline bool key_rows_fit_tma(const BlockMaskParams& p) {
  return key_side_rows(p, max(p.q_heads, p.kv_heads)) + 1024 < (int64_t(1) << 31);
}
template <int D, int BK, int HEADS>
cudaError_t launch_candidate_ws(const BlockMaskParams& p, cudaStream_t stream);  // block_mask_sm90.cuh

// bool view [B, Hq, nQ, nK] of the bit-packed mask.
__global__ void expand_mask_kernel(const uint32_t* __restrict__ bits, bool* __restrict__ mask, int64_t rows, int nK,
                                   int nW) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * nK) return;
  const int64_t row = i / nK;
  const int n = int(i % nK);
  mask[i] = (bits[row * nW + n / 32] >> (n & 31)) & 1u;
}

inline cudaError_t launch_expand_mask(const uint32_t* bits, bool* mask, int64_t rows, int nK, int nW,
                                      cudaStream_t stream) {
  const int64_t total = rows * nK;
  if (total == 0) return cudaSuccess;
  expand_mask_kernel<<<unsigned((total + 255) / 256), 256, 0, stream>>>(bits, mask, rows, nK, nW);
  return cudaGetLastError();
}

// SPEC §4.4 alone with the mma.sync scorer (candidate_kernel, any GPU from sm_80 on), on the row
// thresholds already in p.row_threshold.
template <int D, int BK, bool VARLEN>
inline cudaError_t launch_candidates_mma(const BlockMaskParams& p, cudaStream_t stream) {
  const int heads = scorer_heads_per_cta(p.q_heads, p.kv_heads);
  const dim3 grid(p.nQ, p.q_heads / heads, p.batch);
  if (heads == 4) candidate_kernel<D, BK, 4, VARLEN><<<grid, 256, 0, stream>>>(p);
  else if (heads == 2) candidate_kernel<D, BK, 2, VARLEN><<<grid, 128, 0, stream>>>(p);
  else candidate_kernel<D, BK, 1, VARLEN><<<grid, 64, 0, stream>>>(p);
  return cudaGetLastError();
}

// SPEC §4.4 alone: the candidate scorer on the row thresholds already in p.row_threshold
// (launch_block_mask computes them first; kernel tests write their own).
template <int D, int BK>
inline cudaError_t launch_candidates(const BlockMaskParams& p, cudaStream_t stream) {
  if (p.use_wgmma && key_rows_fit_tma(p)) {
    const int heads = scorer_heads_per_cta(p.q_heads, p.kv_heads);
    if (heads == 4) return launch_candidate_ws<D, BK, 4>(p, stream);
    if (heads == 2) return launch_candidate_ws<D, BK, 2>(p, stream);
    return launch_candidate_ws<D, BK, 1>(p, stream);
  }
  return p.cu_seqlens_q != nullptr ? launch_candidates_mma<D, BK, true>(p, stream)
                                   : launch_candidates_mma<D, BK, false>(p, stream);
}

template <typename T, int D, int BK>
inline cudaError_t launch_block_mask_impl(const BlockMaskParams& p, cudaStream_t stream) {
  const cudaError_t err = launch_row_thresholds<T, D>(p, stream);
  return err != cudaSuccess ? err : launch_candidates<D, BK>(p, stream);
}

// Dispatch on dtype, head dim and key block; the caller validated them.
inline cudaError_t launch_block_mask(const BlockMaskParams& p, bool is_bf16, int head_dim, cudaStream_t stream) {
  return dispatch_dtype_dim_block(is_bf16, head_dim, p.bk, [&](auto type, auto dim, auto bk) {
    return launch_block_mask_impl<typename decltype(type)::type, decltype(dim)::value, decltype(bk)::value>(p, stream);
  });
}

}  // namespace sale
