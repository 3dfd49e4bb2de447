// LED in CUDA: every group's distances, normalization, loss and gradient, one thread block per group,
// without a relation tensor in global memory (the formulas are those of l2d_kernels/ops/triton_led.py).
//
// Launches: members_kernel compacts each group's members from the targets; group_kernel runs once
// per family (CD writes the gradient, zeroing every row outside a group; ID adds into it), and
// finalize_kernel adds the group losses. A block walks its group in 32 x 32 tiles of the Gram
// matrix, recomputing tiles rather than storing them: a group of at most 32 members takes one
// Gram and one gradient pass; a larger one takes four passes (norms, means, Huber and K sums,
// gradient). Every sum runs in a fixed order and no float atomics are used: results are bitwise
// reproducible. Squared norms are the Gram's own diagonal, so identical rows are exactly 0 apart.
//
// Experimental, off unless L2D_CUDA_LED_WIDE=1 is set when the op is called: a group of 33 to 64
// members (COCO's largest at a batch of 64) in one 64 x 64 tile, one Gram pass and one gradient pass
// instead of four passes over four tiles (wide_group). It has not run on a GPU yet: it stays off
// until the GPU check (which turns it on) has passed with it.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_scan.cuh>
#include <cstdlib>
#include <torch/library.h>

#include "common.cuh"
#include "ops.h"

namespace l2d {
namespace {

constexpr int kTile = 32;   // members per tile (rows and columns of a Gram tile)
constexpr int kChunk = 32;  // embedding width per shared-memory chunk
constexpr int kWide = 64;   // members of the one-tile path for groups above kTile (wide_group)
constexpr float kDistEps = 1e-12f;

__global__ void members_kernel(const bool* __restrict__ pos, int64_t y_sb, int64_t y_sc, int64_t B, int64_t C,
                               int* __restrict__ cd_idx, int* __restrict__ cd_cnt, int* __restrict__ id_idx,
                               int* __restrict__ id_cnt) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running;
  const int64_t g = blockIdx.x;
  const bool cd = g < C;
  const bool* flags = cd ? pos + g * y_sc : pos + (g - C) * y_sb;
  const int64_t stride = cd ? y_sb : y_sc;
  const int64_t n = cd ? B : C;
  int* out = cd ? cd_idx + g * B : id_idx + (g - C) * C;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t k = start + threadIdx.x;
    const int hit = (k < n && flags[k * stride]) ? 1 : 0;
    int rank, total;
    Scan(scan_storage).ExclusiveSum(hit, rank, total);
    if (hit) out[running + rank] = static_cast<int>(k);
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) (cd ? cd_cnt[g] : id_cnt[g - C]) = running;
}

struct FamilyArgs {
  int64_t s_g, s_m, s_d, t_g, t_m, t_d;  // strides of the student and teacher embeddings
  int64_t g_g, g_m;                      // strides of the gradient (width stride 1)
  int64_t y_g, y_m;                      // strides of the positive mask
  int64_t n_members, width;
  float scale;                           // 2 lambda
  bool zero_outside, add;
  bool wide;                             // groups of kTile < P <= kWide take wide_group
};

struct Shared {
  float a[kTile][kChunk + 1], b[kTile][kChunk + 1];    // student rows of tiles i and j
  float ta[kTile][kChunk + 1], tb[kTile][kChunk + 1];  // teacher rows
  float w[kTile][kTile + 1];                           // pair weights of one tile
  float ns_i[kTile], nt_i[kTile], ns_j[kTile], nt_j[kTile], rowsum[kTile];
  int rows_i[kTile], rows_j[kTile];
  float reduce[kThreads / 32];
};

struct WideShared {
  float s[kWide][kChunk + 1], t[kWide][kChunk + 1];  // a width chunk of every member row
  float w[kWide][kWide + 1];                         // pair weights
  float ns[kWide], nt[kWide], rowsum[kWide];
  int rows[kWide];
  float reduce[kThreads / 32];
};

