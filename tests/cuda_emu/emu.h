// A CPU emulator of the part of the CUDA execution model that csrc/ uses, so that the CUDA kernels'
// arithmetic and their block-level logic are tested where there is no GPU (tests/test_cuda_emu.py).
//
// The kernel sources are compiled unchanged by the host compiler with this header force-included
// (only the <<<...>>> launches and the is_cuda() checks are rewritten, by tests/cuda_emu/build.py).
// A launch runs the grid's blocks one after another; a block's threads are fibers (ucontext) on one
// OS thread, each run until it reaches a barrier or returns. __shared__ variables become function
// statics, shared by the block that is running. __syncthreads releases a block once every thread
// waits at it; a warp shuffle exchanges values once the warp's 32 lanes wait at it. Where real
// hardware would hang or read undefined values, the emulator stops with an error instead: a
// __syncthreads that only some threads reach (some returned, some wait at a shuffle), a shuffle
// with a partial mask, a warp whose lanes wait at different barriers.
//
// Memory races within a block: the threads between two barriers run one after another, in an order
// the tests choose (by index, reversed, or a random permutation each round; set_order); a read of
// shared memory that another thread writes without a barrier between gives results that depend on
// that order, which the tests compare. Not modelled: concurrency between blocks (they run in turn),
// races that every order hides, the device math's ulp differences (the host's libm is used),
// timing. It checks arithmetic, indexing and barrier structure, not speed; compute-sanitizer on a
// GPU remains the check of the memory model.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace l2d_emu {

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

enum class State { running, block_barrier, warp_barrier, done };

struct Thread {
  ucontext_t ctx;
  std::vector<char> stack;
  uint3 idx;
  unsigned linear = 0;
  State state = State::running;
  bool waited = false;  // called grid_dependency_wait (griddepcontrol.wait)
};

struct Runtime {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  Thread* current = nullptr;
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::string error;
  // The order in which the threads waiting to run are resumed, each round (between two barrier
  // releases): 0 by index, 1 reversed, 2 a fresh random permutation per round (seeded). A kernel
  // whose threads read shared memory that another thread writes without a barrier between gives
  // different results under different orders; the tests compare them.
  int order = 0;
  std::mt19937 rng{0};
  int sm_count = 3;  // what cudaDeviceGetAttribute reports
  // What cudaFuncGetAttributes reports as the kernels' PTX version. Below 90, griddepcontrol.wait is
  // compiled out (a build for older targets, its PTX compiled by the driver for a 9.0 device), so
  // grid_dependency_wait does nothing and an early launch fails.
  int ptx_version = 90;
  std::vector<size_t> perm;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

// Stop the current thread with an error; the launch then throws it.
[[noreturn]] inline void fail(const std::string& what) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = what;
  r.current->state = State::done;
  setcontext(&r.scheduler);
  std::abort();  // not reached
}

inline void wait(State s) {
  Runtime& r = rt();
  Thread& t = *r.current;
  t.state = s;
  swapcontext(&t.ctx, &r.scheduler);
  if (!r.error.empty()) fail(r.error);
}

inline void syncthreads() {
  wait(State::block_barrier);
}

// Every lane writes its value, waits for its warp, reads its source lane's value, and waits again
// (so that no lane overwrites its slot before every lane has read).
template <typename T, typename F>
T warp_exchange(unsigned mask, T value, F source_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shuffle of a large type");
  Runtime& r = rt();
  if (mask != 0xffffffffu) fail("warp shuffle with a partial mask (not emulated)");
  const unsigned me = r.current->linear, lane = me % 32, base = me - lane;
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  r.slots[me] = bits;
  wait(State::warp_barrier);
  const int src = source_lane(static_cast<int>(lane));
  T out = value;
  if (src >= 0 && src < 32 && base + src < r.threads.size()) std::memcpy(&out, &r.slots[base + src], sizeof(T));
  wait(State::warp_barrier);
  return out;
}

// griddepcontrol.wait: the previous launch has always completed here (launches run in turn); what is
// checked is that every thread of a launch allowed to start early waits (Launch::early). Kernels
// compiled from PTX before 9.0 have no such instruction: there the call waits for nothing.
inline void grid_dependency_wait() {
  if (rt().ptx_version >= 90) rt().current->waited = true;
}

inline void trampoline() {
  Runtime& r = rt();
  (*r.body)();
  r.current->state = State::done;  // returns to uc_link, the scheduler
}

