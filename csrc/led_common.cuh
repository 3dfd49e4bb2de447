// What the LED forward (led.cu) and its backward scaling (scale.cu) share: how a target reads as
// positive, on the device and on the host, and the device's SM count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

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

// Whether launches on `device` may start early (programmatic dependent launch: compute capability
// 9.0 and later), unless L2D_CUDA_LED_EARLY_LAUNCH=0 (the profile's comparison).
inline bool early_launches(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  const char* env = std::getenv("L2D_CUDA_LED_EARLY_LAUNCH");
  return major >= 9 && (env == nullptr || std::atoi(env) != 0);
}

// kernel<<<grid, block, 0, stream>>>(args...), and with `early` allowed to start before the previous
// kernel in the stream has finished (see wait_for_previous_launch: the kernel must wait in every
// thread). Stream capture records the early start as a programmatic edge of the graph.
template <typename... Params, typename Stream, typename... Args>
void launch_kernel(bool early, void (*kernel)(Params...), unsigned grid, unsigned block, Stream stream,
                   Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  // In the order of its fields: grid, block, dynamic shared memory, stream, attributes and their count.
  const cudaLaunchConfig_t config{dim3(grid), dim3(block), 0, stream, attribute, early ? 1u : 0u};
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace l2d
