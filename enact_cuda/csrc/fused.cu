// Fused ENACT clustering path: the W_prob logits, information, smoothing, curvature, regions,
// region bounds and region softmax statistics in ONE forward launch, and the information keys'
// share of the backward in one launch.
//
// Forward (fused_fwd_kernel, grid (chunks, B), 1024 threads):
//   every block: z_i = <keys_i, w> + bias for kRows pixels of image b (32 warps, kRowsPerWarp
//   rows each, loads in flight before use); then an atomic ticket per image: the LAST block of
//   image b to finish (all its z are then visible) runs the per-image part on the compact
//   sequence of the valid pixels in shared memory (one pass of the block for N <= 1024):
//     p = softmax(z), H = -(p+1e-8) log2 (p+1e-8), smoothed = gauss * H (same length, zero
//     padded), step = curvature > 0, regions = runs of equal step (row breaks optional),
//     bounds [start_r, end_r) and (max, 1/sum) of exp(smoothed) per region.
// Backward (key_grad_kernel), after cluster_backward and info_backward (grad z): per pixel row
//   gx_i (+)= gz_i w, grad w += sum_i gz_i keys_i, grad bias += sum_i gz_i (block partials,
//   atomics) -- one pass over the keys instead of three torch ops (addcmul, a GEMV, a sum).
#include "common.cuh"
#include "enact.h"
#include "info_common.cuh"

namespace enact {
namespace {

constexpr int kFwdThreads = 1024;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = (kFwdThreads / 32) * kRowsPerWarp;  // 128 logits rows per block
constexpr int kGradThreads = 256;
constexpr int kGradRows = 64;  // pixels per key_grad block
constexpr int kGradUnroll = 4;

// The per-image part of the forward, run by one whole block (all threads) for image b.
// base: 3N floats (shared memory or global scratch). taps synced by the caller.
__device__ __noinline__ void image_part(const FusedFwdArgs& a, int b, float* base,
                                        const float* taps, float* fbuf, int* ibuf) {
  const int N = a.N, tid = threadIdx.x, nt = blockDim.x, T = a.taps_half;
  float* hb = base;                                  // z, then information, then region ids
  float* sb = base + N;                              // smoothed
  int* cidx = reinterpret_cast<int*>(base + 2 * N);  // compact -> pixel
  const int64_t off = static_cast<int64_t>(b) * N;
  const bool* m = a.mask ? a.mask + off : nullptr;

  // 1-4. compaction, information, smoothing, region ids (kept in hb as ints)
  int first_row;
  const int L = compact_image(
      N, m, a.row_breaks != 0, a.W,
      [&](int i) { return __ldcg(a.z + off + i); },  // written by other blocks: read from L2
      cidx, hb, a.info_out + off, a.smoothed_out + off, a.region_out + off, ibuf, first_row);
  information_in_place(hb, L, cidx, a.info_out + off, fbuf);
  smooth_compact(hb, sb, taps, L, T, cidx, a.smoothed_out + off);
  int* rid = reinterpret_cast<int*>(hb);
  const int regions = region_ids(sb, L, a.row_breaks != 0, max(first_row, 1), ibuf,
                                 [&](int j, int r) {
                                   rid[j] = r;
                                   a.region_out[off + cidx[j]] = r;
                                 });
  __syncthreads();

  // 5. per region (the thread at its first position): bounds and softmax statistics
  for (int j = tid; j < L; j += nt) {
    const int r = rid[j];
    if (j > 0 && rid[j - 1] == r) continue;
    float rmx = -INFINITY, rsum = 0.f;
    int k = j;
    for (; k < L && rid[k] == r; ++k) {
      const float s = sb[k];
      if (s > rmx) {
        rsum = rsum * expf(rmx - s) + 1.f;
        rmx = s;
      } else {
        rsum += expf(s - rmx);
      }
    }
    a.starts[off + r] = cidx[j];
    a.ends[off + r] = cidx[k - 1] + 1;
    a.rstats[2 * (off + r)] = rmx;
    a.rstats[2 * (off + r) + 1] = 1.f / rsum;
  }
  if (tid == 0) {
    a.counts_out[b] = regions;
    a.counts32[b] = regions;
    a.stats3[b] = static_cast<float>(regions);
    a.stats3[a.B + b] = static_cast<float>(L);
    a.stats3[2 * a.B + b] = static_cast<float>(L) / fmaxf(static_cast<float>(regions), 1.f);
    atomicMax(a.rmax, regions);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kFwdThreads) fused_fwd_kernel(FusedFwdArgs a) {
  extern __shared__ float4 dyn_smem4[];
  __shared__ float taps[kMaxTapHalf + 1];
  __shared__ float fbuf[32];
  __shared__ int ibuf[32];
  __shared__ int s_last;
  const int b = blockIdx.y, tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
  const int N = a.N, d = a.d;
  const int64_t off = static_cast<int64_t>(b) * N;

  // phase 1: logits of rows i0 + wid + 16 u
  {
    const int i0 = blockIdx.x * kRows + wid;
    const T* K = static_cast<const T*>(a.keys) + static_cast<int64_t>(b) * a.key_batch_stride;
    bool ok[kRowsPerWarp];
    float dot[kRowsPerWarp];
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      const int i = i0 + u * (kFwdThreads / 32);
      ok[u] = i < N && !(a.mask && a.mask[off + i]);
      dot[u] = 0.f;
    }
    for (int c0 = lane * VEC; c0 < d; c0 += 32 * VEC) {
      Raw<T, VEC> raw[kRowsPerWarp];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u) {
        const int i = i0 + u * (kFwdThreads / 32);
        if (ok[u]) {
          raw[u].load(K + static_cast<int64_t>(i) * a.key_row_stride + c0);
        } else {
          raw[u].zero();
        }
      }
      float w[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) w[v] = a.weight[c0 + v];
#pragma unroll
      for (int u = 0; u < kRowsPerWarp; ++u)
#pragma unroll
        for (int v = 0; v < VEC; ++v) dot[u] = fmaf(w[v], raw[u].get(v), dot[u]);
    }
    const float bias = a.bias ? a.bias[0] : 0.f;
#pragma unroll
    for (int u = 0; u < kRowsPerWarp; ++u) {
      const float s = warp_sum(dot[u]);
      const int i = i0 + u * (kFwdThreads / 32);
      if (lane == 0 && i < N) a.z[off + i] = ok[u] ? s + bias : 0.f;
    }
  }

