// Emulator stand-in for cuda_fp16.h: __half is c10::Half (round-to-nearest-even conversions).
#pragma once
#include <c10/util/Half.h>

using __half = c10::Half;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
