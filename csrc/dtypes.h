// dtypes.h: dtype codes shared by the kernels (common.cuh), the torch binding (bindings.cpp) and the
// cuda_host entry points (host_entry.cpp, mirrored in fastbert/cuda_host_backend.py _DTYPE_CODE).
#pragma once

namespace fb {
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
}  // namespace fb
