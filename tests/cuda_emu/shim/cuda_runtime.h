// Emulator stand-in for the runtime calls csrc/ makes: an emulated device of a few SMs (so that
// kernels whose grid is sized by the SM count loop over several work items per block) of compute
// capability 9.0 (so that launches take the early-start path), its kernels' PTX version, memsets (the emulator runs
// everything in order on one stream) and cudaLaunchKernelEx.
#pragma once
#include <cstddef>
#include <cstring>
#include <utility>

enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrComputeCapabilityMajor = 75 };

inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? ::l2d_emu::cfg().sm_count
           : attr == cudaDevAttrComputeCapabilityMajor ? 9
                                                       : 0;
  return cudaSuccess;
}

// The calling thread's stream capture mode (the emulator captures nothing: kept, exchanged, unused).
enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2
};
inline cudaError_t cudaThreadExchangeStreamCaptureMode(cudaStreamCaptureMode* mode) {
  static thread_local cudaStreamCaptureMode current = cudaStreamCaptureModeGlobal;
  std::swap(current, *mode);
  return cudaSuccess;
}

// The PTX version the emulated kernels were compiled from (emu.h's Runtime::ptx_version).
struct cudaFuncAttributes {
  int ptxVersion, binaryVersion;
};
template <typename Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
  attributes->ptxVersion = attributes->binaryVersion = ::l2d_emu::cfg().ptx_version;
  return cudaSuccess;
}

enum cudaLaunchAttributeID { cudaLaunchAttributeProgrammaticStreamSerialization = 6 };
union cudaLaunchAttributeValue {
  int programmaticStreamSerializationAllowed;
};
struct cudaLaunchAttribute {
  cudaLaunchAttributeID id;
  cudaLaunchAttributeValue val;
};
// The one stream takes any stream handle.
struct cudaStreamStandIn {
  cudaStreamStandIn() = default;
  template <typename Stream>
  cudaStreamStandIn(const Stream&) {}
};
// The fields in CUDA's order, under other names (emu.h's gridDim and blockDim are macros).
struct cudaLaunchConfig_t {
  dim3 grid, block;
  size_t dynamic_shared_bytes;
  cudaStreamStandIn stream;
  cudaLaunchAttribute* attrs;
  unsigned numAttrs;
};

template <typename... Params, typename... Args>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Params...), Args&&... args) {
  ::l2d_emu::Launch<Params...> launch{kernel, config->grid, config->block};
  for (unsigned k = 0; k < config->numAttrs; ++k)
    if (config->attrs[k].id == cudaLaunchAttributeProgrammaticStreamSerialization)
      launch.early = config->attrs[k].val.programmaticStreamSerializationAllowed != 0;
  launch(std::forward<Args>(args)...);
  return cudaSuccess;
}

template <typename Stream>
cudaError_t cudaMemsetAsync(void* address, int value, size_t bytes, Stream) {
  std::memset(address, value, bytes);
  return cudaSuccess;
}