union BlockShared {
  Shared tiled;
  WideShared wide;
};

// Distance from a squared distance: sqrt(max(sq, eps)), NaN kept.
__device__ __forceinline__ float pair_dist(float sq) { return sqrtf(sq != sq ? sq : fmaxf(sq, kDistEps)); }

__device__ __forceinline__ float huber(float x) {
  const float ax = fabsf(x);
  return ax < 1.f ? 0.5f * x * x : ax - 0.5f;
}

// w(a, b) of one ordered pair (0 for a non-pair or a coincident pair, NaN kept).
__device__ __forceinline__ float pair_weight(bool pair, float sq, float ds, float dt, float mu_s, float mu_t,
                                             float k_sum, float p_f, float n_pairs) {
  if (pair && sq > kDistEps) {
    const float x = ds / mu_s - dt / mu_t;
    const float gpair = (clamp_keep_nan(x, -1.f, 1.f) / mu_s - k_sum / (mu_s * mu_s * n_pairs)) / p_f;
    return gpair / ds;
  }
  return (pair && sq != sq) ? sq : 0.f;  // NaN in, NaN out
}

template <typename TS, typename TT>
struct Group {
  const TS* s;
  const TT* t;
  const int* members;
  float* norms;  // [n_members][2] scratch: squared norms (student, teacher) by member rank
  int P;
  const FamilyArgs& f;
  Shared& sh;
  // This thread's 2 x 2 entries of a 32 x 32 tile.
  __device__ int r0() const { return (threadIdx.x / 16) * 2; }
  __device__ int c0() const { return (threadIdx.x % 16) * 2; }

  __device__ void load_rows(int i0, int* rows) {
    if (threadIdx.x < kTile) rows[threadIdx.x] = i0 + threadIdx.x < P ? members[i0 + threadIdx.x] : -1;
  }

