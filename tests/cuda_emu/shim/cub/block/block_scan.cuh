// Emulator stand-in for cub::BlockScan: the exclusive sum of one value per thread, with CUB's rule
// that temporary storage is reused only after a __syncthreads (the emulated scan ends with one of
// its own, so a caller that forgets it is not caught here; racecheck on a GPU catches that).
#pragma once

namespace cub {
template <typename T, int kBlockThreads>
class BlockScan {
 public:
  struct TempStorage {
    T values[kBlockThreads];
  };
  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& aggregate) {
    const unsigned me = threadIdx.x;
    storage_.values[me] = input;
    __syncthreads();
    T before{}, total{};
    for (int k = 0; k < kBlockThreads; ++k) {
      if (static_cast<unsigned>(k) == me) before = total;
      total += storage_.values[k];
    }
    output = before;
    aggregate = total;
    __syncthreads();
  }

 private:
  TempStorage& storage_;
};
}  // namespace cub
