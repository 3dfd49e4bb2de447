// Guarded CPU allocations for the emulated kernels' tests: while on, every CPU tensor sits at the end
// of its own mapping, between two 64 MiB no-access regions, so that a kernel reading or writing past
// the end of a buffer (beyond the up-to-63-byte slack that keeps data 64-byte aligned), or before its
// start, stops the process with a segmentation fault instead of silently touching other memory. The
// GPU's equivalent is compute-sanitizer's memcheck. A new allocation's bytes are all 0xFF (NaN as
// floats, -1 as integers), not the zeros of a fresh mapping: a gradient row the kernels never write
// shows as NaN, as the GPU's caching allocator's leftovers would show as garbage.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <unordered_map>

namespace {

constexpr size_t kGuard = size_t(64) << 20;
constexpr size_t kAlign = 64;

struct Region {
  void* base;
  size_t total;
};

// Data pointer -> its mapping. The data pointer is also the DataPtr's context, as raw_allocate()
// callers (oneDNN, for one) require.
std::mutex regions_lock;
std::unordered_map<void*, Region> regions;

void release(void* data) {
  Region region;
  {
    std::lock_guard<std::mutex> hold(regions_lock);
    auto found = regions.find(data);
    TORCH_CHECK(found != regions.end(), "guarded allocator: unknown pointer");
    region = found->second;
    regions.erase(found);
  }
  munmap(region.base, region.total);
}

struct GuardedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t used = (n + kAlign - 1) / kAlign * kAlign;
    const size_t body = used == 0 ? page : (used + page - 1) / page * page;
    const size_t total = kGuard + body + kGuard;
    void* base = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "guarded allocation of ", n, " bytes failed");
    char* start = static_cast<char*>(base) + kGuard;
    TORCH_CHECK(mprotect(start, body, PROT_READ | PROT_WRITE) == 0, "mprotect failed");
    void* data = start + body - used;
    std::memset(data, 0xFF, used);
    {
      std::lock_guard<std::mutex> hold(regions_lock);
      regions[data] = Region{base, total};
    }
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

GuardedAllocator guarded;
c10::Allocator* previous = nullptr;

void guard_memory(bool on) {
  if (on && previous == nullptr) {
    previous = c10::GetCPUAllocator();
    c10::SetCPUAllocator(&guarded, /*priority=*/255);
  } else if (!on && previous != nullptr) {
    c10::SetCPUAllocator(previous, /*priority=*/255);
    previous = nullptr;
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(l2d_emu, m) { m.def("guard_memory(bool on) -> ()", &guard_memory); }
