// The LED operator's launches, one overload per embedding dtype (the first argument only picks it),
// each defined in a file of its own (led_float.cu, led_half.cu, led_bf16.cu) that nvcc compiles in
// parallel with the others. led_cuda (led.cu) checks the inputs and calls the overload of theirs.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

namespace l2d {

// (float32 [total, cd, id], d total / d es in grad_t of the dtype or an empty tensor without with_grad,
// the total as a 0-d tensor of its own), from es and et of that dtype and pos as readable_targets makes it.
using LedResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

LedResult led_of_type(float, const at::Tensor& es, const at::Tensor& et, const at::Tensor& pos, double lambda_cd,
                      double lambda_id, bool with_grad);
LedResult led_of_type(__half, const at::Tensor& es, const at::Tensor& et, const at::Tensor& pos, double lambda_cd,
                      double lambda_id, bool with_grad);
LedResult led_of_type(__nv_bfloat16, const at::Tensor& es, const at::Tensor& et, const at::Tensor& pos,
                      double lambda_cd, double lambda_id, bool with_grad);

}  // namespace l2d
