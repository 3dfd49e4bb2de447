// Emulator stand-in: an emulated launch throws its errors itself.
#pragma once
#include <c10/util/Exception.h>

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == 0, "emulated CUDA call failed: " #expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
