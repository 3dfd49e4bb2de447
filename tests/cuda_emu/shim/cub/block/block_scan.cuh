// Emulator stand-in for cub::BlockScan: the exclusive sum of one value per thread, or of K
// consecutive values per thread (CUB's blocked arrangement: thread t holds items t K .. t K + K - 1),
// with CUB's rule that temporary storage is reused only after a __syncthreads (the emulated scan
// ends with one of its own, so a caller that forgets it is not caught here; racecheck on a GPU
// catches that).
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

  template <int K>
  void ExclusiveSum(const T (&input)[K], T (&output)[K], T& aggregate) {
    T mine{};
    for (int k = 0; k < K; ++k) mine += input[k];
    T before{};
    ExclusiveSum(mine, before, aggregate);
    for (int k = 0; k < K; ++k) {
      output[k] = before;
      before += input[k];
    }
  }

 private:
  TempStorage& storage_;
};
}  // namespace cub
