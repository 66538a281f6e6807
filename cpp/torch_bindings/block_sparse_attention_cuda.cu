// torch.ops.sale.block_sparse_attention on CUDA: the stable-ABI entry around
// cpp/sale/block_sparse_attention.cuh. This file's kernels are sm_90a; on other GPUs the sm8x path
// (block_sparse_attention_sm8x_cuda.cu) serves (arch_dispatch.h).
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <tuple>

#include "arch_dispatch.h"
#include "entry_utils.h"
#include "sm8x_entries.h"
#include "sale/block_sparse_attention.cuh"
#include "sale/block_sparse_attention_sm90.cuh"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

constexpr const char* kOp = "sale.block_sparse_attention";
constexpr int64_t kMaxLen = int64_t(1) << 30;  // key/row indices are int in the kernel

// The Hopper launch of both entries. The wgmma kernel is the default; SALE_OPS_ATTENTION=mma selects
// the mma.sync kernel (the sm80-style path, slower on Hopper), SALE_OPS_ATTENTION=fast the wgmma
// kernel with P rounded once (bf16 only: faster, but outside SPEC §7's elementwise bound in rare
// elements for large V). The wgmma kernel's P.V runs in fp16: bf16 V is converted first into a
// temporary of V's size, [batches, Hkv, nk, D] (packed: one "batch" holding every sequence's rows,
// which keep their offsets); fp16 V is read as is.
cudaError_t launch_hopper(const char* op, sale::BlockSparseAttentionParams p, const Tensor& q, const Tensor& v,
                          bool packed, int64_t batches, int64_t nk, bool is_bf16, int64_t D, int64_t bk,
                          cudaStream_t stream) {
  const char* env = std::getenv("SALE_OPS_ATTENTION");
  const std::string choice = env ? env : "";
  if (choice == "mma") return sale::launch_block_sparse_attention(p, is_bf16, int(D), int(bk), stream);
  const int sms = sale_entry::sm_count(q);
  const unsigned* v_amax_bits = nullptr;
  Tensor v_half, amax;
  if (is_bf16 && nk > 0) {
    const int64_t Hkv = p.kv_heads;
    v_half = torch::stable::new_empty(q, {batches, Hkv, nk, D}, ScalarType::Half);
    amax = torch::stable::new_empty(q, {1}, ScalarType::Int);
    sale::ConvertVParams cv{};
    cv.v = static_cast<const __nv_bfloat16*>(v.const_data_ptr());
    cv.batch_stride = packed ? 0 : v.stride(0), cv.head_stride = v.stride(1), cv.row_stride = v.stride(packed ? 0 : 2);
    cv.heads = int(Hkv), cv.nk = int(nk), cv.d = int(D);
    cv.out = static_cast<__half*>(v_half.mutable_data_ptr());
    cv.amax_bits = static_cast<unsigned*>(amax.mutable_data_ptr());
    cv.rows = batches * Hkv * nk;
    const cudaError_t err = sale::launch_convert_v(cv, sms, stream);
    STD_TORCH_CHECK(err == cudaSuccess, op, ": V conversion launch failed: ", cudaGetErrorString(err));
    p.v = cv.out;
    p.v_batch_stride = packed ? 0 : Hkv * nk * D, p.v_head_stride = nk * D, p.v_row_stride = D;
    v_amax_bits = cv.amax_bits;
  }
  // The persistent kernel's work counter (zeroed by the launch, on the stream).
  const Tensor counter = torch::stable::new_empty(q, {1}, ScalarType::Long);
  auto* item_counter = static_cast<unsigned long long*>(counter.mutable_data_ptr());
  return sale::launch_block_sparse_attention_sm90(p, v_amax_bits, item_counter, sms, is_bf16, int(D), int(bk),
                                                  choice == "fast", stream);
}

// The fields the batched and packed entries fill alike: data pointers, the mask (bool or bit-packed,
// [B, Hq, nQ, *] either way), the outputs, scale and causality. Strides and sizes are the caller's.
sale::BlockSparseAttentionParams common_params(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& block_mask, bool packed, Tensor& out, Tensor& lse,
                                               double scale, bool causal) {
  sale::BlockSparseAttentionParams p{};
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.mask = block_mask.const_data_ptr();
  p.mask_packed = packed;
  p.mask_batch_stride = block_mask.stride(0), p.mask_head_stride = block_mask.stride(1);
  p.mask_row_stride = block_mask.stride(2), p.mask_col_stride = block_mask.stride(3);
  p.out = out.mutable_data_ptr();
  p.lse = static_cast<float*>(lse.mutable_data_ptr());
  p.scale = float(scale);
  p.causal = causal;
  return p;
}

void check_cuda_tensor(const Tensor& t, const char* name, const Tensor& like) {
  STD_TORCH_CHECK(t.is_cuda(), kOp, ": argument '", name, "' must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == like.get_device_index(), kOp, ": argument '", name,
                     "' is on device cuda:", t.get_device_index(), " but 'q' is on cuda:", like.get_device_index());
  STD_TORCH_CHECK(t.dim() == 4, kOp, ": argument '", name, "' must have 4 dimensions, got ", t.dim());
}