  // ticket: the last block of image b continues with the per-image part
  __threadfence();
  __syncthreads();
  if (tid == 0) s_last = atomicAdd(a.counter + b, 1) == static_cast<int>(gridDim.x) - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  make_taps(taps, a.sigma, a.taps_half);
  __syncthreads();
  float* base = a.scratch ? a.scratch + off * 3 : reinterpret_cast<float*>(dyn_smem4);
  image_part(a, b, base, taps, fbuf, ibuf);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kGradThreads) key_grad_kernel(KeyGradArgs a) {
  __shared__ float s_gz[kGradRows];
  __shared__ float s_red[kGradThreads * VEC];
  const int b = blockIdx.y, tid = threadIdx.x, N = a.N, d = a.d;
  const int64_t off = static_cast<int64_t>(b) * N;
  const int i0 = blockIdx.x * kGradRows;

  // the block's gz; grad bias from warps 0 and 1 (64 values)
  if (tid < kGradRows) {
    const int i = i0 + tid;
    const float gz = i < N ? a.gz[off + i] : 0.f;
    s_gz[tid] = gz;
    const float s = warp_sum(gz);
    if ((tid & 31) == 0) atomicAdd(a.gw + d, s);
  }
  __syncthreads();

  // rows: thread (grp, cv) handles columns [cv*VEC, cv*VEC + VEC) of rows grp, grp + G, ...
  const int CV = (d + VEC - 1) / VEC;
  const int G = kGradThreads / CV;  // >= 1 (checked by the launcher)
  const int grp = tid / CV, cv = tid - grp * CV;
  const int col = cv * VEC;
  const bool active = grp < G;
  float wv[VEC], gwp[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    wv[v] = (active && col + v < d) ? a.weight[col + v] : 0.f;
    gwp[v] = 0.f;
  }
  if (active) {
    const T* K = static_cast<const T*>(a.keys) + static_cast<int64_t>(b) * a.key_batch_stride + col;
    T* GX = static_cast<T*>(a.gx) + off * d + col;
    for (int rr0 = grp; rr0 < kGradRows; rr0 += kGradUnroll * G) {
      Raw<T, VEC> kr[kGradUnroll], gr[kGradUnroll];
#pragma unroll
      for (int u = 0; u < kGradUnroll; ++u) {
        const int rr = rr0 + u * G;
        const int i = i0 + rr;
        const float gz = (rr < kGradRows && i < N) ? s_gz[rr] : 0.f;
        kr[u].zero();
        gr[u].zero();
        if (gz != 0.f) {
          kr[u].load(K + static_cast<int64_t>(i) * a.key_row_stride);
          if (a.accumulate) gr[u].load(GX + static_cast<int64_t>(i) * d);
        }
      }
#pragma unroll
      for (int u = 0; u < kGradUnroll; ++u) {
        const int rr = rr0 + u * G;
        const int i = i0 + rr;
        if (rr >= kGradRows || i >= N) continue;
        const float gz = s_gz[rr];
        if (gz == 0.f && a.accumulate) continue;  // the row is unchanged
        float o[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          o[v] = fmaf(gz, wv[v], gr[u].get(v));
          gwp[v] = fmaf(gz, kr[u].get(v), gwp[v]);
        }
        store_vec<T, VEC>(GX + static_cast<int64_t>(i) * d, o);
      }
    }
  }
  // grad weight: reduce the G row groups in shared memory, one atomic per column
#pragma unroll
  for (int v = 0; v < VEC; ++v) s_red[tid * VEC + v] = active ? gwp[v] : 0.f;
  __syncthreads();
  if (active && grp == 0) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      float s = 0.f;
      for (int q = 0; q < G; ++q) s += s_red[(q * CV + cv) * VEC + v];
      if (col + v < d) atomicAdd(a.gw + col + v, s);
    }
  }
}

