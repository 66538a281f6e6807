// torch.ops.sale.quantize on CUDA (SPEC §2): argument checks and allocation, LibTorch stable ABI
// only; the kernels are in sale/quantize.cuh.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <sstream>
#include <string>
#include <tuple>

#include "arch_dispatch.h"
#include "entry_utils.h"
#include "quantize_entry.h"
#include "sale/quantize.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr const char* kOp = "sale.quantize";

// Spelled as Python spells them, so the messages match sale_ops._checks.
std::string dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Half: return "torch.float16";
    case ScalarType::BFloat16: return "torch.bfloat16";
    case ScalarType::Float: return "torch.float32";
    case ScalarType::Double: return "torch.float64";
    default: return std::string("torch.") + torch::headeronly::toString(t);
  }
}

// A Python-style tuple of t's sizes (or strides).
std::string dims(const Tensor& t, bool of_strides = false) {
  std::ostringstream s;
  s << "(";
  for (int64_t i = 0; i < t.dim(); ++i) s << (i ? ", " : "") << (of_strides ? t.stride(i) : t.size(i));
  s << (t.dim() == 1 ? ",)" : ")");
  return s.str();
}

std::string shape(const Tensor& t) { return dims(t); }
std::string strides(const Tensor& t) { return dims(t, true); }

std::string device(const Tensor& t) {
  if (t.is_cuda()) return "cuda:" + std::to_string(t.get_device_index());
  return t.is_cpu() ? "cpu" : "a device other than CUDA";
}

void check_args(const Tensor& q, const Tensor& k, int64_t bk) {
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}})
    STD_TORCH_CHECK(t->dim() == 4, kOp, ": argument '", name, "' must have 4 dimensions, got shape ", shape(*t));
  STD_TORCH_CHECK(q.is_cuda() && k.is_cuda() && q.get_device_index() == k.get_device_index(), kOp,
                  ": all tensors must be on one device; 'q' is on ", device(q), " but 'k' is on ", device(k));
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::Half || q.scalar_type() == ScalarType::BFloat16, kOp,
                  ": argument 'q' has dtype ", dtype_name(q.scalar_type()), "; supported: torch.float16, torch.bfloat16");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, ": argument 'k' has dtype ", dtype_name(k.scalar_type()),
                  " but 'q' has ", dtype_name(q.scalar_type()), "; they must match");
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  STD_TORCH_CHECK(k.size(0) == B, kOp, ": batch sizes differ: 'q' has ", B, ", 'k' has ", k.size(0));
  STD_TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, ": query heads must be a multiple of kv heads, got Hq=", Hq,
                  " ('q') and Hkv=", Hkv, " ('k')");
  STD_TORCH_CHECK(k.size(3) == D, kOp, ": head dims differ: 'q' has D=", D, ", 'k' has D=", k.size(3));
  STD_TORCH_CHECK(D == 64 || D == 128, kOp, ": argument 'q' has head dim ", D, "; supported: 64, 128");
  STD_TORCH_CHECK(Nq >= 1 && Nk >= 1, kOp, ": empty sequence: 'q' has Nq=", Nq, ", 'k' has Nk=", Nk,
                  "; both must be >= 1");
  STD_TORCH_CHECK(Nq <= INT32_MAX && Nk <= INT32_MAX, kOp, ": sequences longer than 2^31 - 1 are not supported, got Nq=",
                  Nq, ", Nk=", Nk);
  for (const auto& [name, t] : {std::pair<const char*, const Tensor*>{"q", &q}, {"k", &k}}) {
    STD_TORCH_CHECK(t->numel() == 0 || t->stride(3) == 1, kOp, ": argument '", name,
                    "' must have a contiguous last dimension (stride 1), got strides ", strides(*t),
                    "; call .contiguous() first");
  }
  STD_TORCH_CHECK(bk == 32 || bk == 64, kOp, ": argument 'bk' is ", bk, "; supported: 32, 64");
}

// Output pointers of sale.quantize(_varlen) (both entries).
void set_outputs(sale::QuantizeParams& p, Tensor& q_codes, Tensor& q_scale, Tensor& k_codes, Tensor& k_scale,
                 Tensor& qk_bias, Tensor& k_mean) {
  p.q_codes = static_cast<int8_t*>(q_codes.mutable_data_ptr());
  p.q_scale = static_cast<float*>(q_scale.mutable_data_ptr());
  p.k_codes = static_cast<int8_t*>(k_codes.mutable_data_ptr());
  p.k_scale = static_cast<float*>(k_scale.mutable_data_ptr());
  p.qk_bias = static_cast<float*>(qk_bias.mutable_data_ptr());
  p.k_mean = static_cast<float*>(k_mean.mutable_data_ptr());
}

