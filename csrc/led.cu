// The LED operator: its input checks, and the dtype's file of kernels and launches (led_of_type.h;
// the kernels and how a call runs them: led_kernels.cuh).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include "common.cuh"
#include "led_common.cuh"
#include "led_of_type.h"
#include "ops.h"

namespace l2d {

std::tuple<at::Tensor, at::Tensor, at::Tensor> led_cuda(const at::Tensor& es_in, const at::Tensor& et_in,
                                            const at::Tensor& targets, double lambda_cd, double lambda_id,
                                            bool with_grad) {
  TORCH_CHECK(es_in.is_cuda() && et_in.is_cuda() && targets.is_cuda(), "led_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(es_in.dim() == 3 && es_in.sizes() == et_in.sizes(), "led_cuda: embeddings must be [B, C, D] of one shape");
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == es_in.size(0) && targets.size(1) == es_in.size(1),
              "led_cuda: targets must be [B, C]");
  const c10::cuda::CUDAGuard guard(es_in.device());
  // Mixed dtypes compute from float32 copies (exact for half inputs); the gradient takes es's dtype
  // (float32 for float16: grad_t).
  const bool mixed = es_in.scalar_type() != et_in.scalar_type();
  const at::Tensor es = mixed ? es_in.to(at::kFloat) : es_in;
  const at::Tensor et = mixed ? et_in.to(at::kFloat) : et_in;
  const at::Tensor pos = readable_targets(targets);
  LedResult result;
  dispatch_float_types(es.scalar_type(), "led_cuda", [&](auto tag) {
    result = led_of_type(tag, es, et, pos, lambda_cd, lambda_id, with_grad);
  });
  if (mixed) {
    const auto grad_type = grad_scalar_type(es_in.scalar_type());
    at::Tensor& grad = std::get<1>(result);
    grad = with_grad ? grad.to(grad_type) : at::empty({0}, es_in.options().dtype(grad_type));
  }
  return result;
}

}  // namespace l2d
