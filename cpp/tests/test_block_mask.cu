// Kernel test of sale/block_mask.cuh (both candidate scorers) against a plain C++ host
// implementation of SPEC §3-4, without libtorch. Built twice: for sm_90a (the mma.sync and wgmma
// scorers) and, with SALE_TEST_SM8X, as compute_80 PTX (the mma.sync and int4 scorers of the sm8x
// path; block_mask_sm80.cuh), which later GPUs run through the driver's JIT. The quantized inputs are drawn directly (codes,
// group scales, bias, key mean): the selection must be right for any of them. Exits 77 (CTest:
// skipped) when there is no usable CUDA device.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "sale/block_mask.cuh"
#ifdef SALE_TEST_SM8X
#include "sale/block_mask_sm80.cuh"
#else
#include "sale/block_mask_sm90.cuh"
#endif
#include "test_common.cuh"


namespace {

struct Case {
  bool bf16;
  int D, bk, window, b, hkv, g, nq, nk;
};

using sale_test::to_device;
using sale_test::uniform;

// Rounds x to the input dtype and returns (bits, rounded value).
uint16_t to_bits(float x, bool bf16, float* rounded) {
  const uint16_t u = sale_test::to_bits(x, !bf16);
  *rounded = sale_test::from_bits(u, !bf16);
  return u;
}

#ifdef SALE_TEST_SM8X
// The two scorers of the sm8x build: 0 = the 8-bit mma.sync scorer, 1 = the int4 scorer.
// k_packed: scratch for the packed key codes.
cudaError_t launch_scorer(const sale::BlockMaskParams& p, int which, bool bf16, int D, uint8_t* k_packed) {
  if (which == 1) return sale::launch_block_mask_s4(p, k_packed, bf16, D, nullptr);
  return sale::launch_block_mask_s8(p, bf16, D, nullptr);
}
constexpr const char* kScorerNames[2] = {"mma.sync s8", "int4 mma.sync s4"};
// The scorer alone, on the row thresholds in p.row_threshold.
cudaError_t launch_candidates_only(const sale::BlockMaskParams& p, int which, int D, uint8_t* k_packed) {
  return sale::dispatch_dtype_dim_block(false, D, p.bk, [&](auto, auto dim, auto bk) {
    constexpr int kD = decltype(dim)::value, kBk = decltype(bk)::value;
    return which == 1 ? sale::launch_candidates_s4<kD, kBk>(p, k_packed, nullptr)
                      : sale::launch_candidates_mma<kD, kBk, false>(p, nullptr);
  });
}

// Host check of the nibble packing (no GPU needed): for every four codes in [-8, 7], nibble e of
// pack_nibbles is code e as a 4-bit two's complement value, which is what the s4 MMA reads.
bool packing_ok() {
  for (uint32_t w = 0; w < (1u << 16); ++w) {
    int codes[4];
    uint32_t bytes = 0;
    for (int e = 0; e < 4; ++e) {
      codes[e] = int((w >> (4 * e)) & 15u) - 8;
      bytes |= uint32_t(uint8_t(int8_t(codes[e]))) << (8 * e);
    }
    const uint32_t packed = sale::s4::pack_nibbles(bytes);
    if (packed >> 16) return false;
    for (int e = 0; e < 4; ++e) {
      const int nibble = int((packed >> (4 * e)) & 15u);
      if ((nibble >= 8 ? nibble - 16 : nibble) != codes[e]) {
        std::printf("FAIL: packing codes (%d, %d, %d, %d) gave 0x%04x\n", codes[0], codes[1], codes[2], codes[3],
                    packed);
        return false;
      }
    }
  }
  std::printf("ok   nibble packing of all 65536 code quadruples\n");
  return true;
}
#else
// 0 = the mma.sync scorer, 1 = the wgmma scorer.
cudaError_t launch_scorer(sale::BlockMaskParams p, int which, bool bf16, int D, uint8_t*) {
  p.use_wgmma = which == 1;
  return sale::launch_block_mask(p, bf16, D, nullptr);
}
constexpr const char* kScorerNames[2] = {"mma.sync", "wgmma"};
cudaError_t launch_candidates_only(sale::BlockMaskParams p, int which, int D, uint8_t*) {
  p.use_wgmma = which == 1;
  return sale::dispatch_dtype_dim_block(false, D, p.bk, [&](auto, auto dim, auto bk) {
    return sale::launch_candidates<decltype(dim)::value, decltype(bk)::value>(p, nullptr);
  });
}
#endif

// Codes in [-7, 7], scales constant on SPEC §2's groups (rows 16a + r and 16a + 8 + r; keys with
// the same (o mod 8) div 2 in a block), and qk_bias [B, Hq, Nk].
struct Quantized {
  std::vector<int8_t> qc, kc;
  std::vector<float> qs, ks, bias;
};
Quantized draw_quantized(const Case& c) {
  const int hq = c.hkv * c.g;
  Quantized z;
  z.qc.resize(size_t(c.b) * hq * c.nq * c.D);
  z.kc.resize(size_t(c.b) * c.hkv * c.nk * c.D);
  for (auto& x : z.qc) x = int8_t(std::lround(7.f * uniform()));
  for (auto& x : z.kc) x = int8_t(std::lround(7.f * uniform()));
  z.qs.resize(size_t(c.b) * hq * c.nq);
  z.ks.resize(size_t(c.b) * c.hkv * c.nk);
  for (size_t bh = 0; bh < z.qs.size() / c.nq; ++bh)
    for (int a = 0; a < c.nq; a += 16)
      for (int r = 0; r < 8; ++r) {
        const float s = 0.05f + 0.1f * (uniform() + 1.f);
        for (int row : {a + r, a + 8 + r})
          if (row < c.nq) z.qs[bh * c.nq + row] = s;
      }
  for (size_t bh = 0; bh < z.ks.size() / c.nk; ++bh)
    for (int blk = 0; blk < c.nk; blk += c.bk)
      for (int grp = 0; grp < 4; ++grp) {
        const float s = 0.05f + 0.1f * (uniform() + 1.f);
        for (int o = 0; o < c.bk; ++o)
          if ((o % 8) / 2 == grp && blk + o < c.nk) z.ks[bh * c.nk + blk + o] = s;
      }
  z.bias.resize(size_t(c.b) * hq * c.nk);
  for (auto& x : z.bias) x = 3.f * uniform();
  return z;
}

// Reads the device mask words back and counts the bits that differ from want ([rows, nK], one
// byte per block); bits past nK must be 0.
int count_differing(const uint32_t* dbits, size_t words, int nW, int nK, const std::vector<uint8_t>& want) {
  std::vector<uint32_t> bits(words);
  CUDA_OK(cudaMemcpy(bits.data(), dbits, words * sizeof(uint32_t), cudaMemcpyDeviceToHost));
  int differ = 0;
  for (size_t row = 0; row < words / nW; ++row)
    for (int n = 0; n < 32 * nW; ++n)
      differ += ((bits[row * nW + n / 32] >> (n % 32)) & 1u) != (n < nK ? want[row * nK + n] : 0u);
  return differ;
}

#ifndef SALE_TEST_SM8X
// sale.select's mode of the wgmma scorer: no stored query codes, each CTA makes them from q, the
// query means and q_scale. With codes computed here from the same q, means and scales (SPEC §2's
// formula in fp32: correctly rounded quotient, round half to even, clamp), the stored-codes run and
// the codes-made-in-the-scorer run must keep exactly the same blocks. Returns the blocks that differ.
int check_codes_made_in_scorer(const Case& c, sale::BlockMaskParams p, const std::vector<float>& q,
                               const std::vector<float>& qs, size_t words, int nW, int nK) {
  const int hq = c.hkv * c.g, D = c.D;
  std::vector<float> q_mean(size_t(c.b) * hq * D);
  for (auto& x : q_mean) x = 0.3f * uniform();
  std::vector<int8_t> codes(q.size());
  for (size_t i = 0; i < q.size(); ++i) {
    const size_t row = i / D, bh = row / c.nq;
    const float x = (q[i] - q_mean[bh * D + i % D]) / qs[row];
    codes[i] = int8_t(std::min(7.f, std::max(-7.f, std::nearbyint(x))));
  }
  int8_t* dcodes = to_device(codes);
  float* dmean = to_device(q_mean);
  p.q_codes = dcodes;
  p.q_bf16 = c.bf16;
  CUDA_OK(launch_scorer(p, 1, c.bf16, D, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  std::vector<uint32_t> stored(words);
  CUDA_OK(cudaMemcpy(stored.data(), p.mask_bits, words * sizeof(uint32_t), cudaMemcpyDeviceToHost));
  std::vector<uint8_t> want(words / nW * nK);
  for (size_t row = 0; row < words / nW; ++row)
    for (int n = 0; n < nK; ++n) want[row * nK + n] = (stored[row * nW + n / 32] >> (n % 32)) & 1u;
  p.q_codes = nullptr;
  p.q_mean = dmean;
  CUDA_OK(cudaMemset(p.mask_bits, 0x55, words * sizeof(uint32_t)));
  CUDA_OK(launch_scorer(p, 1, c.bf16, D, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const int differ = count_differing(p.mask_bits, words, nW, nK, want);
  if (differ) std::printf("  query codes made in the wgmma scorer: %d blocks differ from stored codes\n", differ);
  CUDA_OK(cudaFree(dcodes));
  CUDA_OK(cudaFree(dmean));
  return differ;
}
#endif

// Returns the number of blocks that differ from the host reference beyond SPEC §7's near-tie
// tolerance; near ties are counted in *near.
int run_case(const Case& c, int* near, int* candidates, bool* scorers_agree) {
  const int hq = c.hkv * c.g, D = c.D, bq = 64;
  const int nQ = (c.nq + bq - 1) / bq, nK = (c.nk + c.bk - 1) / c.bk;
  const float scale = 1.f / std::sqrt(float(D));
  // Inputs: a shared direction makes a few heavy keys dominate, so selection is non-trivial.
  std::vector<float> dir(D);
  for (auto& x : dir) x = 1.5f * uniform();
  std::vector<uint16_t> q_bits(size_t(c.b) * hq * c.nq * D), k_bits(size_t(c.b) * c.hkv * c.nk * D);
  std::vector<float> q(q_bits.size()), k(k_bits.size());
  for (size_t i = 0; i < q.size(); ++i) q_bits[i] = to_bits(uniform() + dir[i % D], c.bf16, &q[i]);
  for (size_t r = 0; r < k.size() / D; ++r) {
    const bool heavy = uniform() > 0.97f;
    for (int d = 0; d < D; ++d) k_bits[r * D + d] = to_bits(uniform() + (heavy ? dir[d] : 0.f), c.bf16, &k[r * D + d]);
  }
  const Quantized qz = draw_quantized(c);
  const std::vector<int8_t>&qc = qz.qc, &kc = qz.kc;
  const std::vector<float>&qs = qz.qs, &ks = qz.ks, &bias = qz.bias;
  std::vector<float> kmean(size_t(c.b) * c.hkv * D), tau(hq);
  for (auto& x : kmean) x = 0.2f * uniform();
  const float taus[] = {0.f, 1e-4f, 1e-3f, 1e-2f, 0.1f, 1e30f};
  for (int h = 0; h < hq; ++h) tau[h] = taus[h % 6];

  // Host reference (SPEC §4): exact statistics in double, the estimate in fp32 as the spec writes it.
  std::vector<uint8_t> want(size_t(c.b) * hq * nQ * nK);
  std::vector<double> margin(want.size()), tmag(want.size());
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < hq; ++h) {
      const int hk = h / c.g;
      const float* kb = &k[(size_t(b) * c.hkv + hk) * c.nk * D];
      const float* km = &kmean[(size_t(b) * c.hkv + hk) * D];
      for (int m = 0; m < nQ; ++m) {
        const int e = std::min((m + 1) * bq, c.nq) + (c.nk - c.nq);
        const int first = std::max(0, e - c.window) / c.bk, last = (e - 1) / c.bk;
        const size_t row_off = ((size_t(b) * hq + h) * nQ + m) * nK;
        std::vector<double> T;
        for (int i = m * bq; i < std::min((m + 1) * bq, c.nq); ++i) {
          const float* qi = &q[((size_t(b) * hq + h) * c.nq + i) * D];
          double mx = -INFINITY;
          std::vector<double> s;
          for (int j = 0; j <= i + c.nk - c.nq; ++j) {
            const int n = j / c.bk;
            if (n != 0 && (n < first || n > last)) continue;
            double v = 0;
            for (int d = 0; d < D; ++d) v += double(qi[d]) * (double(kb[size_t(j) * D + d]) - km[d]);
            s.push_back(v);
            mx = std::max(mx, v);
          }
          double l = 0;
          for (double v : s) l += std::exp(double(scale) * (v - mx));
          T.push_back(tau[h] > 0 ? mx + std::log(double(tau[h]) * l) / scale : -INFINITY);
        }
        for (int n = 0; n < nK; ++n) {
          const bool dense = n == 0 || (n >= first && n <= last);
          want[row_off + n] = dense;
          margin[row_off + n] = dense ? INFINITY : -INFINITY;
          if (dense || n * c.bk >= e) continue;
          double best = -INFINITY, tm = 0;
          for (int i = m * bq; i < std::min((m + 1) * bq, c.nq); ++i) {
            const size_t qrow = (size_t(b) * hq + h) * c.nq + i;
            tm = std::max(tm, std::isfinite(T[i - m * bq]) ? std::fabs(T[i - m * bq]) : 0.0);
            for (int j = n * c.bk; j < std::min((n + 1) * c.bk, c.nk); ++j) {
              if (j > i + c.nk - c.nq) continue;
              const size_t krow = (size_t(b) * c.hkv + hk) * c.nk + j;
              int E = 0;
              for (int d = 0; d < D; ++d) E += int(qc[qrow * D + d]) * int(kc[krow * D + d]);
              const float den = qs[qrow] * ks[krow];
              const float bb = std::nearbyint(bias[(size_t(b) * hq + h) * c.nk + j] / den);
              const float est = (float(E) + bb) * den;
              best = std::max(best, double(est) - T[i - m * bq]);
            }
          }
          margin[row_off + n] = best;
          tmag[row_off + n] = tm;
          want[row_off + n] = best > 0;
          ++*candidates;
        }
      }
    }

  sale::BlockMaskParams p{};
  uint16_t* dq = to_device(q_bits);
  uint16_t* dk = to_device(k_bits);
  int8_t* dqc = to_device(qc);
  int8_t* dkc = to_device(kc);
  float *dqs = to_device(qs), *dks = to_device(ks), *dbias = to_device(bias), *dkm = to_device(kmean),
        *dtau = to_device(tau);
  float* dthr = nullptr;
  const int nW = (nK + 31) / 32;
  const size_t words = size_t(c.b) * hq * nQ * nW;
  uint32_t* dbits = nullptr;
  CUDA_OK(cudaMalloc(&dthr, qs.size() * sizeof(float)));
  CUDA_OK(cudaMalloc(&dbits, words * sizeof(uint32_t)));
  p.q = dq, p.k = dk;
  p.q_batch_stride = int64_t(hq) * c.nq * D, p.q_head_stride = int64_t(c.nq) * D, p.q_row_stride = D;
  p.k_batch_stride = int64_t(c.hkv) * c.nk * D, p.k_head_stride = int64_t(c.nk) * D, p.k_row_stride = D;
  p.q_codes = dqc, p.q_scale = dqs, p.k_codes = dkc, p.k_scale = dks, p.qk_bias = dbias, p.k_mean = dkm;
  p.tau = dtau, p.row_threshold = dthr, p.mask_bits = dbits;
  p.batch = c.b, p.q_heads = hq, p.kv_heads = c.hkv, p.nq = c.nq, p.nk = c.nk, p.bk = c.bk;
  p.window = c.window, p.nQ = nQ, p.nK = nK, p.nW = nW, p.scale = scale;

  uint8_t* dpacked = nullptr;
  CUDA_OK(cudaMalloc(&dpacked, kc.size() / 2 + 16));
  std::vector<uint8_t> got[2];
  int bad = 0;
  for (int w = 0; w < 2; ++w) {
    CUDA_OK(cudaMemset(dbits, 0x55, words * sizeof(uint32_t)));  // poison: every word must be written
    CUDA_OK(launch_scorer(p, w, c.bf16, D, dpacked));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<uint32_t> bits(words);
    CUDA_OK(cudaMemcpy(bits.data(), dbits, words * sizeof(uint32_t), cudaMemcpyDeviceToHost));
    got[w].resize(want.size());
    for (size_t row = 0; row < words / nW; ++row) {
      for (int n = 0; n < nK; ++n) got[w][row * nK + n] = (bits[row * nW + n / 32] >> (n % 32)) & 1u;
      for (int n = nK; n < 32 * nW; ++n) bad += (bits[row * nW + n / 32] >> (n % 32)) & 1u;  // bits past nK stay 0
    }
  }
  *scorers_agree = got[0] == got[1];
  // One head: [B, 1, N, ...] is also the packed [B * N, 1, ...] of B sequences of equal length (per-row
  // buffers [1, B * N]), so the variable-length path (cu_seqlens) must keep exactly the same blocks.
#ifndef SALE_TEST_SM8X  // packed batches have Hopper kernels only
  if (hq == 1) {
    std::vector<int> cu_q(c.b + 1), cu_k(c.b + 1);
    for (int b = 0; b <= c.b; ++b) cu_q[b] = b * c.nq, cu_k[b] = b * c.nk;
    sale::BlockMaskParams pv = p;
    pv.cu_seqlens_q = to_device(cu_q), pv.cu_seqlens_k = to_device(cu_k);
    pv.total_q = int64_t(c.b) * c.nq, pv.total_k = int64_t(c.b) * c.nk;
    pv.q_batch_stride = pv.k_batch_stride = 0;
    for (int w = 0; w < 2; ++w) {
      pv.use_wgmma = w == 1;
      CUDA_OK(cudaMemset(dbits, 0x55, words * sizeof(uint32_t)));
      CUDA_OK(sale::launch_block_mask(pv, c.bf16, D, nullptr));
      CUDA_OK(cudaDeviceSynchronize());
      const int differ = count_differing(dbits, words, nW, nK, got[w]);
      if (differ) std::printf("  packed (cu_seqlens) path, %s scorer: %d blocks differ\n", w ? "wgmma" : "mma", differ);
      bad += differ;
    }
    CUDA_OK(cudaFree(const_cast<int*>(pv.cu_seqlens_q)));
    CUDA_OK(cudaFree(const_cast<int*>(pv.cu_seqlens_k)));
  }
  bad += check_codes_made_in_scorer(c, p, q, qs, words, nW, nK);
#endif
  for (size_t i = 0; i < want.size(); ++i) {
    if (got[0][i] == want[i]) continue;
    if (std::fabs(margin[i]) <= 1e-3 * (1 + tmag[i])) ++*near;
    else ++bad;
  }
  for (void* ptr : {(void*)dq, (void*)dk, (void*)dqc, (void*)dkc, (void*)dqs, (void*)dks, (void*)dbias, (void*)dkm,
                    (void*)dtau, (void*)dthr, (void*)dbits, (void*)dpacked})
    CUDA_OK(cudaFree(ptr));
  return bad;
}

// SPEC §4.4's strict test at its boundary. Row thresholds are written here (no exact statistics)
// on the estimate's own values: for each row, x = E + b of its largest estimate over the candidate
// blocks (d = sq * sk there) gives T = fl((x + o) * d) for o in -3 .. 3, the float just below
// fl(x * d), or the midpoint of fl(x * d) and fl((x + 1) * d); a few rows get +-inf or +-1e30. So
// most blocks sit inside the scorers' approximate band (+-4 code units) and are decided by
// refine_row or per element. Both
// scorers must keep exactly the blocks a host evaluation of fl((E + b) * d) > T keeps: no
// tolerance.
int run_boundary_case(const Case& c, int* candidates, int* kept) {
  const int hq = c.hkv * c.g, D = c.D, bq = 64;
  const int nQ = (c.nq + bq - 1) / bq, nK = (c.nk + c.bk - 1) / c.bk;
  const Quantized qz = draw_quantized(c);
  // x = E + b and d of every (row, candidate key) pair, as the host sees them.
  auto estimate = [&](int b, int h, int i, int j, float* d) {
    const size_t qrow = (size_t(b) * hq + h) * c.nq + i, krow = (size_t(b) * c.hkv + h / c.g) * c.nk + j;
    int E = 0;
    for (int e = 0; e < D; ++e) E += int(qz.qc[qrow * D + e]) * int(qz.kc[krow * D + e]);
    *d = qz.qs[qrow] * qz.ks[krow];
    return float(E) + std::nearbyint(qz.bias[(size_t(b) * hq + h) * c.nk + j] / *d);
  };
  auto first_window = [&](int m) {
    const int e = std::min((m + 1) * bq, c.nq) + (c.nk - c.nq);
    return std::max(0, e - c.window) / c.bk;  // candidates: blocks 1 .. first_window - 1
  };
  std::vector<float> thr(qz.qs.size(), INFINITY);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < hq; ++h)
      for (int i = 0; i < c.nq; ++i) {
        const int n_end = first_window(i / bq);
        float best = -INFINITY, best_x = 0.f, best_d = 1.f;
        for (int j = c.bk; j < n_end * c.bk; ++j) {
          float d;
          const float x = estimate(b, h, i, j, &d);
          if (x * d > best) best = x * d, best_x = x, best_d = d;
        }
        // About one row in ten keeps its best block (below the boundary), the rest keep nothing
        // (on or above it), so a block's verdict rests on one or two rows' close calls.
        float& t = thr[(size_t(b) * hq + h) * c.nq + i];
        const int pick = int((uniform() + 1.f) * 50.f);  // 0 .. 99
        const float at = best_x * best_d;
        if (i % 509 == 5 || i % 97 == 3) t = i % 509 == 5 ? -INFINITY : INFINITY;
        else if (i % 509 == 6 || i % 97 == 4) t = i % 509 == 6 ? -1e30f : 1e30f;
        else if (n_end <= 1) t = INFINITY;
        else if (pick < 4) t = std::nextafter(at, -INFINITY);
        else if (pick < 10) t = (best_x - float(1 + pick % 3)) * best_d;  // one to three code units below
        else if (pick < 25) t = 0.5f * (at + (best_x + 1.f) * best_d);
        else if (pick < 55) t = at;
        else t = (best_x + float(1 + pick % 3)) * best_d;
      }
  std::vector<uint8_t> want(size_t(c.b) * hq * nQ * nK, 0);
  for (int b = 0; b < c.b; ++b)
    for (int h = 0; h < hq; ++h)
      for (int m = 0; m < nQ; ++m) {
        const int e = std::min((m + 1) * bq, c.nq) + (c.nk - c.nq), n_end = first_window(m);
        const size_t row_off = ((size_t(b) * hq + h) * nQ + m) * nK;
        for (int n = 0; n < nK; ++n) want[row_off + n] = n * c.bk < e && (n == 0 || n >= n_end);
        for (int n = 1; n < n_end; ++n) {
          bool hit = false;
          for (int i = m * bq; i < std::min((m + 1) * bq, c.nq) && !hit; ++i)
            for (int j = n * c.bk; j < (n + 1) * c.bk && !hit; ++j) {
              float d;
              const float x = estimate(b, h, i, j, &d);
              hit = x * d > thr[(size_t(b) * hq + h) * c.nq + i];
            }
          want[row_off + n] = hit;
          ++*candidates;
          *kept += hit;
        }
      }

  sale::BlockMaskParams p{};
  int8_t *dqc = to_device(qz.qc), *dkc = to_device(qz.kc);
  float *dqs = to_device(qz.qs), *dks = to_device(qz.ks), *dbias = to_device(qz.bias), *dthr = to_device(thr);
  const int nW = (nK + 31) / 32;
  const size_t words = size_t(c.b) * hq * nQ * nW;
  uint32_t* dbits = nullptr;
  uint8_t* dpacked = nullptr;
  CUDA_OK(cudaMalloc(&dbits, words * sizeof(uint32_t)));
  CUDA_OK(cudaMalloc(&dpacked, qz.kc.size() / 2 + 16));
  p.q_codes = dqc, p.q_scale = dqs, p.k_codes = dkc, p.k_scale = dks, p.qk_bias = dbias;
  p.row_threshold = dthr, p.mask_bits = dbits;
  p.batch = c.b, p.q_heads = hq, p.kv_heads = c.hkv, p.nq = c.nq, p.nk = c.nk, p.bk = c.bk;
  p.window = c.window, p.nQ = nQ, p.nK = nK, p.nW = nW;
  int bad = 0;
  for (int w = 0; w < 2; ++w) {
    CUDA_OK(cudaMemset(dbits, 0x55, words * sizeof(uint32_t)));
    CUDA_OK(launch_candidates_only(p, w, D, dpacked));
    CUDA_OK(cudaDeviceSynchronize());
    const int differ = count_differing(dbits, words, nW, nK, want);
    if (differ) std::printf("  %s scorer: %d blocks differ from the host\n", kScorerNames[w], differ);
    bad += differ;
  }
  for (void* ptr : {(void*)dqc, (void*)dkc, (void*)dqs, (void*)dks, (void*)dbias, (void*)dthr, (void*)dbits,
                    (void*)dpacked})
    CUDA_OK(cudaFree(ptr));
  return bad;
}

}  // namespace

int main() {
#ifdef SALE_TEST_SM8X
  if (!packing_ok()) return 1;
#endif
  if (sale_test::skip_unless_supported()) return sale_test::kSkip;
  const Case cases[] = {
      {true, 64, 32, 128, 1, 1, 4, 1, 1},      {false, 128, 32, 128, 1, 2, 3, 63, 63},
      {true, 128, 32, 128, 2, 2, 4, 300, 300}, {false, 64, 64, 128, 1, 3, 1, 777, 1000},
      {true, 128, 64, 192, 1, 1, 2, 513, 513}, {false, 64, 32, 64, 2, 1, 4, 640, 700},
      // long enough for the wgmma scorer's ring of stages to wrap several times
      {true, 128, 32, 128, 1, 1, 4, 2500, 2500}, {false, 64, 64, 128, 1, 1, 2, 1800, 3100},
      // one head, B > 1: also run as a packed batch
      {true, 128, 32, 128, 3, 1, 1, 300, 400},   {false, 64, 64, 128, 2, 1, 1, 700, 700},
  };
  int passed = 0, failed = 0;
  for (const Case& c : cases) {
    int near = 0, candidates = 0;
    bool agree = false;
    const int bad = run_case(c, &near, &candidates, &agree);
    const bool ok = bad == 0 && agree && near <= std::max(1, candidates / 1000);
    std::printf("%s %s D=%d bk=%d W=%d B=%d Hkv=%d g=%d Nq=%d Nk=%d: %d candidates, %d beyond tolerance, "
                "%d near ties, scorers (%s, %s) %s\n",
                ok ? "ok  " : "FAIL", c.bf16 ? "bf16" : "fp16", c.D, c.bk, c.window, c.b, c.hkv, c.g, c.nq, c.nk,
                candidates, bad, near, kScorerNames[0], kScorerNames[1], agree ? "agree" : "DIFFER");
    (ok ? passed : failed)++;
  }
  // Thresholds at the estimate's own values: D and bk of every kernel variant, GQA 1 / 3 / 4 / 2.
  const Case boundary[] = {
      {false, 128, 32, 128, 1, 2, 4, 700, 900}, {false, 64, 32, 128, 2, 1, 3, 513, 513},
      {false, 128, 64, 128, 1, 1, 1, 1100, 1100}, {false, 64, 64, 192, 1, 2, 2, 640, 1000},
  };
  for (const Case& c : boundary) {
    int candidates = 0, kept = 0;
    const int bad = run_boundary_case(c, &candidates, &kept);
    std::printf("%s boundary thresholds D=%d bk=%d W=%d B=%d Hkv=%d g=%d Nq=%d Nk=%d: %d candidates, %d kept, "
                "%d differ\n",
                bad == 0 ? "ok  " : "FAIL", c.D, c.bk, c.window, c.b, c.hkv, c.g, c.nq, c.nk, candidates, kept, bad);
    (bad == 0 ? passed : failed)++;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