  // Gram entries (student gs, teacher gt) of rows sh.rows_i x sh.rows_j, accumulated in width order.
  __device__ void gram(float gs[2][2], float gt[2][2]) {
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 2; ++v) gs[u][v] = gt[u][v] = 0.f;
    for (int64_t d0 = 0; d0 < f.width; d0 += kChunk) {
      for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
        const int r = e / kChunk, c = e % kChunk;
        const int64_t d = d0 + c;
        const int ri = sh.rows_i[r], rj = sh.rows_j[r];
        const bool in_d = d < f.width;
        sh.a[r][c] = (ri >= 0 && in_d) ? to_float(s[ri * f.s_m + d * f.s_d]) : 0.f;
        sh.ta[r][c] = (ri >= 0 && in_d) ? to_float(t[ri * f.t_m + d * f.t_d]) : 0.f;
        sh.b[r][c] = (rj >= 0 && in_d) ? to_float(s[rj * f.s_m + d * f.s_d]) : 0.f;
        sh.tb[r][c] = (rj >= 0 && in_d) ? to_float(t[rj * f.t_m + d * f.t_d]) : 0.f;
      }
      __syncthreads();
      for (int c = 0; c < kChunk; ++c)
        for (int u = 0; u < 2; ++u)
          for (int v = 0; v < 2; ++v) {
            gs[u][v] = fmaf(sh.a[r0() + u][c], sh.b[c0() + v][c], gs[u][v]);
            gt[u][v] = fmaf(sh.ta[r0() + u][c], sh.tb[c0() + v][c], gt[u][v]);
          }
      __syncthreads();
    }
  }

  // Distances of this thread's entries of tile (i0, j0); tile norms must be in shared memory.
  __device__ void distances(int i0, int j0, const float gs[2][2], const float gt[2][2], float sq[2][2],
                            float ds[2][2], float dt[2][2], bool pair[2][2]) {
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 2; ++v) {
        const int a = i0 + r0() + u, b = j0 + c0() + v;
        pair[u][v] = a < P && b < P && a != b;
        sq[u][v] = sh.ns_i[r0() + u] + sh.ns_j[c0() + v] - 2.f * gs[u][v];
        ds[u][v] = pair_dist(sq[u][v]);
        dt[u][v] = pair_dist(sh.nt_i[r0() + u] + sh.nt_j[c0() + v] - 2.f * gt[u][v]);
      }
  }

  __device__ void load_norms(int i0, int j0) {
    if (threadIdx.x < kTile) {
      const int a = i0 + threadIdx.x, b = j0 + threadIdx.x;
      sh.ns_i[threadIdx.x] = a < P ? norms[2 * a] : 0.f;
      sh.nt_i[threadIdx.x] = a < P ? norms[2 * a + 1] : 0.f;
      sh.ns_j[threadIdx.x] = b < P ? norms[2 * b] : 0.f;
      sh.nt_j[threadIdx.x] = b < P ? norms[2 * b + 1] : 0.f;
    }
  }

  // Tile (i0, j0) with its norms: Gram, then distances.
  __device__ void tile(int i0, int j0, float sq[2][2], float ds[2][2], float dt[2][2], bool pair[2][2]) {
    __syncthreads();  // every thread is done with the previous tile's rows and norms
    load_rows(i0, sh.rows_i);
    load_rows(j0, sh.rows_j);
    load_norms(i0, j0);
    __syncthreads();
    float gs[2][2], gt[2][2];
    gram(gs, gt);
    distances(i0, j0, gs, gt, sq, ds, dt, pair);
  }

  // Squared norms of every member, from the diagonals of the tiles (i, i).
  __device__ void norms_pass() {
    for (int i0 = 0; i0 < P; i0 += kTile) {
      load_rows(i0, sh.rows_i);
      load_rows(i0, sh.rows_j);
      __syncthreads();
      float gs[2][2], gt[2][2];
      gram(gs, gt);
      for (int u = 0; u < 2; ++u)
        if (r0() + u == c0() + u && i0 + r0() + u < P) {
          norms[2 * (i0 + r0() + u)] = gs[u][u];
          norms[2 * (i0 + r0() + u) + 1] = gt[u][u];
        }
      __syncthreads();
    }
  }

  // grad[rows_i] (+)= scale * (rowsum * S[rows_i] - w @ S[rows_j]) over tile (i0, j0): the tile's part
  // of sum_b w(a, b) (s_a - s_b), kept in that difference form so that it stays well conditioned.
  template <typename TG>
  __device__ void write_grad(TG* grad, bool add) {
    if (threadIdx.x < kTile) {
      float total = 0.f;
      for (int c = 0; c < kTile; ++c) total += sh.w[threadIdx.x][c];
      sh.rowsum[threadIdx.x] = total;
    }
    __syncthreads();
    for (int64_t d0 = 0; d0 < f.width; d0 += kChunk) {
      for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
        const int r = e / kChunk, c = e % kChunk;
        const int64_t d = d0 + c;
        const int ri = sh.rows_i[r], rj = sh.rows_j[r];
        sh.a[r][c] = (ri >= 0 && d < f.width) ? to_float(s[ri * f.s_m + d * f.s_d]) : 0.f;
        sh.b[r][c] = (rj >= 0 && d < f.width) ? to_float(s[rj * f.s_m + d * f.s_d]) : 0.f;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < kTile * kChunk; e += kThreads) {
        const int r = e / kChunk, c = e % kChunk;
        const int64_t d = d0 + c;
        const int ri = sh.rows_i[r];
        if (ri < 0 || d >= f.width) continue;
        float acc = 0.f;
        for (int k = 0; k < kTile; ++k) acc = fmaf(sh.w[r][k], sh.b[k][c], acc);
        TG* out = grad + ri * f.g_m + d;
        const float value = f.scale * (sh.rowsum[r] * sh.a[r][c] - acc);
        *out = from_float<TG>(add ? to_float(*out) + value : value);
      }
      __syncthreads();
    }
  }
};

