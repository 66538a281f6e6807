// Both block-sparse attention kernels (mma.sync: sale::launch_block_sparse_attention; wgmma:
// sale::launch_block_sparse_attention_sm90 after the bf16 -> fp16 V conversion, with P split or, for
// bf16, rounded once) against a
// double-precision host reference on small shapes (no libtorch).
// Exit 0: pass, 1: fail, 77: no CUDA device (ctest SKIP_RETURN_CODE).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "sale/block_sparse_attention.cuh"
#ifndef SALE_TEST_SM8X  // the sm8x build (compute_80 PTX) has the mma.sync kernel only
#include "sale/block_sparse_attention_sm90.cuh"
#endif
#include "test_common.cuh"

namespace {

struct Case {
  int batch, q_heads, kv_heads, nq, nk, d, bk;
  bool causal, bf16;
  float v_magnitude = 1.f;  // V ~ N(0, v_magnitude^2): large values exercise the fp16 V scaling
};

enum class Kernel { kMma, kWgmma, kWgmmaFastP };

// Runs the chosen kernel; the wgmma kernel reads V in fp16, converted here for bf16 inputs.
cudaError_t launch(sale::BlockSparseAttentionParams p, Kernel kernel, bool bf16, int D, int bk, size_t v_elems) {
  if (kernel == Kernel::kMma) return sale::launch_block_sparse_attention(p, bf16, D, bk, nullptr);
#ifdef SALE_TEST_SM8X
  (void)v_elems;
  return cudaErrorInvalidValue;
#else
  int device = 0, sms = 0;
  CUDA_OK(cudaGetDevice(&device));
  CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  unsigned long long* counter = nullptr;
  CUDA_OK(cudaMalloc(&counter, sizeof(unsigned long long)));
  sale::ConvertVParams cv{};  // bf16 only: V converted to fp16 (cv.out, cv.amax_bits stay null otherwise)
  if (bf16) {
    cv.v = static_cast<const __nv_bfloat16*>(p.v);
    cv.batch_stride = p.v_batch_stride, cv.head_stride = p.v_head_stride, cv.row_stride = p.v_row_stride;
    // Packed (cu_seqlens): one "batch" holding every sequence's rows, as the torch entry converts it.
    const bool packed = p.cu_seqlens_k != nullptr;
    const int rows_per_head = packed ? p.batch * p.nk : p.nk;
    cv.heads = p.kv_heads, cv.nk = rows_per_head, cv.d = D;
    cv.rows = int64_t(packed ? 1 : p.batch) * p.kv_heads * rows_per_head;
    CUDA_OK(cudaMalloc(&cv.out, v_elems * sizeof(__half)));
    CUDA_OK(cudaMalloc(&cv.amax_bits, sizeof(unsigned)));
    CUDA_OK(sale::launch_convert_v(cv, sms, nullptr));
    p.v = cv.out;
    p.v_row_stride = D, p.v_head_stride = int64_t(rows_per_head) * D;
    p.v_batch_stride = packed ? 0 : int64_t(p.kv_heads) * p.nk * D;  // packed: sequences are located by their rows
  }
  const bool fast_p = kernel == Kernel::kWgmmaFastP;  // bf16 only; the launch ignores it for fp16
  const cudaError_t err = sale::launch_block_sparse_attention_sm90(p, cv.amax_bits, counter, sms, bf16, D, bk, fast_p, nullptr);
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaFree(counter));
  CUDA_OK(cudaFree(cv.out));
  CUDA_OK(cudaFree(cv.amax_bits));
  return err;
#endif
}

float to_host_float(__half x) { return __half2float(x); }
float to_host_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_float(float x);
template <>
__half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }


using sale_test::to_device;

