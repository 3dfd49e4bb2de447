// The LED backward's scaling of the saved gradient by grad_output, in place. Only rows whose target
// is positive can be non-zero (a group's members are the positive rows of a label or an image; the
// forward writes every other row as zero), so a finite grad_output leaves the other rows untouched:
// at 9,605 labels that is most of the gradient, which a plain in-place multiply reads and writes
// whole. A grad_output of inf or NaN scales every row, so that 0 * inf gives NaN as a multiply does.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "common.cuh"
#include "led_common.cuh"
#include "ops.h"

namespace l2d {
namespace {

constexpr int kScaleThreads = 256;

// One warp per row of the gradient [rows, D] (rows = B C, row r = (r / C, r % C)), rows strided over
// the grid.
template <typename TG, typename TY>
__global__ void scale_rows_kernel(TG* __restrict__ grad, const TY* __restrict__ y, int64_t y_sb, int64_t y_sc,
                                  int64_t rows, int64_t C, int64_t D, const float* __restrict__ grad_output) {
  const float s = *grad_output;
  const bool every_row = !(fabsf(s) <= FLT_MAX);  // inf or NaN
  const int64_t warps = kScaleThreads / 32;
  const int lane = threadIdx.x % 32;
  for (int64_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
    if (!every_row && !positive(y[(r / C) * y_sb + (r % C) * y_sc])) continue;
    TG* row = grad + r * D;
    for (int64_t d = lane; d < D; d += 32) row[d] = from_float<TG>(to_float(row[d]) * s);
  }
}

}  // namespace

void led_scale_cuda(const at::Tensor& grad, const at::Tensor& targets, const at::Tensor& grad_output) {
  TORCH_CHECK(grad.is_cuda() && targets.is_cuda() && grad_output.is_cuda(),
              "led_scale_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(grad.dim() == 3 && grad.is_contiguous(), "led_scale_cuda: grad must be a contiguous [B, C, D] tensor");
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == grad.size(0) && targets.size(1) == grad.size(1),
              "led_scale_cuda: targets must be [B, C]");
  TORCH_CHECK(grad_output.numel() == 1, "led_scale_cuda: grad_output must hold one value");
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor go = grad_output.to(at::kFloat);
  const at::Tensor pos = readable_targets(targets);
  const int64_t C = grad.size(1), D = grad.size(2), rows = grad.size(0) * C;
  if (rows == 0 || D == 0) return;
  const int64_t sms = sm_count(grad.get_device());
  const int64_t warps = kScaleThreads / 32;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>((rows + warps - 1) / warps, sms * 16));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float_types(grad.scalar_type(), "led_scale_cuda", [&](auto tag) {
    using T = decltype(tag);
    T* g = reinterpret_cast<T*>(grad.data_ptr());
    with_targets(pos, [&](const auto* y) {
      using TY = std::remove_cv_t<std::remove_pointer_t<decltype(y)>>;
      scale_rows_kernel<T, TY><<<blocks, kScaleThreads, 0, stream>>>(g, y, pos.stride(0), pos.stride(1), rows, C, D,
                                                                      go.data_ptr<float>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace l2d