std::tuple<Tensor, Tensor> block_sparse_attention_cuda(Tensor q, Tensor k, Tensor v, Tensor block_mask, int64_t bq,
                                                       int64_t bk, double scale, bool causal) {
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  check_cuda_tensor(v, "v", q);
  check_cuda_tensor(block_mask, "block_mask", q);
  const ScalarType dt = q.scalar_type();
  STD_TORCH_CHECK(dt == ScalarType::BFloat16 || dt == ScalarType::Half, kOp, ": argument 'q' has dtype ", dt,
                     "; supported: float16, bfloat16");
  STD_TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt, kOp, ": arguments 'k' (", k.scalar_type(),
                     ") and 'v' (", v.scalar_type(), ") must have the dtype of 'q' (", dt, ")");
  const bool packed = block_mask.scalar_type() == ScalarType::Int;
  STD_TORCH_CHECK(packed || block_mask.scalar_type() == ScalarType::Bool, kOp, ": argument 'block_mask' has dtype ",
                     block_mask.scalar_type(), "; supported: bool, or int32 bit-packed words (sale.block_mask_bits)");

  const int64_t B = q.size(0), Hq = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  STD_TORCH_CHECK(k.size(0) == B && k.size(3) == D, kOp, ": argument 'k' must be [B, Hkv, Nk, D] with B=", B,
                     " and D=", D, " of 'q', got [", k.size(0), ", ", Hkv, ", ", Nk, ", ", k.size(3), "]");
  STD_TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, kOp, ": query heads must be a multiple of kv heads, got Hq=", Hq,
                     " ('q') and Hkv=", Hkv, " ('k')");
  for (int d = 0; d < 4; ++d) {
    STD_TORCH_CHECK(v.size(d) == k.size(d), kOp, ": argument 'v' must have the shape of 'k'; dim ", d, " is ",
                       v.size(d), ", not ", k.size(d));
  }
  STD_TORCH_CHECK(D == 64 || D == 128, kOp, ": argument 'q' has head dim ", D, "; supported: 64, 128");
  STD_TORCH_CHECK(bq == 64, kOp, ": argument 'bq' is ", bq, "; supported: 64");
  STD_TORCH_CHECK(bk == 32 || bk == 64, kOp, ": argument 'bk' is ", bk, "; supported: 32, 64");
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, kOp, ": argument 'scale' is ", scale,
                     "; it must be a finite number > 0");
  STD_TORCH_CHECK(Nq >= 1 && Nk >= 1, kOp, ": empty sequence: 'q' has Nq=", Nq, ", 'k' has Nk=", Nk,
                     "; both must be >= 1");
  STD_TORCH_CHECK(!causal || Nq <= Nk, kOp, ": causal attention needs Nq <= Nk (queries are the last Nq positions), got Nq=",
                     Nq, " ('q') and Nk=", Nk, " ('k')");
  STD_TORCH_CHECK(Nq <= kMaxLen && Nk <= kMaxLen, kOp, ": sequence too long: Nq=", Nq, ", Nk=", Nk,
                     "; supported: up to 2^30");
  STD_TORCH_CHECK(B <= 65535 && Hq <= 65535, kOp, ": batch (", B, ") and query heads (", Hq,
                     ") must each be at most 65535");
  const int64_t nQ = (Nq + bq - 1) / bq, nK = (Nk + bk - 1) / bk;
  const int64_t mask_cols = packed ? (nK + 31) / 32 : nK;
  STD_TORCH_CHECK(block_mask.size(0) == B && block_mask.size(1) == Hq && block_mask.size(2) == nQ &&
                         block_mask.size(3) == mask_cols,
                     kOp, ": argument 'block_mask' must have shape [B, Hq, ceil(Nq/bq), ",
                     packed ? "ceil(ceil(Nk/bk)/32)" : "ceil(Nk/bk)", "] = [", B, ", ", Hq, ", ", nQ, ", ", mask_cols,
                     "], got [", block_mask.size(0), ", ", block_mask.size(1), ", ", block_mask.size(2), ", ",
                     block_mask.size(3), "]");
  sale_entry::check_rows_aligned(kOp, q, "q");
  sale_entry::check_rows_aligned(kOp, k, "k");
  sale_entry::check_rows_aligned(kOp, v, "v");

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);

  Tensor out = torch::stable::new_empty(q, {B, Hq, Nq, D}, dt);
  Tensor lse = torch::stable::new_empty(q, {B, Hq, Nq}, ScalarType::Float);

  sale::BlockSparseAttentionParams p = common_params(q, k, v, block_mask, packed, out, lse, scale, causal);
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.batch = int(B), p.q_heads = int(Hq), p.kv_heads = int(Hkv), p.nq = int(Nq), p.nk = int(Nk);
  p.nQ = int(nQ), p.nK = int(nK);
  const bool is_bf16 = dt == ScalarType::BFloat16;
  cudaError_t err;
  if (sale_entry::kernel_path(kOp, q.get_device_index()) == sale_entry::KernelPath::kSm8x) {
    // The sm8x path has the mma.sync kernel only (SPEC-exact P split; the switch is ignored).
    err = sale_sm8x_entry::launch_block_sparse_attention(&p, sizeof p, is_bf16, int(D), int(bk), stream);
  } else {
    err = launch_hopper(kOp, p, q, v, false, B, Nk, is_bf16, D, bk, stream);
  }
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(out, lse);
}

