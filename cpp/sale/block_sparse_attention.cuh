// SPEC §5 block-sparse attention on tensor cores (FlashAttention-2 style on mma.sync), torch-free.
//
// One CTA of 4 warps per (query block of 64 rows, query head, batch); warp w owns rows
// 16w .. 16w + 15 and keeps their Q fragments in registers. The CTA compacts its mask row into
// a list of kept key blocks in shared memory (kChunk entries at a time, in ascending order, so
// the summation order and hence the result is deterministic) and walks the list in tiles of 64
// keys: with bk = 32 a tile gathers two kept blocks wherever they lie, so every mma step works on
// a full 64-key tile. K and V tiles are cp.async double-buffered; the softmax is online, in
// fp32, with base-2 exponents and the scale folded in. Variable-length (packed) batches: see
// BlockSparseAttentionParams::cu_seqlens_q.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#include "sale/varlen.cuh"
#include "sale/warp_mma.cuh"

namespace sale {

struct BlockSparseAttentionParams {
  const void* q;  // [B, Hq, Nq, D] f16/bf16, rows 16-byte aligned, last dim contiguous
  const void* k;  // [B, Hkv, Nk, D]
  const void* v;  // [B, Hkv, Nk, D]
  int64_t q_batch_stride, q_head_stride, q_row_stride;  // in elements
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  // The block mask, either bool [B, Hq, nQ, nK] (any strides: expanded masks are fine) or, when
  // mask_packed, int32 words [B, Hq, nQ, ceil(nK / 32)] with bit n % 32 of word n / 32 = block n
  // (the estimator's output); strides in elements of the respective type.
  const void* mask;
  bool mask_packed;
  int64_t mask_batch_stride, mask_head_stride, mask_row_stride, mask_col_stride;
  void* out;   // [B, Hq, Nq, D] contiguous, dtype of q
  float* lse;  // [B, Hq, Nq] contiguous
  int batch, q_heads, kv_heads, nq, nk, nQ, nK;
  float scale;
  bool causal;  // bottom-right: row i sees keys j <= i + Nk - Nq
  // Variable-length batch (both or neither; nullptr: batched): sequence b is rows [cu[b], cu[b + 1])
  // of the packed q [total_q, Hq, D] and k, v [total_k, Hkv, D] (batch strides 0, causal alignment
  // per sequence); out is then [total_q, Hq, D] and lse [Hq, total_q]; nq, nk, nQ, nK are the
  // longest sequence's and the mask is [B, Hq, nQ, nK or words] as in the batched case.
  const int* cu_seqlens_q;
  const int* cu_seqlens_k;
  int64_t total_q;
};

namespace bsa {

// The epilogue both kernels share: a thread's rows row0 and row0 + 8 of out = O / l (0 for a row
// that saw nothing) and lse = ln sum exp(scale q.k). o(i), i = 4 dt + 2 r + c, is the accumulator
// of row row0 + 8r, column 8 dt + 2t + c (the mma/wgmma ownership); row_sum is this thread's part
// of l. O may carry a factor 1 / out_factor and l (with O) a factor 2^log2_shift, undone here.
// Rows are relative to the sequence s (sale/varlen.cuh); packed: the batch is variable-length.
template <typename T, int D, typename Acc>
__device__ __forceinline__ void store_output_rows(const BlockSparseAttentionParams& p, bool packed, const SeqSpan& s,
                                                  int b, int h, int row0, int t, const float (&row_sum)[2],
                                                  const float (&row_max)[2], float sl2, float out_factor,
                                                  float log2_shift, Acc&& o) {
  constexpr float kLn2 = 0.6931471805599453f;
  // out [B, Hq, Nq, D] batched, [total_q, Hq, D] packed; lse [B, Hq, Nq] / [Hq, total_q].
  const int64_t out_row_stride = packed ? int64_t(p.q_heads) * D : D;
  T* out = static_cast<T*>(p.out) +
           (packed ? (int64_t(s.q0) * p.q_heads + h) * D : (int64_t(b) * p.q_heads + h) * p.nq * D);
  float* lse = p.lse + rows_base(packed, b, h, p.q_heads, packed ? p.total_q : p.nq, s.q0);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    const float l = quad_sum(row_sum[r]);
    const float inv = l > 0.f ? out_factor / l : 0.f;
    if (row < s.nq) {
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt)
        *reinterpret_cast<uint32_t*>(out + int64_t(row) * out_row_stride + dt * 8 + 2 * t) =
            pack2<T>(o(dt * 4 + 2 * r) * inv, o(dt * 4 + 2 * r + 1) * inv);
      if (t == 0) lse[row] = l > 0.f ? fmaf(row_max[r] * sl2 - log2_shift, kLn2, logf(l)) : -INFINITY;
    }
  }
}


