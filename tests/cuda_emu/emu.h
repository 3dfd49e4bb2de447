// A CPU emulator of the part of the CUDA execution model that csrc/ uses, so that the CUDA kernels'
// arithmetic and their block-level logic are tested where there is no GPU (tests/test_cuda_emu.py).
//
// The kernel sources are compiled unchanged by the host compiler with this header force-included
// (only the <<<...>>> launches and the is_cuda() checks are rewritten, by tests/cuda_emu/build.py).
// A launch runs the grid's blocks one after another (or interleaved: below); a block's threads are
// fibers (ucontext) on one OS thread, each run until it reaches a barrier or returns. __shared__
// variables become thread_local function statics, shared by the block that the OS thread runs. __syncthreads releases a block once every thread
// waits at it; a warp shuffle exchanges values once the warp's 32 lanes wait at it. Where real
// hardware would hang or read undefined values, the emulator stops with an error instead: a
// __syncthreads that only some threads reach (some returned, some wait at a shuffle), a shuffle
// with a partial mask, a warp whose lanes wait at different barriers.
//
// Memory races within a block: the threads between two barriers run one after another, in an order
// the tests choose (by index, reversed, or a random permutation each round; set_order); a read of
// shared memory that another thread writes without a barrier between gives results that depend on
// that order, which the tests compare.
//
// Blocks run one after another by default. With set_blocks(n, seed), up to n blocks of a launch are
// resident at once (dispatched in index order, as a GPU's block scheduler does, each as a free slot
// opens) and interleaved: each resident block runs on an OS thread of its own, with its own
// __shared__ variables (thread_local), and only one thread of the whole emulator runs at any time.
// A block hands over to another chosen at random (seeded) at every barrier round, before and after
// every atomic, at every fence and at every __nanosleep, so that a block polling for others' work
// (members_kernel's plan block) waits while they run, work queues are shared out among blocks, and
// a launch's last block to arrive is any block. Right after an atomic, every other hand-over goes to
// a block that sleeps polling, if there is one: where a block counts itself done before its last
// write, that is when the poller would read too early. Results that depend on how blocks
// interleave then differ between seeds, which the tests compare. Memory stays sequentially
// consistent: a missing fence is not seen. At most 512 blocks are resident (OS threads) at once.
//
// Not modelled: weak memory ordering between blocks, races that every order hides, the device
// math's ulp differences (the host's libm is used), timing. It checks arithmetic, indexing, barrier
// structure and the order of work between blocks, not speed; compute-sanitizer on a GPU remains the
// check of the memory model.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
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
  std::unique_ptr<char[]> stack;  // 64 KiB, left uninitialized: only the pages a fiber uses are touched
  uint3 idx;
  unsigned linear = 0;
  State state = State::running;
  bool waited = false;  // called grid_dependency_wait (griddepcontrol.wait)
};

// Settings, for every OS thread of the emulator.
struct Settings {
  // The order in which the threads waiting to run are resumed, each round (between two barrier
  // releases): 0 by index, 1 reversed, 2 a fresh random permutation per round (seeded). A kernel
  // whose threads read shared memory that another thread writes without a barrier between gives
  // different results under different orders; the tests compare them.
  int order = 0;
  uint64_t seed = 0;
  int sm_count = 3;  // what cudaDeviceGetAttribute reports
  // What cudaFuncGetAttributes reports as the kernels' PTX version. Below 90, griddepcontrol.wait is
  // compiled out (a build for older targets, its PTX compiled by the driver for a 9.0 device), so
  // grid_dependency_wait does nothing and an early launch fails.
  int ptx_version = 90;
  // Blocks resident at once: 0 runs a launch's blocks in turn; n > 0 interleaves up to n of them
  // (set_blocks). block_seed seeds which block runs next; launches counts launches since, so that
  // each launch gets its own sequence.
  int resident = 0;
  uint64_t block_seed = 0, launches = 0;
  // Since set_blocks: hand-overs between blocks, and __nanosleep calls (a block waiting for others).
  int64_t handovers = 0, sleeps = 0;
};

inline Settings& cfg() {
  static Settings c;
  return c;
}

