// Operator schemas and their CUDA implementations. The fake (meta) implementations and autograd live
// in Python (l2d_kernels/ops/library.py), shared with the Triton operators.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_FRAGMENT(l2d_kernels, m) {
  m.def("mld_cuda(Tensor zs, Tensor zt, str reduction, float eps, float temperature) -> (Tensor, Tensor)");
  m.def("led_cuda(Tensor es, Tensor et, Tensor targets, float lambda_cd, float lambda_id) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(l2d_kernels, CUDA, m) {
  m.impl("mld_cuda", &l2d::mld_cuda);
  m.impl("led_cuda", &l2d::led_cuda);
}
