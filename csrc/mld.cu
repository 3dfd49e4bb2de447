// MLD in one pass: per-label Bernoulli KL of clamped sigmoid probabilities, its reduction and the
// student gradient (see l2d_kernels/ops/triton_mld.py for the formulas, which this mirrors).
// Each block writes its partial sum; one block adds them in a fixed order: no float atomics. Small
// inputs take one block, which writes the loss itself.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "common.cuh"
#include "ops.h"

namespace l2d {
namespace {

// The kernel is bound by instruction issue (expf and logf are ten to twenty instructions each, ten of
// them a label), so, as in the Triton kernel: each exponential is one ex2.approx.ftz (2 ulp; results
// below 2^-126 flush to zero, which only touches sigmoids of logits below -87: their probabilities are
// clamped to eps and their gradient terms are that small) and the logarithm a short polynomial. The
// host-compiled copy (the CPU emulator's) takes the libm functions.
__device__ __forceinline__ float fast_exp(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
#else
  return expf(x);
#endif
}

__device__ __forceinline__ float fast_reciprocal(float x) {  // 1 / x for x in [1.7, 3] (1 ulp)
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// The polynomials below are fitted, not truncated series (triton_mld.py's, the same coefficients):
// least maximum relative error over each range, the constant term held at 1.

// log(1 + u) for u in [0, 1], to a few ulp also where u is tiny: 2 atanh(s), s = u / (2 + u) in
// [0, 1/3], as 2 s p(s^2), p of degree 4 fitted over [0, 1/9] (4.5e-9 of the result).
__device__ __forceinline__ float log1p_unit(float u) {
  const float s = u * fast_reciprocal(2.f + u), t = s * s;
  float p = 0.14005993499f;
  p = p * t + 0.14000902616f;
  p = p * t + 0.20010763621f;
  p = p * t + 0.33333208143f;
  p = p * t + 1.f;
  return 2.f * s * p;
}

// log(1 + x) for x = pt expm1(d), |d| < 1/4, so x in [-0.222, 0.285]: 2 s p(s^2), s = x / (2 + x)
// within 0.1244, p of degree 2 fitted over that (2.1e-8 of the result).
__device__ __forceinline__ float log1p_near(float x) {
  const float s = x * fast_reciprocal(2.f + x), t = s * s;
  return 2.f * s * (1.f + t * (0.33331834656f + t * 0.20311795327f));
}

// u + exp(-u) - 1 >= 0, no cancellation near 0: for |u| < 1/4 by its series (what it leaves out is
// below 5e-7 of the result; the direct form loses up to 2e-6 at 1/4). Both forms are evaluated and one
// selected (no branch: neighbouring labels take either).
__device__ __forceinline__ float kl_excess(float u) {
  const float series = 0.5f - u * (1.f / 6 - u * (1.f / 24 - u * (1.f / 120 - u * (1.f / 720))));
  const float direct = u + fast_exp(-u) - 1.f;
  return fabsf(u) < 0.25f ? u * u * series : direct;
}

// exp(d) - 1 for |d| < 1/4: d p(d), p of degree 4 fitted over [-1/4, 1/4] (8.7e-8 of the result).
__device__ __forceinline__ float expm1_small(float d) {
  return d * (1.f + d * (0.49999835941f + d * (0.16666710458f + d * (0.041774192304f + d * 0.0083359397141f))));
}

// clamp_keep_nan in two instructions: the min and max that return NaN for a NaN operand (sm_80 and
// later), where the select around fminf / fmaxf took a compare, and a reload of each bound, per clamp.
__device__ __forceinline__ float clamp_nan(float x, float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float y;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(x), "f"(lo));
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(y), "f"(hi));
  return y;
#else
  return clamp_keep_nan(x, lo, hi);
#endif
}

struct LogProbs {
  float log_p, log_q, log_sig, log_sig_neg;
};

__device__ __forceinline__ LogProbs clamped_log_probs(float z, float lo, float hi) {
  const float tail = log1p_unit(fast_exp(-fabsf(z)));
  LogProbs r;
  r.log_sig = fminf(z, 0.f) - tail;
  r.log_sig_neg = fminf(-z, 0.f) - tail;
  r.log_p = clamp_nan(r.log_sig, lo, hi);
  r.log_q = clamp_nan(r.log_sig_neg, lo, hi);
  return r;
}

// kPacked: both inputs row-major and dense, so label k is at offset k (no 64-bit division by C per
// label, which costs as much as the rest of the label's arithmetic). kGrad: write the gradient (a
// call that needs none passes a null grad). kPerLabel: write each label's loss (reduction "none")
// instead of the block's sum; as a runtime flag, its branch and both paths' addressing were 10 of a
// label's 144 instructions.
// At most 32 registers (eight blocks an SM): the 1,024 blocks of a large call in one wave on 132 SMs
// (with the near forms nvcc took 39 by itself, six blocks an SM, and a second wave of 232 blocks).
template <typename T, bool kPacked, bool kGrad, bool kPerLabel>
__global__ void __launch_bounds__(kThreads, 8)
    mld_kernel(const T* __restrict__ zs, const T* __restrict__ zt, grad_t<T>* __restrict__ grad,
               float* __restrict__ out, int64_t B, int64_t C, int64_t zs_sb, int64_t zs_sc, int64_t zt_sb,
               int64_t zt_sc, float inv_t, float loss_scale, float grad_scale, float lo, float hi, float free_max,
               float near_max, bool single) {
  __shared__ float scratch[kThreads / 32];
  const int64_t n = B * C;
  float partial = 0.f;
  #pragma unroll 4
  for (int64_t k = blockIdx.x * (int64_t)kThreads + threadIdx.x; k < n; k += (int64_t)gridDim.x * kThreads) {
    int64_t s_at = k, t_at = k;
    if constexpr (!kPacked) {
      const int64_t b = k / C, c = k % C;
      s_at = b * zs_sb + c * zs_sc;
      t_at = b * zt_sb + c * zt_sc;
    }
    const float a = to_float(zs[s_at]), b = to_float(zt[t_at]);
    const LogProbs s = clamped_log_probs(a * inv_t, lo, hi);
    const LogProbs t = clamped_log_probs(b * inv_t, lo, hi);
    const float pt = fast_exp(t.log_p), qt = fast_exp(t.log_q);
    // Nearly agreeing and unclamped (|a / T| and |b / T| below near_max: see triton_mld.py): the
    // log-ratios and the gradient from d, exact for close logits, where their usual forms cancel.
    const float d = (a - b) * inv_t;
    const bool near = fabsf(d) < 0.25f && fmaxf(fabsf(a * inv_t), fabsf(b * inv_t)) < near_max;
    const float close = expm1_small(d);
    const float u_q_near = log1p_near(pt * close);
    const float u_p = near ? u_q_near - d : t.log_p - s.log_p;
    const float u_q = near ? u_q_near : t.log_q - s.log_q;
    const float loss = pt * kl_excess(u_p) + qt * kl_excess(u_q);
    if constexpr (kGrad) {
      // The terms qt sigmoid(a / T) and pt sigmoid(-a / T) = below have the ratio
      // exp(log qt - log pt + a / T), exp(d) where near, and below * expm1(d) keeps the digits their
      // difference loses. Unclamped is |a / T| < free_max, on both sides at once.
      const float below = pt * fast_exp(s.log_sig_neg);
      const float apart = fabsf(a * inv_t) < free_max ? fast_exp(t.log_q - t.log_p + a * inv_t) - 1.f : 0.f;
      const float g = below * (near ? close : apart);
      grad[k] = from_float<grad_t<T>>(g * grad_scale);
    }
    if constexpr (kPerLabel)
      out[k] = loss * loss_scale;
    else
      partial += loss;
  }
  if constexpr (!kPerLabel) {
    const float total = block_sum(partial, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = single ? total * loss_scale : total;
  }
}

__global__ void sum_kernel(const float* __restrict__ partials, int n, float scale, float* __restrict__ out) {
  __shared__ float scratch[kThreads / 32];
  float v = 0.f;
  for (int k = threadIdx.x; k < n; k += kThreads) v += partials[k];
  const float total = block_sum(v, scratch);
  if (threadIdx.x == 0) *out = total * scale;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mld_cuda(const at::Tensor& zs_in, const at::Tensor& zt_in,
                                            c10::string_view reduction, double eps, double temperature,
                                            bool with_grad) {
  TORCH_CHECK(zs_in.is_cuda() && zt_in.is_cuda(), "mld_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(zs_in.dim() == 2 && zs_in.sizes() == zt_in.sizes(), "mld_cuda: logits must be [B, C] of one shape");
  const c10::cuda::CUDAGuard guard(zs_in.device());
  // Mixed dtypes compute from float32 copies (exact for half inputs); the gradient takes zs's dtype
  // (float32 for float16: grad_t).
  const bool mixed = zs_in.scalar_type() != zt_in.scalar_type();
  const at::Tensor zs = mixed ? zs_in.to(at::kFloat) : zs_in;
  const at::Tensor zt = mixed ? zt_in.to(at::kFloat) : zt_in;
  const int64_t B = zs.size(0), C = zs.size(1), n = B * C;
  double scale = 1.0;
  if (reduction == "batchmean") scale = 1.0 / B;
  else if (reduction == "mean") scale = 1.0 / n;
  else TORCH_CHECK(reduction == "sum" || reduction == "none", "mld_cuda: unknown reduction ", reduction);
  const bool per_label = reduction == "none";
  const float loss_scale = static_cast<float>(scale * temperature * temperature);
  const float grad_scale = static_cast<float>(scale * temperature);
  // Up to kSingleBlock labels, one block reduces them all and writes the loss: one launch instead of
  // two where the call's cost is its launches (64 x 80 is 20 labels a thread).
  constexpr int64_t kSingleBlock = 32 * kThreads;
  const bool single = !per_label && n <= kSingleBlock;
  const int blocks = single ? 1 : static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1024));

  at::Tensor grad = with_grad ? at::empty({B, C}, zs.options().dtype(grad_scalar_type(zs.scalar_type())))
                               : at::empty({0}, zs_in.options().dtype(grad_scalar_type(zs_in.scalar_type())));
  const auto f32 = zs.options().dtype(at::kFloat);
  at::Tensor out = per_label ? at::empty({B, C}, f32) : single ? at::empty({}, f32) : at::empty({blocks}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float lo = static_cast<float>(std::log(eps)), hi = static_cast<float>(std::log1p(-eps));
  // Where neither probability is clamped: |z / T| below the clamp's logit. Where the nearly-agreeing
  // forms are taken: the same, at most 80 (reference.near_max, the same value).
  const float free_max = static_cast<float>(std::log1p(-eps) - std::log(eps));
  const float near_max = std::min(std::max(free_max, 0.f), 80.f);
  dispatch_float_types(zs.scalar_type(), "mld_cuda", [&](auto tag) {
    using T = decltype(tag);
    const auto launch = [&](auto kernel) {
      kernel<<<blocks, kThreads, 0, stream>>>(
          reinterpret_cast<const T*>(zs.data_ptr()), reinterpret_cast<const T*>(zt.data_ptr()),
          with_grad ? reinterpret_cast<grad_t<T>*>(grad.data_ptr()) : nullptr, out.data_ptr<float>(), B, C,
          zs.stride(0), zs.stride(1), zt.stride(0), zt.stride(1), static_cast<float>(1.0 / temperature), loss_scale,
          grad_scale, lo, hi, free_max, near_max, single);
    };
    // [packed][with gradient][per label]
    decltype(&mld_kernel<T, true, true, true>) kernels[2][2][2] = {
        {{mld_kernel<T, false, false, false>, mld_kernel<T, false, false, true>},
         {mld_kernel<T, false, true, false>, mld_kernel<T, false, true, true>}},
        {{mld_kernel<T, true, false, false>, mld_kernel<T, true, false, true>},
         {mld_kernel<T, true, true, false>, mld_kernel<T, true, true, true>}}};
    const bool packed = zs.is_contiguous() && zt.is_contiguous();
    launch(kernels[packed][with_grad][per_label]);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mixed && with_grad) grad = grad.to(grad_scalar_type(zs_in.scalar_type()));
  if (per_label || single) return {out, grad};
  at::Tensor loss = at::empty({}, out.options());
  sum_kernel<<<1, kThreads, 0, stream>>>(out.data_ptr<float>(), blocks, loss_scale, loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad};
}

}  // namespace l2d
