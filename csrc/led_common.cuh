// What the LED forward (led.cu) and its backward scaling (scale.cu) share: how a target reads as
// positive, on the device and on the host, and the device's SM count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace l2d {

// Positive targets (> 0.5) read from bool or float32 tensors as they are.
__device__ __forceinline__ bool positive(bool y) { return y; }
__device__ __forceinline__ bool positive(float y) { return y > 0.5f; }

// Targets of any dtype as a tensor the kernels read directly: bool and float32 unchanged, any other
// dtype compared once into bool.
inline at::Tensor readable_targets(const at::Tensor& targets) {
  const bool direct = targets.scalar_type() == at::kBool || targets.scalar_type() == at::kFloat;
  return direct ? targets : targets.gt(0.5);
}

// Calls f with the typed data pointer of readable_targets' result (const float* or const bool*).
template <typename F>
void with_targets(const at::Tensor& pos, F&& f) {
  if (pos.scalar_type() == at::kFloat) f(static_cast<const float*>(pos.data_ptr<float>()));
  else f(static_cast<const bool*>(pos.data_ptr<bool>()));
}

inline int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

}  // namespace l2d
