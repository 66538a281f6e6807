// sale.block_mask / sale.block_mask_bits on the sm8x path (sm8x_entries.h): exact statistics on
// f16/bf16 mma.sync (block_mask.cuh), candidates on int4 tensor cores (block_mask_sm80.cuh; the
// 8-bit mma.sync scorer with SALE_OPS_ESTIMATOR=mma).
// Compiled for sm_80/86/89 plus compute_80 PTX.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "sm8x_entries.h"

// The kernel headers in a namespace of their own: this file's instantiations of
// row_threshold_kernel etc. must not be those of block_mask_cuda.cu (sm_90a only). Every header
// they include was included above, so only their own code lands in the namespace.
namespace sale_sm8x {
#include "sale/block_mask_sm80.cuh"
}  // namespace sale_sm8x

namespace sale_sm8x_entry {

using Params = sale_sm8x::sale::BlockMaskParams;

cudaError_t launch_block_mask(const void* params, size_t params_size, uint8_t* k_packed, bool is_bf16, int head_dim,
                              cudaStream_t stream) {
  static_assert(std::is_trivially_copyable_v<Params>);
  if (params_size != sizeof(Params)) return cudaErrorInvalidValue;
  Params p;
  std::memcpy(&p, params, sizeof p);
  // use_wgmma is the entry's "fast scorer" choice (SALE_OPS_ESTIMATOR unset): here the int4 one;
  // SALE_OPS_ESTIMATOR=mma selects the 8-bit mma.sync scorer, which decides identically.
  if (!p.use_wgmma) return sale_sm8x::sale::launch_block_mask_s8(p, is_bf16, head_dim, stream);
  return sale_sm8x::sale::launch_block_mask_s4(p, k_packed, is_bf16, head_dim, stream);
}

cudaError_t launch_expand_mask(const uint32_t* bits, bool* mask, int64_t rows, int nK, int nW, cudaStream_t stream) {
  return sale_sm8x::sale::launch_expand_mask(bits, mask, rows, nK, nW, stream);
}

}  // namespace sale_sm8x_entry
