// LED in CUDA: every group's distances, normalization, loss and gradient, without a relation tensor
// in global memory (the formulas are those of l2d_kernels/ops/triton_led.py).
//
// Launches: members_kernel compacts each group's members from the targets and writes the zero rows
// of the gradient; where the width is more than one slice (kSliceWidth), one more block of it
// places the groups of 2 to 64 members in a scratch, and one slice_kernel launch of both families'
// partial Grams and one per family of weights and gradient take those groups over their width (see
// "the width-split path" below); group_kernel runs once per family (three times for a striped
// family, below; CD writes its groups' rows, ID adds into them), and the last block of the last
// launch adds the group losses. Every sum runs in a fixed order and no float atomics are used:
// results are bitwise reproducible. Squared norms are the Gram's own diagonal (or the same fmaf
// chain), so identical rows are exactly 0 apart. Grams and norms are of the rows less the group's
// first member (load_chunk_less, in float32 for every dtype), the gradient of the rows as they are.
//
// A call without gradient (with_grad false: a null gradient pointer, FamilyArgs::write_grad false)
// makes the same launches and writes no gradient: no zero rows, no gradient pass of a tile, no third
// sweep of a large group, no slice item past a group's first; its losses are those of the call with
// gradient, bitwise.
//
// A group of at most 64 members is one tile (one_tile_group, T = 16, 32 or 64 rows by its size):
// one pass over the width builds both Gram matrices in registers, the distances, means, Huber and K
// sums and pair weights stay on chip, and a second pass writes the gradient. Width chunks are read
// into registers one chunk ahead of the arithmetic, so their memory latency hides behind the
// previous chunk's products; chunks sit in shared memory transposed (member fastest), so that each
// thread reads four members' values with one 16-byte load. Smaller tiles take wider chunks and split
// the width among groups of threads (kSlices), whose partial Grams are then added in a fixed order:
// every tile size has 16 Gram entries per thread per slice and 8 chunk values per thread per input.
// A larger group is swept as pairs of 64-row tiles (I, J), three sweeps: the means of the distances;
// the Huber and K sums; the pair weights and the gradient of rows I. Each pair's Gram is recomputed
// from the inputs with the same chunk machinery, about 3 (P / 64)^2 tile Grams for P members. Where a
// family's groups can exceed 128 members ("striped"), each row tile I of such a group is a work item
// of its own, on its own SM, and the sweeps are three launches whose sums are kept per row tile and
// added in row-tile order; otherwise the group's at most four tile pairs stay in one block.
//
// This header holds the kernels and led_of_type<T>, a call's launches for one dtype. It is compiled
// once per dtype, each in a file of its own (led_float.cu, led_half.cu, led_bf16.cu: the kernels'
// instantiations are most of the extension's build time, and nvcc builds the three at once);
// led.cu checks a call's inputs and picks the file. Everything here has internal linkage, so each
// file keeps its own copy of what it instantiates.
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <type_traits>

#include "common.cuh"
#include "led_common.cuh"
#include "led_of_type.h"

