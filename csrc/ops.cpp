// Operator schemas and their CUDA implementations. The fake (meta) implementations and autograd live
// in Python (l2d_kernels/ops/library.py), shared with the Triton operators.
#include <torch/library.h>

#include <string>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(l2d_kernels, m) {
  m.def((std::string("mld_cuda") + l2d::kMldArgs).c_str());
  m.def((std::string("led_cuda") + l2d::kLedArgs).c_str());
  m.def((std::string("led_scale_cuda") + l2d::kLedScaleArgs).c_str());
}

TORCH_LIBRARY_IMPL(l2d_kernels, CUDA, m) {
  m.impl("mld_cuda", &l2d::mld_cuda);
  m.impl("led_cuda", &l2d::led_cuda);
  m.impl("led_scale_cuda", &l2d::led_scale_cuda);
}
