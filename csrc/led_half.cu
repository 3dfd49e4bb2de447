// LED's kernels and launches for __half embeddings (led_kernels.cuh).
#include "led_kernels.cuh"

namespace l2d {

LedResult led_of_type(__half, const at::Tensor& es, const at::Tensor& et, const at::Tensor& pos, double lambda_cd,
                      double lambda_id, bool with_grad) {
  return launch_led<__half>(es, et, pos, lambda_cd, lambda_id, with_grad);
}

}  // namespace l2d