namespace l2d {
namespace {

constexpr int kOneTile = 64;  // the largest group of the one-tile path, and the tile of larger groups
constexpr float kDistEps = 1e-12f;

// The one-tile size for a group of P members (P above kOneTile: the largest), on the device and in
// the host's scratch bound alike.
__host__ __device__ __forceinline__ int tile_of(int64_t P) { return P <= 16 ? 16 : P <= 32 ? 32 : kOneTile; }

// A family's groups of more than 64 members spread over blocks ("striped", where the family's groups
// can exceed 128 members; max_strips > 0): each row tile I of such a group is a work item (g, I) that
// members_kernel lists, and its three sweeps are three launches of the group kernel (kStage 0, 1,
// 2), the sums of a sweep kept per item in global memory and added in row-tile order by every item
// of the group in the next launch.
struct Strips {
  int* n_items;     // work items listed
  int* items;       // g * max_strips + I
  float* sums;      // [groups][max_strips][4]: distance sums (sweep 0), Huber and K sums (sweep 1)
  int max_strips;   // row tiles of the largest possible group; 0: the family is not striped
};

// Whether this block is the last of its launch to get here, in every thread of the block (call it
// from all of them). Each block counts itself in `counter` (zero before the launch) once its
// writes are visible (the barrier, then thread 0's fence); the last one fences again before it
// reads the others' writes, which it reads at L2 (__ldcg).
__device__ bool last_block(int* counter) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(counter, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (last) __threadfence();
  return last;
}

// The width-split path's placement of the groups in the scratch (see "the width-split path" below),
// made by members_kernel's last block once every group's size is written.
struct Plan {
  // Group blocks that have written their size (and work-list place), zero before the launch. With a
  // plan, members_kernel has one block more, its last, which waits until every group block has
  // counted itself here and then places the groups, while the group blocks write the gradient's zero
  // rows. The last group block to finish placed them before (run f at COCO on an H100: SMs active 47%
  // of members_kernel's 11.9 us, the plan a serial tail after the zero rows). At COCO every block of
  // the launch is resident at once; at OpenImages' 9,621 groups the plan's block, dispatched last,
  // finds them counted, as before.
  int* published;
  int n_s;           // slices per group
  int64_t cap;       // floats of the scratch (below 2^31)
  int64_t* offs;     // [C + B]: where each group's partial Grams start; null: no width split
  // The slice launches' work lists: each family's groups of 2 to 64 members by tile size (kTileClasses,
  // the 64-row tile first), in the order members_kernel's atomics list them: n_class [2][3] counts
  // (zero before the launch), pos [C + B] each group's place in its list, info [3 C] (CD) then [3 B]
  // (ID): per place {group, size, scratch offset (-1: none), 0}, written by the plan.
  int* n_class;
  int* pos;
  int4* info;
};

// Tile classes of the width-split path, largest first: a slice launch takes its work in this order
// (see slice_kernel).
constexpr int kTileClasses = 3;
__host__ __device__ __forceinline__ int class_of(int P) { return P > 32 ? 0 : P > 16 ? 1 : 2; }

// One block: each group's place in the scratch (floats), CD groups then ID groups, -1 for a group of
// fewer than two or more than 64 members, or past cap. A group's area, n_s * 2 * T * T floats, is
// counted in units of n_s * 2 * 16 * 16 (1, 4 or 16 units): the scan runs in 32-bit integers, in
// the caller's scan storage and counter, kPlanItems consecutive groups a thread per step (one
// block-wide scan and two barriers a step: with one group a thread, OpenImages' 9,621 groups took
// 38 steps, about 28 us of one block at the end of members_kernel on an H100; now 10). Four, not
// more: members_kernel stays at 32 registers (eight blocks per SM for its zero rows) without a spill.
// The sizes are read at L2 (__ldcg): other blocks of the launch wrote them. The plan also writes each
// listed group's entry of the slice launches' work lists (Plan::info).
constexpr int kPlanItems = 4;

template <typename Scan>
__device__ void plan_groups(const int* cd_cnt, const int* id_cnt, int64_t C, int64_t B, const Plan& plan,
                            typename Scan::TempStorage& scan_storage, int& running) {
  // In 32 bits: an offset is below the scratch's floats (Plan::cap < 2^31), a unit count below 16 (C + B).
  const int unit = plan.n_s * 2 * 16 * 16;
  const int cap_units = static_cast<int>(plan.cap / unit);
  int4* const info_id = plan.info + kTileClasses * C;
  __syncthreads();  // the caller's last use of the storage and counter is over
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t start = 0; start < C + B; start += kThreads * kPlanItems) {
    const int64_t first = start + static_cast<int64_t>(threadIdx.x) * kPlanItems;
    int sizes[kPlanItems], units[kPlanItems], before[kPlanItems];
    #pragma unroll
    for (int k = 0; k < kPlanItems; ++k) {  // every load issued before any is used
      const int64_t g = first + k;
      sizes[k] = g >= C + B ? 0 : g < C ? __ldcg(cd_cnt + g) : __ldcg(id_cnt + g - C);
    }
    #pragma unroll
    for (int k = 0; k < kPlanItems; ++k) {
      const int side = tile_of(sizes[k]) / 16;
      units[k] = (sizes[k] >= 2 && sizes[k] <= kOneTile) ? side * side : 0;
    }
    int total;
    Scan(scan_storage).ExclusiveSum(units, before, total);
    // Each listed group's place in its work list, loaded after the scan: loaded before it, the four
    // values held across it spill 24 bytes at members_kernel's 32 registers (nvcc 13.0, sm_90).
    int pos[kPlanItems];
    #pragma unroll
    for (int k = 0; k < kPlanItems; ++k) pos[k] = units[k] > 0 ? __ldcg(plan.pos + first + k) : -1;
    #pragma unroll
    for (int k = 0; k < kPlanItems; ++k) {
      const int64_t g = first + k;
      const int end = running + before[k] + units[k];
      const int off = (units[k] > 0 && end <= cap_units) ? (end - units[k]) * unit : -1;
      if (g < C + B) plan.offs[g] = off;
      if (pos[k] >= 0) {
        const bool cd = g < C;
        const int c = class_of(sizes[k]);
        int4* entry = cd ? plan.info + c * C + pos[k] : info_id + c * B + pos[k];
        *entry = make_int4(static_cast<int>(cd ? g : g - C), sizes[k], off, 0);
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
}

// One block per group (CD groups first, then ID groups): the group's members in order and its size;
// a group of two to 64 members (or more, in a family that is not striped) goes on its family's list
// of active groups (and, with a plan, one of 2 to 64 on its tile class's work list), a larger one of
// a striped family puts its row tiles on the list of work items (integer atomics: the lists' order
// varies, each group's arithmetic does not); a group of fewer than two has loss 0 here. The blocks
// also write the gradient's zero rows (every row but those of CD groups of two or more members),
// so that every row is written once before ID adds into it. With a plan (the width split), one
// more block places the groups (Plan::published). 32 registers (the bound): a full SM of blocks for
// the zero rows.
template <typename TG, typename TY>
__global__ void __launch_bounds__(kThreads, 8)
    members_kernel(const TY* __restrict__ pos, int64_t y_sb, int64_t y_sc, int64_t B, int64_t C,
                   int* __restrict__ cd_idx, int* cd_cnt, int* __restrict__ id_idx, int* id_cnt,
                   int* __restrict__ n_active, int* __restrict__ active, float* __restrict__ group_loss,
                   TG* __restrict__ grad, int64_t g_sb, int64_t g_sc, int64_t D, Strips cd_strips, Strips id_strips,
                   Plan plan) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ int running;
  wait_for_previous_launch();  // launched in order (after a memset); a no-op then
  let_next_launch_start();
  const int64_t g = blockIdx.x;
  if (g == C + B) {  // the plan's block (see Plan::published)
    if (threadIdx.x == 0) {
      while (atomicAdd(plan.published, 0) < C + B) __nanosleep(200);
      __threadfence();
    }
    plan_groups<Scan>(cd_cnt, id_cnt, C, B, plan, scan_storage, running);
    return;
  }
  const bool cd = g < C;
  const TY* flags = cd ? pos + g * y_sc : pos + (g - C) * y_sb;
  const int64_t stride = cd ? y_sb : y_sc;
  const int64_t n = cd ? B : C;
  int* out = cd ? cd_idx + g * B : id_idx + (g - C) * C;
  if (threadIdx.x == 0) running = 0;
  __syncthreads();
  for (int64_t start = 0; start < n; start += kThreads) {
    const int64_t k = start + threadIdx.x;
    const int hit = (k < n && positive(flags[k * stride])) ? 1 : 0;
    int rank, total;
    Scan(scan_storage).ExclusiveSum(hit, rank, total);
    if (hit) out[running + rank] = static_cast<int>(k);
    __syncthreads();
    if (threadIdx.x == 0) running += total;
    __syncthreads();
  }
  const int P = running;
  if (threadIdx.x == 0) {
    (cd ? cd_cnt[g] : id_cnt[g - C]) = P;
    const int fam = cd ? 0 : 1;
    const int rank = static_cast<int>(cd ? g : g - C);
    const int max_strips = cd ? cd_strips.max_strips : id_strips.max_strips;
    if (P > kOneTile && max_strips > 0) {  // a striped family: one work item per row tile
      const int n = (P + kOneTile - 1) / kOneTile;
      int* items = cd ? cd_strips.items + atomicAdd(cd_strips.n_items, n) : id_strips.items + atomicAdd(id_strips.n_items, n);
      for (int k = 0; k < n; ++k) items[k] = rank * max_strips + k;
    } else if (P >= 2) {
      active[(cd ? 0 : C) + atomicAdd(n_active + fam, 1)] = rank;
      if (plan.offs != nullptr && P <= kOneTile)  // on its work list of the width-split path
        plan.pos[g] = atomicAdd(plan.n_class + kTileClasses * fam + class_of(P), 1);
    } else {
      group_loss[g] = 0.f;
    }
    if (plan.offs != nullptr) {  // what the plan reads is written: count it (before the zero rows)
      __threadfence();
      atomicAdd(plan.published, 1);
    }
  }
  if (grad == nullptr) return;
  // The zero rows, in an equal share of the B C rows (in (image, label) order) for every group block:
  // each row whose target is negative; and a CD block with one member zeroes that member's row (a
  // label's only positive image, which ID may add into). The rows of CD groups of two or more are
  // CD's to write. Until run f's tree, each CD block zeroed its label's rows: at COCO 80 blocks for
  // 5,120 rows (about 6 us of members_kernel's 10.6 on an H100, its no-gradient row 4.6), the ID
  // blocks none. Sixteen bytes a store where every row starts 16-byte aligned.
  const int64_t rows = B * C, share = (rows + C + B - 1) / (C + B);
  const int64_t r0 = g * share, r1 = r0 + share < rows ? r0 + share : rows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool wide = (D * static_cast<int64_t>(sizeof(TG))) % 16 == 0;
  const auto zero_row = [&](int64_t b, int64_t c) {
    TG* row = grad + b * g_sb + c * g_sc;
    if (wide) {
      uint4* row16 = reinterpret_cast<uint4*>(row);
      const int64_t n16 = D * static_cast<int64_t>(sizeof(TG)) / 16;
      for (int64_t d = lane; d < n16; d += 32) row16[d] = make_uint4(0u, 0u, 0u, 0u);
    } else {
      const TG zero = from_float<TG>(0.f);
      for (int64_t d = lane; d < D; d += 32) row[d] = zero;
    }
  };
  if (cd && P == 1 && warp == 0) zero_row(out[0], g);
  // Row r = r0 + warp + 8 k is (b, c) = (r / C, r % C), stepped without a division per row.
  constexpr int kWarps = kThreads / 32;
  int64_t b = (r0 + warp) / C, c = (r0 + warp) % C;
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    if (!positive(pos[b * y_sb + c * y_sc])) zero_row(b, c);
    for (c += kWarps; c >= C; c -= C) ++b;
  }
}

struct FamilyArgs {
  int64_t s_g, s_m, s_d, t_g, t_m, t_d;  // strides of the student and teacher embeddings
  int64_t g_g, g_m;                      // strides of the gradient (width stride 1)
  int64_t n_members, width;
  float scale;                           // 2 lambda
  bool add;                              // ID adds into the gradient CD wrote
  bool write_grad;                       // false: a call without gradient (grad is null; losses only)
  const int64_t* offs;                   // width-split path: each group's partial Grams in the scratch,
                                         // -1 if it has none; null without the split (see slice_kernel)
};

// Sizes of the one-tile path for tiles of T members (T = 16, 32, 64).
template <int T>
struct OneTile {
  static constexpr int kPad = T + 4;                        // row length of a transposed chunk (16-byte rows)
  static constexpr int kWidth = 2048 / T;                   // widths per chunk: 128, 64, 32
  static constexpr int kSlices = 4096 / (T * T);            // Gram: width slices of a chunk: 16, 4, 1
  static constexpr int kSliceThreads = kThreads / kSlices;  // (T / 4)^2 threads, 4 x 4 entries each
  static constexpr int kEntries = T * T / kThreads;         // Gram entries per thread once added: 1, 4, 16
  static constexpr int kLoads = T * kWidth / kThreads;      // chunk values per thread and input: 8
  static constexpr int kRowThreads = kThreads / T;          // gradient: threads per member row
  static constexpr int kCols = kWidth / kRowThreads;        // gradient: widths per thread: 8
  static_assert(kSliceThreads * 16 == T * T && kCols == 8 && kLoads == 8, "tile arithmetic");
};

// Shared memory of a group block: one buffer reused by the phases (at most 8704 floats: four
// transposed 32-wide chunks of two 64-row tiles), and per-member values of the tile's rows (I) and,
// for a pair of tiles, its columns (J).
struct GroupShared {
  alignas(16) float buf[8704];
  float ns[kOneTile], nt[kOneTile], rowsum[kOneTile];
  float ns_j[kOneTile], nt_j[kOneTile];
  int rows[kOneTile], rows_j[kOneTile];
  int ref;  // the group's first member row, which its Grams are taken less (load_chunk_less)
  float reduce[kThreads / 32];
};

// Distance from a squared distance: sqrt(max(sq, eps)), NaN kept.
__device__ __forceinline__ float pair_dist(float sq) { return sqrtf(sq != sq ? sq : fmaxf(sq, kDistEps)); }

__device__ __forceinline__ float huber(float x) {
  const float ax = fabsf(x);
  return ax < 1.f ? 0.5f * x * x : ax - 0.5f;
}

// A group's means and its pair weights' two factors, g(a, b) = c1 clamp(x, -1, 1) - c2 (SPEC 3:
// (1 / P) [h'(x) / mu_s - K / (mu_s^2 N)]), divided once per group rather than in every pair: a
// pair's weight took six IEEE divisions (about ten instructions each with its slow-path check), now
// three; the 64-row tile's 16 pairs a thread held CD's slice launch at COCO on an H100 (run f). x
// itself stays ds / mu_s - dt / mu_t, divisions: a group of two has ds == mu_s, so x is exactly 0
// (loss and gradient 0, SPEC 3), which ds * (1 / mu_s) would miss by an ulp. NaN and inf go through
// as before (a NaN mean or K gives NaN factors).
struct PairScales {
  float mu_s, mu_t, c1, c2;
};

__device__ __forceinline__ PairScales pair_scales(float mu_s, float mu_t, float k_sum, float p_f, float n_pairs) {
  return {mu_s, mu_t, 1.f / (mu_s * p_f), k_sum / (mu_s * mu_s * n_pairs * p_f)};
}

// One ordered pair's terms of the loss and of the K sum: huber(x) and clamp(x, -1, 1) d, with
// x = ds / mu_s - dt / mu_t (the c's unused).
__device__ __forceinline__ void add_pair_terms(float ds, float dt, const PairScales& ps, float& huber_sum,
                                               float& k_part) {
  const float x = ds / ps.mu_s - dt / ps.mu_t;
  huber_sum += huber(x);
  k_part += clamp_keep_nan(x, -1.f, 1.f) * ds;
}

// w(a, b) = g(a, b) / d(a, b) of one ordered pair (0 for a non-pair or a coincident pair, NaN kept).
__device__ __forceinline__ float pair_weight(bool pair, float sq, float ds, float dt, const PairScales& ps) {
  if (pair && sq > kDistEps) {
    const float x = ds / ps.mu_s - dt / ps.mu_t;
    return (ps.c1 * clamp_keep_nan(x, -1.f, 1.f) - ps.c2) / ds;
  }
  return (pair && sq != sq) ? sq : 0.f;  // NaN in, NaN out
}

// Gram entry k of this thread (after the slices are added): for T = 64 the 4 x 4 block of rows
// 4 tr + u and columns 4 tc + v (k = 4 u + v); for smaller T, entry threadIdx.x + kThreads k in row-major order.
template <int T>
__device__ __forceinline__ void entry_of(int k, int& a, int& b) {
  if constexpr (OneTile<T>::kSlices == 1) {
    const int tr = threadIdx.x / (T / 4), tc = threadIdx.x % (T / 4);
    a = 4 * tr + k / 4;
    b = 4 * tc + k % 4;
  } else {
    const int e = threadIdx.x + kThreads * k;
    a = e / T;
    b = e % T;
  }
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }

// One width of both Grams' 4 x 4 blocks: rows 4 tr .. 4 tr + 3 of the student and teacher chunks si,
// ti against columns 4 tc .. of sj, tj (the same chunks for a single tile), at offsets row_at and
// col_at of transposed chunks (16-byte aligned). The fmaf chains run in width order.
__device__ __forceinline__ void gram_width(const float* si, const float* ti, const float* sj, const float* tj,
                                           int row_at, int col_at, float (&gs)[4][4], float (&gt)[4][4]) {
  const float4 as = load4(si + row_at), bs = load4(sj + col_at);
  const float4 at = load4(ti + row_at), bt = load4(tj + col_at);
  const float ras[4] = {as.x, as.y, as.z, as.w}, rbs[4] = {bs.x, bs.y, bs.z, bs.w};
  const float rat[4] = {at.x, at.y, at.z, at.w}, rbt[4] = {bt.x, bt.y, bt.z, bt.w};
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v) {
      gs[u][v] = fmaf(ras[u], rbs[v], gs[u][v]);
      gt[u][v] = fmaf(rat[u], rbt[v], gt[u][v]);
    }
}

// Values i of a chunk held by this thread: member r = e / kWidth, width c = e % kWidth of the
// chunk, e = threadIdx.x + kThreads i (a warp reads 32 consecutive widths of one member row).
template <int T, typename TX>
__device__ __forceinline__ void load_chunk(const TX* __restrict__ x, int64_t x_m, int64_t x_d, const int* rows,
                                           int64_t width, int64_t d0, float (&v)[OneTile<T>::kLoads]) {
  using C = OneTile<T>;
  static_assert(kThreads % C::kWidth == 0, "one width per thread");  // e % kWidth is threadIdx.x's
  const int64_t d = d0 + threadIdx.x % C::kWidth;
  #pragma unroll
  for (int i = 0; i < C::kLoads; ++i) {
    const int row = rows[(threadIdx.x + kThreads * i) / C::kWidth];
    v[i] = (row >= 0 && d < width) ? to_float(x[row * x_m + d * x_d]) : 0.f;
  }
}

// What the Grams are taken of: load_chunk's values less the same widths of row ref (the group's first
// member, sh.ref), in float32 for every input dtype. Distances are shift-invariant, but their Gram form
// is not in floating point: rows that share a part k times their spread lose k^2 times a Gram entry's
// rounding to the cancellation in |s_a|^2 + |s_b|^2 - 2 s_a.s_b (a cosine of 0.999 between float32
// rows put the LED gradient 4e-4 off float64; float16 rows 100 times their spread apart, 3.6e-3 where
// the dtype's own rounding of the gradient is 2e-4); less a member of their group they keep only what
// sets them apart (see reference.shifted). The difference of two values of one dtype is exact in
// float32 where they are close (half-precision values, converted, have 13 or 16 bits to spare), and
// it stays in float32 here: nothing is rounded back. Row ref's widths are the same for every member
// row of a chunk: after the first warp's load, L1 hits.
template <int T, typename TX>
__device__ __forceinline__ void load_chunk_less(const TX* __restrict__ x, int64_t x_m, int64_t x_d, const int* rows,
                                                int ref, int64_t width, int64_t d0,
                                                float (&v)[OneTile<T>::kLoads]) {
  using C = OneTile<T>;
  // A thread's values are all at one width of the chunk (load_chunk): one value of row ref a chunk.
  const int64_t d = d0 + threadIdx.x % C::kWidth;
  const bool inside = d < width;
  const float r = inside ? to_float(x[ref * x_m + d * x_d]) : 0.f;
  #pragma unroll
  for (int i = 0; i < C::kLoads; ++i) {
    const int row = rows[(threadIdx.x + kThreads * i) / C::kWidth];
    v[i] = (row >= 0 && inside) ? to_float(x[row * x_m + d * x_d]) - r : 0.f;
  }
}

// ... and into shared memory, transposed: chunk[c * kPad + r].
template <int T>
__device__ __forceinline__ void store_chunk(const float (&v)[OneTile<T>::kLoads], float* chunk) {
  using C = OneTile<T>;
  #pragma unroll
  for (int i = 0; i < C::kLoads; ++i) {
    const int e = threadIdx.x + kThreads * i;
    chunk[(e % C::kWidth) * C::kPad + e / C::kWidth] = v[i];
  }
}

template <int T, typename TS>
__device__ void tile_grad(const TS* __restrict__ s, const FamilyArgs& f, GroupShared& sh, int rows_in_group,
                          int cols, bool same, bool add, grad_t<TS>* __restrict__ grad);

// Gram pass of a tile (rows sh.rows, set by the caller) over the widths lo .. hi - 1: this thread's
// entries of the student and teacher Grams (entry_of), the chunk's width slices added in order for
// T <= 32. Thread (q, tr, tc) adds the widths q, q + kSlices, ... of each chunk into its 4 x 4
// entries (rows 4 tr + u, columns 4 tc + v). Rows past the group are zero in every chunk.
template <int T, typename TS, typename TT>
__device__ void tile_gram(const TS* __restrict__ s, const TT* __restrict__ t, const FamilyArgs& f, GroupShared& sh,
                          int64_t lo, int64_t hi, float (&es_)[OneTile<T>::kEntries],
                          float (&et_)[OneTile<T>::kEntries]) {
  using C = OneTile<T>;
  const int64_t n_chunks = (hi - lo + C::kWidth - 1) / C::kWidth;
  float* cs = sh.buf;                       // student chunk [kWidth][kPad]
  float* ct = sh.buf + C::kWidth * C::kPad; // teacher chunk
  const int q = threadIdx.x / C::kSliceThreads, local = threadIdx.x % C::kSliceThreads;
  const int tr = local / (T / 4), tc = local % (T / 4);
  float gs[4][4], gt[4][4];
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v) gs[u][v] = gt[u][v] = 0.f;
  float next_s[C::kLoads], next_t[C::kLoads];
  load_chunk_less<T>(s, f.s_m, f.s_d, sh.rows, sh.ref, hi, lo, next_s);
  load_chunk_less<T>(t, f.t_m, f.t_d, sh.rows, sh.ref, hi, lo, next_t);
  for (int64_t k = 0; k < n_chunks; ++k) {
    store_chunk<T>(next_s, cs);
    store_chunk<T>(next_t, ct);
    __syncthreads();
    if (k + 1 < n_chunks) {  // the next chunk's loads are in flight during this chunk's products
      load_chunk_less<T>(s, f.s_m, f.s_d, sh.rows, sh.ref, hi, lo + (k + 1) * C::kWidth, next_s);
      load_chunk_less<T>(t, f.t_m, f.t_d, sh.rows, sh.ref, hi, lo + (k + 1) * C::kWidth, next_t);
    }
    for (int c = q; c < C::kWidth; c += C::kSlices)
      gram_width(cs, ct, cs, ct, c * C::kPad + 4 * tr, c * C::kPad + 4 * tc, gs, gt);
    __syncthreads();
  }

