// Emulator stand-in for the runtime calls csrc/ makes: an emulated device of a few SMs (so that
// kernels whose grid is sized by the SM count loop over several work items per block), and memsets
// (the emulator runs everything in order on one stream).
#pragma once
#include <cstddef>
#include <cstring>

enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? ::l2d_emu::rt().sm_count : 0;
  return cudaSuccess;
}

template <typename Stream>
cudaError_t cudaMemsetAsync(void* address, int value, size_t bytes, Stream) {
  std::memset(address, value, bytes);
  return cudaSuccess;
}