// Width chunk d0 .. d0 + kChunk of every member row into sh.s (and sh.t, unless t is null); rows past
// the group and widths past the end are 0.
template <typename TS, typename TT>
__device__ void load_wide_chunk(const TS* __restrict__ s, const TT* __restrict__ t, const FamilyArgs& f,
                                WideShared& sh, int64_t d0) {
  for (int e = threadIdx.x; e < kWide * kChunk; e += kThreads) {
    const int r = e / kChunk, c = e % kChunk;
    const int64_t d = d0 + c;
    const int row = sh.rows[r];
    const bool ok = row >= 0 && d < f.width;
    sh.s[r][c] = ok ? to_float(s[row * f.s_m + d * f.s_d]) : 0.f;
    if (t != nullptr) sh.t[r][c] = ok ? to_float(t[row * f.t_m + d * f.t_d]) : 0.f;
  }
}

// A group of kTile < P <= kWide members as one 64 x 64 tile. Thread (tr, tc) = (tid / 16, tid % 16) holds
// the entries (tr + 16 u, tc + 16 v), u, v < 4, of both Grams in registers: one pass over the width
// gives every distance, the means, the Huber and K sums and the pair weights on chip; a second pass
// writes the gradient, each thread 8 widths of one member row per chunk. The Gram entries are the
// same fmaf chain in width order as the tiled path's, so the distances are bitwise those of the tiled
// path; sums are per thread in (u, v) order, then block_sum.
template <typename TS, typename TT>
__device__ void wide_group(const TS* __restrict__ s, const TT* __restrict__ t, const int* __restrict__ members,
                           int P, const FamilyArgs& f, WideShared& sh, TS* __restrict__ grad,
                           float* __restrict__ loss_out) {
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  if (threadIdx.x < kWide) sh.rows[threadIdx.x] = static_cast<int>(threadIdx.x) < P ? members[threadIdx.x] : -1;
  __syncthreads();

  float gs[4][4], gt[4][4];
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v) gs[u][v] = gt[u][v] = 0.f;
  for (int64_t d0 = 0; d0 < f.width; d0 += kChunk) {
    load_wide_chunk(s, t, f, sh, d0);
    __syncthreads();
    for (int c = 0; c < kChunk; ++c) {
      float as[4], at[4], bs[4], bt[4];
      #pragma unroll
      for (int u = 0; u < 4; ++u) {
        as[u] = sh.s[tr + 16 * u][c];
        at[u] = sh.t[tr + 16 * u][c];
        bs[u] = sh.s[tc + 16 * u][c];
        bt[u] = sh.t[tc + 16 * u][c];
      }
      #pragma unroll
      for (int u = 0; u < 4; ++u)
        #pragma unroll
        for (int v = 0; v < 4; ++v) {
          gs[u][v] = fmaf(as[u], bs[v], gs[u][v]);
          gt[u][v] = fmaf(at[u], bt[v], gt[u][v]);
        }
    }
    __syncthreads();
  }
  if (tr == tc) {
    #pragma unroll
    for (int u = 0; u < 4; ++u) {
      sh.ns[tr + 16 * u] = gs[u][u];
      sh.nt[tr + 16 * u] = gt[u][u];
    }
  }
  __syncthreads();

  float sq[4][4], ds[4][4], dt[4][4];
  bool pair[4][4];
  float sum_s = 0.f, sum_t = 0.f;
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v) {
      const int a = tr + 16 * u, b = tc + 16 * v;
      pair[u][v] = a < P && b < P && a != b;
      sq[u][v] = sh.ns[a] + sh.ns[b] - 2.f * gs[u][v];
      ds[u][v] = pair_dist(sq[u][v]);
      dt[u][v] = pair_dist(sh.nt[a] + sh.nt[b] - 2.f * gt[u][v]);
      if (pair[u][v]) sum_s += ds[u][v], sum_t += dt[u][v];
    }
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  const float mu_s = block_sum(sum_s, sh.reduce) / n_pairs;
  const float mu_t = block_sum(sum_t, sh.reduce) / n_pairs;

  float huber_sum = 0.f, k_part = 0.f;
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v)
      if (pair[u][v]) {
        const float x = ds[u][v] / mu_s - dt[u][v] / mu_t;
        huber_sum += huber(x);
        k_part += clamp_keep_nan(x, -1.f, 1.f) * ds[u][v];
      }
  const float loss = block_sum(huber_sum, sh.reduce) / p_f;
  const float k_sum = block_sum(k_part, sh.reduce);
  if (threadIdx.x == 0) *loss_out = loss;

  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v)
      sh.w[tr + 16 * u][tc + 16 * v] =
          pair_weight(pair[u][v], sq[u][v], ds[u][v], dt[u][v], mu_s, mu_t, k_sum, p_f, n_pairs);
  __syncthreads();
  if (threadIdx.x < kWide) {
    float total = 0.f;
    for (int c = 0; c < kWide; ++c) total += sh.w[threadIdx.x][c];
    sh.rowsum[threadIdx.x] = total;
  }

  // grad[a] (+)= scale * (rowsum[a] s_a - sum_b w(a, b) s_b): thread -> member row tid / 4, widths
  // (tid % 4) * 8 .. + 8 of each chunk.
  const int gr = threadIdx.x / 4, gc = (threadIdx.x % 4) * 8;
  for (int64_t d0 = 0; d0 < f.width; d0 += kChunk) {
    __syncthreads();  // the previous chunk's rows (and, first, the row sums) are done with
    load_wide_chunk(s, static_cast<const TT*>(nullptr), f, sh, d0);
    __syncthreads();
    const int row = sh.rows[gr];
    if (row < 0) continue;
    float acc[8];
    #pragma unroll
    for (int j = 0; j < 8; ++j) acc[j] = 0.f;
    for (int k = 0; k < kWide; ++k) {
      const float w = sh.w[gr][k];
      #pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, sh.s[k][gc + j], acc[j]);
    }
    #pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64_t d = d0 + gc + j;
      if (d >= f.width) break;
      TS* out = grad + row * f.g_m + d;
      const float value = f.scale * (sh.rowsum[gr] * sh.s[gr][gc + j] - acc[j]);
      *out = from_float<TS>(f.add ? to_float(*out) + value : value);
    }
  }
}