constexpr int kRows = 64;  // bq

// Whether the mask row starting at element `row` (bool or bit-packed, see the params) keeps key
// block n.
__device__ __forceinline__ bool mask_block_kept(const BlockSparseAttentionParams& p, int64_t row, int n) {
  if (p.mask_packed)
    return (static_cast<const uint32_t*>(p.mask)[row + (n >> 5) * p.mask_col_stride] >> (n & 31)) & 1u;
  return static_cast<const uint8_t*>(p.mask)[row + n * p.mask_col_stride] != 0;
}

// This CTA's sequence (sale/varlen.cuh): the batched shape, or its rows of the packed batch.
// VARLEN = false: known to be batched at compile time (addresses stay functions of parameters).
template <bool VARLEN>
__device__ __forceinline__ SeqSpan seq_of(const BlockSparseAttentionParams& p, int b) {
  if constexpr (VARLEN) return seq_span(p.cu_seqlens_q, p.cu_seqlens_k, b, p.nq, p.nk);
  return SeqSpan{0, 0, p.nq, p.nk};
}

// Key blocks of sequence s that query block m can see: all, or (causal) those starting before its
// last row's end.
__device__ __forceinline__ int visible_key_blocks(const BlockSparseAttentionParams& p, const SeqSpan& s, int m,
                                                  int bk) {
  const int n_blocks = (s.nk + bk - 1) / bk;
  return p.causal ? min(n_blocks, (min((m + 1) * kRows, s.nq) + s.nk - s.nq + bk - 1) / bk) : n_blocks;
}

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kKeys = 64;     // keys per tile
constexpr int kChunk = 2048;  // mask entries compacted per pass (a multiple of kThreads)
constexpr int kPad = 8;       // elements (16 bytes): 8 consecutive rows hit distinct banks in ldmatrix

template <typename T, int D>
struct Smem {
  T k[2][kKeys][D + kPad];
  T v[2][kKeys][D + kPad];
  int list[kChunk];         // kept key blocks of the current chunk, ascending
  int warp_count[2][kWarps];  // double-buffered so one barrier per compaction round suffices
};

