// torch.ops.sale.block_mask on CUDA: the stable-ABI entry around cpp/sale/block_mask.cuh. This file's
// kernels are sm_90a; on other GPUs the sm8x path (block_mask_sm8x_cuda.cu) serves (arch_dispatch.h).
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "arch_dispatch.h"
#include "entry_utils.h"
#include "quantize_entry.h"
#include "sm8x_entries.h"
#include "sale/block_mask.cuh"
#include "sale/block_mask_sm90.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr const char* kOp = "sale.block_mask";

void check_cuda_tensor(const Tensor& t, const char* name, ScalarType dtype, int64_t dim, const Tensor& like,
                       const char* op = kOp) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == like.get_device_index(), op, ": argument '", name,
                     "' is on another device than 'q'");
  STD_TORCH_CHECK(t.scalar_type() == dtype, op, ": argument '", name, "' has the wrong dtype");
  STD_TORCH_CHECK(t.dim() == dim, op, ": argument '", name, "' must have ", dim, " dimensions, got ", t.dim());
}

// q, k, tau and the block options of a batched selection (sale.block_mask*, sale.select).
void check_selection_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& tau, int64_t bq, int64_t bk,
                          int64_t window, double scale) {
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::BFloat16 || dt == ScalarType::Half, op,
                     ": argument 'q' must be float16 or bfloat16");
  check_cuda_tensor(q, "q", dt, 4, q, op);
  check_cuda_tensor(k, "k", dt, 4, q, op);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  STD_TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0, op,
                     ": 'k' must be [B, Hkv, Nk, D] with Hq % Hkv == 0 and the batch and head dim of 'q'");
  STD_TORCH_CHECK(D == 64 || D == 128, op, ": argument 'q' has head dim ", D, "; supported: 64, 128");
  STD_TORCH_CHECK(bq == 64, op, ": argument 'bq' is ", bq, "; supported: 64");
  STD_TORCH_CHECK(bk == 32 || bk == 64, op, ": argument 'bk' is ", bk, "; supported: 32, 64");
  STD_TORCH_CHECK(window % bk == 0 && window >= bq, op, ": argument 'window' is ", window,
                     "; it must be a multiple of bk and at least bq");
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": argument 'scale' must be finite and > 0");
  STD_TORCH_CHECK(Nq >= 1 && Nq <= Nk, op, ": causal selection needs 1 <= Nq <= Nk, got Nq=", Nq, ", Nk=", Nk);
  STD_TORCH_CHECK(Nk < (int64_t(1) << 31) / 64, op, ": sequence too long");
  sale_entry::check_rows_aligned(op, q, "q");
  sale_entry::check_rows_aligned(op, k, "k");
  check_cuda_tensor(tau, "tau", ScalarType::Float, 1, q, op);
  STD_TORCH_CHECK(tau.is_contiguous() && tau.size(0) == Hq, op, ": argument 'tau' must be a contiguous [Hq] tensor");
}

// The shapes and raw inputs of a batched selection.
void set_batched_shape(sale::BlockMaskParams& p, const Tensor& q, const Tensor& k, int64_t bk, int64_t window,
                       double scale) {
  const int64_t Nq = q.size(2), Nk = k.size(2), nK = (Nk + bk - 1) / bk;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.batch = int(q.size(0)), p.q_heads = int(q.size(1)), p.kv_heads = int(k.size(1)), p.nq = int(Nq), p.nk = int(Nk);
  p.bk = int(bk), p.window = int(window), p.nQ = int((Nq + sale::kBq - 1) / sale::kBq), p.nK = int(nK);
  p.nW = int((nK + 31) / 32);
  p.scale = float(scale);
  p.q_bf16 = q.scalar_type() == ScalarType::BFloat16;
}

