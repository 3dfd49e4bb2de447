// Kernels that check the emulator itself (tests/test_cuda_emu.py): it must run correct block-level
// code to the right result, and stop, or give order-dependent results, where a GPU would misbehave.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>
#include <string>
#include <vector>

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

// Block 0 waits, polling with a sleep between polls, until every other block has counted itself,
// then writes the count it saw; the others count themselves. Where blocks run in turn it would wait
// forever (the emulator stops it at the first sleep); interleaved, it waits while they run.
__global__ void poll_kernel(float* out, int* count) {
  if (blockIdx.x == 0) {
    if (threadIdx.x == 0) {
      while (atomicAdd(count, 0) < static_cast<int>(gridDim.x) - 1) __nanosleep(100);
      out[0] = static_cast<float>(atomicAdd(count, 0));
    }
  } else if (threadIdx.x == 0) {
    atomicAdd(count, 1);
  }
}

// Each block takes a ticket: out[block] = its place in the order the blocks reached the atomic.
__global__ void tickets_kernel(float* out, int* count) {
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<float>(atomicAdd(count, 1));
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
  } else if (name == "poll" || name == "tickets") {
    at::Tensor count = at::zeros({1}, at::kInt);
    if (name == "poll") ::l2d_emu::launch(poll_kernel, 8, kN)(p, count.data_ptr<int>());
    else ::l2d_emu::launch(tickets_kernel, 16, kN)(p, count.data_ptr<int>());
  } else if (name == "write_past_end") ::l2d_emu::launch(write_past_end_kernel, 1, kN)(p, out.numel());
  else TORCH_CHECK(false, "no self-test ", name);
  return out;
}

void set_ptx_version(int64_t version) { ::l2d_emu::set_ptx_version(static_cast<int>(version)); }

void set_order(int64_t order, int64_t seed) { ::l2d_emu::set_order(static_cast<int>(order), static_cast<uint64_t>(seed)); }

void set_blocks(int64_t resident, int64_t seed) {
  ::l2d_emu::set_blocks(static_cast<int>(resident), static_cast<uint64_t>(seed));
}

// (hand-overs between interleaved blocks, __nanosleep calls) since set_blocks.
std::vector<int64_t> block_counts() { return {::l2d_emu::cfg().handovers, ::l2d_emu::cfg().sleeps}; }

TORCH_LIBRARY_FRAGMENT(l2d_emu, m) {
  m.def("selftest(str name) -> Tensor", &selftest);
  m.def("set_order(int order, int seed) -> ()", &set_order);
  m.def("set_ptx_version(int version) -> ()", &set_ptx_version);
  m.def("set_blocks(int resident, int seed) -> ()", &set_blocks);
  m.def("block_counts() -> int[]", &block_counts);
}
