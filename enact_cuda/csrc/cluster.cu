// ENACT clustering: K'_j = sum_{i in j} w_i K_i with w = softmax of the smoothed information
// inside region j (spec §1.6), and its exact backward (spec §1.10):
//   dK_i = w_i G_j,
//   d smoothed_i = w_i (sum_t <G^t_j, X^t_i> - sum_{k in j} w_k sum_t <G^t_j, X^t_k>).
//
// Regions are given by region_index (B, N): ids 0..R_b-1 non-decreasing over an image's valid
// pixels in raster order, -1 on padding. Region r of image b therefore lies in the index range
// [start_r, end_r) (first pixel, last valid pixel + 1), where padding pixels may be interleaved
// (a region that wraps from one row's valid end into the next row).
//
// Kernels: (1) bounds: one block per image; start/end by atomicMin/Max over the few pixels
// whose left/right neighbour has another id, then the region softmax statistics (max, 1/sum)
// with one thread per region (the fused path computes the same arrays in fused.cu).
// (2) forward: one warp per (image, region, tensor, 32*VEC-column chunk), so a region's rows are
// read by several warps at once: the region's valid pixels are listed in shared memory 32 at a
// time (ballot), then up to U rows are loaded per lane (16-byte loads) before the first use.
// (3) backward: one warp per (image, region) for the region's pixels and the padding up to the
// next region; extra warps zero the trailing padding rows.
#include "common.cuh"
#include "enact.h"

namespace enact {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kThreads = kWarpsPerBlock * 32;
constexpr int kFwdRows = 8;  // rows in flight per lane in the forward

__global__ void cluster_bounds_kernel(const int64_t* __restrict__ ri,
                                      const float* __restrict__ sm, int N, int R,
                                      int* __restrict__ starts, int* __restrict__ ends,
                                      float* __restrict__ stats, int* __restrict__ counts) {
  __shared__ int cnt;
  const int b = blockIdx.x;
  const int64_t* r_b = ri + static_cast<int64_t>(b) * N;
  const float* s_b = sm + static_cast<int64_t>(b) * N;
  int* st = starts + static_cast<int64_t>(b) * R;
  int* en = ends + static_cast<int64_t>(b) * R;
  float* sts = stats + static_cast<int64_t>(b) * R * 2;
  if (threadIdx.x == 0) cnt = 0;
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    st[r] = N;
    en[r] = 0;
  }
  __syncthreads();
  int local_max = 0;
  for (int i = threadIdx.x; i < N; i += blockDim.x) {
    const int64_t r = r_b[i];
    if (r < 0 || r >= R) continue;
    const int64_t prev = i > 0 ? r_b[i - 1] : -2;
    const int64_t next = i + 1 < N ? r_b[i + 1] : -2;
    if (prev != r) atomicMin(&st[r], i);
    if (next != r) atomicMax(&en[r], i + 1);
    local_max = max(local_max, static_cast<int>(r) + 1);
  }
  atomicMax(&cnt, local_max);
  __syncthreads();
  const int c = cnt;
  if (threadIdx.x == 0) counts[b] = c;
  // region softmax statistics, one thread per region (regions are short; the bounds were
  // written with atomics, so read them from L2)
  for (int r = threadIdx.x; r < c; r += blockDim.x) {
    const int lo = __ldcg(st + r), hi = __ldcg(en + r);
    float mx = -INFINITY, sum = 0.f;
    for (int i = lo; i < hi; ++i) {
      if (r_b[i] != r) continue;
      const float s = s_b[i];
      if (s > mx) {
        sum = sum * expf(mx - s) + 1.f;
        mx = s;
      } else {
        sum += expf(s - mx);
      }
    }
    sts[2 * r] = mx;
    sts[2 * r + 1] = 1.f / sum;
  }
}

// Valid pixels of region r in [base, end) (end - base <= 32) -> shared list of (index, weight).
__device__ __forceinline__ int build_list(int base, int end, int64_t r,
                                          const int64_t* __restrict__ rib,
                                          const float* __restrict__ smb, float mx, float inv,
                                          int* sidx, float* sw, int lane) {
  __syncwarp();  // earlier readers of the list are done
  const int i = base + lane;
  const bool valid = i < end && rib[i] == r;
  const float w = valid ? expf(smb[i] - mx) * inv : 0.f;
  const unsigned m = __ballot_sync(ENACT_FULL_MASK, valid);
  if (valid) {
    const int pos = __popc(m & ((1u << lane) - 1u));
    sidx[pos] = i;
    sw[pos] = w;
  }
  __syncwarp();
  return __popc(m);
}