inline void run_block() {
  Runtime& r = rt();
  const size_t n = r.threads.size();
  r.perm.resize(n);
  for (;;) {
    for (size_t k = 0; k < n; ++k) r.perm[k] = r.order == 1 ? n - 1 - k : k;
    if (r.order == 2) std::shuffle(r.perm.begin(), r.perm.end(), r.rng);
    for (size_t k : r.perm)
      if (Thread& t = r.threads[k]; t.state == State::running) {
        r.current = &t;
        swapcontext(&r.scheduler, &t.ctx);
        if (!r.error.empty()) return;
      }
    size_t done = 0, at_block = 0;
    for (auto& t : r.threads) done += t.state == State::done, at_block += t.state == State::block_barrier;
    if (done == n) return;
    bool released = false;
    for (size_t w = 0; w < n; w += 32) {
      const size_t end = std::min(n, w + 32);
      size_t at_warp = 0;
      for (size_t k = w; k < end; ++k) at_warp += r.threads[k].state == State::warp_barrier;
      if (at_warp == 0) continue;
      if (at_warp != end - w) {
        r.error = "warp " + std::to_string(w / 32) + ": a shuffle reached by only some of its lanes";
        return;
      }
      for (size_t k = w; k < end; ++k) r.threads[k].state = State::running;
      released = true;
    }
    if (released) continue;
    if (at_block + done == n) {
      if (done > 0) {
        r.error = "__syncthreads reached by " + std::to_string(at_block) + " threads while " + std::to_string(done) +
                  " had returned";
        return;
      }
      for (auto& t : r.threads) t.state = State::running;
      continue;
    }
    r.error = "threads wait at different barriers";
    return;
  }
}

// Runs kernel(args...) over grid x block. Arguments are converted to the kernel's parameter types
// first, as a launch does.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  // Launched with programmatic stream serialization (cudaLaunchKernelEx): on a GPU the kernel may
  // start before the previous one ends, so each of its threads must wait for it before touching
  // memory; a thread that returns without waiting stops the launch with an error.
  bool early = false;

  template <typename... Args>
  void operator()(Args&&... args) const {
    static_assert(sizeof...(Args) == sizeof...(Params), "kernel launched with the wrong number of arguments");
    std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    Runtime& r = rt();
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024) throw std::runtime_error("launch with " + std::to_string(n) + " threads per block");
    r.body = &body;
    r.block_dim = block;
    r.grid_dim = grid;
    r.threads.resize(n);
    r.slots.assign(n, 0);
    r.error.clear();
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          r.block_idx = {bx, by, bz};
          for (unsigned k = 0; k < n; ++k) {
            Thread& t = r.threads[k];
            t.linear = k;
            t.idx = {k % block.x, (k / block.x) % block.y, k / (block.x * block.y)};
            t.state = State::running;
            t.waited = false;
            t.stack.resize(64 * 1024);
            getcontext(&t.ctx);
            t.ctx.uc_stack.ss_sp = t.stack.data();
            t.ctx.uc_stack.ss_size = t.stack.size();
            t.ctx.uc_link = &r.scheduler;
            makecontext(&t.ctx, trampoline, 0);
          }
          run_block();
          if (early && r.error.empty())
            for (const Thread& t : r.threads)
              if (!t.waited) {
                r.error = "thread " + std::to_string(t.linear) +
                          " of a launch that may start early returned without waiting for the previous launch";
                break;
              }
          if (!r.error.empty())
            throw std::runtime_error("emulated kernel, block (" + std::to_string(bx) + ", " + std::to_string(by) +
                                     ", " + std::to_string(bz) + "): " + r.error);
        }
    r.body = nullptr;
  }
};

template <typename... Params, typename... Config>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, Config...) {
  return {kernel, grid, block};
}

inline void set_ptx_version(int version) { rt().ptx_version = version; }

inline void set_order(int order, uint64_t seed) {
  if (order < 0 || order > 2) throw std::invalid_argument("emulator order must be 0, 1 or 2");
  rt().order = order;
  rt().rng.seed(seed);
}

}  // namespace l2d_emu

// csrc/common.cuh calls the emulator's grid_dependency_wait where a GPU runs griddepcontrol.wait.
#define L2D_EMULATED_CUDA 1

using l2d_emu::dim3;
using l2d_emu::uint3;

// CUDA's 16-byte vector types: the emulator's build checks the alignment of every access through them
// (-fsanitize=alignment), as the GPU faults on a misaligned vector access.
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct alignas(16) int4 {
  int x, y, z, w;
};
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (::l2d_emu::rt().current->idx)
#define blockIdx (::l2d_emu::rt().block_idx)
#define blockDim (::l2d_emu::rt().block_dim)
#define gridDim (::l2d_emu::rt().grid_dim)

inline void __syncthreads() { ::l2d_emu::syncthreads(); }

// One OS thread runs every fiber, and blocks run one after another: memory is always coherent.
inline void __threadfence() {}
template <typename T>
T __ldcg(const T* address) {
  return *address;
}

// A block that waits for other blocks (polling, with a sleep between polls) waits on blocks that
// have not run yet, since blocks run in turn: it would wait forever, so the first sleep stops it.
inline void __nanosleep(unsigned) {
  ::l2d_emu::fail("a block sleeps waiting for others: the emulator runs blocks in turn, the later ones never would");
}

// A fiber is only switched at a barrier: atomics are plain read-modify-writes.
template <typename T>
T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  return ::l2d_emu::warp_exchange(mask, value, [=](int lane) {
    const int src = lane + static_cast<int>(delta);
    return src / width == lane / width ? src : lane;
  });
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::l2d_emu::warp_exchange(mask, value, [=](int lane) {
    const int src = lane ^ lane_mask;
    return src / width == lane / width ? src : lane;
  });
}

template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = 32) {
  return ::l2d_emu::warp_exchange(mask, value, [=](int lane) { return (lane / width) * width + src_lane % width; });
}
