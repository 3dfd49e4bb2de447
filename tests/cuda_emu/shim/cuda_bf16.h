// Emulator stand-in for cuda_bf16.h: __nv_bfloat16 is c10::BFloat16 (round-to-nearest-even conversions).
#pragma once
#include <c10/util/BFloat16.h>

using __nv_bfloat16 = c10::BFloat16;
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