// The resident blocks of an interleaved launch and the baton they pass: `turn` is the one OS thread
// allowed to run (-1 the launching thread, k the block in slot k), every other one waits for it, each
// on a condition variable of its own (so that a hand-over wakes one thread, not every slot's).
enum class Handover { round, atomic, after_atomic, fence, sleep };

struct Interleave {
  std::mutex m;
  std::unique_ptr<std::condition_variable[]> cvs;  // [slots + 1]: the launching thread's, then each slot's
  int turn = -1;
  bool abort = false;          // a block failed: the others stop at their next hand-over
  int64_t sleeps = 0;          // this launch's __nanosleep calls
  std::vector<int64_t> block;  // each slot's block (linear index); -1 none yet, -2 stop
  std::vector<char> finished;
  std::vector<Handover> why;  // each slot's last hand-over
  std::vector<std::string> errors;

  explicit Interleave(int slots)
      : cvs(new std::condition_variable[slots + 1]),
        block(slots, -1),
        finished(slots, 0),
        why(slots, Handover::round),
        errors(slots) {}

  // Waits until the baton is `me`'s.
  void await(int me) {
    std::unique_lock<std::mutex> lock(m);
    cvs[me + 1].wait(lock, [&] { return turn == me; });
  }
  // Hands the baton to `to` and, unless me is null, waits for it to come back to `me`.
  void pass(int to, const int* me) {
    std::unique_lock<std::mutex> lock(m);
    turn = to;
    cvs[to + 1].notify_one();
    if (me != nullptr) cvs[*me + 1].wait(lock, [&] { return turn == *me; });
  }
  void pass(int to, int me) { pass(to, &me); }
};

// The state of the block an OS thread runs (the launching thread's, or an interleaved slot's).
struct Runtime {
  ucontext_t scheduler;
  std::vector<Thread> threads;
  std::vector<uint64_t> slots;  // one shuffle value per thread
  Thread* current = nullptr;    // the fiber running; null between fibers
  uint3 block_idx;
  dim3 block_dim, grid_dim;
  const std::function<void()>* body = nullptr;
  std::string error;
  std::mt19937 rng{0};
  std::vector<size_t> perm;
  Interleave* group = nullptr;  // set in the slots of an interleaved launch
  int slot = -1;
};

