// Helpers shared by the stable-ABI CUDA entries (*_cuda.cu): argument checks the kernels rely on
// and the caller's CUDA stream.
#pragma once

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdint>

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

}  // namespace sale_entry