  // This thread's entries, the slices added in order (T <= 32) or its own 4 x 4 block (T = 64).
  if constexpr (C::kSlices == 1) {
    #pragma unroll
    for (int k = 0; k < C::kEntries; ++k) es_[k] = gs[k / 4][k % 4], et_[k] = gt[k / 4][k % 4];
  } else {
    float* partial = sh.buf;  // [kSlices][2][T][T]; the chunks are done with (barrier above)
    #pragma unroll
    for (int u = 0; u < 4; ++u) {
      float* row_s = partial + ((q * 2) * T + 4 * tr + u) * T + 4 * tc;
      float* row_t = partial + ((q * 2 + 1) * T + 4 * tr + u) * T + 4 * tc;
      *reinterpret_cast<float4*>(row_s) = make_float4(gs[u][0], gs[u][1], gs[u][2], gs[u][3]);
      *reinterpret_cast<float4*>(row_t) = make_float4(gt[u][0], gt[u][1], gt[u][2], gt[u][3]);
    }
    __syncthreads();
    #pragma unroll
    for (int k = 0; k < C::kEntries; ++k) {
      const int e = threadIdx.x + kThreads * k;
      float vs = 0.f, vt = 0.f;
      for (int p = 0; p < C::kSlices; ++p) vs += partial[(p * 2) * T * T + e], vt += partial[(p * 2 + 1) * T * T + e];
      es_[k] = vs, et_[k] = vt;
    }
    // sh.buf still holds the partials: the caller passes a barrier before writing it (tile_weights'
    // block sums; slice_kernel's barrier between work items).
  }
}