template <typename T, int VEC>
cudaError_t launch_fused_fwd(const FusedFwdArgs& a, int smem_limit, cudaStream_t stream) {
  const size_t smem = a.scratch ? 0 : fused_forward_smem_bytes(a.N);
  if (smem > 48 * 1024) {
    static bool raised = false;  // per instantiation; the limit is the device's opt-in maximum
    if (!raised) {
      cudaError_t e = cudaFuncSetAttribute(fused_fwd_kernel<T, VEC>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           smem_limit);
      if (e != cudaSuccess) return e;
      raised = true;
    }
  }
  const dim3 grid((a.N + kRows - 1) / kRows, a.B);
  fused_fwd_kernel<T, VEC><<<grid, kFwdThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_key_grad(const KeyGradArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kGradRows - 1) / kGradRows, a.B);
  key_grad_kernel<T, VEC><<<grid, kGradThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_t(const FusedFwdArgs& a, bool vec, int smem_limit, cudaStream_t stream) {
  return vec ? launch_fused_fwd<T, 16 / sizeof(T)>(a, smem_limit, stream)
             : launch_fused_fwd<T, 1>(a, smem_limit, stream);
}

template <typename T>
cudaError_t key_grad_t(const KeyGradArgs& a, bool vec, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if ((a.d + (vec ? kVec : 1) - 1) / (vec ? kVec : 1) > kGradThreads) return cudaErrorInvalidValue;
  return vec ? launch_key_grad<T, kVec>(a, stream) : launch_key_grad<T, 1>(a, stream);
}

}  // namespace

size_t fused_forward_smem_bytes(int N) { return static_cast<size_t>(N) * 12; }

cudaError_t fused_forward(const FusedFwdArgs& a, DType key_dtype, bool vec, int smem_limit,
                          cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if (!taps_ok(a.sigma, a.taps_half)) return cudaErrorInvalidValue;
  switch (key_dtype) {
    case DType::kFloat: return fwd_t<float>(a, vec, smem_limit, stream);
    case DType::kBFloat16: return fwd_t<__nv_bfloat16>(a, vec, smem_limit, stream);
    case DType::kHalf: return fwd_t<__half>(a, vec, smem_limit, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t key_grad(const KeyGradArgs& a, DType key_dtype, bool vec, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  switch (key_dtype) {
    case DType::kFloat: return key_grad_t<float>(a, vec, stream);
    case DType::kBFloat16: return key_grad_t<__nv_bfloat16>(a, vec, stream);
    case DType::kHalf: return key_grad_t<__half>(a, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace enact