inline Runtime& rt() {
  static thread_local Runtime r;
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

// An interleaved block hands over to the launching thread, which picks the next block to run, and
// continues when it is picked again; a no-op where blocks run in turn. A block resumed after another
// failed stops (within a fiber) or returns false (between rounds).
inline bool block_yield(Handover why) {
  Runtime& r = rt();
  if (r.group == nullptr) return true;
  ++cfg().handovers;
  r.group->why[r.slot] = why;
  r.group->pass(-1, r.slot);
  if (!r.group->abort) return true;
  if (r.current != nullptr) fail("stopped: another block of the launch failed");
  if (r.error.empty()) r.error = "stopped: another block of the launch failed";
  return false;
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
  if (cfg().ptx_version >= 90) rt().current->waited = true;
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
  const int order = cfg().order;
  for (;;) {
    if (!block_yield(Handover::round)) return;
    for (size_t k = 0; k < n; ++k) r.perm[k] = order == 1 ? n - 1 - k : k;
    if (order == 2) std::shuffle(r.perm.begin(), r.perm.end(), r.rng);
    for (size_t k : r.perm)
      if (Thread& t = r.threads[k]; t.state == State::running) {
        r.current = &t;
        swapcontext(&r.scheduler, &t.ctx);
        r.current = nullptr;
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

// A fresh block in the runtime: its index (linear, x fastest), its threads at their start.
inline void start_block(Runtime& r, int64_t linear) {
  const dim3 g = r.grid_dim, b = r.block_dim;
  r.block_idx = {static_cast<unsigned>(linear % g.x), static_cast<unsigned>((linear / g.x) % g.y),
                 static_cast<unsigned>(linear / (static_cast<int64_t>(g.x) * g.y))};
  r.error.clear();
  const unsigned n = static_cast<unsigned>(r.threads.size());
  for (unsigned k = 0; k < n; ++k) {
    Thread& t = r.threads[k];
    t.linear = k;
    t.idx = {k % b.x, (k / b.x) % b.y, k / (b.x * b.y)};
    t.state = State::running;
    t.waited = false;
    constexpr size_t kStack = 64 * 1024;
    if (!t.stack) t.stack.reset(new char[kStack]);
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack.get();
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &r.scheduler;
    makecontext(&t.ctx, trampoline, 0);
  }
}

// Runs the block started in r; its error (empty if none), with the early-launch check.
inline std::string finish_block(Runtime& r, bool early) {
  run_block();
  if (early && r.error.empty())
    for (const Thread& t : r.threads)
      if (!t.waited)
        return "thread " + std::to_string(t.linear) +
               " of a launch that may start early returned without waiting for the previous launch";
  return r.error;
}

inline void setup_runtime(Runtime& r, const std::function<void()>* body, dim3 grid, dim3 block) {
  const unsigned n = block.x * block.y * block.z;
  r.body = body;
  r.block_dim = block;
  r.grid_dim = grid;
  r.threads.resize(n);
  r.slots.assign(n, 0);
  r.error.clear();
}

inline std::string block_name(int64_t linear, dim3 g) {
  return "block (" + std::to_string(linear % g.x) + ", " + std::to_string((linear / g.x) % g.y) + ", " +
         std::to_string(linear / (static_cast<int64_t>(g.x) * g.y)) + ")";
}

// An interleaved block slot's OS thread: runs the blocks it is given until told to stop (-2).
inline void slot_main(Interleave* g, int k, const std::function<void()>* body, dim3 grid, dim3 block,
                      bool early) {
  Runtime& r = rt();
  setup_runtime(r, body, grid, block);
  r.group = g;
  r.slot = k;
  g->await(k);
  for (;;) {
    const int64_t linear = g->block[k];
    if (linear < 0) break;
    start_block(r, linear);
    r.rng.seed(cfg().seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(linear));
    g->errors[k] = finish_block(r, early);
    g->finished[k] = 1;
    g->pass(-1, k);
  }
  r.group = nullptr;
  g->pass(-1, nullptr);
}

// An interleaved launch (cfg().resident > 0): blocks dispatched in index order into `resident` slots
// as slots free up; at each hand-over the next block to run is drawn from the resident ones. The
// first block to fail stops the others at their next hand-over; its error is thrown.
inline void run_interleaved(const std::function<void()>* body, dim3 grid, dim3 block, bool early) {
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const int slots = static_cast<int>(std::min<int64_t>({cfg().resident, blocks, 512}));
  Interleave g(slots);
  std::mt19937_64 pick(cfg().block_seed * 0x2545F4914F6CDD1Dull + cfg().launches++);
  std::vector<std::thread> workers;
  for (int k = 0; k < slots; ++k) workers.emplace_back(slot_main, &g, k, body, grid, block, early);
  std::vector<int> resident, free_slots;
  for (int k = slots - 1; k >= 0; --k) free_slots.push_back(k);
  int64_t next = 0;
  int last = -1;  // the slot that ran last
  std::string error;
  for (;;) {
    while (!g.abort && next < blocks && !free_slots.empty()) {
      const int k = free_slots.back();
      free_slots.pop_back();
      g.block[k] = next++;
      g.finished[k] = 0;
      g.why[k] = Handover::round;
      resident.push_back(k);
    }
    if (resident.empty()) break;
    // Uniformly among the resident blocks; but right after a block's atomic, every other time a block
    // that sleeps polling: the moment a block that publishes its work before writing all of it would
    // be caught, which a uniform draw among many blocks rarely hits.
    size_t i = pick() % resident.size();
    if (last >= 0 && g.why[last] == Handover::after_atomic && pick() % 2 == 0) {
      std::vector<size_t> polling;
      for (size_t j = 0; j < resident.size(); ++j)
        if (resident[j] != last && g.why[resident[j]] == Handover::sleep) polling.push_back(j);
      if (!polling.empty()) i = polling[pick() % polling.size()];
    }
    const int k = resident[i];
    last = k;
    g.pass(k, -1);
    if (!g.finished[k]) continue;
    if (!g.errors[k].empty() && error.empty()) {
      error = block_name(g.block[k], grid) + ": " + g.errors[k];
      g.abort = true;
    }
    resident.erase(resident.begin() + static_cast<std::ptrdiff_t>(i));
    free_slots.push_back(k);
  }
  for (int k = 0; k < slots; ++k) {
    g.block[k] = -2;
    g.pass(k, -1);
  }
  for (auto& w : workers) w.join();
  if (!error.empty()) throw std::runtime_error("emulated kernel, " + error);
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
    const unsigned n = block.x * block.y * block.z;
    if (n == 0 || n > 1024) throw std::runtime_error("launch with " + std::to_string(n) + " threads per block");
    const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
    if (cfg().resident > 0 && blocks > 1) {
      run_interleaved(&body, grid, block, early);
      return;
    }
    Runtime& r = rt();
    setup_runtime(r, &body, grid, block);
    for (int64_t linear = 0; linear < blocks; ++linear) {
      start_block(r, linear);
      const std::string error = finish_block(r, early);
      if (!error.empty()) throw std::runtime_error("emulated kernel, " + block_name(linear, grid) + ": " + error);
    }
    r.body = nullptr;
  }
};

template <typename... Params, typename... LaunchConfig>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 block, LaunchConfig...) {
  return {kernel, grid, block};
}

inline void set_ptx_version(int version) { cfg().ptx_version = version; }

inline void set_order(int order, uint64_t seed) {
  if (order < 0 || order > 2) throw std::invalid_argument("emulator order must be 0, 1 or 2");
  cfg().order = order;
  cfg().seed = seed;
  rt().rng.seed(seed);
}

// Up to `resident` blocks of a launch at once, interleaved (seeded by `seed`); 0: in turn. Resets
// the hand-over and sleep counts.
inline void set_blocks(int resident, uint64_t seed) {
  if (resident < 0) throw std::invalid_argument("resident blocks must be 0 or more");
  Settings& c = cfg();
  c.resident = resident;
  c.block_seed = seed;
  c.launches = 0;
  c.handovers = c.sleeps = 0;
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
#define __shared__ static thread_local
#define threadIdx (::l2d_emu::rt().current->idx)
#define blockIdx (::l2d_emu::rt().block_idx)
#define blockDim (::l2d_emu::rt().block_dim)
#define gridDim (::l2d_emu::rt().grid_dim)

inline void __syncthreads() { ::l2d_emu::syncthreads(); }

// One OS thread runs at a time (blocks in turn, or interleaved ones passing a baton): memory is always
// coherent. An interleaved block hands over to another at a fence.
inline void __threadfence() { ::l2d_emu::block_yield(::l2d_emu::Handover::fence); }
template <typename T>
T __ldcg(const T* address) {
  return *address;
}

// A block that waits for other blocks (polling, with a sleep between polls): where blocks run in turn
// it waits on blocks that have not run yet, and would wait forever, so the first sleep stops it.
// Interleaved, it hands over to another block; 100,000 sleeps in one launch stop it as a hang.
inline void __nanosleep(unsigned) {
  ::l2d_emu::Runtime& r = ::l2d_emu::rt();
  if (r.group == nullptr)
    ::l2d_emu::fail("a block sleeps waiting for others: the emulator runs blocks in turn, the later ones never would");
  ++::l2d_emu::cfg().sleeps;
  if (++r.group->sleeps > 100000) ::l2d_emu::fail("blocks slept 100,000 times in one launch: they wait for what never comes");
  ::l2d_emu::block_yield(::l2d_emu::Handover::sleep);
}

// A fiber is only switched at a barrier: atomics are plain read-modify-writes. Interleaved blocks
// hand over before and after one, so that others' atomics and writes fall between this block's.
template <typename T>
T atomicAdd(T* address, T value) {
  ::l2d_emu::block_yield(::l2d_emu::Handover::atomic);
  const T old = *address;
  *address = old + value;
  ::l2d_emu::block_yield(::l2d_emu::Handover::after_atomic);
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
