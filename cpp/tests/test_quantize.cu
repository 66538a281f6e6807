// Kernel test of sale/quantize.cuh against a plain C++ host implementation of SPEC §2, without
// libtorch. Exits 77 (CTest: skipped) when there is no usable CUDA device.
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

#include "sale/quantize.cuh"
#include "test_common.cuh"


namespace {

enum class Layout { kContiguous, kHeadMajor, kUnaligned };
const char* layout_name(Layout l) {
  return l == Layout::kContiguous ? "contiguous" : l == Layout::kHeadMajor ? "head-major" : "unaligned";
}

struct Case {
  bool half;
  int D, bk, g, hkv, b;
  int64_t nq, nk;
  Layout layout;
};

using sale_test::from_bits;
using sale_test::to_bits;
using sale_test::uniform;

// One input tensor [B, H, N, D] in a host buffer and a device copy, with the case's strides.
struct Input {
  int64_t B, H, N, D, sb, sh, sn, offset;
  std::vector<uint16_t> host;
  uint16_t* dev = nullptr;
  float at(int64_t b, int64_t h, int64_t n, int64_t d, bool half) const {
    return from_bits(host[offset + b * sb + h * sh + n * sn + d], half);
  }
};

Input make_input(int64_t B, int64_t H, int64_t N, int64_t D, Layout layout, bool half, float spread) {
  Input t{B, H, N, D};
  if (layout == Layout::kHeadMajor) {  // [B, N, H, D] memory, viewed as [B, H, N, D]
    t.sn = H * D, t.sh = D, t.sb = N * H * D, t.offset = 0;
  } else {
    const int64_t row = layout == Layout::kUnaligned ? D + 1 : D;
    t.sn = row, t.sh = N * row, t.sb = H * N * row, t.offset = layout == Layout::kUnaligned ? 1 : 0;
  }
  t.host.resize(t.offset + B * t.sb);
  std::vector<float> centre(D);
  for (auto& c : centre) c = 2.f * uniform();
  for (size_t i = 0; i < t.host.size(); ++i) t.host[i] = to_bits(centre[i % D] + spread * uniform(), half);
  CUDA_OK(cudaMalloc(&t.dev, t.host.size() * 2));
  CUDA_OK(cudaMemcpy(t.dev, t.host.data(), t.host.size() * 2, cudaMemcpyHostToDevice));
  return t;
}

template <typename T>
T* dev_alloc(int64_t n) {
  T* p = nullptr;
  CUDA_OK(cudaMalloc(&p, std::max<int64_t>(n, 1) * sizeof(T)));
  return p;
}
template <typename T>
std::vector<T> to_host(const T* p, int64_t n) {
  std::vector<T> v(n);
  CUDA_OK(cudaMemcpy(v.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

struct Errors {
  int64_t checked = 0, bad = 0, ties = 0;
  void fail(const char* what, int64_t index, double got, double want) {
    if (bad++ < 5) std::printf("    %s[%lld]: got %.9g, want %.9g\n", what, static_cast<long long>(index), got, want);
  }
  void close(const char* what, int64_t index, double got, double want, double tol) {
    ++checked;
    if (!(std::fabs(got - want) <= tol)) fail(what, index, got, want);
  }
};

// Mean in double, then fp32, as the kernel (which sums in another order): within 4e-6 of mean |x|.
std::vector<float> host_means(const Input& x, bool half, std::vector<double>* abs_means) {
  std::vector<float> m(x.B * x.H * x.D);
  abs_means->assign(m.size(), 0.0);
  for (int64_t bh = 0; bh < x.B * x.H; ++bh)
    for (int64_t d = 0; d < x.D; ++d) {
      double s = 0, a = 0;
      for (int64_t n = 0; n < x.N; ++n) {
        const float v = x.at(bh / x.H, bh % x.H, n, d, half);
        s += v;
        a += std::fabs(v);
      }
      m[bh * x.D + d] = static_cast<float>(s / x.N);
      (*abs_means)[bh * x.D + d] = a / x.N;
    }
  return m;
}

// SPEC §2.2-2.3 on the host, centred on `mean` (the kernel's, so that codes and scales compare exactly).
void check_codes(const Input& x, bool half, bool is_k, int bk, const std::vector<float>& mean,
                 const std::vector<int8_t>& codes, const std::vector<float>& scales, Errors& err) {
  const int64_t D = x.D, N = x.N;
  for (int64_t bh = 0; bh < x.B * x.H; ++bh) {
    const int64_t b = bh / x.H, h = bh % x.H;
    auto xc = [&](int64_t n, int64_t d) { return x.at(b, h, n, d, half) - mean[bh * D + d]; };
    auto group = [&](int64_t n) { return is_k ? (n / bk) * 4 + (n % bk % 8) / 2 : (n / 16) * 8 + n % 8; };
    std::vector<float> amax((N / 16 + 1) * 8 + (N / bk + 1) * 4, 0.f);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t d = 0; d < D; ++d) amax[group(n)] = std::max(amax[group(n)], std::fabs(xc(n, d)));
    for (int64_t n = 0; n < N; ++n) {
      const float a = amax[group(n)], scale = a == 0.f ? 1.f : a / 7.f;
      const int64_t row = bh * N + n;
      err.close(is_k ? "k_scale" : "q_scale", row, scales[row], scale, 1e-6 * scale);
      for (int64_t d = 0; d < D; ++d) {
        const float r = xc(n, d) / scale;
        const int want = static_cast<int>(std::fmin(7.f, std::fmax(-7.f, std::nearbyint(r))));
        const int got = codes[row * D + d];
        ++err.checked;
        if (got == want) continue;
        const float frac = std::fabs(r) - std::floor(std::fabs(r));
        const bool near_tie = std::fabs(frac - 0.5f) <= 1e-6f * std::max(1.f, std::fabs(r));
        if (std::abs(got - want) == 1 && near_tie)
          ++err.ties;
        else
          err.fail(is_k ? "k_codes" : "q_codes", row * D + d, got, want);
      }
    }
  }
}

bool run_case(const Case& c) {
  const int64_t hq = c.hkv * c.g, D = c.D;
  Input q = make_input(c.b, hq, c.nq, D, c.layout, c.half, 1.5f);
  Input k = make_input(c.b, c.hkv, c.nk, D, c.layout, c.half, 1.f);

  sale::QuantizeParams p;
  p.q = q.dev + q.offset, p.k = k.dev + k.offset;
  p.dtype = c.half ? sale::QuantizeDtype::kHalf : sale::QuantizeDtype::kBFloat16;
  p.B = c.b, p.Hq = hq, p.Hkv = c.hkv, p.Nq = c.nq, p.Nk = c.nk, p.D = D, p.bk = c.bk;
  p.q_stride_b = q.sb, p.q_stride_h = q.sh, p.q_stride_n = q.sn;
  p.k_stride_b = k.sb, p.k_stride_h = k.sh, p.k_stride_n = k.sn;
  p.q_codes = dev_alloc<int8_t>(c.b * hq * c.nq * D);
  p.q_scale = dev_alloc<float>(c.b * hq * c.nq);
  p.k_codes = dev_alloc<int8_t>(c.b * c.hkv * c.nk * D);
  p.k_scale = dev_alloc<float>(c.b * c.hkv * c.nk);
  p.qk_bias = dev_alloc<float>(c.b * hq * c.nk);
  p.k_mean = dev_alloc<float>(c.b * c.hkv * D);
  const sale::QuantizeWorkspace ws = sale::quantize_workspace(p);
  p.partial = dev_alloc<double>(ws.partial_doubles);
  p.q_mean = dev_alloc<float>(ws.q_mean_floats);

  CUDA_OK(sale::launch_quantize(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  const auto q_codes = to_host(p.q_codes, c.b * hq * c.nq * D);
  const auto q_scale = to_host(p.q_scale, c.b * hq * c.nq);
  const auto k_codes = to_host(p.k_codes, c.b * c.hkv * c.nk * D);
  const auto k_scale = to_host(p.k_scale, c.b * c.hkv * c.nk);
  const auto qk_bias = to_host(p.qk_bias, c.b * hq * c.nk);
  const auto k_mean = to_host(p.k_mean, c.b * c.hkv * D);
  const auto q_mean = to_host(p.q_mean, c.b * hq * D);

  Errors err;
  std::vector<double> q_abs, k_abs;
  const auto q_mean_ref = host_means(q, c.half, &q_abs);
  const auto k_mean_ref = host_means(k, c.half, &k_abs);
  for (size_t i = 0; i < q_mean.size(); ++i) err.close("q_mean", i, q_mean[i], q_mean_ref[i], 4e-6 * q_abs[i]);
  for (size_t i = 0; i < k_mean.size(); ++i) err.close("k_mean", i, k_mean[i], k_mean_ref[i], 4e-6 * k_abs[i]);
  check_codes(q, c.half, false, c.bk, q_mean, q_codes, q_scale, err);
  check_codes(k, c.half, true, c.bk, k_mean, k_codes, k_scale, err);
  // qk_bias = q̄_h · (k_j − k̄) within 1e-6 of the sum of the magnitudes of its terms.
  for (int64_t b = 0; b < c.b; ++b)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t j = 0; j < c.nk; ++j) {
        const int64_t kv = b * c.hkv + h / c.g;
        double dot = 0, mag = 0;
        for (int64_t d = 0; d < D; ++d) {
          const double t = static_cast<double>(q_mean[(b * hq + h) * D + d]) *
                           (k.at(b, h / c.g, j, d, c.half) - k_mean[kv * D + d]);
          dot += t;
          mag += std::fabs(t);
        }
        err.close("qk_bias", (b * hq + h) * c.nk + j, qk_bias[(b * hq + h) * c.nk + j], dot, 1e-6 * mag + 1e-30);
      }

  // Determinism: a second run gives the same bytes.
  CUDA_OK(sale::launch_quantize(p, nullptr));
  CUDA_OK(cudaDeviceSynchronize());
  if (to_host(p.q_codes, q_codes.size()) != q_codes || to_host(p.k_codes, k_codes.size()) != k_codes ||
      std::memcmp(to_host(p.qk_bias, qk_bias.size()).data(), qk_bias.data(), qk_bias.size() * 4) != 0 ||
      std::memcmp(to_host(p.k_mean, k_mean.size()).data(), k_mean.data(), k_mean.size() * 4) != 0) {
    err.fail("second run differs", 0, 0, 0);
  }

  std::printf("%s %-4s D=%-3d bk=%d B=%d Hq=%-2lld Hkv=%d Nq=%-4lld Nk=%-4lld %-10s: %lld values, %lld near-tie codes, %s\n",
              err.bad ? "FAIL" : "ok  ", c.half ? "fp16" : "bf16", c.D, c.bk, c.b, static_cast<long long>(hq), c.hkv,
              static_cast<long long>(c.nq), static_cast<long long>(c.nk), layout_name(c.layout),
              static_cast<long long>(err.checked), static_cast<long long>(err.ties),
              err.bad ? "MISMATCH" : "match");
  for (void* ptr : {static_cast<void*>(q.dev), static_cast<void*>(k.dev), static_cast<void*>(p.q_codes),
                    static_cast<void*>(p.q_scale), static_cast<void*>(p.k_codes), static_cast<void*>(p.k_scale),
                    static_cast<void*>(p.qk_bias), static_cast<void*>(p.k_mean), static_cast<void*>(p.partial),
                    static_cast<void*>(p.q_mean)})
    CUDA_OK(cudaFree(ptr));
  return err.bad == 0;
}

}  // namespace

int main() {
  if (sale_test::skip_unless_supported()) return sale_test::kSkip;

  std::vector<Case> cases;
  for (bool half : {false, true})
    for (int D : {64, 128})
      for (int bk : {32, 64})
        for (int64_t n : {1, 63, 1025})
          for (int g : {1, 3}) cases.push_back({half, D, bk, g, 2, 1, n, n, Layout::kContiguous});
  for (Layout l : {Layout::kHeadMajor, Layout::kUnaligned})
    for (bool half : {false, true})
      for (int D : {64, 128}) cases.push_back({half, D, half ? 64 : 32, 3, 1, 2, 1025, 1025, l});
  cases.push_back({false, 128, 32, 4, 2, 2, 63, 1025, Layout::kContiguous});  // Nq < Nk
  cases.push_back({true, 64, 64, 1, 3, 1, 4097, 300, Layout::kContiguous});   // Nq > Nk

  int failed = 0;
  for (const Case& c : cases) failed += run_case(c) ? 0 : 1;
  std::printf("%d passed, %d failed\n", static_cast<int>(cases.size()) - failed, failed);
  return failed ? 1 : 0;
}