template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads) group_kernel(const TS* __restrict__ es, const TT* __restrict__ et,
                                                         TS* __restrict__ grad, const bool* __restrict__ pos,
                                                         const int* __restrict__ idx, const int* __restrict__ cnt,
                                                         float* __restrict__ norms, float* __restrict__ group_loss,
                                                         FamilyArgs f) {
  __shared__ BlockShared shared;
  Shared& sh = shared.tiled;
  const int64_t g = blockIdx.x;
  const int P = cnt[g];
  TS* grad_g = grad + g * f.g_g;

  if (f.zero_outside) {  // CD: every row of this label outside a group of two or more gets zero gradient
    const TS zero = from_float<TS>(0.f);
    for (int64_t e = threadIdx.x; e < f.n_members * f.width; e += kThreads) {
      const int64_t m = e / f.width, d = e % f.width;
      if (P < 2 || !pos[g * f.y_g + m * f.y_m]) grad_g[m * f.g_m + d] = zero;
    }
  }
  if (P < 2) {
    if (threadIdx.x == 0) group_loss[g] = 0.f;
    return;
  }

  if (f.wide && P > kTile && P <= kWide) {
    wide_group(es + g * f.s_g, et + g * f.t_g, idx + g * f.n_members, P, f, shared.wide, grad_g, group_loss + g);
    return;
  }
  Group<TS, TT> grp{es + g * f.s_g, et + g * f.t_g, idx + g * f.n_members, norms + g * f.n_members * 2, P, f, sh};
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  float sq[2][2], ds[2][2], dt[2][2];
  bool pair[2][2];

  if (P <= kTile) {  // one tile: one Gram, kept in registers for every step
    grp.load_rows(0, sh.rows_i);
    grp.load_rows(0, sh.rows_j);
    __syncthreads();
    float gs[2][2], gt[2][2];
    grp.gram(gs, gt);
    for (int u = 0; u < 2; ++u)
      if (grp.r0() + u == grp.c0() + u) {
        sh.ns_i[grp.r0() + u] = sh.ns_j[grp.r0() + u] = gs[u][u];
        sh.nt_i[grp.r0() + u] = sh.nt_j[grp.r0() + u] = gt[u][u];
      }
    __syncthreads();
    grp.distances(0, 0, gs, gt, sq, ds, dt, pair);
  } else {
    grp.norms_pass();
  }

  // Means of the distances over the ordered pairs.
  float sum_s = 0.f, sum_t = 0.f;
  if (P <= kTile) {
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 2; ++v)
        if (pair[u][v]) sum_s += ds[u][v], sum_t += dt[u][v];
  } else {
    for (int i0 = 0; i0 < P; i0 += kTile)
      for (int j0 = 0; j0 < P; j0 += kTile) {
        grp.tile(i0, j0, sq, ds, dt, pair);
        for (int u = 0; u < 2; ++u)
          for (int v = 0; v < 2; ++v)
            if (pair[u][v]) sum_s += ds[u][v], sum_t += dt[u][v];
      }
  }
  const float mu_s = block_sum(sum_s, sh.reduce) / n_pairs;
  const float mu_t = block_sum(sum_t, sh.reduce) / n_pairs;

  // Huber and K sums.
  float huber_sum = 0.f, k_part = 0.f;
  auto stats = [&]() {
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 2; ++v)
        if (pair[u][v]) {
          const float x = ds[u][v] / mu_s - dt[u][v] / mu_t;
          huber_sum += huber(x);
          k_part += clamp_keep_nan(x, -1.f, 1.f) * ds[u][v];
        }
  };
  if (P <= kTile) {
    stats();
  } else {
    for (int i0 = 0; i0 < P; i0 += kTile)
      for (int j0 = 0; j0 < P; j0 += kTile) {
        grp.tile(i0, j0, sq, ds, dt, pair);
        stats();
      }
  }
  const float loss = block_sum(huber_sum, sh.reduce) / p_f;
  const float k_sum = block_sum(k_part, sh.reduce);
  if (threadIdx.x == 0) group_loss[g] = loss;

  // Gradient, tile by tile.
  auto weights = [&]() {
    for (int u = 0; u < 2; ++u)
      for (int v = 0; v < 2; ++v) {
        sh.w[grp.r0() + u][grp.c0() + v] =
            pair_weight(pair[u][v], sq[u][v], ds[u][v], dt[u][v], mu_s, mu_t, k_sum, p_f, n_pairs);
      }
    __syncthreads();
  };
  if (P <= kTile) {
    weights();
    grp.write_grad(grad_g, f.add);
  } else {
    for (int i0 = 0; i0 < P; i0 += kTile)
      for (int j0 = 0; j0 < P; j0 += kTile) {
        grp.tile(i0, j0, sq, ds, dt, pair);
        weights();
        grp.write_grad(grad_g, f.add || j0 > 0);
      }
  }
}

