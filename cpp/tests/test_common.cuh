// Helpers shared by the ctest kernel tests and the kernel benchmarks in cpp/bench (no libtorch).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CUDA_OK(call)                                                                              \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      std::printf("FAIL: %s: %s (%s:%d)\n", #call, cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                                \
    }                                                                                              \
  } while (0)

namespace sale_test {

// ctest's SKIP_RETURN_CODE for these tests.
constexpr int kSkip = 77;

// Device 0's properties; false (after printing why) when there is no CUDA device.
inline bool device0(cudaDeviceProp& prop) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIP: no CUDA device\n");
    return false;
  }
  CUDA_OK(cudaGetDeviceProperties(&prop, 0));
  return true;
}

// True (after printing why) when device 0 cannot run the sm_90a kernels: the test should return
// kSkip. Otherwise prints the device's name.
inline bool skip_unless_sm90() {
  cudaDeviceProp prop{};
  if (!device0(prop)) return true;
  if (prop.major != 9 || prop.minor != 0) {
    std::printf("SKIP: the kernels are built for sm_90a, device 0 is sm_%d%d (%s)\n", prop.major, prop.minor, prop.name);
    return true;
  }
  std::printf("device: %s\n", prop.name);
  return false;
}

// The sm8x builds of the tests (SALE_TEST_SM8X, compiled as compute_80 PTX only): true (after
// printing why) when device 0 is older than 8.0. On later GPUs the driver JIT-compiles the PTX,
// which is how an H100 checks the sm8x kernels.
inline bool skip_unless_sm80_or_later() {
  cudaDeviceProp prop{};
  if (!device0(prop)) return true;
  if (prop.major < 8) {
    std::printf("SKIP: the sm8x kernels need compute capability 8.0+, device 0 is %d.%d (%s)\n", prop.major,
                prop.minor, prop.name);
    return true;
  }
  std::printf("device: %s (compute capability %d.%d; sm8x kernels from compute_80 PTX, JIT-compiled)\n", prop.name,
              prop.major, prop.minor);
  return false;
}

// The variant a test binary was built for: the sm_90a kernels, or (SALE_TEST_SM8X) the sm8x ones.
inline bool skip_unless_supported() {
#ifdef SALE_TEST_SM8X
  return skip_unless_sm80_or_later();
#else
  return skip_unless_sm90();
#endif
}

// Deterministic uniform numbers in [-1, 1) (a 64-bit LCG: same sequence on every machine).
inline float uniform() {
  static uint64_t state = 0x9e3779b97f4a7c15ull;
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<float>((state >> 40) & 0xffffff) / 8388608.f - 1.f;
}

// float <-> raw bits of fp16 (half = true) or bf16, rounding to nearest even.
inline uint16_t to_bits(float x, bool half) {
  uint16_t u;
  if (half) {
    __half h = __float2half_rn(x);
    std::memcpy(&u, &h, 2);
  } else {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(&u, &h, 2);
  }
  return u;
}

inline float from_bits(uint16_t u, bool half) {
  if (half) {
    __half h;
    std::memcpy(&h, &u, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &u, 2);
  return __bfloat162float(h);
}

template <typename T>
T* to_device(const std::vector<T>& host) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(host.size(), 1) * sizeof(T)));
  CUDA_OK(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

}  // namespace sale_test