// The bit-packed mask [B, Hq, nQ, ceil(nK / 32)] (int32 words; bit n % 32 of word n / 32 is key
// block n), written by the kernels of cpp/sale/block_mask.cuh.
// The quantized inputs, thresholds and outputs of a selection (both entries).
void set_selection_tensors(sale::BlockMaskParams& p, const Tensor& q_codes, const Tensor& q_scale,
                           const Tensor& k_codes, const Tensor& k_scale, const Tensor& qk_bias, const Tensor& k_mean,
                           const Tensor& tau, Tensor& threshold, Tensor& bits) {
  p.q_codes = static_cast<const int8_t*>(q_codes.const_data_ptr());
  p.q_scale = static_cast<const float*>(q_scale.const_data_ptr());
  p.k_codes = static_cast<const int8_t*>(k_codes.const_data_ptr());
  p.k_scale = static_cast<const float*>(k_scale.const_data_ptr());
  p.qk_bias = static_cast<const float*>(qk_bias.const_data_ptr());
  p.k_mean = static_cast<const float*>(k_mean.const_data_ptr());
  p.tau = static_cast<const float*>(tau.const_data_ptr());
  p.row_threshold = static_cast<float*>(threshold.mutable_data_ptr());
  p.mask_bits = static_cast<uint32_t*>(bits.mutable_data_ptr());
}

// The warp-specialised wgmma scorer is the default (faster, benchmarks/RESULTS.md);
// SALE_OPS_ESTIMATOR=mma selects the mma.sync scorer, which decides identically.
bool wgmma_estimator() {
  const char* estimator = std::getenv("SALE_OPS_ESTIMATOR");
  return !(estimator && std::string(estimator) == "mma");
}

// The scorers copy code rows in 16-byte pieces (cp.async, TMA): a contiguous codes tensor must also
// start on a 16-byte boundary (a view at an odd offset does not).
void check_codes_aligned(const char* op, const Tensor& t, const char* name) {
  STD_TORCH_CHECK(reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0, op, ": argument '", name,
                  "' must start on a 16-byte boundary; call .clone() first");
}

// The kernels of a selection whose inputs p holds: the sm8x path's, or the Hopper ones.
void launch_selection(const char* op, sale::BlockMaskParams& p, const Tensor& q, int64_t D, cudaStream_t stream) {
  const bool bf16 = p.q_bf16;
  cudaError_t err;
  if (sale_entry::kernel_path(op, q.get_device_index()) == sale_entry::KernelPath::kSm8x) {
    Tensor k_packed = torch::stable::new_empty(
        q, {int64_t(sale_sm8x_entry::block_mask_s4_scratch_bytes(p.batch, p.kv_heads, p.nk, D))}, ScalarType::Byte);
    err = sale_sm8x_entry::launch_block_mask(&p, sizeof p, static_cast<uint8_t*>(k_packed.mutable_data_ptr()), bf16,
                                             int(D), stream);
  } else {
    err = sale::launch_block_mask(p, bf16, int(D), stream);
  }
  STD_TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

Tensor block_mask_bits_cuda(Tensor q, Tensor k, Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale,
                            Tensor qk_bias, Tensor k_mean, Tensor tau, int64_t bq, int64_t bk, int64_t window,
                            double scale) {
  check_selection_args(kOp, q, k, tau, bq, bk, window, scale);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Nk = k.size(2);
  check_cuda_tensor(q_codes, "q_codes", ScalarType::Char, 4, q);
  check_cuda_tensor(q_scale, "q_scale", ScalarType::Float, 3, q);
  check_cuda_tensor(k_codes, "k_codes", ScalarType::Char, 4, q);
  check_cuda_tensor(k_scale, "k_scale", ScalarType::Float, 3, q);
  check_cuda_tensor(qk_bias, "qk_bias", ScalarType::Float, 3, q);
  check_cuda_tensor(k_mean, "k_mean", ScalarType::Float, 3, q);
  const Tensor* contiguous[] = {&q_codes, &q_scale, &k_codes, &k_scale, &qk_bias, &k_mean, &tau};
  for (const Tensor* t : contiguous) {
    STD_TORCH_CHECK(t->is_contiguous(), kOp, ": the quantized tensors and 'tau' must be contiguous");
  }
  STD_TORCH_CHECK(q_codes.size(2) == Nq && k_codes.size(2) == Nk && qk_bias.size(2) == Nk && tau.size(0) == Hq,
                     kOp, ": the quantized tensors do not match 'q' and 'k' (see sale.quantize)");
  check_codes_aligned(kOp, q_codes, "q_codes");
  check_codes_aligned(kOp, k_codes, "k_codes");

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);
  sale::BlockMaskParams p{};
  set_batched_shape(p, q, k, bk, window, scale);
  Tensor threshold = torch::stable::new_empty(q, {B, Hq, Nq}, ScalarType::Float);
  Tensor bits = torch::stable::new_empty(q, {B, Hq, int64_t(p.nQ), int64_t(p.nW)}, ScalarType::Int);
  set_selection_tensors(p, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, threshold, bits);
  p.use_wgmma = wgmma_estimator();
  launch_selection(kOp, p, q, D, stream);
  return bits;
}

