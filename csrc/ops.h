// The CUDA implementations of the l2d_kernels operators (registered in ops.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <tuple>

namespace l2d {

// The operators' arguments and results, for every registration of them (ops.cpp, and the CPU
// emulator's in tests/cuda_emu), so that the schemas cannot drift apart.
inline constexpr char kMldArgs[] =
    "(Tensor zs, Tensor zt, str reduction, float eps, float temperature, bool with_grad=True) -> (Tensor, Tensor)";
inline constexpr char kLedArgs[] =
    "(Tensor es, Tensor et, Tensor targets, float lambda_cd, float lambda_id, bool with_grad=True)"
    " -> (Tensor, Tensor, Tensor)";
inline constexpr char kLedScaleArgs[] = "(Tensor(a!) grad, Tensor targets, Tensor grad_output) -> ()";

// (loss in float32, d loss / d zs in zs's dtype, float32 for float16: grad_t); without with_grad, an
// empty tensor in place of the gradient, which is neither computed nor allocated.
std::tuple<at::Tensor, at::Tensor> mld_cuda(const at::Tensor& zs, const at::Tensor& zt, c10::string_view reduction,
                                            double eps, double temperature, bool with_grad);

// (float32 [lambda_cd * CD + lambda_id * ID, CD, ID], d total / d es in es's dtype (float32 for float16:
// grad_t), the total again as a float32 0-d tensor of its own: what an eager call returns, with no copy
// kernel to make it); without with_grad, an empty tensor in place of the gradient, which is neither
// computed nor allocated.
std::tuple<at::Tensor, at::Tensor, at::Tensor> led_cuda(const at::Tensor& es, const at::Tensor& et, const at::Tensor& targets,
                                            double lambda_cd, double lambda_id, bool with_grad);

// The LED backward: grad *= grad_output in place, reading only the rows whose target is positive
// (every other row is zero) unless grad_output is inf or NaN.
void led_scale_cuda(const at::Tensor& grad, const at::Tensor& targets, const at::Tensor& grad_output);

}  // namespace l2d
