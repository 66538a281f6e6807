// Helpers shared by the stable-ABI CUDA entries (*_cuda.cu): argument checks the kernels rely on
// and the caller's CUDA stream.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace sale_entry {

// The kernels read 4- and 16-byte vectors of [B, H, N, D] rows: every row must start on a 16-byte
// boundary.
inline void check_rows_aligned(const char* op, const torch::stable::Tensor& t, const char* name) {
  STD_TORCH_CHECK(t.stride(3) == 1, op, ": argument '", name, "' must have a contiguous last dimension, got stride ",
                  t.stride(3));
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                       t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  STD_TORCH_CHECK(aligned, op, ": argument '", name,
                  "' must start on a 16-byte boundary with batch/head/row strides that are multiples of 8 "
                  "elements; call .contiguous() first");
}

// The current stream of t's device (the caller must hold a DeviceGuard for that device).
inline cudaStream_t current_stream(const torch::stable::Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// Streaming multiprocessors of t's device (for grid-stride kernels).
inline int sm_count(const torch::stable::Tensor& t) {
  int n = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.get_device_index());
  STD_TORCH_CHECK(err == cudaSuccess, "cudaDeviceGetAttribute(multiProcessorCount) failed: ", cudaGetErrorString(err));
  return n;
}

// ---- Variable-length (packed) batches: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32
// [B + 1] on the device. Sizes come from shapes and the max_seqlen ints, never from cu_seqlens'
// values (no host sync); the checks that need the values (cu[0] = 0, non-decreasing, cu[B] = total,
// lengths <= max, Nq_b <= Nk_b) run in Python where reading them is free (sale_ops._checks).

namespace varlen {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

inline constexpr int64_t kMaxRows = int64_t(1) << 30;  // row indices and offsets are int in the kernels

inline void check_cuda(const char* op, const Tensor& t, const char* name, const Tensor& q) {
  STD_TORCH_CHECK(t.is_cuda(), op, ": argument '", name, "' must be a CUDA tensor");
  STD_TORCH_CHECK(t.get_device_index() == q.get_device_index(), op, ": argument '", name, "' is on cuda:",
                  t.get_device_index(), " but 'q' is on cuda:", q.get_device_index());
}

// A packed [total, H, D] input: fp16/bf16 like q, rows on 16-byte boundaries.
inline void check_packed(const char* op, const Tensor& t, const char* name, const Tensor& q) {
  check_cuda(op, t, name, q);
  STD_TORCH_CHECK(t.dim() == 3, op, ": argument '", name, "' must be packed [total, H, D], got ", t.dim(),
                  " dimensions");
  STD_TORCH_CHECK(t.scalar_type() == ScalarType::Half || t.scalar_type() == ScalarType::BFloat16, op,
                  ": argument '", name, "' must be float16 or bfloat16");
  STD_TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": argument '", name, "' must have the dtype of 'q'");
  STD_TORCH_CHECK(t.size(0) <= kMaxRows, op, ": argument '", name, "' has ", t.size(0), " rows; supported: up to 2^30");
  STD_TORCH_CHECK(t.size(0) == 0 || t.stride(2) == 1, op, ": argument '", name,
                  "' must have a contiguous last dimension");
  const bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                       t.stride(1) % 8 == 0;
  STD_TORCH_CHECK(aligned, op, ": argument '", name,
                  "' must start on a 16-byte boundary with row/head strides that are multiples of 8 elements; "
                  "call .contiguous() first");
}

struct Batch {
  int64_t batch, total_q, total_k, max_q, max_k;
  const int* cu_q;
  const int* cu_k;
};

// q [total_q, Hq, D], k [total_k, Hkv, D], the two cu_seqlens and the max lengths.
inline Batch check_batch(const char* op, const Tensor& q, const Tensor& k, const Tensor& cu_q, const Tensor& cu_k,
                         int64_t max_q, int64_t max_k) {
  check_packed(op, q, "q", q);
  check_packed(op, k, "k", q);
  const int64_t Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  STD_TORCH_CHECK(k.size(2) == D, op, ": head dims differ: 'q' has D=", D, ", 'k' has D=", k.size(2));
  STD_TORCH_CHECK(D == 64 || D == 128, op, ": argument 'q' has head dim ", D, "; supported: 64, 128");
  STD_TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, op, ": query heads must be a multiple of kv heads, got Hq=", Hq,
                  " ('q') and Hkv=", Hkv, " ('k')");
  STD_TORCH_CHECK(Hq <= 65535, op, ": query heads (", Hq, ") must be at most 65535");
  using Named = std::pair<const char*, const Tensor*>;
  for (const auto& [name, t] : {Named{"cu_seqlens_q", &cu_q}, Named{"cu_seqlens_k", &cu_k}}) {
    check_cuda(op, *t, name, q);
    STD_TORCH_CHECK(t->scalar_type() == ScalarType::Int, op, ": argument '", name, "' must be torch.int32");
    STD_TORCH_CHECK(t->dim() == 1 && t->size(0) >= 2 && t->is_contiguous(), op, ": argument '", name,
                    "' must be a contiguous 1-D tensor of B + 1 >= 2 offsets");
  }
  STD_TORCH_CHECK(cu_q.size(0) == cu_k.size(0), op, ": 'cu_seqlens_q' has ", cu_q.size(0),
                  " offsets but 'cu_seqlens_k' has ", cu_k.size(0), "; both must hold B + 1");
  const int64_t B = cu_q.size(0) - 1;
  STD_TORCH_CHECK(B <= 65535, op, ": batch (", B, ") must be at most 65535");
  STD_TORCH_CHECK(max_q >= 1 && max_k >= 1 && max_q <= kMaxRows && max_k <= kMaxRows, op,
                  ": arguments 'max_seqlen_q' (", max_q, ") and 'max_seqlen_k' (", max_k, ") must be in [1, 2^30]");
  return {B, q.size(0), k.size(0), max_q, max_k, static_cast<const int*>(cu_q.const_data_ptr()),
          static_cast<const int*>(cu_k.const_data_ptr())};
}

inline void check_blocks(const char* op, int64_t bq, int64_t bk) {
  STD_TORCH_CHECK(bq == 64, op, ": argument 'bq' is ", bq, "; supported: 64");
  STD_TORCH_CHECK(bk == 32 || bk == 64, op, ": argument 'bk' is ", bk, "; supported: 32, 64");
}

}  // namespace varlen

}  // namespace sale_entry
