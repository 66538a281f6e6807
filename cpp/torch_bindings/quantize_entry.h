// sale.quantize's allocation and launch, shared by the entries that quantize: quantize_cuda.cu
// defines it (that file is compiled for every architecture, so its kernels serve any GPU) and
// block_mask_cuda.cu's sale.select calls it (its own instantiation would be sm_90a only).
#pragma once

#include <torch/csrc/stable/tensor.h>

#include <cstdint>

#include "entry_utils.h"

namespace sale_entry {

// SPEC §2 for batched q [B, Hq, Nq, D], k [B, Hkv, Nk, D] (validated by the caller), as
// sale.quantize returns it. Without store_q_codes, q_codes is an empty tensor and no query code
// is written (the query scales are); q_mean [B, Hq, D] is the query means the codes come from.
struct Quantized {
  torch::stable::Tensor q_codes, q_scale, k_codes, k_scale, qk_bias, k_mean, q_mean;
};
Quantized quantize_batched(const char* op, const torch::stable::Tensor& q, const torch::stable::Tensor& k, int64_t bk,
                           bool store_q_codes);
// The same for a packed batch (q [total_q, Hq, D], k [total_k, Hkv, D], checked into vb), as
// sale.quantize_varlen returns it; q_mean is [B, Hq, D].
Quantized quantize_packed(const char* op, const torch::stable::Tensor& q, const torch::stable::Tensor& k,
                          const varlen::Batch& vb, int64_t bk, bool store_q_codes);

}  // namespace sale_entry