// From a tile's Gram entries (this thread's, entry_of) of a group of P members: the squared norms
// (the diagonal), distances, means, the loss (stored at loss_out unless null), the K sum, and the
// pair weights w(a, b) into sh.buf [T][kPad] (every entry of the tile, 0 off the group) with their
// row sums in sh.rowsum.
template <int T>
__device__ void tile_weights(int P, const float (&es_)[OneTile<T>::kEntries], const float (&et_)[OneTile<T>::kEntries],
                             GroupShared& sh, float* __restrict__ loss_out) {
  using C = OneTile<T>;
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k) {
    int a, b;
    entry_of<T>(k, a, b);
    if (a == b) sh.ns[a] = es_[k], sh.nt[a] = et_[k];
  }
  __syncthreads();

  float sq[C::kEntries], ds[C::kEntries], dt[C::kEntries];
  bool pair[C::kEntries];
  float sum_s = 0.f, sum_t = 0.f;
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k) {
    int a, b;
    entry_of<T>(k, a, b);
    pair[k] = a < P && b < P && a != b;
    sq[k] = sh.ns[a] + sh.ns[b] - 2.f * es_[k];
    ds[k] = pair_dist(sq[k]);
    dt[k] = pair_dist(sh.nt[a] + sh.nt[b] - 2.f * et_[k]);
    if (pair[k]) sum_s += ds[k], sum_t += dt[k];
  }
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  const float mu_s = block_sum(sum_s, sh.reduce) / n_pairs;
  const float mu_t = block_sum(sum_t, sh.reduce) / n_pairs;
  float huber_sum = 0.f, k_part = 0.f;
  const PairScales means = pair_scales(mu_s, mu_t, 0.f, p_f, n_pairs);
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k)
    if (pair[k]) add_pair_terms(ds[k], dt[k], means, huber_sum, k_part);
  const float loss = block_sum(huber_sum, sh.reduce) / p_f;
  const float k_sum = block_sum(k_part, sh.reduce);
  const PairScales ps = pair_scales(mu_s, mu_t, k_sum, p_f, n_pairs);
  if (loss_out != nullptr && threadIdx.x == 0) *loss_out = loss;

  float* w = sh.buf;  // every read of sh.buf by the Gram pass is behind the block sums' barriers
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k) {
    int a, b;
    entry_of<T>(k, a, b);
    w[a * C::kPad + b] = pair_weight(pair[k], sq[k], ds[k], dt[k], ps);
  }
  __syncthreads();
  if (threadIdx.x < T) {
    float total = 0.f;
    for (int b = 0; b < T; ++b) total += w[threadIdx.x * C::kPad + b];
    sh.rowsum[threadIdx.x] = total;
  }
}

template <int T, typename TS>
__device__ void tile_grad(const TS* __restrict__ s, const FamilyArgs& f, GroupShared& sh, int rows_in_group,
                          int cols, bool same, bool add, grad_t<TS>* __restrict__ grad, int64_t lo, int64_t hi);

// A group of P <= T members (T = 16, 32 or 64) as one tile: see the file's header.
template <int T, typename TS, typename TT>
__device__ void one_tile_group(const TS* __restrict__ s, const TT* __restrict__ t, const int* __restrict__ members,
                               int P, const FamilyArgs& f, GroupShared& sh, grad_t<TS>* __restrict__ grad,
                               float* __restrict__ loss_out) {
  using C = OneTile<T>;
  if (threadIdx.x < T) sh.rows[threadIdx.x] = static_cast<int>(threadIdx.x) < P ? members[threadIdx.x] : -1;
  if (threadIdx.x == 0) sh.ref = members[0];
  __syncthreads();
  float es_[C::kEntries], et_[C::kEntries];
  tile_gram<T>(s, t, f, sh, 0, f.width, es_, et_);
  tile_weights<T>(P, es_, et_, sh, loss_out);
  tile_grad<T>(s, f, sh, P, P, true, f.add, grad, 0, f.width);
}

// Gradient pass of a tile (rows sh.rows, I) against itself (same) or against the tile of columns
// sh.rows_j (J), with the pair weights w(a, b) in sh.buf [T][kPad] and their row sums in sh.rowsum:
// grad[a] (+)= scale * (rowsum[a] s_a - sum_{b in J} w(a, b) s_b), in that difference form (well
// conditioned). Thread -> member row tid / kRowThreads of I, kCols consecutive widths of each chunk;
// the sum over b stops at cols (the columns in the group) rounded up to 4, past which w is 0.
template <int T, typename TS>
__device__ void tile_grad(const TS* __restrict__ s, const FamilyArgs& f, GroupShared& sh, int rows_in_group,
                          int cols, bool same, bool add, grad_t<TS>* __restrict__ grad, int64_t lo, int64_t hi) {
  if (!f.write_grad) return;  // the same for every thread of the block
  using C = OneTile<T>;
  const float* w = sh.buf;
  float* ci = sh.buf + T * C::kPad;                // student chunk of I [kWidth][kPad], after the weights
  float* cj = same ? ci : ci + C::kWidth * C::kPad;  // ... of J
  const int a = threadIdx.x / C::kRowThreads, c0 = (threadIdx.x % C::kRowThreads) * C::kCols;
  const int b_end = (cols + 3) & ~3;
  const int64_t n_chunks = (hi - lo + C::kWidth - 1) / C::kWidth;
  float next_i[C::kLoads], next_j[C::kLoads];
  load_chunk<T>(s, f.s_m, f.s_d, sh.rows, hi, lo, next_i);
  if (!same) load_chunk<T>(s, f.s_m, f.s_d, sh.rows_j, hi, lo, next_j);
  for (int64_t k = 0; k < n_chunks; ++k) {
    __syncthreads();  // the previous chunk (first: the weights and row sums) is done with
    store_chunk<T>(next_i, ci);
    if (!same) store_chunk<T>(next_j, cj);
    __syncthreads();
    if (k + 1 < n_chunks) {
      load_chunk<T>(s, f.s_m, f.s_d, sh.rows, hi, lo + (k + 1) * C::kWidth, next_i);
      if (!same) load_chunk<T>(s, f.s_m, f.s_d, sh.rows_j, hi, lo + (k + 1) * C::kWidth, next_j);
    }
    if (a >= rows_in_group) continue;
    float acc[C::kCols];
    #pragma unroll
    for (int j = 0; j < C::kCols; ++j) acc[j] = 0.f;
    for (int b = 0; b < b_end; b += 4) {
      const float4 w4 = load4(w + a * C::kPad + b);
      #pragma unroll
      for (int j = 0; j < C::kCols; ++j) {
        const float4 s4 = load4(cj + (c0 + j) * C::kPad + b);
        acc[j] = fmaf(w4.x, s4.x, acc[j]);
        acc[j] = fmaf(w4.y, s4.y, acc[j]);
        acc[j] = fmaf(w4.z, s4.z, acc[j]);
        acc[j] = fmaf(w4.w, s4.w, acc[j]);
      }
    }
    grad_t<TS>* out = grad + sh.rows[a] * f.g_m;
    const int64_t d0 = lo + k * C::kWidth + c0;
    float value[C::kCols];
    #pragma unroll
    for (int j = 0; j < C::kCols; ++j) value[j] = f.scale * (sh.rowsum[a] * ci[(c0 + j) * C::kPad + a] - acc[j]);
    if (d0 + C::kCols <= hi) {
      // A whole run of widths: where adding, every load issues before any store. Per width, a load
      // behind the previous width's store and its bounds check made eight round trips in a row:
      // ID's launch (adding) took 22 us for one item a block at 16 x 9605 x 256 on an H100.
      if (add) {
        float before[C::kCols];
        #pragma unroll
        for (int j = 0; j < C::kCols; ++j) before[j] = to_float(out[d0 + j]);
        #pragma unroll
        for (int j = 0; j < C::kCols; ++j) value[j] = before[j] + value[j];
      }
      #pragma unroll
      for (int j = 0; j < C::kCols; ++j) out[d0 + j] = from_float<grad_t<TS>>(value[j]);
    } else {
      #pragma unroll
      for (int j = 0; j < C::kCols; ++j) {
        const int64_t d = d0 + j;
        if (d >= hi) break;
        out[d] = from_float<grad_t<TS>>(add ? to_float(out[d]) + value[j] : value[j]);
      }
    }
  }
}

// ---------------------------------------------------------------- groups of more than 64 members

