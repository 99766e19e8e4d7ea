// ENACT clustering: K'_j = sum_{i in j} w_i K_i with w = softmax of the smoothed information
// inside region j (spec §1.6), and its exact backward (spec §1.10):
//   dK_i = w_i G_j,   d smoothed_i = w_i (sum_t <G^t_j, X^t_i> - sum_{k in j} w_k sum_t <G^t_j, X^t_k>).
//
// Regions are given by region_index (B, N): ids 0..R_b-1 non-decreasing over an image's valid
// pixels in raster order, -1 on padding. A region is therefore a contiguous range of original
// indices [start_r, start_{r+1}) in which padding pixels (-1) may be interleaved (a region that
// wraps from one row's valid end to the next row's start).
//
// Kernels: (1) starts: one block per image, first pixel of every region (atomicMin over the
// few candidate pixels whose left neighbour has another id); (2) forward: one warp per
// (image, region): region softmax statistics, then a weighted sum over the region's rows with
// 16-byte loads along d; (3) backward: one warp per (image, region), the grads of the inputs
// plus per-pixel dot products, then the region's grad of smoothed.
#include "common.cuh"
#include "enact.h"

namespace enact {
namespace {

constexpr int kWarpsPerBlock = 8;

__global__ void cluster_starts_kernel(const int64_t* __restrict__ ri, int N, int R,
                                      int* __restrict__ starts, int* __restrict__ counts) {
  __shared__ int cnt;
  const int b = blockIdx.x;
  const int64_t* r_b = ri + static_cast<int64_t>(b) * N;
  int* st = starts + static_cast<int64_t>(b) * (R + 1);
  if (threadIdx.x == 0) cnt = 0;
  for (int r = threadIdx.x; r <= R; r += blockDim.x) st[r] = N;
  __syncthreads();
  int local_max = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t r = r_b[i];
    if (r < 0 || r >= R) continue;
    const int64_t prev = i > 0 ? r_b[i - 1] : -2;
    if (prev != r) atomicMin(&st[r], i);
    local_max = max(local_max, static_cast<int>(r) + 1);
  }
  atomicMax(&cnt, local_max);
  __syncthreads();
  if (threadIdx.x == 0) counts[b] = cnt;
}

template <typename T, int VEC>
__device__ __forceinline__ void weighted_sum(const T* __restrict__ X, int64_t row_stride, int d,
                                             const float* __restrict__ wb, int lo, int hi,
                                             T* __restrict__ out, int lane) {
  for (int f = lane * VEC; f < d; f += 32 * VEC) {
    float acc[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
    int i = lo;
    for (; i + 4 <= hi; i += 4) {
      float w[4];
      float x[4][VEC];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        w[u] = wb[i + u];
        if (w[u] >= 0.f) {
          load_vec<T, VEC>(X + static_cast<int64_t>(i + u) * row_stride + f, x[u]);
        } else {
#pragma unroll
          for (int v = 0; v < VEC; ++v) x[u][v] = 0.f;
          w[u] = 0.f;
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w[u], x[u][v], acc[v]);
    }
    for (; i < hi; ++i) {
      const float w = wb[i];
      if (w >= 0.f) {
        float x[VEC];
        load_vec<T, VEC>(X + static_cast<int64_t>(i) * row_stride + f, x);
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w, x[v], acc[v]);
      }
    }
    store_vec<T, VEC>(out + f, acc);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    cluster_fwd_kernel(ClusterFwdArgs a) {
  const int lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gw >= static_cast<int64_t>(a.B) * a.R) return;
  const int b = static_cast<int>(gw / a.R), r = static_cast<int>(gw % a.R);
  const int N = a.N;

  if (r >= a.counts[b]) {  // padding cluster: zero rows
    for (int t = 0; t < a.n_tensors; ++t) {
      T* out = static_cast<T*>(a.out[t]) + (static_cast<int64_t>(b) * a.R + r) * a.d[t];
      for (int f = lane; f < a.d[t]; f += 32) out[f] = from_float<T>(0.f);
    }
    return;
  }
  const int* st = a.starts + static_cast<int64_t>(b) * (a.R + 1);
  const int lo = st[r], hi = st[r + 1];
  const int64_t* rib = a.region_index + static_cast<int64_t>(b) * N;
  const float* smb = a.smoothed + static_cast<int64_t>(b) * N;
  float* wb = a.w + static_cast<int64_t>(b) * N;

  // region softmax statistics (online max / sum per lane, then combined)
  float mx = -INFINITY, sum = 0.f;
  for (int i = lo + lane; i < hi; i += 32) {
    if (rib[i] != r) continue;
    const float s = smb[i];
    if (s > mx) {
      sum = sum * expf(mx - s) + 1.f;
      mx = s;
    } else {
      sum += expf(s - mx);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(ENACT_FULL_MASK, mx, o);
    const float s2 = __shfl_xor_sync(ENACT_FULL_MASK, sum, o);
    const float mn = fmaxf(mx, m2);
    sum = (mn == -INFINITY) ? 0.f : sum * expf(mx - mn) + s2 * expf(m2 - mn);
    mx = mn;
  }
  const float inv = 1.f / sum;
  for (int i = lo + lane; i < hi; i += 32)
    wb[i] = (rib[i] == r) ? expf(smb[i] - mx) * inv : -1.f;  // -1 marks padding in range
  __syncwarp();

  for (int t = 0; t < a.n_tensors; ++t) {
    const T* X = static_cast<const T*>(a.x[t]) + static_cast<int64_t>(b) * a.x_batch_stride[t];
    T* out = static_cast<T*>(a.out[t]) + (static_cast<int64_t>(b) * a.R + r) * a.d[t];
    weighted_sum<T, VEC>(X, a.x_row_stride[t], a.d[t], wb, lo, hi, out, lane);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    cluster_bwd_kernel(ClusterBwdArgs a, bool accumulate, bool finalize) {
  const int lane = threadIdx.x & 31;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
  if (gw >= static_cast<int64_t>(a.B) * a.R) return;
  const int b = static_cast<int>(gw / a.R), r = static_cast<int>(gw % a.R);
  const int N = a.N;
  const int cnt = a.counts[b];
  if (r >= max(cnt, 1)) return;
  // This warp owns pixels [lo, hi): its region plus the padding pixels around it, so every
  // pixel of the image (padding included) is written exactly once.
  const int* st = a.starts + static_cast<int64_t>(b) * (a.R + 1);
  const int lo = (r == 0) ? 0 : st[r];
  const int hi = (r + 1 < cnt) ? st[r + 1] : N;
  const int64_t* rib = a.region_index + static_cast<int64_t>(b) * N;
  const float* wb = a.w + static_cast<int64_t>(b) * N;
  float* dots = a.dots + static_cast<int64_t>(b) * N;
  float* gsm = a.grad_sm + static_cast<int64_t>(b) * N;

  float c = 0.f;  // sum_k w_k dots_k over the region (kept by lane 0)
  constexpr int U = 4;  // pixels in flight per step
  for (int i0 = lo; i0 < hi; i0 += U) {
    bool valid[U];
    float w[U], pd[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + u;
      valid[u] = i < hi && rib[i] == r;
      w[u] = valid[u] ? wb[i] : 0.f;
      pd[u] = 0.f;
    }
    for (int t = 0; t < a.n_tensors; ++t) {
      const int d = a.d[t];
      const T* G = static_cast<const T*>(a.g[t]) + (static_cast<int64_t>(b) * a.R + r) * d;
      const T* X = static_cast<const T*>(a.x[t]) + static_cast<int64_t>(b) * a.x_batch_stride[t];
      T* GX = static_cast<T*>(a.gx[t]) + static_cast<int64_t>(b) * N * d;
      const int64_t xs = a.x_row_stride[t];
      for (int f = lane * VEC; f < d; f += 32 * VEC) {
        float g[VEC];
        load_vec<T, VEC>(G + f, g);
        float x[U][VEC];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (valid[u]) {
            load_vec<T, VEC>(X + static_cast<int64_t>(i0 + u) * xs + f, x[u]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) x[u][v] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (i0 + u >= hi) continue;
          float o[VEC];
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            o[v] = w[u] * g[v];
            pd[u] = fmaf(g[v], x[u][v], pd[u]);
          }
          store_vec<T, VEC>(GX + static_cast<int64_t>(i0 + u) * d + f, o);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) pd[u] = warp_sum(pd[u]);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!valid[u]) continue;
      const int i = i0 + u;
      float dot = pd[u];
      if (accumulate) dot += dots[i];
      if (lane == 0) dots[i] = dot;
      c = fmaf(w[u], dot, c);
    }
  }
  if (!finalize) return;
  c = __shfl_sync(ENACT_FULL_MASK, c, 0);
  __syncwarp();
  for (int i = lo + lane; i < hi; i += 32)
    gsm[i] = (rib[i] == r) ? wb[i] * (dots[i] - c) : 0.f;
}

template <typename T>
cudaError_t launch_fwd(const ClusterFwdArgs& a, bool vec, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(a.B) * a.R;
  const int blocks = static_cast<int>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (blocks == 0) return cudaSuccess;
  if (vec)
    cluster_fwd_kernel<T, 16 / sizeof(T)><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(a);
  else
    cluster_fwd_kernel<T, 1><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const ClusterBwdArgs& a, bool vec, bool acc, bool fin,
                       cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(a.B) * a.R;
  const int blocks = static_cast<int>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (blocks == 0) return cudaSuccess;
  if (vec)
    cluster_bwd_kernel<T, 16 / sizeof(T)><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(a, acc, fin);
  else
    cluster_bwd_kernel<T, 1><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(a, acc, fin);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cluster_starts(const int64_t* region_index, int B, int N, int R, int* starts,
                           int* counts, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cluster_starts_kernel<<<B, 512, 0, stream>>>(region_index, N, R, starts, counts);
  return cudaGetLastError();
}

cudaError_t cluster_forward(const ClusterFwdArgs& a, DType dtype, bool vec, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_fwd<float>(a, vec, stream);
    case DType::kBFloat16: return launch_fwd<__nv_bfloat16>(a, vec, stream);
    case DType::kHalf: return launch_fwd<__half>(a, vec, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cluster_backward(const ClusterBwdArgs& a, DType dtype, bool vec, bool accumulate,
                             bool finalize, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat: return launch_bwd<float>(a, vec, accumulate, finalize, stream);
    case DType::kBFloat16: return launch_bwd<__nv_bfloat16>(a, vec, accumulate, finalize, stream);
    case DType::kHalf: return launch_bwd<__half>(a, vec, accumulate, finalize, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace enact
