// The emulated CUDA operators, on the CPU: l2d_emu::mld, l2d_emu::led and l2d_emu::led_scale run csrc/'s host code and
// kernels (compiled for the host with emu.h) on CPU tensors.
#include <torch/library.h>

#include <string>

#include "ops.h"

TORCH_LIBRARY(l2d_emu, m) {
  m.def((std::string("mld") + l2d::kMldArgs).c_str());
  m.def((std::string("led") + l2d::kLedArgs).c_str());
  m.def((std::string("led_scale") + l2d::kLedScaleArgs).c_str());
}

TORCH_LIBRARY_IMPL(l2d_emu, CPU, m) {
  m.impl("mld", &l2d::mld_cuda);
  m.impl("led", &l2d::led_cuda);
  m.impl("led_scale", &l2d::led_scale_cuda);
}
