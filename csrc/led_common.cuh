// What the LED forward (led_kernels.cuh) and its backward scaling (scale.cu) share: how a target reads as
// positive, on the device and on the host, and the device's SM count.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <atomic>
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

// Whether the launches of a kernel of `image` (any kernel of the same translation unit: they share
// its compile targets) may start early on `device` (programmatic dependent launch), unless
// L2D_CUDA_LED_EARLY_LAUNCH=0 (the profile's comparison). Two conditions: compute capability 9.0 or
// later, and the kernel's code on that device compiled from PTX of 9.0 or later. The second is what
// makes wait_for_previous_launch() a griddepcontrol.wait: an extension built for older targets only
// (TORCH_CUDA_ARCH_LIST=8.0+PTX, say) runs on an H100 from PTX the driver compiles there, with
// __CUDA_ARCH__ 800 and the wait compiled out, and launched early its kernels would read what the
// previous launch has not yet written. Known per device after its first call (the emulator asks on
// every call, so that its tests can change the answer).
template <typename Kernel>
bool early_launches(int device, Kernel* image) {
  const char* env = std::getenv("L2D_CUDA_LED_EARLY_LAUNCH");
  if (env != nullptr && std::atoi(env) == 0) return false;
  static std::atomic<signed char> known[64] = {};  // 0 unknown, 1 early, -1 in order
  const bool cached = device >= 0 && device < 64;
#ifndef L2D_EMULATED_CUDA
  if (cached && known[device].load(std::memory_order_relaxed) != 0) return known[device].load() > 0;
#endif
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  bool early = major >= 9;
  if (early) {
    // A query, but the first one may load the kernel (lazy loading), and a stream capture in global or
    // thread-local mode may refuse calls that are not plainly capture-safe: in relaxed mode for the
    // call, so that a process's first LED call can itself be captured.
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    cudaFuncAttributes attributes{};
    const cudaError_t status = cudaFuncGetAttributes(&attributes, image);
    C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode));
    C10_CUDA_CHECK(status);
    early = attributes.ptxVersion >= 90;
  }
  if (cached) known[device].store(early ? 1 : -1, std::memory_order_relaxed);
  return early;
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