// The Gram entries of two 64-row tiles, rows sh.rows (I) by columns sh.rows_j (J): this thread's
// 4 x 4 block (rows 4 tr + u, columns 4 tc + v), and the squared norms of both tiles' rows into
// sh.ns / sh.nt (I) and sh.ns_j / sh.nt_j (J). Each norm is a fmaf chain in width order, the same
// chain as a Gram entry of a row with itself, so identical rows are exactly 0 apart here too.
template <typename TS, typename TT>
__device__ void pair_gram(const TS* __restrict__ s, const TT* __restrict__ t, const FamilyArgs& f, GroupShared& sh,
                          float (&gs)[4][4], float (&gt)[4][4]) {
  using C = OneTile<64>;
  constexpr int kArray = C::kWidth * C::kPad;
  float* chunk = sh.buf;  // student I, teacher I, student J, teacher J: [kWidth][kPad] each
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  // Norms: thread -> row threadIdx.x % 64 of array threadIdx.x / 64.
  const int n_array = threadIdx.x / 64, n_row = threadIdx.x % 64;
  float norm = 0.f;
  #pragma unroll
  for (int u = 0; u < 4; ++u)
    #pragma unroll
    for (int v = 0; v < 4; ++v) gs[u][v] = gt[u][v] = 0.f;
  const int64_t n_chunks = (f.width + C::kWidth - 1) / C::kWidth;
  float n_si[C::kLoads], n_ti[C::kLoads], n_sj[C::kLoads], n_tj[C::kLoads];
  auto load = [&](int64_t d0) {
    load_chunk_less<64>(s, f.s_m, f.s_d, sh.rows, sh.ref, f.width, d0, n_si);
    load_chunk_less<64>(t, f.t_m, f.t_d, sh.rows, sh.ref, f.width, d0, n_ti);
    load_chunk_less<64>(s, f.s_m, f.s_d, sh.rows_j, sh.ref, f.width, d0, n_sj);
    load_chunk_less<64>(t, f.t_m, f.t_d, sh.rows_j, sh.ref, f.width, d0, n_tj);
  };
  load(0);
  for (int64_t k = 0; k < n_chunks; ++k) {
    store_chunk<64>(n_si, chunk);
    store_chunk<64>(n_ti, chunk + kArray);
    store_chunk<64>(n_sj, chunk + 2 * kArray);
    store_chunk<64>(n_tj, chunk + 3 * kArray);
    __syncthreads();
    if (k + 1 < n_chunks) load((k + 1) * C::kWidth);
    const float* si = chunk;
    const float* ti = chunk + kArray;
    const float* sj = chunk + 2 * kArray;
    const float* tj = chunk + 3 * kArray;
    for (int c = 0; c < C::kWidth; ++c) {
      gram_width(si, ti, sj, tj, c * C::kPad + 4 * tr, c * C::kPad + 4 * tc, gs, gt);
      const float x = chunk[n_array * kArray + c * C::kPad + n_row];
      norm = fmaf(x, x, norm);
    }
    __syncthreads();
  }
  float* norms = n_array == 0 ? sh.ns : n_array == 1 ? sh.nt : n_array == 2 ? sh.ns_j : sh.nt_j;
  norms[n_row] = norm;
  __syncthreads();
}

// One sweep of a group of more than 64 members over the pairs of 64-row tiles (I, J) of one row
// tile I (rows i0 .. i0 + 63), J in order, each pair's Gram recomputed from the inputs:
//   kSweep 0: this thread's sums of the pairs' student and teacher distances (into out[0], out[1]);
//   kSweep 1: its Huber and K sums, given the means (out[0], out[1]);
//   kSweep 2: the pair weights, given the means and the K sum, and the gradient of rows I.
struct SweepIn {
  float mu_s, mu_t, k_sum;
};

template <int kSweep, typename TS, typename TT>
__device__ void strip_sweep(const TS* __restrict__ s, const TT* __restrict__ t, const int* __restrict__ members,
                            int P, const FamilyArgs& f, GroupShared& sh, grad_t<TS>* __restrict__ grad, int i0,
                            SweepIn in, float (&out)[2]) {
  using C = OneTile<64>;
  const int tr = threadIdx.x / 16, tc = threadIdx.x % 16;
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  const PairScales ps = pair_scales(in.mu_s, in.mu_t, in.k_sum, p_f, n_pairs);
  for (int j0 = 0; j0 < P; j0 += kOneTile) {
    __syncthreads();  // the previous pair's rows, norms and weights are done with
    if (threadIdx.x < kOneTile) {
      const int a = i0 + threadIdx.x, b = j0 + threadIdx.x;
      sh.rows[threadIdx.x] = a < P ? members[a] : -1;
      sh.rows_j[threadIdx.x] = b < P ? members[b] : -1;
    }
    if (threadIdx.x == 0) sh.ref = members[0];
    __syncthreads();
    float gs[4][4], gt[4][4];
    pair_gram(s, t, f, sh, gs, gt);
    #pragma unroll
    for (int k = 0; k < 16; ++k) {
      const int u = k / 4, v = k % 4, a = i0 + 4 * tr + u, b = j0 + 4 * tc + v;
      const bool pair = a < P && b < P && a != b;
      const float sq = sh.ns[4 * tr + u] + sh.ns_j[4 * tc + v] - 2.f * gs[u][v];
      const float ds = pair_dist(sq), dt = pair_dist(sh.nt[4 * tr + u] + sh.nt_j[4 * tc + v] - 2.f * gt[u][v]);
      if constexpr (kSweep == 0) {
        if (pair) out[0] += ds, out[1] += dt;
      } else if constexpr (kSweep == 1) {
        if (pair) add_pair_terms(ds, dt, ps, out[0], out[1]);
      } else {
        sh.buf[(4 * tr + u) * C::kPad + 4 * tc + v] =
            pair_weight(pair, sq, ds, dt, ps);
      }
    }
    if constexpr (kSweep == 2) {
      __syncthreads();
      if (threadIdx.x < kOneTile) {
        float total = 0.f;
        for (int b = 0; b < kOneTile; ++b) total += sh.buf[threadIdx.x * C::kPad + b];
        sh.rowsum[threadIdx.x] = total;
      }
      const int rows_in = P - i0 < kOneTile ? P - i0 : kOneTile, cols_in = P - j0 < kOneTile ? P - j0 : kOneTile;
      tile_grad<64>(s, f, sh, rows_in, cols_in, false, f.add || j0 > 0, grad, 0, f.width);
    }
  }
}

// A group of more than 64 members in one block: the three sweeps over every row tile, the sums
// over the whole group between them. A sweep costs (P / 64)^2 Gram tiles of 64 x 64.
template <typename TS, typename TT>
__device__ void large_group(const TS* __restrict__ s, const TT* __restrict__ t, const int* __restrict__ members,
                            int P, const FamilyArgs& f, GroupShared& sh, grad_t<TS>* __restrict__ grad,
                            float* __restrict__ loss_out) {
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  float sums[2] = {0.f, 0.f};
  for (int i0 = 0; i0 < P; i0 += kOneTile) strip_sweep<0>(s, t, members, P, f, sh, grad, i0, SweepIn{}, sums);
  SweepIn in{block_sum(sums[0], sh.reduce) / n_pairs, block_sum(sums[1], sh.reduce) / n_pairs, 0.f};
  float stats[2] = {0.f, 0.f};
  for (int i0 = 0; i0 < P; i0 += kOneTile) strip_sweep<1>(s, t, members, P, f, sh, grad, i0, in, stats);
  const float loss = block_sum(stats[0], sh.reduce) / p_f;
  in.k_sum = block_sum(stats[1], sh.reduce);
  if (threadIdx.x == 0) *loss_out = loss;
  if (!f.write_grad) return;
  float unused[2];
  for (int i0 = 0; i0 < P; i0 += kOneTile) strip_sweep<2>(s, t, members, P, f, sh, grad, i0, in, unused);
}

template <int kStage, typename TS, typename TT>
__device__ void strip_item(const TS* __restrict__ es, const TT* __restrict__ et, grad_t<TS>* __restrict__ grad,
                           const int* __restrict__ idx, const int* __restrict__ cnt, float* __restrict__ group_loss,
                           const FamilyArgs& f, const Strips& st, GroupShared& sh, int item) {
  const int64_t g = item / st.max_strips;
  const int strip = item % st.max_strips, P = cnt[g], n_strips = (P + kOneTile - 1) / kOneTile;
  const TS* s = es + g * f.s_g;
  const TT* t = et + g * f.t_g;
  const int* members = idx + g * f.n_members;
  float* sums = st.sums + g * st.max_strips * 4;
  const float p_f = static_cast<float>(P), n_pairs = p_f * (p_f - 1.f);
  SweepIn in{};
  if (kStage >= 1) {  // the means, from every row tile's distance sums in order
    float ss = 0.f, st_ = 0.f;
    for (int k = 0; k < n_strips; ++k) ss += __ldcg(sums + 4 * k), st_ += __ldcg(sums + 4 * k + 1);
    in.mu_s = ss / n_pairs;
    in.mu_t = st_ / n_pairs;
  }
  if (kStage == 2) {
    float hs = 0.f, ks = 0.f;
    for (int k = 0; k < n_strips; ++k) hs += __ldcg(sums + 4 * k + 2), ks += __ldcg(sums + 4 * k + 3);
    in.k_sum = ks;
    if (strip == 0 && threadIdx.x == 0) group_loss[g] = hs / p_f;
    if (!f.write_grad) return;  // the sweep of stage 2 only writes gradient
  }
  float out[2] = {0.f, 0.f};
  strip_sweep<kStage>(s, t, members, P, f, sh, grad + g * f.g_g, strip * kOneTile, in, out);
  if (kStage < 2) {
    const float a = block_sum(out[0], sh.reduce), b = block_sum(out[1], sh.reduce);
    if (threadIdx.x == 0) sums[4 * strip + 2 * kStage] = a, sums[4 * strip + 2 * kStage + 1] = b;
  }
}

// One group of P >= 2 members: one tile up to 64 members, pairs of 64-row tiles above.
template <typename TS, typename TT>
__device__ void group(const TS* __restrict__ es, const TT* __restrict__ et, grad_t<TS>* __restrict__ grad,
                      const int* __restrict__ idx, const int* __restrict__ cnt, float* __restrict__ group_loss,
                      const FamilyArgs& f, GroupShared& sh, int64_t g) {
  const int P = cnt[g];
  grad_t<TS>* grad_g = grad + g * f.g_g;
  const TS* s = es + g * f.s_g;
  const TT* t = et + g * f.t_g;
  const int* members = idx + g * f.n_members;
  if (f.offs != nullptr && P <= kOneTile && f.offs[g] >= 0) return;  // done by the slice kernels
  if (P <= 16) return one_tile_group<16>(s, t, members, P, f, sh, grad_g, group_loss + g);
  if (P <= 32) return one_tile_group<32>(s, t, members, P, f, sh, grad_g, group_loss + g);
  if (P <= kOneTile) return one_tile_group<64>(s, t, members, P, f, sh, grad_g, group_loss + g);
  large_group(s, t, members, P, f, sh, grad_g, group_loss + g);
}

