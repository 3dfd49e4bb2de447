// Shared device helpers of the l2d_kernels CUDA kernels: dtype conversion, NaN-keeping clamps and a
// deterministic block reduction (fixed tree, no atomics).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace l2d {

constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The gradient's device type for a student input of type T: T, except float16, whose gradient is
// written in float32 and rounded to float16 only after backward has applied grad_output (a loss
// scale): float16's exponent range would lose what underflows at a scale of 1 (l2d_kernels.ops.library.grad_dtype).
template <typename T>
struct GradOf {
  using type = T;
};
template <>
struct GradOf<__half> {
  using type = float;
};
template <typename T>
using grad_t = typename GradOf<T>::type;

// The gradient's dtype for a student input of `type` (as grad_t).
inline c10::ScalarType grad_scalar_type(c10::ScalarType type) {
  return type == c10::ScalarType::Half ? c10::ScalarType::Float : type;
}

// min(max(x, lo), hi), keeping NaN (fminf / fmaxf would return a bound).
__device__ __forceinline__ float clamp_keep_nan(float x, float lo, float hi) {
  return x != x ? x : fminf(fmaxf(x, lo), hi);
}

// Sum of one value per thread over a block of kThreads threads, in a fixed order; every thread gets
// the result. `scratch` holds kThreads / 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// Programmatic dependent launch (compute capability 9.0 and later). A kernel launched with
// launch_kernel(early = true) may be scheduled before the previous kernel in its stream has finished;
// each of its threads calls wait_for_previous_launch() before it touches global memory, which
// returns once that kernel has completed and its writes are visible (griddepcontrol.wait). Since
// every thread waits, a grid completes only after the one before it: the order of the whole chain
// holds. let_next_launch_start() lets the next early launch be scheduled once every block of this
// grid has called it or exited (griddepcontrol.launch_dependents): a hint, with no memory ordering
// of its own. Both are no-ops in a grid launched without the attribute and before sm_90.
__device__ __forceinline__ void wait_for_previous_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#elif defined(L2D_EMULATED_CUDA)
  ::l2d_emu::grid_dependency_wait();
#endif
}

__device__ __forceinline__ void let_next_launch_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Calls f(T{}) with T the device type of a float32, float16 or bfloat16 tensor.
template <typename F>
void dispatch_float_types(c10::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case c10::ScalarType::Float: f(float{}); break;
    case c10::ScalarType::Half: f(__half{}); break;
    case c10::ScalarType::BFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, op, ": takes float32, float16 or bfloat16 tensors, got ", type);
  }
}

}  // namespace l2d