// Whether sale.select(_varlen) must store the query codes: only the wgmma scorer makes its own
// (sale/block_mask_sm90.cuh); the sm8x path, SALE_OPS_ESTIMATOR=mma and key sides too large for TMA
// read stored ones. (sale_ops._pipeline.select_stores_q_codes mirrors this for its memory plan.)
bool select_stores_q_codes(const char* op, const sale::BlockMaskParams& p, const Tensor& q) {
  return sale_entry::kernel_path(op, q.get_device_index()) == sale_entry::KernelPath::kSm8x || !p.use_wgmma ||
         !sale::key_rows_fit_tma(p);
}

// sale.select(_varlen)'s quantized tensors, thresholds and output into p; without stored query
// codes the scorer gets the query means instead.
void set_selected_tensors(sale::BlockMaskParams& p, const sale_entry::Quantized& z, bool stored_q_codes,
                          const Tensor& tau, Tensor& threshold, Tensor& bits) {
  set_selection_tensors(p, z.q_codes, z.q_scale, z.k_codes, z.k_scale, z.qk_bias, z.k_mean, tau, threshold, bits);
  if (!stored_q_codes) {
    p.q_codes = nullptr;
    p.q_mean = static_cast<const float*>(z.q_mean.const_data_ptr());
  }
}

// ---------------------------------------------------------------------------------------------
// sale.select: sale.quantize + sale.block_mask_bits in one call. Where the wgmma scorer serves, the
// query codes are never stored: each scorer CTA makes its rows' codes from q (bit-identical), so
// the selection holds ~0.1x the bytes of q + k + v instead of ~0.45x (Llama-3.1-8B shapes) and
// does not write and re-read 1 byte per query element.
// ---------------------------------------------------------------------------------------------
Tensor select_cuda(Tensor q, Tensor k, Tensor tau, int64_t bq, int64_t bk, int64_t window, double scale) {
  constexpr const char* kSelect = "sale.select";
  check_selection_args(kSelect, q, k, tau, bq, bk, window, scale);
  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);
  sale::BlockMaskParams p{};
  set_batched_shape(p, q, k, bk, window, scale);
  p.use_wgmma = wgmma_estimator();
  const bool store_q_codes = select_stores_q_codes(kSelect, p, q);
  const sale_entry::Quantized z = sale_entry::quantize_batched(kSelect, q, k, bk, store_q_codes);
  Tensor threshold = torch::stable::new_empty(q, {B, Hq, Nq}, ScalarType::Float);
  Tensor bits = torch::stable::new_empty(q, {B, Hq, int64_t(p.nQ), int64_t(p.nW)}, ScalarType::Int);
  set_selected_tensors(p, z, store_q_codes, tau, threshold, bits);
  launch_selection(kSelect, p, q, D, stream);
  return bits;
}

// The bool view [B, Hq, nQ, nK] of the same selection.
Tensor block_mask_cuda(Tensor q, Tensor k, Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale,
                       Tensor qk_bias, Tensor k_mean, Tensor tau, int64_t bq, int64_t bk, int64_t window,
                       double scale) {
  Tensor bits = block_mask_bits_cuda(q, k, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, bq, bk, window,
                                     scale);
  const int64_t B = bits.size(0), Hq = bits.size(1), nQ = bits.size(2), nW = bits.size(3);
  const int64_t nK = (k.size(2) + bk - 1) / bk;
  Tensor mask = torch::stable::new_empty(q, {B, Hq, nQ, nK}, ScalarType::Bool);
  const bool sm8x = sale_entry::kernel_path(kOp, q.get_device_index()) == sale_entry::KernelPath::kSm8x;
  const cudaError_t err = (sm8x ? sale_sm8x_entry::launch_expand_mask : sale::launch_expand_mask)(
      static_cast<const uint32_t*>(bits.const_data_ptr()), static_cast<bool*>(mask.mutable_data_ptr()),
      B * Hq * nQ, int(nK), int(nW), sale_entry::current_stream(q));
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return mask;
}