template <typename T, int D, int BK, bool VARLEN>
__global__ void __launch_bounds__(kThreads, 2) block_sparse_attention_kernel(const BlockSparseAttentionParams p) {
  constexpr int kPer = kKeys / BK;     // kept blocks per tile
  constexpr int kRowChunks = D / 8;    // 16-byte pieces per row
  constexpr float kLog2e = 1.4426950408889634f;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem<T, D>& sm = *reinterpret_cast<Smem<T, D>*>(smem_raw);

  const int m = p.nQ - 1 - blockIdx.x;  // heaviest (causal: last) query blocks first
  const int h = blockIdx.y, b = blockIdx.z;
  const SeqSpan sp = seq_of<VARLEN>(p, b);
  if (VARLEN && m * kRows >= sp.nq) return;  // past its sequence's end: no rows
  const int nq = sp.nq, nk = sp.nk;
  const int hk = h / (p.q_heads / p.kv_heads);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int row0 = m * kRows + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
  const int shift = nk - nq;                   // causal: row i sees keys j <= i + shift

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + sp.q0 * p.q_row_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride + sp.k0 * p.k_row_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride + sp.k0 * p.v_row_stride;
  const int64_t mask_row = b * p.mask_batch_stride + h * p.mask_head_stride + m * p.mask_row_stride;

  // A fragments of the warp's 16 query rows (rows past Nq are zero: finite, never stored).
  uint32_t qa[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int half = 0; half < 2; ++half)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = row0 + 8 * r;
        qa[kk][half * 2 + r] =
            row < nq ? *reinterpret_cast<const uint32_t*>(q + row * p.q_row_stride + kk * 16 + half * 8 + 2 * t) : 0u;
      }

  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};  // row_sum: this thread's part
  const float sl2 = p.scale * kLog2e;

  // Causal: blocks starting at or past the last row's end are invisible to the whole query block.
  const int n_end = visible_key_blocks(p, sp, m, BK);
  const int first_row_end = m * kRows + shift;  // last key the block's first row sees

  for (int c0 = 0; c0 < n_end; c0 += kChunk) {
    const int c1 = min(c0 + kChunk, n_end);
    // Stream compaction of mask[c0, c1): one entry per thread per round, ballot + warp counts.
    int count = 0;
    for (int base = c0, round = 0; base < c1; base += kThreads, ++round) {
      const int n = base + tid;
      const bool kept = n < c1 && mask_block_kept(p, mask_row, n);
      const unsigned ballot = __ballot_sync(0xffffffffu, kept);
      if (lane == 0) sm.warp_count[round & 1][warp] = __popc(ballot);
      __syncthreads();
      int before = count, total = 0;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const int cw = sm.warp_count[round & 1][w];
        total += cw;
        before += w < warp ? cw : 0;
      }
      if (kept) sm.list[before + __popc(ballot & ((1u << lane) - 1u))] = n;
      count += total;
    }
    __syncthreads();
    const int tiles = (count + kPer - 1) / kPer;

    // Tile `tile` = list entries [tile * kPer, tile * kPer + kPer); missing blocks and keys past
    // Nk are zero-filled (P = 0 times V = 0: no NaN from stale shared memory).
    auto load_tile = [&](int tile, int buf) {
#pragma unroll
      for (int c = tid; c < kKeys * kRowChunks; c += kThreads) {
        const int slot = c / kRowChunks, col = (c % kRowChunks) * 8;
        const int e = tile * kPer + slot / BK;
        const int key = e < count ? sm.list[e] * BK + slot % BK : nk;
        const bool in = key < nk;
        cp_async_16(&sm.k[buf][slot][col], k + (in ? key * p.k_row_stride + col : 0), in ? 16 : 0);
        cp_async_16(&sm.v[buf][slot][col], v + (in ? key * p.v_row_stride + col : 0), in ? 16 : 0);
      }
      cp_async_commit();
    };
    if (tiles > 0) load_tile(0, 0);

    for (int it = 0; it < tiles; ++it) {
      const int buf = it & 1;
      if (it + 1 < tiles) {
        load_tile(it + 1, buf ^ 1);
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();

      // S = Q K^T for the warp's 16 rows x 64 keys; one ldmatrix.x4 = B of two n8 tiles.
      float s[kKeys / 8][4];
#pragma unroll
      for (int i = 0; i < kKeys / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
        for (int np = 0; np < kKeys / 16; ++np) {
          uint32_t bf[4];
          ldmatrix_x4(bf, &sm.k[buf][np * 16 + (lane & 7) + (lane >> 4) * 8][kk * 16 + ((lane >> 3) & 1) * 8]);
          mma_16x8x16<T>(s[2 * np], qa[kk], {bf[0], bf[1]});
          mma_16x8x16<T>(s[2 * np + 1], qa[kk], {bf[2], bf[3]});
        }

      // Element masks only on tiles that need them: a missing block, keys past Nk, or keys past
      // the first row's causal end.
      int key0[kPer];
      bool need_mask = false;
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int e = it * kPer + i;
        key0[i] = e < count ? sm.list[e] * BK : nk;
        need_mask |= key0[i] + BK > nk || (p.causal && key0[i] + BK - 1 > first_row_end);
      }
      if (need_mask) {
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int j = key0[nt * 8 / BK] + (nt * 8) % BK + 2 * t + c;
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const bool visible = j < nk && (!p.causal || j <= row0 + 8 * r + shift);
              if (!visible) s[nt][2 * r + c] = -INFINITY;
            }
          }
      }

      // Online softmax. A row with nothing visible yet keeps max -inf: its exponent base is
      // taken as 0 so every term is exp2(-inf) = 0, never (-inf) - (-inf).
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = row_max[r];
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = quad_max(mx);
        const float base = mx == -INFINITY ? 0.f : mx * sl2;
        const float alpha = fast_exp2(row_max[r] * sl2 - base);
        row_max[r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kKeys / 8; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float e = fast_exp2(fmaf(s[nt][2 * r + c], sl2, -base));
            s[nt][2 * r + c] = e;
            sum += e;
          }
        row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          acc[dt][2 * r] *= alpha;
          acc[dt][2 * r + 1] *= alpha;
        }
      }

      // O += P V: the S accumulators of n8 tiles 2kk, 2kk + 1 are the A fragment of k16 step kk.
      // P goes in as hi + lo parts of the input dtype (two mma on the same V fragments): SPEC §7
      // bounds every element by the input-dtype reference's own error, which can be ~0, so the
      // output must round like the exact result; P rounded once to bf16 (2^-9) is too coarse.
