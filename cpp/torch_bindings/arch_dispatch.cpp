// Runtime dispatch by compute capability (arch_dispatch.h), plus its C entry for Python
// (sale_ops._dispatch reads the same decision for backend_summary and for CPU tests).
#include "arch_dispatch.h"

#include <torch/headeronly/util/Exception.h>

#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <string>

#ifndef SALE_OPS_HAVE_SM8X
#error "SALE_OPS_HAVE_SM8X must be defined by the build (CMakeLists.txt)"
#endif

namespace sale_entry {

namespace {

// What this build can serve, for the messages.
std::string supported() {
  std::string s;
  if (SALE_OPS_HAVE_SM8X) s += "8.x (sm8x kernels, built for 8.0, 8.6, 8.9), ";
  if (SALE_OPS_HAVE_SM8X) s += "10.0 and later (the sm8x kernels' compute_80 PTX, untested), ";
  if (SALE_OPS_HAVE_SM90) s += "9.0 (Hopper kernels), ";
  return s.substr(0, s.size() - 2) + " [built for SALE_CUDA_ARCHS=" SALE_OPS_CUDA_ARCHS "]";
}

std::string gpu(int device, int major, int minor) {
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  return (device >= 0 ? "GPU cuda:" + std::to_string(device) : std::string("a GPU")) + " of compute capability " + cc;
}

}  // namespace

bool choose_kernel_path(const char* op, int device, int major, int minor, const char* force_sm8x, KernelPath* path,
                        std::string* error) {
  const std::string force = force_sm8x ? force_sm8x : "";
  if (force != "" && force != "0" && force != "1") {
    *error = std::string(op) + ": environment variable " + kForceSm8xEnv + " is '" + force + "'; supported: 0, 1 or unset";
    return false;
  }
  const std::string not_served = std::string(op) + ": " + gpu(device, major, minor) + " is not supported";
  if (major < 8) {
    *error = not_served + " (the kernels need tensor-core features of 8.0 and later); supported: " + supported();
    return false;
  }
  if (major == 9 && minor == 0 && SALE_OPS_HAVE_SM90 && force != "1") {
    *path = KernelPath::kSm90;
    return true;
  }
  if (!SALE_OPS_HAVE_SM8X) {
    *error = not_served + (force == "1" ? std::string(" with ") + kForceSm8xEnv + "=1" : std::string()) +
             ": this build has no sm8x kernels; rebuild with 80 (and 86, 89) in SALE_CUDA_ARCHS; supported: " +
             supported();
    return false;
  }
  *path = KernelPath::kSm8x;
  return true;
}

KernelPath kernel_path(const char* op, int device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  STD_TORCH_CHECK(err == cudaSuccess, op, ": cannot read the compute capability of cuda:", device, ": ",
                  cudaGetErrorString(err));
  KernelPath path;
  std::string error;
  STD_TORCH_CHECK(choose_kernel_path(op, device, major, minor, std::getenv(kForceSm8xEnv), &path, &error), error);
  return path;
}

}  // namespace sale_entry

// For Python (ctypes; the rest of _C.so is hidden): 90 = Hopper kernels, 80 = sm8x kernels, 0 = none
// serves (the message, NUL-terminated and truncated to message_size, in `message`).
extern "C" __attribute__((visibility("default"))) int sale_ops_choose_kernel_path(const char* op, int major, int minor,
                                                                                  const char* force_sm8x, char* message,
                                                                                  int message_size) {
  sale_entry::KernelPath path;
  std::string error;
  if (sale_entry::choose_kernel_path(op, -1, major, minor, force_sm8x, &path, &error))
    return path == sale_entry::KernelPath::kSm90 ? 90 : 80;
  if (message && message_size > 0) {
    std::strncpy(message, error.c_str(), size_t(message_size) - 1);
    message[message_size - 1] = '\0';
  }
  return 0;
}

// The SALE_CUDA_ARCHS this library was built for (comma-separated), for logs.
extern "C" __attribute__((visibility("default"))) const char* sale_ops_cuda_archs() { return SALE_OPS_CUDA_ARCHS; }