// ---- variable-length (packed) batches (sale/varlen.cuh; checks in entry_utils.h)

namespace vl = sale_entry::varlen;

// ---------------------------------------------------------------------------------------------
// sale.block_sparse_attention_varlen -> out [Tq, Hq, D], lse [Hq, Tq]
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> block_sparse_attention_varlen_cuda(Tensor q, Tensor k, Tensor v, Tensor cu_q, Tensor cu_k,
                                                              int64_t max_q, int64_t max_k, Tensor block_mask,
                                                              int64_t bq, int64_t bk, double scale, bool causal) {
  constexpr const char* kOp = "sale.block_sparse_attention_varlen";
  // Packed batches have Hopper kernels only so far; the sm8x path refuses them by name.
  STD_TORCH_CHECK(sale_entry::kernel_path(kOp, q.get_device_index()) == sale_entry::KernelPath::kSm90, kOp,
                  ": variable-length batches run on the Hopper kernels only (compute capability 9.0); the sm8x "
                  "path (this GPU, or SALE_OPS_FORCE_SM8X=1) has no varlen kernels yet");
  const vl::Batch vb = vl::check_batch(kOp, q, k, cu_q, cu_k, max_q, max_k);
  vl::check_packed(kOp, v, "v", q);
  for (int d = 0; d < 3; ++d)
    STD_TORCH_CHECK(v.size(d) == k.size(d), kOp, ": argument 'v' must have the shape of 'k'; dim ", d, " is ",
                    v.size(d), ", not ", k.size(d));
  vl::check_blocks(kOp, bq, bk);
  STD_TORCH_CHECK(std::isfinite(scale) && scale > 0, kOp, ": argument 'scale' is ", scale,
                  "; it must be a finite number > 0");
  vl::check_cuda(kOp, block_mask, "block_mask", q);
  const bool packed = block_mask.scalar_type() == ScalarType::Int;
  STD_TORCH_CHECK(packed || block_mask.scalar_type() == ScalarType::Bool, kOp,
                  ": argument 'block_mask' must be bool or int32 bit-packed words");
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1), Tq = vb.total_q, Tk = vb.total_k;
  const int64_t nQ = (max_q + bq - 1) / bq, nK = (max_k + bk - 1) / bk, cols = packed ? (nK + 31) / 32 : nK;
  STD_TORCH_CHECK(block_mask.dim() == 4 && block_mask.size(0) == vb.batch && block_mask.size(1) == Hq &&
                      block_mask.size(2) == nQ && block_mask.size(3) == cols,
                  kOp, ": argument 'block_mask' must have shape [B, Hq, ceil(max_seqlen_q/bq), ",
                  packed ? "ceil(ceil(max_seqlen_k/bk)/32)" : "ceil(max_seqlen_k/bk)", "] = [", vb.batch, ", ", Hq,
                  ", ", nQ, ", ", cols, "]");

  torch::stable::accelerator::DeviceGuard guard(q.get_device_index());
  const cudaStream_t stream = sale_entry::current_stream(q);
  Tensor out = torch::stable::new_empty(q, {Tq, Hq, D}, q.scalar_type());
  Tensor lse = torch::stable::new_empty(q, {Hq, Tq}, ScalarType::Float);
  if (Tq == 0) return std::make_tuple(out, lse);

  sale::BlockSparseAttentionParams p = common_params(q, k, v, block_mask, packed, out, lse, scale, causal);
  p.q_batch_stride = 0, p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(0);
  p.k_batch_stride = 0, p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(0);
  p.v_batch_stride = 0, p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(0);
  p.batch = int(vb.batch), p.q_heads = int(Hq), p.kv_heads = int(Hkv), p.nq = int(max_q), p.nk = int(max_k);
  p.nQ = int(nQ), p.nK = int(nK);
  p.cu_seqlens_q = vb.cu_q, p.cu_seqlens_k = vb.cu_k;
  p.total_q = Tq;
  const bool is_bf16 = q.scalar_type() == ScalarType::BFloat16;
  const cudaError_t err = launch_hopper(kOp, p, q, v, true, 1, Tk, is_bf16, D, bk, stream);
  STD_TORCH_CHECK(err == cudaSuccess, kOp, ": kernel launch failed: ", cudaGetErrorString(err));
  return std::make_tuple(out, lse);
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sale, CUDA, m) {
  m.impl("block_sparse_attention", TORCH_BOX(&block_sparse_attention_cuda));
  m.impl("block_sparse_attention_varlen", TORCH_BOX(&block_sparse_attention_varlen_cuda));
}
