// Host-side types shared by the CUDA launchers and their ATen bindings (CUDA runtime headers only; no
// device code, so a plain C++ compiler can include it).
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fmk::cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fmk::cuda
