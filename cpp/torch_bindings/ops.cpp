// Schemas of the torch.ops.sale.* operators, defined once here with the
// LibTorch stable ABI (built with TORCH_TARGET_VERSION = torch 2.10).
//
// Implementations are registered elsewhere: Python reference implementations
// (torch.library) for now, CUDA kernels via STABLE_TORCH_LIBRARY_IMPL(sale,
// CUDA, m) in cpp/torch_bindings/*_cuda.cu.
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(sale, m) {
  m.def("quantize(Tensor q, Tensor k, int bk) -> (Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias, Tensor k_mean)");
  m.def("block_mask(Tensor q, Tensor k, Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias, Tensor k_mean, Tensor tau, int bq, int bk, int window, float scale) -> Tensor");
  m.def("block_mask_bits(Tensor q, Tensor k, Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias, Tensor k_mean, Tensor tau, int bq, int bk, int window, float scale) -> Tensor");
  // quantize + block_mask_bits in one call, without storing the query codes where the wgmma scorer serves.
  m.def("select(Tensor q, Tensor k, Tensor tau, int bq, int bk, int window, float scale) -> Tensor");
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, int bq, int bk, float scale, bool causal) -> (Tensor out, Tensor lse)");
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor tau, int bq, int bk, int window, float scale, bool causal, int dense_below) -> (Tensor out, Tensor lse, Tensor block_mask_bits)");
  // Variable-length (packed) batches: q [total_q, Hq, D], k/v [total_k, Hkv, D], cu_seqlens int32
  // [B + 1] on q's device, max_seqlen_* the longest sequence (sizes every output: no host sync).
  m.def("quantize_varlen(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int bk) -> (Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias, Tensor k_mean)");
  m.def("block_mask_bits_varlen(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor q_codes, Tensor q_scale, Tensor k_codes, Tensor k_scale, Tensor qk_bias, Tensor k_mean, Tensor tau, int bq, int bk, int window, float scale, int dense_below) -> Tensor");
  m.def("select_varlen(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor tau, int bq, int bk, int window, float scale, int dense_below) -> Tensor");
  m.def("block_sparse_attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor block_mask, int bq, int bk, float scale, bool causal) -> (Tensor out, Tensor lse)");
  m.def("attention_varlen(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, Tensor tau, int bq, int bk, int window, float scale, bool causal, int dense_below) -> (Tensor out, Tensor lse, Tensor block_mask_bits)");
}