template <typename T, int VEC, int NCH>
__device__ __forceinline__ void zero_row(T* __restrict__ row, int d, int lane) {
  float z[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) z[v] = 0.f;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
    const int f = (c * 32 + lane) * VEC;
    if (f < d) store_vec<T, VEC>(row + f, z);
  }
}

// Forward: warp gw -> (region g = b * R + r, task k); task k -> (tensor t, column chunk c).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) cluster_fwd_kernel(ClusterFwdArgs a, int K) {
  constexpr int U = kFwdRows;
  __shared__ int s_idx[kWarpsPerBlock][32];
  __shared__ float s_w[kWarpsPerBlock][32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + wid;
  if (gw >= static_cast<int64_t>(a.B) * a.R * K) return;
  const int64_t g = gw / K;
  int c = static_cast<int>(gw - g * K);
  const int b = static_cast<int>(g / a.R), r = static_cast<int>(g - static_cast<int64_t>(b) * a.R);
  int t = 0;
  for (; t < a.n_tensors - 1; ++t) {
    const int nch = (a.d[t] + 32 * VEC - 1) / (32 * VEC);
    if (c < nch) break;
    c -= nch;
  }
  // the region's data: independent loads, issued together (in bounds since r < R <= S)
  const int64_t bs = static_cast<int64_t>(b) * a.S + r;
  const int cnt = a.counts[b];
  const int lo = a.starts[bs], hi = a.ends[bs];
  const float mx = a.stats[2 * bs], inv = a.stats[2 * bs + 1];

  const int d = a.d[t];
  const int col = (c * 32 + lane) * VEC;
  const bool has_col = col < d;
  if (a.kpm != nullptr && t == 0 && c == 0 && lane == 0)
    a.kpm[static_cast<int64_t>(b) * a.R + r] = r >= cnt;
  float acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) acc[v] = 0.f;
  if (r < cnt) {
    const T* X = static_cast<const T*>(a.x[t]) + static_cast<int64_t>(b) * a.x_batch_stride[t] + col;
    const int64_t xs = a.x_row_stride[t];
    const int64_t* rib = a.region_index + static_cast<int64_t>(b) * a.N;
    const float* smb = a.smoothed + static_cast<int64_t>(b) * a.N;
    int* sidx = s_idx[wid];
    float* sw = s_w[wid];
    for (int base = lo; base < hi; base += 32) {
      const int n = build_list(base, min(base + 32, hi), r, rib, smb, mx, inv, sidx, sw, lane);
      for (int k = 0; k < n; k += U) {
        Raw<T, VEC> raw[U];
        float w[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const bool ok = k + u < n;
          w[u] = ok ? sw[k + u] : 0.f;
          if (ok && has_col) {
            raw[u].load(X + static_cast<int64_t>(sidx[k + u]) * xs);
          } else {
            raw[u].zero();
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[v] = fmaf(w[u], raw[u].get(v), acc[v]);
      }
    }
  }
  if (has_col) {
    T* out = static_cast<T*>(a.out[t]) + (static_cast<int64_t>(b) * a.R + r) * d + col;
    store_vec<T, VEC>(out, acc);
  }
}

// rows in flight per lane in the backward: about 8 vector loads
template <int NCH>
struct Unroll {
  static constexpr int U = NCH >= 4 ? 2 : (NCH == 2 ? 4 : 8);
};

template <typename T, int VEC, int NCH>
__global__ void __launch_bounds__(kThreads)
    cluster_bwd_kernel(ClusterBwdArgs a, bool accumulate, bool finalize) {
  constexpr int U = Unroll<NCH>::U;
  __shared__ int s_idx[kWarpsPerBlock][32];
  __shared__ float s_w[kWarpsPerBlock][32];
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + wid;
  const int N = a.N;
  const int64_t region_warps = static_cast<int64_t>(a.B) * a.R;

  if (gw == 0 && a.zero_ptr != nullptr)
    for (int i = lane; i < a.zero_n; i += 32) a.zero_ptr[i] = 0.f;

  if (gw >= region_warps) {
    // trailing padding of an image (after its last region), 32 pixels per warp
    const int chunks = (N + 31) / 32;
    const int64_t t = gw - region_warps;
    if (t >= static_cast<int64_t>(a.B) * chunks) return;
    const int b = static_cast<int>(t / chunks);
    const int cnt = a.counts[b];
    const int tail0 = cnt > 0 ? a.ends[static_cast<int64_t>(b) * a.S + cnt - 1] : 0;
    const int lo = max(static_cast<int>(t % chunks) * 32, tail0);
    const int hi = min(static_cast<int>(t % chunks) * 32 + 32, N);
    for (int i = lo; i < hi; ++i)
      for (int tt = 0; tt < a.n_tensors; ++tt)
        zero_row<T, VEC, NCH>(static_cast<T*>(a.gx[tt]) + (static_cast<int64_t>(b) * N + i) * a.d[tt],
                              a.d[tt], lane);
    if (finalize && lo + lane < hi) a.grad_sm[static_cast<int64_t>(b) * N + lo + lane] = 0.f;
    return;
  }

  const int b = static_cast<int>(gw / a.R), r = static_cast<int>(gw % a.R);
  const int cnt = a.counts[b];
  if (r >= cnt) return;
  const int64_t bs = static_cast<int64_t>(b) * a.S;
  const int lo = a.starts[bs + r];
  const int hi = a.ends[bs + r];
  const int gap_hi = r + 1 < cnt ? a.starts[bs + r + 1] : hi;
  const int64_t* rib = a.region_index + static_cast<int64_t>(b) * N;
  const float* smb = a.smoothed + static_cast<int64_t>(b) * N;
  const float mx = a.stats[(bs + r) * 2];
  const float inv = a.stats[(bs + r) * 2 + 1];
  float* dots = a.dots + static_cast<int64_t>(b) * N;
  float* gsm = a.grad_sm + static_cast<int64_t>(b) * N;
  int* sidx = s_idx[wid];
  float* sw = s_w[wid];

  // This warp owns pixels [own_lo, gap_hi): the region and the padding up to the next region
  // (region 0 also owns any leading padding); the last region's trailing padding belongs to the
  // extra warps above.
  const int own_lo = r == 0 ? 0 : lo;
  float csum = 0.f;  // sum_k w_k dots_k over the region (valid in lane 0)
  for (int base = own_lo; base < gap_hi; base += 32) {
    const int end = min(base + 32, gap_hi);
    // padding inside [base, end): zero grad rows
    {
      const int i = base + lane;
      const unsigned pad = __ballot_sync(ENACT_FULL_MASK, i < end && rib[i] != r);
      for (unsigned m = pad; m; m &= m - 1) {
        const int ip = base + __ffs(m) - 1;
        for (int tt = 0; tt < a.n_tensors; ++tt)
          zero_row<T, VEC, NCH>(static_cast<T*>(a.gx[tt]) + (static_cast<int64_t>(b) * N + ip) * a.d[tt],
                                a.d[tt], lane);
      }
    }
    const int n = build_list(base, min(end, hi), r, rib, smb, mx, inv, sidx, sw, lane);
    for (int k = 0; k < n; k += U) {
      int idx[U];
      float w[U], pd[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool ok = k + u < n;
        idx[u] = ok ? sidx[k + u] : -1;
        w[u] = ok ? sw[k + u] : 0.f;
        pd[u] = 0.f;
      }
      for (int tt = 0; tt < a.n_tensors; ++tt) {
        const int d = a.d[tt];
        const int64_t xs = a.x_row_stride[tt];
        const T* G = static_cast<const T*>(a.g[tt]) + (static_cast<int64_t>(b) * a.R + r) * d;
        const T* X = static_cast<const T*>(a.x[tt]) + static_cast<int64_t>(b) * a.x_batch_stride[tt];
        T* GX = static_cast<T*>(a.gx[tt]) + static_cast<int64_t>(b) * N * d;
        float g[NCH][VEC];
        float x[U][NCH][VEC];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
          const int f = (c * 32 + lane) * VEC;
          if (f < d) {
            load_vec<T, VEC>(G + f, g[c]);
          } else {
#pragma unroll
            for (int v = 0; v < VEC; ++v) g[c][v] = 0.f;
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            const int f = (c * 32 + lane) * VEC;
            if (idx[u] >= 0 && f < d) {
              load_vec<T, VEC>(X + static_cast<int64_t>(idx[u]) * xs + f, x[u][c]);
            } else {
#pragma unroll
              for (int v = 0; v < VEC; ++v) x[u][c][v] = 0.f;
            }
          }
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
          for (int c = 0; c < NCH; ++c) {
            float o[VEC];
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
              o[v] = w[u] * g[c][v];
              pd[u] = fmaf(g[c][v], x[u][c][v], pd[u]);
            }
            const int f = (c * 32 + lane) * VEC;
            if (idx[u] >= 0 && f < d)
              store_vec<T, VEC>(GX + static_cast<int64_t>(idx[u]) * d + f, o);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) pd[u] = warp_sum(pd[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (idx[u] < 0) continue;
        float dot = pd[u];
        if (accumulate) dot += dots[idx[u]];
        if (lane == 0) dots[idx[u]] = dot;
        csum = fmaf(w[u], dot, csum);
      }
    }
  }
  if (!finalize) return;
  csum = __shfl_sync(ENACT_FULL_MASK, csum, 0);
  __syncwarp();
  for (int i = own_lo + lane; i < gap_hi; i += 32)
    gsm[i] = (rib[i] == r) ? expf(smb[i] - mx) * inv * (dots[i] - csum) : 0.f;
}

// chunks of 32 * VEC elements needed for the widest tensor -> kernel template NCH
int chunks_needed(const int* d, int n, int vec) {
  int mx = 0;
  for (int t = 0; t < n; ++t) mx = max(mx, (d[t] + 32 * vec - 1) / (32 * vec));
  return mx;
}

// warp tasks per region: column chunks summed over the tensors
int tasks_per_region(const int* d, int n, int vec) {
  int k = 0;
  for (int t = 0; t < n; ++t) k += (d[t] + 32 * vec - 1) / (32 * vec);
  return k;
}

template <typename T, int VEC>
cudaError_t launch_fwd_v(const ClusterFwdArgs& a, cudaStream_t stream) {
  const int K = tasks_per_region(a.d, a.n_tensors, VEC);
  const int64_t warps = static_cast<int64_t>(a.B) * a.R * K;
  const int64_t blocks = (warps + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  cluster_fwd_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, K);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_bwd_v(const ClusterBwdArgs& a, int blocks, bool acc, bool fin,
                         cudaStream_t stream) {
  const int nch = chunks_needed(a.d, a.n_tensors, VEC);
  if (nch <= 1) cluster_bwd_kernel<T, VEC, 1><<<blocks, kThreads, 0, stream>>>(a, acc, fin);
  else if (nch <= 2) cluster_bwd_kernel<T, VEC, 2><<<blocks, kThreads, 0, stream>>>(a, acc, fin);
  else if (nch <= 4) cluster_bwd_kernel<T, VEC, 4><<<blocks, kThreads, 0, stream>>>(a, acc, fin);
  else if (nch <= 8) cluster_bwd_kernel<T, VEC, 8><<<blocks, kThreads, 0, stream>>>(a, acc, fin);
  else return cudaErrorInvalidValue;
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fwd(const ClusterFwdArgs& a, bool vec, cudaStream_t stream) {
  return vec ? launch_fwd_v<T, 16 / sizeof(T)>(a, stream) : launch_fwd_v<T, 1>(a, stream);
}

template <typename T>
cudaError_t launch_bwd(const ClusterBwdArgs& a, bool vec, bool acc, bool fin, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(a.B) * a.R + static_cast<int64_t>(a.B) * ((a.N + 31) / 32);
  const int blocks = static_cast<int>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (blocks == 0) return cudaSuccess;
  return vec ? launch_bwd_v<T, 16 / sizeof(T)>(a, blocks, acc, fin, stream)
             : launch_bwd_v<T, 1>(a, blocks, acc, fin, stream);
}

}  // namespace

cudaError_t cluster_bounds(const int64_t* region_index, const float* smoothed, int B, int N,
                           int R, int* starts, int* ends, float* stats, int* counts,
                           cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  cluster_bounds_kernel<<<B, 512, 0, stream>>>(region_index, smoothed, N, R, starts, ends, stats,
                                               counts);
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