template <typename T>
int run_case(const Case& c, Kernel kernel, std::mt19937& rng) {
  const int B = c.batch, Hq = c.q_heads, Hkv = c.kv_heads, Nq = c.nq, Nk = c.nk, D = c.d, bk = c.bk;
  const int nQ = (Nq + 63) / 64, nK = (Nk + bk - 1) / bk;
  std::normal_distribution<float> normal;
  std::vector<T> q(size_t(B) * Hq * Nq * D), k(size_t(B) * Hkv * Nk * D), v(k.size());
  for (auto* x : {&q, &k, &v})
    for (T& e : *x) e = from_float<T>(normal(rng) * (x == &v ? c.v_magnitude : 1.f));
  std::vector<uint8_t> mask(size_t(B) * Hq * nQ * nK);
  for (auto& e : mask) e = rng() % 3 == 0;
  for (int n = 0; n < nK; ++n) mask[n] = 0;  // (b 0, h 0) query block 0 keeps nothing: empty rows
  const float scale = 1.f / std::sqrt(float(D));

  sale::BlockSparseAttentionParams p{};
  p.q = to_device(q), p.k = to_device(k), p.v = to_device(v);
  p.q_row_stride = D, p.q_head_stride = int64_t(Nq) * D, p.q_batch_stride = int64_t(Hq) * Nq * D;
  p.k_row_stride = p.v_row_stride = D;
  p.k_head_stride = p.v_head_stride = int64_t(Nk) * D;
  p.k_batch_stride = p.v_batch_stride = int64_t(Hkv) * Nk * D;
  p.mask = to_device(mask);
  p.mask_col_stride = 1, p.mask_row_stride = nK, p.mask_head_stride = int64_t(nQ) * nK;
  p.mask_batch_stride = int64_t(Hq) * nQ * nK;
  std::vector<T> out(q.size());
  std::vector<float> lse(size_t(B) * Hq * Nq);
  T* out_d = nullptr;
  float* lse_d = nullptr;
  CUDA_OK(cudaMalloc(&out_d, out.size() * sizeof(T)));
  CUDA_OK(cudaMalloc(&lse_d, lse.size() * sizeof(float)));
  CUDA_OK(cudaMemset(out_d, 0xff, out.size() * sizeof(T)));  // NaN: every element must be written
  CUDA_OK(cudaMemset(lse_d, 0xff, lse.size() * sizeof(float)));
  p.out = out_d, p.lse = lse_d;
  p.batch = B, p.q_heads = Hq, p.kv_heads = Hkv, p.nq = Nq, p.nk = Nk, p.nQ = nQ, p.nK = nK;
  p.scale = scale, p.causal = c.causal;
  CUDA_OK(launch(p, kernel, c.bf16, D, bk, v.size()));
  CUDA_OK(cudaDeviceSynchronize());
  CUDA_OK(cudaMemcpy(out.data(), out_d, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(lse.data(), lse_d, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

  // The same mask bit-packed (the estimator's format) must give bit-identical results.
  int packed_differs = 0;
  {
    const int nW = (nK + 31) / 32;
    std::vector<uint32_t> words(size_t(B) * Hq * nQ * nW, 0u);
    for (size_t row = 0; row < words.size() / nW; ++row)
      for (int n = 0; n < nK; ++n) words[row * nW + n / 32] |= uint32_t(mask[row * nK + n] != 0) << (n % 32);
    sale::BlockSparseAttentionParams pp = p;
    pp.mask = to_device(words);
    pp.mask_packed = true;
    pp.mask_col_stride = 1, pp.mask_row_stride = nW, pp.mask_head_stride = int64_t(nQ) * nW;
    pp.mask_batch_stride = int64_t(Hq) * nQ * nW;
    CUDA_OK(cudaMemset(out_d, 0xff, out.size() * sizeof(T)));
    CUDA_OK(launch(pp, kernel, c.bf16, D, bk, v.size()));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<T> out2(out.size());
    CUDA_OK(cudaMemcpy(out2.data(), out_d, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    packed_differs = std::memcmp(out2.data(), out.data(), out.size() * sizeof(T)) != 0;
    if (packed_differs) std::printf("  the bit-packed mask gives a different output\n");
    CUDA_OK(cudaFree(const_cast<void*>(pp.mask)));
  }

  // One head: [B, 1, N, D] is also the packed [B * N, 1, D] of B sequences of equal length, so the
  // variable-length path (cu_seqlens) must give bit-identical out and lse ([1, B * N] = [B, 1, N]).
  int varlen_differs = 0;
  if (Hq == 1) {
    std::vector<int> cu_q(B + 1), cu_k(B + 1);
    for (int b = 0; b <= B; ++b) cu_q[b] = b * Nq, cu_k[b] = b * Nk;
    sale::BlockSparseAttentionParams pv = p;
    pv.cu_seqlens_q = to_device(cu_q), pv.cu_seqlens_k = to_device(cu_k);
    pv.total_q = int64_t(B) * Nq;
    pv.q_batch_stride = pv.k_batch_stride = pv.v_batch_stride = 0;
    CUDA_OK(cudaMemset(out_d, 0xff, out.size() * sizeof(T)));
    CUDA_OK(cudaMemset(lse_d, 0xff, lse.size() * sizeof(float)));
    CUDA_OK(launch(pv, kernel, c.bf16, D, bk, v.size()));
    CUDA_OK(cudaDeviceSynchronize());
    std::vector<T> out2(out.size());
    std::vector<float> lse2(lse.size());
    CUDA_OK(cudaMemcpy(out2.data(), out_d, out.size() * sizeof(T), cudaMemcpyDeviceToHost));
    CUDA_OK(cudaMemcpy(lse2.data(), lse_d, lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
    varlen_differs = std::memcmp(out2.data(), out.data(), out.size() * sizeof(T)) != 0 ||
                     std::memcmp(lse2.data(), lse.data(), lse.size() * sizeof(float)) != 0;
    if (varlen_differs) {
      double d_out = 0, d_lse = 0;
      size_t first = out.size();
      for (size_t i = 0; i < out.size(); ++i) {
        const double d = std::fabs(double(to_host_float(out2[i])) - double(to_host_float(out[i])));
        if (d > 0 && first == out.size()) first = i;
        d_out = d > d_out ? d : d_out;
      }
      for (size_t i = 0; i < lse.size(); ++i) d_lse = std::fmax(d_lse, std::fabs(double(lse2[i]) - double(lse[i])));
      std::printf("  the packed (cu_seqlens) path gives a different output: max |out diff| %.3e (first at element "
                  "%zu), max |lse diff| %.3e\n", d_out, first, d_lse);
    }
    CUDA_OK(cudaFree(const_cast<int*>(pv.cu_seqlens_q)));
    CUDA_OK(cudaFree(const_cast<int*>(pv.cu_seqlens_k)));
  }

  // Host reference in double from the rounded inputs. Tolerance: a few output ulps (P is rounded
  // to the input dtype before P.V) plus the output's own rounding.
  const double tol = c.bf16 ? 3e-2 : 4e-3;
  int bad = 0;
  double worst = 0, worst_lse = 0;
  std::vector<double> s(Nk), o(D);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Nq; ++i) {
        const int hk = h / (Hq / Hkv);
        const T* qi = &q[((size_t(b) * Hq + h) * Nq + i) * D];
        double mx = -INFINITY;
        for (int j = 0; j < Nk; ++j) {
          const bool kept = mask[((size_t(b) * Hq + h) * nQ + i / 64) * nK + j / bk];
          const bool visible = kept && (!c.causal || j <= i + Nk - Nq);
          double dot = 0;
          const T* kj = &k[((size_t(b) * Hkv + hk) * Nk + j) * D];
          for (int e = 0; e < D; ++e) dot += double(to_host_float(qi[e])) * to_host_float(kj[e]);
          s[j] = visible ? dot * scale : -INFINITY;
          mx = std::fmax(mx, s[j]);
        }
        double l = 0;
        for (int e = 0; e < D; ++e) o[e] = 0;
        for (int j = 0; j < Nk; ++j) {
          if (s[j] == -INFINITY) continue;
          const double w = std::exp(s[j] - mx);
          l += w;
          for (int e = 0; e < D; ++e) o[e] += w * to_host_float(v[((size_t(b) * Hkv + hk) * Nk + j) * D + e]);
        }
        const size_t row = (size_t(b) * Hq + h) * Nq + i;
        const double want_lse = l > 0 ? mx + std::log(l) : -INFINITY;
        const float got_lse = lse[row];
        const bool lse_ok = l > 0 ? std::fabs(got_lse - want_lse) <= 1e-3 : got_lse == -INFINITY;
        if (l > 0) worst_lse = std::fmax(worst_lse, std::fabs(got_lse - want_lse));
        bool ok = lse_ok;
        for (int e = 0; e < D; ++e) {
          const double want = l > 0 ? o[e] / l : 0.0, got = to_host_float(out[row * D + e]);
          const double err = std::fabs(got - want);  // NaN fails the comparison below
          if (!(err <= tol * (c.v_magnitude + std::fabs(want)))) ok = false;
          if (err == err) worst = std::fmax(worst, err);
        }
        if (!ok && bad++ < 5)
          std::printf("  mismatch at b=%d h=%d row=%d: lse %f vs %f\n", b, h, i, got_lse, want_lse);
      }
  std::printf("%s %s B=%d Hq=%d Hkv=%d Nq=%d Nk=%d D=%d bk=%d causal=%d: max |out err| %.2e, max |lse err| %.2e, %d bad rows\n",
              kernel == Kernel::kMma ? "mma.sync" : kernel == Kernel::kWgmma ? "wgmma" : "wgmma fast-P", c.bf16 ? "bf16" : "fp16", B, Hq, Hkv, Nq, Nk, D, bk, int(c.causal), worst, worst_lse, bad);
  for (const void* ptr : {p.q, p.k, p.v, static_cast<const void*>(p.mask)}) CUDA_OK(cudaFree(const_cast<void*>(ptr)));
  CUDA_OK(cudaFree(out_d));
  CUDA_OK(cudaFree(lse_d));
  return bad == 0 && !packed_differs && !varlen_differs ? 0 : 1;
}

}  // namespace

int main() {
  if (sale_test::skip_unless_supported()) return sale_test::kSkip;
  std::mt19937 rng(1234);
  const Case cases[] = {
      {1, 4, 2, 100, 130, 64, 32, true, false},  {2, 3, 1, 70, 70, 128, 64, true, true},
      {1, 2, 2, 130, 45, 128, 32, false, false}, {1, 7, 1, 1, 300, 64, 64, true, true},
      {1, 2, 1, 200, 200, 128, 32, true, false},
      {1, 3, 3, 150, 150, 128, 32, true, true, 1e5f},  // |V| past fp16's range: scaled by 2^-e
      {1, 1, 1, 70, 33000, 64, 32, false, true},       // > 1024 kept blocks: several compaction passes
      {3, 1, 1, 100, 130, 64, 32, true, false},        // one head, B > 1: also run as a packed batch
      {2, 1, 1, 70, 200, 128, 64, true, true},
  };
  int failed = 0;
#ifdef SALE_TEST_SM8X
  const Kernel kernels[] = {Kernel::kMma};
#else
  const Kernel kernels[] = {Kernel::kMma, Kernel::kWgmma, Kernel::kWgmmaFastP};
#endif
  for (Kernel kernel : kernels)
    for (const Case& c : cases)
      failed += c.bf16 ? run_case<__nv_bfloat16>(c, kernel, rng) : run_case<__half>(c, kernel, rng);
  std::printf(failed ? "FAILED: %d case(s)\n" : "PASSED\n", failed);
  return failed ? 1 : 0;
}
