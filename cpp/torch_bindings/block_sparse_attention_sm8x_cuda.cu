// sale.block_sparse_attention on the sm8x path (sm8x_entries.h): the FlashAttention-2-style
// mma.sync kernel of block_sparse_attention.cuh (cp.async double buffering, sm_80 features only).
// Compiled for sm_80/86/89 plus compute_80 PTX.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sm8x_entries.h"

// Own namespace for the kernel instantiations (see block_mask_sm8x_cuda.cu).
namespace sale_sm8x {
#include "sale/block_sparse_attention.cuh"
}  // namespace sale_sm8x

namespace sale_sm8x_entry {

cudaError_t launch_block_sparse_attention(const void* params, size_t params_size, bool is_bf16, int head_dim, int bk,
                                          cudaStream_t stream) {
  using Params = sale_sm8x::sale::BlockSparseAttentionParams;
  static_assert(std::is_trivially_copyable_v<Params>);
  if (params_size != sizeof(Params)) return cudaErrorInvalidValue;
  Params p;
  std::memcpy(&p, params, sizeof p);
  return sale_sm8x::sale::launch_block_sparse_attention(p, is_bf16, head_dim, bk, stream);
}

}  // namespace sale_sm8x_entry
