// Which kernels serve a CUDA op on a given GPU (issue 7). Two paths exist:
//   kSm90  the Hopper kernels (wgmma; sm_90a SASS only), on compute capability 9.0;
//   kSm8x  the sm8x kernels (mma.sync with cp.async, int4 tensor cores for the estimate), built as
//          sm_80/86/89 SASS plus compute_80 PTX; they serve 8.x, and later GPUs through the PTX.
// SALE_OPS_FORCE_SM8X=1 sends a 9.0 GPU to the sm8x path (the driver JIT-compiles its PTX): the
// test switch that checks the sm8x kernels on an H100. Capabilities below 8.0 are refused.
#pragma once

#include <string>

namespace sale_entry {

enum class KernelPath { kSm90, kSm8x };

constexpr const char* kForceSm8xEnv = "SALE_OPS_FORCE_SM8X";

// The decision alone (no device access, so it is testable without a GPU; exported to Python as
// sale_ops_choose_kernel_path). force_sm8x: the variable's value, nullptr when unset. device: for
// the message only (-1: none). Returns false with *error naming the op, what it got and what is
// supported when no path serves.
bool choose_kernel_path(const char* op, int device, int major, int minor, const char* force_sm8x, KernelPath* path,
                        std::string* error);

// The path for an op on CUDA device `device` (its capability and SALE_OPS_FORCE_SM8X); raises the
// op's error when none serves.
KernelPath kernel_path(const char* op, int device);

}  // namespace sale_entry