#pragma unroll
      for (int kk = 0; kk < kKeys / 16; ++kk) {
        uint32_t hi[4], lo[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)  // a_i: row g + 8 (i % 2), n8 tile 2kk + i / 2
          pack2_split<T>(s[2 * kk + i / 2][2 * (i % 2)], s[2 * kk + i / 2][2 * (i % 2) + 1], hi[i], lo[i]);
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          uint32_t bf[4];
          ldmatrix_x4_trans(bf, &sm.v[buf][kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8][dp * 16 + (lane >> 4) * 8]);
          mma_16x8x16<T>(acc[2 * dp], hi, {bf[0], bf[1]});
          mma_16x8x16<T>(acc[2 * dp + 1], hi, {bf[2], bf[3]});
          mma_16x8x16<T>(acc[2 * dp], lo, {bf[0], bf[1]});
          mma_16x8x16<T>(acc[2 * dp + 1], lo, {bf[2], bf[3]});
        }
      }
      __syncthreads();  // this buffer (and the list, after the last tile) is overwritten next
    }
  }

  // Epilogue: out = acc / l (0 for a row that saw nothing), lse = ln sum exp(scale q.k).
  store_output_rows<T, D>(p, VARLEN, sp, b, h, row0, t, row_sum, row_max, sl2, 1.f, 0.f,
                          [&](int i) { return acc[i / 4][i % 4]; });
}

template <typename T, int D, int BK>
inline cudaError_t launch_block_sparse_attention_impl(const BlockSparseAttentionParams& p, cudaStream_t stream) {
  auto kernel = p.cu_seqlens_q != nullptr ? block_sparse_attention_kernel<T, D, BK, true>
                                          : block_sparse_attention_kernel<T, D, BK, false>;
  constexpr int smem = int(sizeof(Smem<T, D>));
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(p.nQ, p.q_heads, p.batch), kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bsa

// Dispatch on dtype (is_bf16), head dim (64/128) and key block (32/64); the caller validated
// them (bq = 64, Hq % Hkv == 0, rows 16-byte aligned, grid limits).
inline cudaError_t launch_block_sparse_attention(const BlockSparseAttentionParams& p, bool is_bf16, int head_dim,
                                                 int bk, cudaStream_t stream) {
  return dispatch_dtype_dim_block(is_bf16, head_dim, bk, [&](auto type, auto dim, auto block) {
    return bsa::launch_block_sparse_attention_impl<typename decltype(type)::type, decltype(dim)::value,
                                                   decltype(block)::value>(p, stream);
  });
}

}  // namespace sale
