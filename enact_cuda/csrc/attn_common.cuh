// Shared pieces of the clustered-attention kernels (attn_fwd.cu, attn_bwd.cu).
//
// Thread layout: a query (or key) row of q / k head dim E is owned by TP = E / 32 adjacent
// threads, each holding 32 of its elements in registers ("part"); the same TP threads hold a
// value-dim row (head dim EV <= E) as parts of EV / TP elements. Dot products are finished with
// one __shfl_xor per extra part. Tiles of rows are staged in shared memory as float, two tiles
// in turn (for_each_staged_tile: the next one's copies in flight during the current one's
// compute); a row's parts are stored W + PAD floats apart (PAD = 4 when TP > 1) so that the
// parts' 16-byte reads of one row fall in different banks.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "enact.h"

namespace enact {

// Rows of head dim E split over TP threads: W floats per thread ("part").
template <int E, int TP>
struct AttnLayout {
  static_assert(TP == 1 || TP == 2, "one or two threads per row");
  static_assert(E % (16 * TP) == 0, "parts must be whole 16-float chunks");
  static constexpr int DIM = E;                     // head dim of a row
  static constexpr int W = E / TP;                  // floats per part
  static constexpr int PAD = TP > 1 ? 4 : 0;
  static constexpr int PW = W + PAD;                // floats per part in shared memory
  static constexpr int RS = TP * PW;                // floats per row in shared memory
};

// Threads per row for q / k head dim E (32 or 64).
template <int E>
struct RowThreads {
  static_assert(E == 32 || E == 64, "q / k head dim must be 32 or 64");
  static constexpr int value = E / 32;
};

// The register layout of one kernel instantiation: TP threads per row (q / k head dim E), each
// holding WK floats of a q / k row and WV floats of a value row (head dim EV).
template <int E, int EV>
struct AttnParts {
  static constexpr int TP = RowThreads<E>::value;
  using LayK = AttnLayout<E, TP>;
  using LayV = AttnLayout<EV, TP>;
  static constexpr int WK = LayK::W, WV = LayV::W;
};

// Minimum resident blocks per SM (__launch_bounds__) that the forward and the dK/dV kernel cap
// their registers for: 3 for (q / k, v) head dims (64, 32), where both fit in 168 registers
// without spilling (their own choices, the forward with dropout ~205 and the dK/dV kernel
// ~180, leave 2 per SM); the compiler's choice for the others (the dK/dV kernel's ~250 for
// (64, 64) would spill under the cap).
template <int E, int EV>
constexpr int capped_min_blocks() {
  return E == 64 && EV == 32 ? 3 : 1;
}

// Number of keys of image b: the index of the first True of its key padding mask row (the
// mask is a suffix, so keys [0, count) exist), by binary search: every thread computes the
// same answer from log2(R) broadcast reads, so R may be a generous upper bound (e.g. N).
__device__ __forceinline__ int block_key_count(const bool* __restrict__ kpm_row, int R) {
  int lo = 0, hi = R;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (kpm_row[mid]) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// This block's (image, head): blockIdx.y = b * H + h, and the image's key (cluster) count.
struct BlockHead {
  int bh, b, h, Lk;
};
__device__ __forceinline__ BlockHead block_head(const AttnArgs& a) {
  const int bh = blockIdx.y, b = bh / a.H;
  return {bh, b, bh % a.H, block_key_count(a.kpm + static_cast<int64_t>(b) * a.R, a.R)};
}

// Index of query row i of head bh in the (B, H, N) per-row arrays (lse, delta, dropout rows).
__device__ __forceinline__ int64_t query_row(const AttnArgs& a, int bh, int i) {
  return static_cast<int64_t>(bh) * a.N + i;
}

// Row `row` of head (b, h) of a (B, H, L, e) tensor with strides s of (B, H, L), as T.
template <typename T>
__device__ __forceinline__ const T* head_row(const void* base, const int64_t (&s)[3], int b,
                                             int h, int row) {
  return static_cast<const T*>(base) + b * s[0] + h * s[1] + row * s[2];
}
template <typename T>
__device__ __forceinline__ T* head_row_out(void* base, const int64_t (&s)[3], int b, int h,
                                           int row) {
  return static_cast<T*>(base) + b * s[0] + h * s[1] + row * s[2];
}

template <int W>
__device__ __forceinline__ void fill(float (&x)[W], float value) {
#pragma unroll
  for (int e = 0; e < W; ++e) x[e] = value;
}

// W consecutive elements (one part of a row) -> registers as float. p 16-byte aligned.
template <typename T, int W>
__device__ __forceinline__ void load_part(const T* __restrict__ p, float (&x)[W]) {
  constexpr int V = 16 / sizeof(T);
  static_assert(W % V == 0, "a part is whole 16-byte vectors");
#pragma unroll
  for (int c = 0; c < W / V; ++c) {
    float tmp[V];
    load_vec<T, V>(p + c * V, tmp);
#pragma unroll
    for (int v = 0; v < V; ++v) x[c * V + v] = tmp[v];
  }
}

// The same for an existing row (active), zeros for a thread past the last row.
template <typename T, int W>
__device__ __forceinline__ void load_part_or_zero(bool active, const T* __restrict__ p,
                                                  float (&x)[W]) {
  if (active) load_part<T, W>(p, x);
  else fill<W>(x, 0.f);
}

template <typename T, int W>
__device__ __forceinline__ void store_part(T* __restrict__ p, const float (&x)[W], float mul) {
  constexpr int V = 16 / sizeof(T);
  static_assert(W % V == 0, "a part is whole 16-byte vectors");
#pragma unroll
  for (int c = 0; c < W / V; ++c) {
    float tmp[V];
#pragma unroll
    for (int v = 0; v < V; ++v) tmp[v] = x[c * V + v] * mul;
    store_vec<T, V>(p + c * V, tmp);
  }
}

// Whether load_tile copies float tiles asynchronously (cp.async, sm_80 and later): no
// registers, and all of a thread's 16-byte copies in flight at once.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define ENACT_ASYNC_TILES 1
#else
#define ENACT_ASYNC_TILES 0
#endif

// BYTES (4 or 16) global -> shared (both BYTES-aligned) without passing through registers;
// zeros when !valid (nothing is read then). 16-byte copies bypass L1 (.cg), 4-byte ones
// cannot (.ca).
template <int BYTES>
__device__ __forceinline__ void copy_async(float* smem, const float* gmem, bool valid) {
  static_assert(BYTES == 4 || BYTES == 16, "4- or 16-byte copies");
#if ENACT_ASYNC_TILES
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = valid ? BYTES : 0;
  if constexpr (BYTES == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(gmem),
                 "r"(src_bytes));
#endif
}

// Rows [row0, row0 + nrows) of a (L, E) slice with row stride `stride` -> shared tile of
// ROWS rows in layout Lay (rows >= nrows are zero-filled). Cooperative over the block's NT
// threads (the kernel's launch size). float tiles on sm_80+ are copied asynchronously, every
// copy of a thread in flight at once: the tile is complete only after its group's
// wait_tile_loads (for_each_staged_tile does that, and the __syncthreads). Other tiles pass
// through registers, one 16-byte load at a time.
template <typename T, typename Lay, int ROWS, int NT>
__device__ __forceinline__ void load_tile(float* __restrict__ tile, const T* __restrict__ base,
                                          int64_t stride, int row0, int nrows) {
  constexpr int V = 16 / sizeof(T);
  constexpr int CPR = Lay::DIM / V;  // 16-byte chunks per row
  static_assert(Lay::W % V == 0, "a chunk never straddles two parts");
  static_assert(ROWS * CPR % NT == 0, "the tile is whole chunks per thread");
  auto dest = [&](int row, int e0) {
    return tile + row * Lay::RS + (e0 / Lay::W) * Lay::PW + (e0 % Lay::W);
  };
  if constexpr (std::is_same_v<T, float> && ENACT_ASYNC_TILES) {
    // a thread's chunks: the same columns of every RSTEP-th row from its first
    constexpr int RSTEP = NT / CPR;
    static_assert(NT % CPR == 0, "whole rows per pass of the block");
    const int r0 = threadIdx.x / CPR, e0 = threadIdx.x % CPR * V;
    const float* src = base + static_cast<int64_t>(row0 + r0) * stride + e0;
    float* dst = dest(r0, e0);
#pragma unroll
    for (int c = 0; c < ROWS / RSTEP; ++c) {
      const bool valid = r0 + c * RSTEP < nrows;
      copy_async<16>(dst, valid ? src : base, valid);  // never an address past the rows
      src += RSTEP * stride;
      dst += RSTEP * Lay::RS;
    }
  } else {
#pragma unroll 1
    for (int idx = threadIdx.x; idx < ROWS * CPR; idx += NT) {
      const int row = idx / CPR, e0 = idx % CPR * V;
      float tmp[V];
      if (row < nrows) {
        load_vec<T, V>(base + static_cast<int64_t>(row0 + row) * stride + e0, tmp);
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) tmp[v] = 0.f;
      }
      float* dst = dest(row, e0);
#pragma unroll
      for (int v = 0; v < V; v += 4)
        *reinterpret_cast<float4*>(dst + v) = make_float4(tmp[v], tmp[v + 1], tmp[v + 2], tmp[v + 3]);
    }
  }
}

// values[row0, row0 + nrows) of a float array -> shared row values of ROWS rows (zeros past
// nrows), as load_tile: asynchronous on sm_80+ (complete after the tile's wait), else through
// registers.
template <int ROWS, int NT>
__device__ __forceinline__ void load_row_values(float* __restrict__ dst,
                                                const float* __restrict__ values, int row0,
                                                int nrows) {
  for (int i = threadIdx.x; i < ROWS; i += NT) {
    const bool valid = i < nrows;
#if ENACT_ASYNC_TILES
    copy_async<4>(dst + i, valid ? values + row0 + i : values, valid);
#else
    dst[i] = valid ? values[row0 + i] : 0.f;
#endif
  }
}

// Closes the group of this thread's asynchronous copies issued since the last group.
__device__ __forceinline__ void commit_tile_loads() {
#if ENACT_ASYNC_TILES
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most PENDING of this thread's groups of copies are still in flight (a no-op
// where there are none); a __syncthreads after it makes every thread's copies visible to the
// block.
template <int PENDING>
__device__ __forceinline__ void wait_tile_loads() {
#if ENACT_ASYNC_TILES
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
#endif
}

// The rows [begin, end) in tiles of ROWS, staged in two shared buffers ("stages" 0 and 1):
// load(stage, row0, nrows) fills a stage with load_tile / load_row_values, and
// body(stage, row0, nrows) computes on a complete one. The copies of tile t + 1 are issued
// before the body of tile t, so on sm_80+ they are in flight while the block computes (other
// builds and tiles load through registers, as before the body). Block-uniform arguments;
// every thread of the block must call it.
template <int ROWS, typename Load, typename Body>
__device__ __forceinline__ void for_each_staged_tile(int begin, int end, Load&& load,
                                                     Body&& body) {
  if (begin >= end) return;
  load(0, begin, min(ROWS, end - begin));
  commit_tile_loads();
  int stage = 0;
  for (int row0 = begin; row0 < end; row0 += ROWS, stage ^= 1) {
    const int next = row0 + ROWS;
    if (next < end) {
      load(stage ^ 1, next, min(ROWS, end - next));  // the stage the previous tile used
      commit_tile_loads();
      wait_tile_loads<1>();
    } else {
      wait_tile_loads<0>();
    }
    __syncthreads();
    body(stage, row0, min(ROWS, end - row0));
    __syncthreads();  // before the next load overwrites this stage
  }
}

// The `load` for for_each_staged_tile of a kernel that streams head (b, h)'s key and value rows
// (the forward, the dQ kernel): load(stage, row0, nrows) copies rows [row0, row0 + nrows) of
// its keys into ks[stage] and of its values into vs[stage], tiles of ROWS rows.
template <typename T, typename LayK, typename LayV, int ROWS, int NT>
__device__ __forceinline__ auto key_value_loader(float (&ks)[2][ROWS * LayK::RS],
                                                 float (&vs)[2][ROWS * LayV::RS],
                                                 const AttnArgs& a, int b, int h) {
  const T* kb = head_row<T>(a.k, a.sk, b, h, 0);
  const T* vb = head_row<T>(a.v, a.sv, b, h, 0);
  return [&ks, &vs, &a, kb, vb](int stage, int row0, int nrows) {
    load_tile<T, LayK, ROWS, NT>(ks[stage], kb, a.sk[2], row0, nrows);
    load_tile<T, LayV, ROWS, NT>(vs[stage], vb, a.sv[2], row0, nrows);
  };
}

// Partial dot product of a register part with a shared-memory part (4 accumulators).
template <int W>
__device__ __forceinline__ float dot_part(const float (&x)[W], const float* __restrict__ row) {
  const float4* r4 = reinterpret_cast<const float4*>(row);
  float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma unroll
  for (int d4 = 0; d4 < W / 4; ++d4) {
    const float4 y = r4[d4];
    a0 = fmaf(x[4 * d4 + 0], y.x, a0);
    a1 = fmaf(x[4 * d4 + 1], y.y, a1);
    a2 = fmaf(x[4 * d4 + 2], y.z, a2);
    a3 = fmaf(x[4 * d4 + 3], y.w, a3);
  }
  return (a0 + a1) + (a2 + a3);
}

// acc += c * row (shared-memory part)
template <int W>
__device__ __forceinline__ void axpy_part(float (&acc)[W], float c, const float* __restrict__ row) {
  const float4* r4 = reinterpret_cast<const float4*>(row);
#pragma unroll
  for (int d4 = 0; d4 < W / 4; ++d4) {
    const float4 y = r4[d4];
    acc[4 * d4 + 0] = fmaf(c, y.x, acc[4 * d4 + 0]);
    acc[4 * d4 + 1] = fmaf(c, y.y, acc[4 * d4 + 1]);
    acc[4 * d4 + 2] = fmaf(c, y.z, acc[4 * d4 + 2]);
    acc[4 * d4 + 3] = fmaf(c, y.w, acc[4 * d4 + 3]);
  }
}

template <int TP>
__device__ __forceinline__ float finish_dot(float x) {
  if constexpr (TP == 2) x += __shfl_xor_sync(ENACT_FULL_MASK, x, 1);
  return x;
}

// Dropout threshold / scale from p.
struct DropoutParams {
  uint32_t threshold;  // keep iff hash >= threshold = round(p * 2^32)
  float inv_keep;      // 1 / (1 - p)  (0 for p >= 1)
};
DropoutParams make_dropout_params(float p);  // attn_fwd.cu

template <typename T>
struct TypeTag {
  using type = T;
};
template <int X>
using Int = std::integral_constant<int, X>;

// f(TypeTag<T>{}, Int<E>{}, Int<EV>{}) for the supported element type and (q / k, v) head dims
// (32, 32), (64, 64), (64, 32); cudaErrorInvalidValue for anything else.
template <typename F>
cudaError_t dispatch_attn(DType dtype, int E, int EV, F&& f) {
  auto dims = [&](auto tag) -> cudaError_t {
    if (E == 32 && EV == 32) return f(tag, Int<32>{}, Int<32>{});
    if (E == 64 && EV == 64) return f(tag, Int<64>{}, Int<64>{});
    if (E == 64 && EV == 32) return f(tag, Int<64>{}, Int<32>{});
    return cudaErrorInvalidValue;
  };
  if (dtype == DType::kFloat) return dims(TypeTag<float>{});
  if (dtype == DType::kBFloat16) return dims(TypeTag<__nv_bfloat16>{});
  return cudaErrorInvalidValue;
}

}  // namespace enact