// The call's three sums from the per-group losses (CD groups, then ID groups), each added in index
// order: [lambda_cd * CD + lambda_id * ID, CD, ID]. Run by the last block of the ID launch to finish;
// __ldcg reads at L2, past any L1 line of this SM that predates the other blocks' writes.
__device__ void finalize(const float* group_loss, int64_t C, int64_t B, float lambda_cd, float lambda_id,
                         float* __restrict__ out, float* __restrict__ total, float* scratch) {
  float cd = 0.f, id = 0.f;
  for (int64_t k = threadIdx.x; k < C; k += kThreads) cd += __ldcg(group_loss + k);
  for (int64_t k = threadIdx.x; k < B; k += kThreads) id += __ldcg(group_loss + C + k);
  cd = block_sum(cd, scratch);
  id = block_sum(id, scratch);
  if (threadIdx.x == 0) {
    out[0] = *total = lambda_cd * cd + lambda_id * id;
    out[1] = cd;
    out[2] = id;
  }
}

// What the launch that ends a call (ID) needs to add the group losses once every block is done.
struct Finalize {
  float* out;              // [3]; null for the CD launch
  float* total;            // [], out[0] once more
  const float* group_loss; // all C + B group losses
  int* blocks_done;        // zero before the launch
  int64_t C, B;
  float lambda_cd, lambda_id;
};

// One launch of a family: stage 0 takes its active groups (members_kernel listed them) and, if the
// family is striped, the first sweep of every row tile of its larger groups; stages 1 and 2 the
// other two sweeps. Each block takes every gridDim.x-th item: the grid is at most one block per SM,
// whatever the number of labels. The last launch of a call adds the group losses in its last block.
template <int kStage, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads, 1)
    group_kernel(const TS* __restrict__ es, const TT* __restrict__ et, grad_t<TS>* __restrict__ grad,
                 const int* __restrict__ idx, const int* __restrict__ cnt, const int* __restrict__ n_active,
                 const int* __restrict__ active, float* group_loss, FamilyArgs f, Strips st, Finalize fin) {
  __shared__ GroupShared shared;
  wait_for_previous_launch();  // launched early: before any global memory access
  let_next_launch_start();
  if constexpr (kStage == 0) {
    const int n = *n_active;
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
      group(es, et, grad, idx, cnt, group_loss, f, shared, active[i]);
      __syncthreads();  // the next group reuses shared memory
    }
  }
  if (st.max_strips > 0) {
    const int n = *st.n_items;
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
      strip_item<kStage>(es, et, grad, idx, cnt, group_loss, f, st, shared, st.items[i]);
      __syncthreads();
    }
  }
  // The last block to finish adds the losses (a fixed order, whichever block it is).
  if (fin.out != nullptr && last_block(fin.blocks_done))
    finalize(fin.group_loss, fin.C, fin.B, fin.lambda_cd, fin.lambda_id, fin.out, fin.total, shared.reduce);
}

// ---------------------------------------------------------------- the width-split path

// Groups of 2 to 64 members, where the width is more than one slice (kSliceWidth), are spread over
// their width: slice_kernel<false>'s work item (slice q, group g) writes the tile's Gram entries
// over the widths of slice q into the scratch (part + offs[g]: [n_s][2][T][T]); slice_kernel<true>'s
// item (q, g) adds the n_s slices' entries in order, takes the weights (the loss too, slice 0) and
// writes the gradient at the widths of slice q. A group's work then runs on up to n_s SMs instead of one
// (the 36-member group of a COCO batch held its launch for 182 us on one SM). members_kernel's last
// block (plan_groups) places the groups in the scratch in group order while they fit; a group past
// it stays with group_kernel, whole. Each group's sums run in a fixed order wherever it is placed:
// bitwise reproducible.
constexpr int kSliceWidth = 128;  // a whole number of chunks for every tile (128, 64 and 32 wide)
constexpr int kMaxSlices = 16;    // wider inputs take slices of a multiple of kSliceWidth

struct SliceArgs {
  float* part;    // the scratch
  int n_s;        // slices per group
  int64_t slice;  // widths per slice
  int* queue = nullptr;  // the launch's next work item (zero before it); null: every gridDim.x-th item a block
  // Profiling only (L2D_CUDA_LED_ITEM_CLOCKS, see led_cuda): per work item i of the launch, [5 i ..
  // 5 i + 4] = i, the SM, the start (globaltimer, ns), the cycles it took (clock64) and its group's
  // size (negated for a group without a place in the scratch: passed over); null: off.
  long long* clocks = nullptr;
  int64_t clock_items = 0;
};

// The device's nanosecond clock and this block's SM (0 in the CPU emulator, which has neither).
__device__ __forceinline__ long long global_ns() {
#ifdef __CUDA_ARCH__
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#else
  return 0;
#endif
}

__device__ __forceinline__ long long sm_cycles() {
#ifdef __CUDA_ARCH__
  return clock64();
#else
  return 0;
#endif
}

__device__ __forceinline__ int sm_id() {
#ifdef __CUDA_ARCH__
  unsigned r;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(r));
  return static_cast<int>(r);
#else
  return 0;
#endif
}

// One family's share of a slice launch (and of the host's launches of the family).
struct SliceFamily {
  FamilyArgs f;
  const int* idx;       // member lists
  const int* cnt;       // group sizes
  float* loss;          // group losses
  int64_t n_groups;     // 0: no share in the launch
  const int* n_active;  // the family's groups of two members or more (members_kernel's list: the
  const int* active;    // group launches' work)
  const int* n_class;   // its slice work lists (Plan): [3] counts, [3][n_groups] entries
  const int4* info;
};

template <int T, typename TS, typename TT>
__device__ void slice_gram(const TS* __restrict__ s, const TT* __restrict__ t, const int* __restrict__ members, int P,
                           const FamilyArgs& f, GroupShared& sh, float* __restrict__ part_g, int q, int64_t lo,
                           int64_t hi) {
  using C = OneTile<T>;
  if (threadIdx.x < T) sh.rows[threadIdx.x] = static_cast<int>(threadIdx.x) < P ? members[threadIdx.x] : -1;
  if (threadIdx.x == 0) sh.ref = members[0];
  __syncthreads();
  float es_[C::kEntries], et_[C::kEntries];
  tile_gram<T>(s, t, f, sh, lo, hi, es_, et_);
  float* out = part_g + static_cast<int64_t>(q) * 2 * T * T;
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k) {
    int a, b;
    entry_of<T>(k, a, b);
    out[a * T + b] = es_[k];
    out[T * T + a * T + b] = et_[k];
  }
}

template <int T, typename TS>
__device__ void slice_grad(const TS* __restrict__ s, const int* __restrict__ members, int P, const FamilyArgs& f,
                           GroupShared& sh, const float* __restrict__ part_g, int n_s, int q, int64_t lo, int64_t hi,
                           grad_t<TS>* __restrict__ grad, float* __restrict__ loss_out) {
  using C = OneTile<T>;
  if (threadIdx.x < T) sh.rows[threadIdx.x] = static_cast<int>(threadIdx.x) < P ? members[threadIdx.x] : -1;
  // This thread's entries summed over the slices in slice order, kU slices' loads issued before any
  // of their adds: one round trip to L2 per kU slices. Run e's loop over slices inside the loop over
  // entries made them one round trip each (the adds wait on them): 192 in a row for the 64-row
  // tile, whose items held CD's launch at COCO for 63 us (Nsight Compute: 26% of its SM cycles
  // active on average).
  constexpr int kU = C::kEntries >= 16 ? 1 : 16 / C::kEntries;
  float es_[C::kEntries], et_[C::kEntries];
  #pragma unroll
  for (int k = 0; k < C::kEntries; ++k) es_[k] = et_[k] = 0.f;
  for (int p0 = 0; p0 < n_s; p0 += kU) {
    float vs[kU][C::kEntries], vt[kU][C::kEntries];
    #pragma unroll
    for (int u = 0; u < kU; ++u)
      #pragma unroll
      for (int k = 0; k < C::kEntries; ++k) {
        int a, b;
        entry_of<T>(k, a, b);
        const float* slice = part_g + static_cast<int64_t>(p0 + u) * 2 * T * T;
        const bool in = p0 + u < n_s;
        vs[u][k] = in ? slice[a * T + b] : 0.f;
        vt[u][k] = in ? slice[T * T + a * T + b] : 0.f;
      }
    #pragma unroll
    for (int u = 0; u < kU; ++u)
      #pragma unroll
      for (int k = 0; k < C::kEntries; ++k)
        if (p0 + u < n_s) es_[k] += vs[u][k], et_[k] += vt[u][k];
  }
  __syncthreads();  // sh.rows
  tile_weights<T>(P, es_, et_, sh, q == 0 ? loss_out : nullptr);
  tile_grad<T>(s, f, sh, P, P, true, f.add, grad, lo, hi);
}

