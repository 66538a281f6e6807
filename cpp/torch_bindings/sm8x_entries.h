// The sm8x implementations behind the CUDA op entries (issue 7): defined in *_sm8x_cuda.cu, which
// are compiled for sm_80/86/89 SASS plus compute_80 PTX. The entries (*_cuda.cu) validate the
// arguments, fill their params struct and call these when sale_entry::kernel_path picks
// KernelPath::kSm8x.
//
// The params cross as bytes: the sm8x files compile the same kernel headers in a namespace of
// their own (a kernel template instantiated by two translation units built for different
// architectures would share one host stub, and one of the two fatbins would lose it), so their
// struct is another type with the same definition; the size is checked on the way in.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace sale_sm8x_entry {

#if SALE_OPS_HAVE_SM8X
// sale::BlockMaskParams -> the bit-packed mask with the int4 scorer (block_mask_sm80.cuh), or with
// the 8-bit mma.sync scorer when params.use_wgmma is false (SALE_OPS_ESTIMATOR=mma).
// k_packed: block_mask_s4_scratch_bytes() of device memory.
cudaError_t launch_block_mask(const void* params, size_t params_size, uint8_t* k_packed, bool is_bf16, int head_dim,
                              cudaStream_t stream);
cudaError_t launch_expand_mask(const uint32_t* bits, bool* mask, int64_t rows, int nK, int nW, cudaStream_t stream);
// sale::BlockSparseAttentionParams -> out, lse with the mma.sync kernel (block_sparse_attention.cuh).
cudaError_t launch_block_sparse_attention(const void* params, size_t params_size, bool is_bf16, int head_dim, int bk,
                                          cudaStream_t stream);
#else
// Built without sm8x architectures: sale_entry::kernel_path never picks this path.
inline cudaError_t launch_block_mask(const void*, size_t, uint8_t*, bool, int, cudaStream_t) {
  return cudaErrorNoKernelImageForDevice;
}
inline cudaError_t launch_expand_mask(const uint32_t*, bool*, int64_t, int, int, cudaStream_t) {
  return cudaErrorNoKernelImageForDevice;
}
inline cudaError_t launch_block_sparse_attention(const void*, size_t, bool, int, int, cudaStream_t) {
  return cudaErrorNoKernelImageForDevice;
}
#endif

// Bytes of packed key codes the int4 scorer needs (two 4-bit codes per byte).
inline size_t block_mask_s4_scratch_bytes(int64_t batch, int64_t kv_heads, int64_t nk, int64_t head_dim) {
  return size_t(batch * kv_heads * nk * head_dim / 2);
}

}  // namespace sale_sm8x_entry