// Scratch from the caching allocator (stream-ordered, capture-safe, freed when this returns, q_mean
// when its last holder lets go), then the kernels (every entry).
Tensor launch(const char* op, sale::QuantizeParams& p, const Tensor& q) {
  const sale::QuantizeWorkspace ws = sale::quantize_workspace(p);
  Tensor partial = torch::stable::new_empty(q, {ws.partial_doubles}, ScalarType::Double);
  Tensor q_mean = torch::stable::new_empty(q, {ws.q_mean_floats}, ScalarType::Float);
  p.partial = static_cast<double*>(partial.mutable_data_ptr());
  p.q_mean = static_cast<float*>(q_mean.mutable_data_ptr());
  const cudaError_t err = sale::launch_quantize(p, sale_entry::current_stream(q));
  STD_TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
  return q_mean;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> quantize_cuda(Tensor q, Tensor k, int64_t bk) {
  check_args(q, k, bk);
  // One kernel for every architecture; this refuses GPUs no path serves (before 8.0) by name.
  sale_entry::kernel_path(kOp, q.get_device_index());
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const sale_entry::Quantized z = sale_entry::quantize_batched(kOp, q, k, bk, true);
  return {z.q_codes, z.q_scale, z.k_codes, z.k_scale, z.qk_bias, z.k_mean};
}

// ---- variable-length (packed) batches (sale/varlen.cuh; checks in entry_utils.h)

namespace vl = sale_entry::varlen;

// ---------------------------------------------------------------------------------------------
// sale.quantize_varlen -> q_codes [Hq, Tq, D], q_scale [Hq, Tq], k_codes [Hkv, Tk, D],
// k_scale [Hkv, Tk], qk_bias [Hq, Tk], k_mean [B, Hkv, D]
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> quantize_varlen_cuda(Tensor q, Tensor k, Tensor cu_q,
                                                                                Tensor cu_k, int64_t max_q,
                                                                                int64_t max_k, int64_t bk) {
  constexpr const char* kOp = "sale.quantize_varlen";
  const vl::Batch vb = vl::check_batch(kOp, q, k, cu_q, cu_k, max_q, max_k);
  vl::check_blocks(kOp, 64, bk);
  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const sale_entry::Quantized z = sale_entry::quantize_packed(kOp, q, k, vb, bk, true);
  return {z.q_codes, z.q_scale, z.k_codes, z.k_scale, z.qk_bias, z.k_mean};
}

}  // namespace

sale_entry::Quantized sale_entry::quantize_batched(const char* op, const Tensor& q, const Tensor& k, int64_t bk,
                                                   bool store_q_codes) {
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  using torch::stable::new_empty;
  Quantized z{store_q_codes ? new_empty(q, {B, Hq, Nq, D}, ScalarType::Char) : new_empty(q, {0}, ScalarType::Char),
              new_empty(q, {B, Hq, Nq}, ScalarType::Float),
              new_empty(k, {B, Hkv, Nk, D}, ScalarType::Char),
              new_empty(k, {B, Hkv, Nk}, ScalarType::Float),
              new_empty(q, {B, Hq, Nk}, ScalarType::Float),
              new_empty(k, {B, Hkv, D}, ScalarType::Float),
              new_empty(q, {0}, ScalarType::Float)};

  sale::QuantizeParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.dtype = q.scalar_type() == ScalarType::Half ? sale::QuantizeDtype::kHalf : sale::QuantizeDtype::kBFloat16;
  p.B = B, p.Hq = Hq, p.Hkv = Hkv, p.Nq = Nq, p.Nk = Nk, p.D = D;
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_n = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_n = k.stride(2);
  p.bk = static_cast<int>(bk);
  set_outputs(p, z.q_codes, z.q_scale, z.k_codes, z.k_scale, z.qk_bias, z.k_mean);
  if (!store_q_codes) p.q_codes = nullptr;
  if (B * (Hq + Hkv) > 0) z.q_mean = launch(op, p, q);
  return z;
}

sale_entry::Quantized sale_entry::quantize_packed(const char* op, const Tensor& q, const Tensor& k,
                                                  const varlen::Batch& vb, int64_t bk, bool store_q_codes) {
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Tq = vb.total_q, Tk = vb.total_k;
  using torch::stable::new_empty;
  Quantized z{store_q_codes ? new_empty(q, {Hq, Tq, D}, ScalarType::Char) : new_empty(q, {0}, ScalarType::Char),
              new_empty(q, {Hq, Tq}, ScalarType::Float),
              new_empty(k, {Hkv, Tk, D}, ScalarType::Char),
              new_empty(k, {Hkv, Tk}, ScalarType::Float),
              new_empty(q, {Hq, Tk}, ScalarType::Float),
              new_empty(k, {vb.batch, Hkv, D}, ScalarType::Float),
              new_empty(q, {0}, ScalarType::Float)};

  sale::QuantizeParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.dtype = q.scalar_type() == ScalarType::Half ? sale::QuantizeDtype::kHalf : sale::QuantizeDtype::kBFloat16;
  p.B = vb.batch, p.Hq = Hq, p.Hkv = Hkv, p.Nq = vb.max_q, p.Nk = vb.max_k, p.D = D;
  p.q_stride_b = 0, p.q_stride_h = q.stride(1), p.q_stride_n = q.stride(0);
  p.k_stride_b = 0, p.k_stride_h = k.stride(1), p.k_stride_n = k.stride(0);
  p.bk = static_cast<int>(bk);
  set_outputs(p, z.q_codes, z.q_scale, z.k_codes, z.k_scale, z.qk_bias, z.k_mean);
  if (!store_q_codes) p.q_codes = nullptr;
  p.cu_seqlens_q = vb.cu_q, p.cu_seqlens_k = vb.cu_k;
  p.total_q = Tq, p.total_k = Tk;
  z.q_mean = launch(op, p, q);
  return z;
}

STABLE_TORCH_LIBRARY_IMPL(sale, CUDA, m) {
  m.impl("quantize", TORCH_BOX(&quantize_cuda));
  m.impl("quantize_varlen", TORCH_BOX(&quantize_varlen_cuda));
}