__global__ void finalize_kernel(const float* __restrict__ group_loss, int64_t C, int64_t B, float lambda_cd,
                                float lambda_id, float* __restrict__ out) {
  __shared__ float scratch[kThreads / 32];
  float cd = 0.f, id = 0.f;
  for (int64_t k = threadIdx.x; k < C; k += kThreads) cd += group_loss[k];
  for (int64_t k = threadIdx.x; k < B; k += kThreads) id += group_loss[C + k];
  cd = block_sum(cd, scratch);
  id = block_sum(id, scratch);
  if (threadIdx.x == 0) {
    out[0] = lambda_cd * cd + lambda_id * id;
    out[1] = cd;
    out[2] = id;
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> led_cuda(const at::Tensor& es_in, const at::Tensor& et_in,
                                            const at::Tensor& targets, double lambda_cd, double lambda_id) {
  TORCH_CHECK(es_in.is_cuda() && et_in.is_cuda() && targets.is_cuda(), "led_cuda: inputs must be CUDA tensors");
  TORCH_CHECK(es_in.dim() == 3 && es_in.sizes() == et_in.sizes(), "led_cuda: embeddings must be [B, C, D] of one shape");
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == es_in.size(0) && targets.size(1) == es_in.size(1),
              "led_cuda: targets must be [B, C]");
  const c10::cuda::CUDAGuard guard(es_in.device());
  // Mixed dtypes compute from float32 copies (exact for half inputs); the gradient keeps es's dtype.
  const bool mixed = es_in.scalar_type() != et_in.scalar_type();
  const at::Tensor es = mixed ? es_in.to(at::kFloat) : es_in;
  const at::Tensor et = mixed ? et_in.to(at::kFloat) : et_in;
  const at::Tensor pos = targets.gt(0.5);
  const int64_t B = es.size(0), C = es.size(1), D = es.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const char* wide_env = std::getenv("L2D_CUDA_LED_WIDE");
  const bool wide = wide_env != nullptr && wide_env[0] == '1';
  auto i32 = es.options().dtype(at::kInt), f32 = es.options().dtype(at::kFloat);

  at::Tensor grad = at::empty({B, C, D}, es.options());
  at::Tensor lists = at::empty({2 * B * C + B + C}, i32);
  int* cd_idx = lists.data_ptr<int>();
  int* id_idx = cd_idx + B * C;
  int* cd_cnt = id_idx + B * C;
  int* id_cnt = cd_cnt + C;
  at::Tensor norms = at::empty({2 * B * C * 2}, f32);
  at::Tensor group_loss = at::empty({C + B}, f32);
  at::Tensor out = at::empty({3}, f32);

  members_kernel<<<static_cast<unsigned>(C + B), kThreads, 0, stream>>>(
      pos.data_ptr<bool>(), pos.stride(0), pos.stride(1), B, C, cd_idx, cd_cnt, id_idx, id_cnt);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  dispatch_float_types(es.scalar_type(), "led_cuda", [&](auto tag) {
    using T = decltype(tag);
    const T* s = reinterpret_cast<const T*>(es.data_ptr());
    const T* t = reinterpret_cast<const T*>(et.data_ptr());
    T* g = reinterpret_cast<T*>(grad.data_ptr());
    // CD: groups are labels, members are images. ID: the other way round.
    const FamilyArgs cd{es.stride(1), es.stride(0), es.stride(2), et.stride(1), et.stride(0), et.stride(2),
                        grad.stride(1), grad.stride(0), pos.stride(1), pos.stride(0), B, D,
                        static_cast<float>(2.0 * lambda_cd), true, false, wide};
    group_kernel<T, T><<<static_cast<unsigned>(C), kThreads, 0, stream>>>(
        s, t, g, pos.data_ptr<bool>(), cd_idx, cd_cnt, norms.data_ptr<float>(), group_loss.data_ptr<float>(), cd);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const FamilyArgs id{es.stride(0), es.stride(1), es.stride(2), et.stride(0), et.stride(1), et.stride(2),
                        grad.stride(0), grad.stride(1), pos.stride(0), pos.stride(1), C, D,
                        static_cast<float>(2.0 * lambda_id), false, true, wide};
    group_kernel<T, T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        s, t, g, pos.data_ptr<bool>(), id_idx, id_cnt, norms.data_ptr<float>() + 2 * B * C,
        group_loss.data_ptr<float>() + C, id);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finalize_kernel<<<1, kThreads, 0, stream>>>(group_loss.data_ptr<float>(), C, B, static_cast<float>(lambda_cd),
                                               static_cast<float>(lambda_id), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (mixed) grad = grad.to(es_in.scalar_type());
  return {out, grad};
}

}  // namespace l2d
