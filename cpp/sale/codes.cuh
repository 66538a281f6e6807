// SPEC §2's code arithmetic shared by the quantize kernels and the wgmma scorer, which makes the
// query codes itself for sale.select: one definition, so the two give bit-identical codes.
// Device functions only (no kernels), so any translation unit may include it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sale {

// SPEC §2's 4-bit code of x with its sequence mean mu and group scale. True division, as the
// reference: x * (1/scale) can round to the other side of a tie.
__device__ __forceinline__ int code_of(float x, float mu, float scale) {
  return min(7, max(-7, __float2int_rn(__fdiv_rn(x - mu, scale))));
}

template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t w);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t w) {
  return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t w) {
  return __half22float2(__halves2half2(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)),
                                       __ushort_as_half(static_cast<unsigned short>(w >> 16))));
}

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& r, float (&f)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 v = unpack2<T>(w[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

}  // namespace sale