// A launch's work items, largest tiles first: of class 0 (64-row tiles) CD's groups then ID's (the
// Gram launch takes both families; a gradient launch one), then class 1, then class 2; within a
// class and family, the groups in their work list's order (members_kernel's atomics: it varies from
// run to run, an item's arithmetic does not), each group's n_s slices in turn. A block takes the
// next item from the launch's queue (an integer atomic) when it starts one: the 64-row tiles' items
// (a COCO batch's 36-member CD group: six of them, each several times a 16-row tile's) go first, and
// the small items fill the SMs around them. Run f's Nsight Compute read the slice launches at COCO
// with the items dealt out in turn, one block per SM: SMs were active 32-67% of the launch (CD's
// weights and gradient: 24.1k cycles active per SM on average, 74.8k elapsed).
//
// The block's thread 0 holds two items ahead of the one it runs: when it starts an item it loads
// the next item's entry (group, size, scratch offset), whose index it took one item earlier, and
// takes the index of the one after, so that both round trips hide behind the item; after the item
// it passes the entry to the block in shared memory (two buffers, by the parity of the turn).
// Loaded after the item instead, the entry was an L2 round trip between every two items of a block,
// with all of the block's threads waiting behind it at the barrier (no more registers: 248 and 254,
// nvcc 13.0 sm_90 float32, no spill). Only groups
// of 2 to 64 members have items (at OpenImages' 9,605 labels, two in a batch of 16); an item of a
// group without a place in the scratch is passed over (the same for the whole block). Without a
// queue (SliceArgs::queue null), block b takes items b, b + gridDim.x, ... of the same order.
struct SliceItem {  // (in shared memory: no initializers)
  int64_t i;  // -1: no more items
  int fam;    // 0: family a, 1: b
  int g, P, q, off;
};

struct SliceList {
  int64_t n[2][kTileClasses];  // items of each family and class
  int64_t items = 0;
  int n_s = 1;                 // items a group

  // Where item i is: its family, class and place in the class's list (its slice: q).
  __device__ __forceinline__ bool locate(int64_t i, int& fam, int& c, int64_t& k, int& q) const {
    #pragma unroll
    for (c = 0; c < kTileClasses; ++c)
      #pragma unroll
      for (fam = 0; fam < 2; ++fam) {
        if (i < n[fam][c]) {
          k = i / n_s, q = static_cast<int>(i % n_s);
          return true;
        }
        i -= n[fam][c];
      }
    return false;
  }
};

template <bool kGrad, typename TS, typename TT>
__device__ __forceinline__ void slice_item(const TS* __restrict__ es, const TT* __restrict__ et,
                                           grad_t<TS>* __restrict__ grad, const SliceFamily& fam,
                                           const SliceArgs& sa, GroupShared& shared, const SliceItem& item) {
  const FamilyArgs& f = fam.f;
  if (item.off < 0) return;  // no place in the scratch: the group kernel takes it whole
  const int64_t g = item.g;
  const int P = item.P, q = item.q;
  const int64_t lo = q * sa.slice, hi = lo + sa.slice < f.width ? lo + sa.slice : f.width;
  const TS* s = es + g * f.s_g;
  const TT* t = et + g * f.t_g;
  const int* members = fam.idx + g * f.n_members;
  float* part_g = sa.part + item.off;
  if constexpr (kGrad) {
    grad_t<TS>* grad_g = grad + g * f.g_g;
    float* loss = fam.loss + g;
    if (P <= 16) slice_grad<16>(s, members, P, f, shared, part_g, sa.n_s, q, lo, hi, grad_g, loss);
    else if (P <= 32) slice_grad<32>(s, members, P, f, shared, part_g, sa.n_s, q, lo, hi, grad_g, loss);
    else slice_grad<64>(s, members, P, f, shared, part_g, sa.n_s, q, lo, hi, grad_g, loss);
  } else {
    if (P <= 16) slice_gram<16>(s, t, members, P, f, shared, part_g, q, lo, hi);
    else if (P <= 32) slice_gram<32>(s, t, members, P, f, shared, part_g, q, lo, hi);
    else slice_gram<64>(s, t, members, P, f, shared, part_g, q, lo, hi);
  }
  __syncthreads();  // the next item reuses shared memory
}

// The Gram launch (kGrad false) takes both families at once, CD (a) and ID (b): they read the inputs
// and write apart in the scratch. The gradient launches take one family each (b unused): ID adds
// into the rows CD wrote. Without gradient, a gradient launch's items are the groups' slice 0 (the
// loss) alone.
template <bool kGrad, typename TS, typename TT>
__global__ void __launch_bounds__(kThreads, 1)
    slice_kernel(const TS* __restrict__ es, const TT* __restrict__ et, grad_t<TS>* __restrict__ grad, SliceFamily a,
                 SliceFamily b, SliceArgs sa) {
  __shared__ GroupShared shared;
  __shared__ SliceItem turn[2];
  wait_for_previous_launch();  // launched early: before any global memory access
  let_next_launch_start();
  SliceList list;  // thread 0's
  int64_t next = -1;  // thread 0: the index of the block's next item
  // Item `i`'s entry, loaded by thread 0.
  const auto entry = [&](int64_t i) {
    SliceItem item{-1, 0, 0, 0, 0, -1};
    int fam, c, q;
    int64_t k;
    if (i >= 0 && list.locate(i, fam, c, k, q)) {
      const SliceFamily& share = fam == 0 ? a : b;
      const int4 e = share.info[c * share.n_groups + k];
      item.i = i, item.fam = fam, item.g = e.x, item.P = e.y, item.off = e.z, item.q = q;
    }
    return item;
  };
  const auto take = [&](int64_t after) -> int64_t {
    return sa.queue != nullptr ? atomicAdd(sa.queue, 1) : after + gridDim.x;
  };
  if (threadIdx.x == 0) {
    list.n_s = kGrad && !a.f.write_grad ? 1 : sa.n_s;
    #pragma unroll
    for (int c = 0; c < kTileClasses; ++c) {
      list.n[0][c] = a.n_groups > 0 ? static_cast<int64_t>(a.n_class[c]) * list.n_s : 0;
      list.n[1][c] = !kGrad && b.n_groups > 0 ? static_cast<int64_t>(b.n_class[c]) * list.n_s : 0;
      list.items += list.n[0][c] + list.n[1][c];
    }
    const int64_t first = sa.queue != nullptr ? atomicAdd(sa.queue, 1) : blockIdx.x;
    next = take(first);  // its round trip under the first entry's
    turn[0] = entry(first < list.items ? first : -1);
  }
  __syncthreads();
  for (int p = 0;; p ^= 1) {
    const SliceItem item = turn[p];
    if (item.i < 0) break;
    SliceItem upcoming;
    if (threadIdx.x == 0) {
      upcoming = entry(next < list.items ? next : -1);
      next = take(next);
    }
    const bool timed = sa.clocks != nullptr && threadIdx.x == 0 && item.i < sa.clock_items;
    const long long start_ns = timed ? global_ns() : 0, start = timed ? sm_cycles() : 0;
    slice_item<kGrad>(es, et, grad, item.fam == 0 ? a : b, sa, shared, item);
    if (timed) {  // after the item's closing barrier
      long long* out = sa.clocks + 5 * item.i;
      out[0] = item.i, out[1] = sm_id(), out[2] = start_ns, out[3] = sm_cycles() - start;
      out[4] = item.off < 0 ? -item.P : item.P;
    }
    if (threadIdx.x == 0) turn[p ^ 1] = upcoming;
    __syncthreads();  // turn[p ^ 1] written; every thread read turn[p] before it
  }
}

// L2D_CUDA_LED_ITEM_CLOCKS=FILE (profiling, never in a timed run: it synchronizes): appends each
// slice launch's items, one line each, "launch item sm start_ns cycles P" after a "# B C D n_s" line
// (launch 0: the Grams of both families; 1: CD's weights and gradient; 2: ID's).
void append_item_clocks(const char* path, const at::Tensor& clocks, int64_t B, int64_t C, int64_t D, int64_t n_s) {
  const at::Tensor host = clocks.cpu();
  const long long* v = reinterpret_cast<const long long*>(host.data_ptr<int64_t>());
  std::ofstream out(path, std::ios::app);
  out << "# " << B << " " << C << " " << D << " " << n_s << "\n";
  for (int64_t launch = 0; launch < host.size(0); ++launch)
    for (int64_t i = 0; i < host.size(1); ++i) {
      const long long* row = v + (launch * host.size(1) + i) * 5;
      if (row[0] >= 0)
        out << launch << " " << row[0] << " " << row[1] << " " << row[2] << " " << row[3] << " " << row[4] << "\n";
    }
}

