// Kernels that check the emulator itself (tests/test_cuda_emu.py): it must run correct block-level
// code to the right result, and stop, or give order-dependent results, where a GPU would misbehave.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <string>

#include "common.cuh"

namespace {

constexpr int kN = l2d::kThreads;

// out[0] = block_sum of the thread indices, out[1 + k] = exclusive prefix sum of the indices.
__global__ void sums_kernel(float* out) {
  __shared__ float scratch[kN / 32];
  using Scan = cub::BlockScan<int, kN>;
  __shared__ typename Scan::TempStorage storage;
  const float total = l2d::block_sum(static_cast<float>(threadIdx.x), scratch);
  int before, all;
  Scan(storage).ExclusiveSum(static_cast<int>(threadIdx.x), before, all);
  if (threadIdx.x == 0) out[0] = total;
  out[1 + threadIdx.x] = static_cast<float>(before + blockIdx.x * all);
}

__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < kN / 2) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void partial_shuffle_kernel(float* out) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

// Reads a neighbour's shared-memory write without a barrier between: a race.
__global__ void missing_barrier_kernel(float* out) {
  __shared__ float values[kN];
  values[threadIdx.x] = static_cast<float>(blockIdx.x * 1000 + threadIdx.x);
  out[blockIdx.x * kN + threadIdx.x] = values[(threadIdx.x + 1) % kN];
}

// Writes 64 bytes past the end of its output (past any alignment slack of a guarded allocation).
__global__ void write_past_end_kernel(float* out, int64_t n) {
  if (threadIdx.x == 0) out[n + 16] = 1.f;
}

// Waits for the previous launch in every thread but one.
__global__ void one_thread_skips_the_wait_kernel(float* out) {
  if (threadIdx.x != 7) l2d::wait_for_previous_launch();
  l2d::let_next_launch_start();
  out[threadIdx.x] = 1.f;
}

}  // namespace

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::full({2 * kN + 1}, -1.f);
  float* p = out.data_ptr<float>();
  if (name == "sums") ::l2d_emu::launch(sums_kernel, 2, kN)(p);
  else if (name == "divergent_barrier") ::l2d_emu::launch(divergent_barrier_kernel, 1, kN)(p);
  else if (name == "partial_shuffle") ::l2d_emu::launch(partial_shuffle_kernel, 1, kN)(p);
  else if (name == "missing_barrier") ::l2d_emu::launch(missing_barrier_kernel, 2, kN)(p);
  else if (name == "skipped_wait_in_order") ::l2d_emu::launch(one_thread_skips_the_wait_kernel, 1, kN)(p);
  else if (name == "skipped_wait_early") {
    auto launch = ::l2d_emu::launch(one_thread_skips_the_wait_kernel, 1, kN);
    launch.early = true;
    launch(p);
  } else if (name == "write_past_end") ::l2d_emu::launch(write_past_end_kernel, 1, kN)(p, out.numel());
  else TORCH_CHECK(false, "no self-test ", name);
  return out;
}

void set_ptx_version(int64_t version) { ::l2d_emu::set_ptx_version(static_cast<int>(version)); }

void set_order(int64_t order, int64_t seed) { ::l2d_emu::set_order(static_cast<int>(order), static_cast<uint64_t>(seed)); }

TORCH_LIBRARY_FRAGMENT(l2d_emu, m) {
  m.def("selftest(str name) -> Tensor", &selftest);
  m.def("set_order(int order, int seed) -> ()", &set_order);
  m.def("set_ptx_version(int version) -> ()", &set_ptx_version);
}
