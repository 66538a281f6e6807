// Warp-level tensor-core and async-copy primitives (sm_80+ PTX), torch-free.
//
// Fragment ownership of mma.sync (PTX ISA "Matrix fragments for mma.m16n8k*"), with
// g = lane / 4 and t = lane % 4:
//   accumulator c[0], c[1]: row g,     columns 2t, 2t+1
//               c[2], c[3]: row g + 8, columns 2t, 2t+1
// SPEC §2's scale groups follow exactly this ownership: rows g and g + 8 share a query scale,
// and columns 2t, 2t+1 of every 8-column tile share a key scale ((o mod 8) div 2 == t). So each
// thread sees one query scale and one key scale per 16-row tile, whatever the key block.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cuda_fp16.h>

namespace sale {

// D(16x8, s32) += A(16x32, s8, row) * B(32x8, s8, col), saturating instead of wrapping.
__device__ __forceinline__ void mma_s8_16x8x32(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D(16x8, s32) = A(16x32, s8) * B(32x8, s8) + C, saturating, with C given as one value per column
// pair (c0, c1), the same for rows g and g + 8 (a per-key start value, e.g. a bias).
__device__ __forceinline__ void mma_s8_16x8x32_from(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                    int32_t c0, int32_t c1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%10,%11};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c0), "r"(c1));
}

// D(16x8, f32) += A(16x16, f16/bf16, row) * B(16x8, f16/bf16, col).
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
// For int8 data stored [key][dim], matrix i's fragment is exactly an s8 mma B register:
// key = lane / 4, dims 4 (lane % 4) .. + 3 of the matrix's 16 dims.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// The first 1024-byte boundary in a dynamic shared-memory buffer (swizzled wgmma tiles need it).
// Pointer arithmetic on the __shared__ array itself, not on an integer address, keeps the shared
// address space visible to the compiler: accesses through the result stay ld/st.shared instead of
// generic loads.
template <typename T>
__device__ __forceinline__ T& aligned_smem_1024(unsigned char* smem_raw) {
  const uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  return *reinterpret_cast<T*>(smem_raw + ((1024u - (addr & 1023u)) & 1023u));
}

// 16-byte global -> shared copy; src_bytes < 16 zero-fills the rest (0: a pure zero fill).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

// 16-byte store of registers to shared memory (st.shared: a generic store would go through the
// generic address path).
__device__ __forceinline__ void st_shared_16(void* smem, const uint4& v) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(s), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

// 4-byte global -> shared copy (for data without 16-byte alignment); src_bytes 0 zero-fills.
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, int src_bytes) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Reductions over the 4 lanes of a quad (the lanes sharing an accumulator row).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

// ldmatrix_x4 with .trans: lane (g, t) gets rows 2t, 2t+1 of column g of each 8x8 matrix. For
// V stored [key][dim], the matrix at (keys k0.., dims n0..) gives exactly an f16/bf16 mma B
// register (k = key, n = dim), so P.V needs no transposed copy of V.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// Two floats rounded to nearest into one f16x2/bf16x2 register (lo in the low half): the
// layout of an mma A/B fragment element pair and of two consecutive elements in memory.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// hi = pack2(x, y), lo = its rounding remainders packed the same way: hi + lo carries about 16
// significant bits, so two mma on the same B fragments multiply at near-fp32 accuracy.
template <typename T>
__device__ __forceinline__ void pack2_split(float x, float y, uint32_t& hi, uint32_t& lo) {
  hi = pack2<T>(x, y);
  const T* h = reinterpret_cast<const T*>(&hi);
  lo = pack2<T>(x - to_float(h[0]), y - to_float(h[1]));
}

// 2^x with the hardware approximation (rel. error ~2^-22); ex2(-inf) = +0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace sale

namespace sale {

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>, integral_constant<D>, integral_constant<BK>) for the kernels' supported
// configurations: T in {bf16, f16}, head dim 64/128, key block 32/64. Anything else was refused by
// the caller's checks; it returns cudaErrorInvalidValue here.
template <typename F>
inline cudaError_t dispatch_dtype_dim_block(bool is_bf16, int head_dim, int bk, F&& f) {
  auto by_block = [&](auto type, auto dim) -> cudaError_t {
    if (bk == 32) return f(type, dim, std::integral_constant<int, 32>{});
    if (bk == 64) return f(type, dim, std::integral_constant<int, 64>{});
    return cudaErrorInvalidValue;
  };
  auto by_dim = [&](auto type) -> cudaError_t {
    if (head_dim == 64) return by_block(type, std::integral_constant<int, 64>{});
    if (head_dim == 128) return by_block(type, std::integral_constant<int, 128>{});
    return cudaErrorInvalidValue;
  };
  return is_bf16 ? by_dim(TypeTag<__nv_bfloat16>{}) : by_dim(TypeTag<__half>{});
}

}  // namespace sale