// One LED call on embeddings of dtype T (es and et alike, any strides; pos as readable_targets makes
// it), on the current device and stream: what led_of_type returns (led_of_type.h).
template <typename T>
LedResult launch_led(const at::Tensor& es, const at::Tensor& et, const at::Tensor& pos, double lambda_cd,
                     double lambda_id, bool with_grad) {
  const int64_t B = es.size(0), C = es.size(1), D = es.size(2);
  auto stream = c10::cuda::getCurrentCUDAStream();
  auto i32 = es.options().dtype(at::kInt), f32 = es.options().dtype(at::kFloat);

  // Without the gradient: no buffer (an empty tensor returned in its place), a null pointer to the
  // kernels, which then write none of it (the same launches; the same losses, bitwise).
  at::Tensor grad = with_grad ? at::empty({B, C, D}, es.options().dtype(grad_scalar_type(es.scalar_type())))
                               : at::empty({0}, es.options().dtype(grad_scalar_type(es.scalar_type())));
  const int64_t g_sb = C * D, g_sc = D;  // its strides, when there is one
  // Striped families (groups of more than 64 members spread over blocks): those whose groups can
  // exceed 128 members; up to 128, a larger group's four tile pairs stay in one block.
  const auto strips_of = [](int64_t n_members) { return n_members > 2 * kOneTile ? (n_members + kOneTile - 1) / kOneTile : 0; };
  const int64_t strips_cd = strips_of(B), strips_id = strips_of(C);
  const int64_t n_items = C * strips_cd + B * strips_id;
  // One int buffer: counters first (active CD groups, active ID groups, blocks done of the last
  // launch, CD and ID work items, members_kernel's group blocks done, the width-split path's work
  // lists' counts [2][3] and its three slice launches' queues), zeroed by a memset on the stream
  // rather than a fill kernel; then the member lists, the active groups, the striped families'
  // work items and each group's place in its work list. One float buffer: the group losses, then
  // the striped sweeps' sums.
  constexpr int kCounters = 6 + 2 * kTileClasses + 3;
  at::Tensor lists = at::empty({kCounters + 2 * B * C + 3 * (B + C) + n_items}, i32);
  int* n_active = lists.data_ptr<int>();
  C10_CUDA_CHECK(cudaMemsetAsync(n_active, 0, kCounters * sizeof(int), stream));
  int* cd_idx = n_active + kCounters;
  int* id_idx = cd_idx + B * C;
  int* cd_cnt = id_idx + B * C;
  int* id_cnt = cd_cnt + C;
  int* active = id_cnt + B;  // [C] active CD groups, then [B] active ID groups
  int* items = active + B + C;
  int* n_class = n_active + 6;
  int* queues = n_class + 2 * kTileClasses;
  int* list_pos = items + n_items;
  at::Tensor group_loss = at::empty({C + B + 4 * n_items}, f32);
  float* losses = group_loss.data_ptr<float>();
  float* sums = losses + C + B;
  at::Tensor out = at::empty({3}, f32), total = at::empty({}, f32);
  // The width-split path (above slice_kernel): slices of kSliceWidth widths, or of a multiple of it
  // past kMaxSlices; a scratch for the partial Grams of what every group at its family's largest
  // tile would need, at most a sixteenth of the gradient's bytes, within 4-32 MiB, after the work
  // lists' entries (16 bytes for each of 3 (C + B) places). For the tests, which run at small
  // widths: L2D_CUDA_LED_SLICE_WIDTH sets the slice width, L2D_CUDA_LED_SCRATCH_BYTES the scratch's
  // bytes (0 keeps every group whole); for the profile's comparisons, L2D_CUDA_LED_QUEUE=0 deals
  // the slice launches' items out in turn instead of from a queue, and L2D_CUDA_LED_EARLY_LAUNCH=0
  // starts no launch before the previous one ends (early_launches).
  int64_t base = kSliceWidth;
  if (const char* env = std::getenv("L2D_CUDA_LED_SLICE_WIDTH")) base = std::max<int64_t>(1, std::atoll(env));
  int64_t slice = base, n_s = (D + base - 1) / base;
  if (n_s > kMaxSlices) {
    slice = base * ((n_s + kMaxSlices - 1) / kMaxSlices);
    n_s = (D + slice - 1) / slice;
  }
  const int64_t tile_b = tile_of(B), tile_c = tile_of(C);  // each family's largest tile
  const int64_t worst = n_s * 2 * (C * tile_b * tile_b + B * tile_c * tile_c);
  const int64_t grad_bytes = es.numel() * static_cast<int64_t>(c10::elementSize(grad_scalar_type(es.scalar_type())));
  int64_t scratch_bytes = std::min<int64_t>(std::max<int64_t>(4 << 20, grad_bytes / 16), 32 << 20);
  if (const char* env = std::getenv("L2D_CUDA_LED_SCRATCH_BYTES")) scratch_bytes = std::atoll(env);
  const int64_t cap = std::min<int64_t>({worst, scratch_bytes / 4, INT32_MAX});  // offsets in 32 bits
  const bool split = n_s > 1 && cap > 0 && B * C > 0;
  const char* queue_env = std::getenv("L2D_CUDA_LED_QUEUE");
  const bool queue = queue_env == nullptr || std::atoi(queue_env) != 0;
  const int64_t info_floats = 4 * kTileClasses * (C + B);
  at::Tensor offs, part;  // allocated only for the split path
  if (split) {
    offs = at::empty({C + B}, es.options().dtype(at::kLong));
    part = at::empty({info_floats + cap}, f32);
  }
  int64_t* offs_ptr = split ? offs.data_ptr<int64_t>() : nullptr;
  int4* info = split ? reinterpret_cast<int4*>(part.data_ptr<float>()) : nullptr;
  // Profiling only: each slice launch's items' clocks (append_item_clocks), -1 where no item ran.
  const char* clock_path = std::getenv("L2D_CUDA_LED_ITEM_CLOCKS");
  at::Tensor clocks;
  if (split && clock_path != nullptr && *clock_path != '\0')
    clocks = at::full({3, (C + B) * n_s, 5}, -1, es.options().dtype(at::kLong));
  const Strips st_cd{n_active + 3, items, sums, static_cast<int>(strips_cd)};
  const Strips st_id{n_active + 4, items + C * strips_cd, sums + 4 * C * strips_cd, static_cast<int>(strips_id)};
  // Group blocks: at most one per SM (each holds up to 255 registers per thread), looping over items.
  const int sms = sm_count(es.get_device());
  // Every launch after members_kernel's may start while the one before it ends (programmatic
  // dependent launch, sm_90 and later): its blocks are scheduled as the previous launch's leave and
  // wait there for it to complete, so the gap between two launches (the grid's launch and its
  // blocks' dispatch) passes under the previous launch's last blocks.
  const bool early = early_launches(es.get_device(), group_kernel<0, T, T>);
  const auto blocks = [&](int64_t work) { return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(work, sms))); };

  const T* s = reinterpret_cast<const T*>(es.data_ptr());
  const T* t = reinterpret_cast<const T*>(et.data_ptr());
  using G = grad_t<T>;
  G* g = with_grad ? reinterpret_cast<G*>(grad.data_ptr()) : nullptr;
  with_targets(pos, [&](const auto* y) {
    using TY = std::remove_cv_t<std::remove_pointer_t<decltype(y)>>;
    launch_kernel(false, members_kernel<G, TY>, static_cast<unsigned>(C + B + (split ? 1 : 0)), kThreads, stream,
                  y, pos.stride(0), pos.stride(1), B, C, cd_idx, cd_cnt, id_idx, id_cnt, n_active, active, losses, g,
                  g_sb, g_sc, D, st_cd, st_id,
                  split ? Plan{n_active + 5, static_cast<int>(n_s), cap, offs_ptr, n_class, list_pos, info} : Plan{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // CD: groups are labels, members are images; then ID: the other way round. When split, one slice
  // launch writes both families' partial Grams; then each family's launches in order (its slice
  // launch of weights and gradient when split; then one group launch, or three when striped); the
  // last one of the call adds the losses.
  const FamilyArgs cd{es.stride(1), es.stride(0), es.stride(2), et.stride(1), et.stride(0), et.stride(2),
                      g_sc, g_sb, B, D, static_cast<float>(2.0 * lambda_cd), false, with_grad, offs_ptr};
  const FamilyArgs id{es.stride(0), es.stride(1), es.stride(2), et.stride(0), et.stride(1), et.stride(2),
                      g_sb, g_sc, C, D, static_cast<float>(2.0 * lambda_id), true, with_grad,
                      split ? offs_ptr + C : nullptr};
  const Finalize fin{out.data_ptr<float>(), total.data_ptr<float>(), losses, n_active + 2, C, B,
                     static_cast<float>(lambda_cd), static_cast<float>(lambda_id)};
  const SliceFamily cd_share{cd, cd_idx, cd_cnt, losses, C, n_active, active, n_class, info},
      id_share{id, id_idx, id_cnt, losses + C, B, n_active + 1, active + C, n_class + kTileClasses,
               info == nullptr ? nullptr : info + kTileClasses * C};
  SliceArgs sa{split ? part.data_ptr<float>() + info_floats : nullptr, static_cast<int>(n_s), slice};
  const auto timed = [&](int launch) {  // sa with launch's queue and share of the item clocks, if any
    SliceArgs with = sa;
    if (queue) with.queue = queues + launch;
    if (clocks.defined()) {
      with.clocks = reinterpret_cast<long long*>(clocks.data_ptr<int64_t>()) + launch * clocks.size(1) * 5;
      with.clock_items = clocks.size(1);
    }
    return with;
  };
  if (split) {
    launch_kernel(early, slice_kernel<false, T, T>, blocks((C + B) * n_s), kThreads, stream, s, t, g, cd_share,
                  id_share, timed(0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const auto family = [&](const SliceFamily& share, const Strips& st, bool ends_call) {
    const FamilyArgs& f = share.f;
    const int* idx = share.idx;
    const int* cnt = share.cnt;
    const int* n_act = share.n_active;
    const int* act = share.active;
    float* loss = share.loss;
    const int64_t groups = share.n_groups;
    const unsigned grid0 = blocks(groups + groups * st.max_strips), grid = blocks(groups * st.max_strips);
    if (split) {
      launch_kernel(early, slice_kernel<true, T, T>, blocks(groups * n_s), kThreads, stream, s, t, g, share,
                    SliceFamily{}, timed(share.f.add ? 2 : 1));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_kernel(early, group_kernel<0, T, T>, grid0, kThreads, stream, s, t, g, idx, cnt, n_act, act, loss, f, st,
                  ends_call && st.max_strips == 0 ? fin : Finalize{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (st.max_strips == 0) return;
    launch_kernel(early, group_kernel<1, T, T>, grid, kThreads, stream, s, t, g, idx, cnt, n_act, act, loss, f, st,
                  Finalize{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_kernel(early, group_kernel<2, T, T>, grid, kThreads, stream, s, t, g, idx, cnt, n_act, act, loss, f, st,
                  ends_call ? fin : Finalize{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  family(cd_share, st_cd, false);
  family(id_share, st_id, true);
  if (clocks.defined()) append_item_clocks(clock_path, clocks, B, C, D, n_s);
  return {out, grad, total};
}

}  // namespace
}  // namespace l2d