// ---- variable-length (packed) batches (sale/varlen.cuh; checks in entry_utils.h)

namespace vl = sale_entry::varlen;

// ---------------------------------------------------------------------------------------------
// sale.block_mask_bits_varlen -> int32 [B, Hq, ceil(max_q / bq), ceil(ceil(max_k / bk) / 32)]
// ---------------------------------------------------------------------------------------------
void check_quantized(const char* op, const Tensor& t, const char* name, ScalarType dtype, int64_t s0, int64_t s1,
                     int64_t s2, const Tensor& q) {
  vl::check_cuda(op, t, name, q);
  STD_TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), op, ": argument '", name,
                  "' must be a contiguous tensor as sale.quantize_varlen returns it (wrong dtype or strides)");
  const int64_t want[3] = {s0, s1, s2};
  const int64_t dims = s2 < 0 ? 2 : 3;
  bool ok = t.dim() == dims;
  for (int64_t d = 0; ok && d < dims; ++d) ok = t.size(d) == want[d];
  STD_TORCH_CHECK(ok, op, ": argument '", name, "' does not have the shape sale.quantize_varlen gives for 'q' and 'k'");
}

// Packed batches have Hopper kernels only so far; the sm8x path refuses them by name. Then the
// checks shared by sale.block_mask_bits_varlen and sale.select_varlen.
vl::Batch check_varlen_selection_args(const char* op, const Tensor& q, const Tensor& k, const Tensor& cu_q,
                                      const Tensor& cu_k, int64_t max_q, int64_t max_k, const Tensor& tau, int64_t bq,
                                      int64_t bk, int64_t window, double scale) {
  STD_TORCH_CHECK(sale_entry::kernel_path(op, q.get_device_index()) == sale_entry::KernelPath::kSm90, op,
                  ": variable-length batches run on the Hopper kernels only (compute capability 9.0); the sm8x "
                  "path (this GPU, or SALE_OPS_FORCE_SM8X=1) has no varlen kernels yet");
  const vl::Batch vb = vl::check_batch(op, q, k, cu_q, cu_k, max_q, max_k);
  vl::check_blocks(op, bq, bk);
  STD_TORCH_CHECK(window % bk == 0 && window >= bq, op, ": argument 'window' is ", window,
                  "; it must be a multiple of bk and at least bq");
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, op, ": argument 'scale' must be finite and > 0");
  vl::check_cuda(op, tau, "tau", q);
  STD_TORCH_CHECK(tau.scalar_type() == ScalarType::Float && tau.dim() == 1 && tau.size(0) == q.size(1) &&
                      tau.is_contiguous(),
                  op, ": argument 'tau' must be a contiguous float32 [Hq] tensor");
  return vb;
}

// The shapes and raw inputs of a packed selection.
void set_packed_shape(sale::BlockMaskParams& p, const Tensor& q, const Tensor& k, const vl::Batch& vb, int64_t bk,
                      int64_t window, double scale, int64_t dense_below) {
  const int64_t nK = (vb.max_k + bk - 1) / bk;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.q_batch_stride = 0, p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(0);
  p.k_batch_stride = 0, p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(0);
  p.batch = int(vb.batch), p.q_heads = int(q.size(1)), p.kv_heads = int(k.size(1));
  p.nq = int(vb.max_q), p.nk = int(vb.max_k);
  p.bk = int(bk), p.window = int(window), p.nQ = int((vb.max_q + sale::kBq - 1) / sale::kBq), p.nK = int(nK);
  p.nW = int((nK + 31) / 32);
  p.scale = float(scale);
  p.cu_seqlens_q = vb.cu_q, p.cu_seqlens_k = vb.cu_k;
  p.total_q = vb.total_q, p.total_k = vb.total_k;
  p.dense_below = int(std::min<int64_t>(std::max<int64_t>(dense_below, 0), vl::kMaxRows + 1));
  p.q_bf16 = q.scalar_type() == ScalarType::BFloat16;
}

Tensor block_mask_bits_varlen_cuda(Tensor q, Tensor k, Tensor cu_q, Tensor cu_k, int64_t max_q, int64_t max_k,
                                   Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias,
                                   Tensor k_mean, Tensor tau, int64_t bq, int64_t bk, int64_t window, double scale,
                                   int64_t dense_below) {
  constexpr const char* kOp = "sale.block_mask_bits_varlen";
  const vl::Batch vb = check_varlen_selection_args(kOp, q, k, cu_q, cu_k, max_q, max_k, tau, bq, bk, window, scale);
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Tq = vb.total_q, Tk = vb.total_k;
  check_quantized(kOp, q_codes, "q_codes", ScalarType::Char, Hq, Tq, D, q);
  check_quantized(kOp, q_scale, "q_scale", ScalarType::Float, Hq, Tq, -1, q);
  check_quantized(kOp, k_codes, "k_codes", ScalarType::Char, Hkv, Tk, D, q);
  check_quantized(kOp, k_scale, "k_scale", ScalarType::Float, Hkv, Tk, -1, q);
  check_quantized(kOp, qk_bias, "qk_bias", ScalarType::Float, Hq, Tk, -1, q);
  check_quantized(kOp, k_mean, "k_mean", ScalarType::Float, vb.batch, Hkv, D, q);
  check_codes_aligned(kOp, q_codes, "q_codes");
  check_codes_aligned(kOp, k_codes, "k_codes");

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);
  sale::BlockMaskParams p{};
  set_packed_shape(p, q, k, vb, bk, window, scale, dense_below);
  Tensor threshold = torch::stable::new_empty(q, {Hq, Tq}, ScalarType::Float);
  Tensor bits = torch::stable::new_empty(q, {vb.batch, Hq, int64_t(p.nQ), int64_t(p.nW)}, ScalarType::Int);
  set_selection_tensors(p, q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, tau, threshold, bits);
  p.use_wgmma = wgmma_estimator();
  launch_selection(kOp, p, q, D, stream);
  return bits;
}

// sale.select_varlen: sale.select for a packed batch (quantize_varlen + block_mask_bits_varlen).
Tensor select_varlen_cuda(Tensor q, Tensor k, Tensor cu_q, Tensor cu_k, int64_t max_q, int64_t max_k, Tensor tau,
                          int64_t bq, int64_t bk, int64_t window, double scale, int64_t dense_below) {
  constexpr const char* kOp = "sale.select_varlen";
  const vl::Batch vb = check_varlen_selection_args(kOp, q, k, cu_q, cu_k, max_q, max_k, tau, bq, bk, window, scale);
  const int64_t Hq = q.size(1), D = q.size(2), Tq = vb.total_q;

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);
  sale::BlockMaskParams p{};
  set_packed_shape(p, q, k, vb, bk, window, scale, dense_below);
  p.use_wgmma = wgmma_estimator();
  const bool store_q_codes = select_stores_q_codes(kOp, p, q);
  const sale_entry::Quantized z = sale_entry::quantize_packed(kOp, q, k, vb, bk, store_q_codes);
  Tensor threshold = torch::stable::new_empty(q, {Hq, Tq}, ScalarType::Float);
  Tensor bits = torch::stable::new_empty(q, {vb.batch, Hq, int64_t(p.nQ), int64_t(p.nW)}, ScalarType::Int);
  set_selected_tensors(p, z, store_q_codes, tau, threshold, bits);
  launch_selection(kOp, p, q, D, stream);
  return bits;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sale, CUDA, m) {
  m.impl("block_mask", TORCH_BOX(&block_mask_cuda));
  m.impl("block_mask_bits", TORCH_BOX(&block_mask_bits_cuda));
  m.impl("block_mask_bits_varlen", TORCH_BOX(&block_mask_bits_varlen_cuda));
  m.impl("select", TORCH_BOX(&select_cuda));
  m.impl("select_varlen", TORCH_BOX(&select_varlen_cuda));
}
