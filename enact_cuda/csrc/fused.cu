// Fused ENACT clustering path: the W_prob logits, information, smoothing, curvature, regions,
// region bounds and region softmax statistics in ONE forward launch, and the information part
// of the backward (grad z -> grad keys, grad W_prob) in one launch after cluster_backward.
//
// Forward (fused_fwd_kernel, grid (chunks, B), 512 threads):
//   every block: z_i = <keys_i, w> + bias for kRows pixels of image b (16 warps, kRowsPerWarp
//   rows each, loads in flight before use); then an atomic ticket per image: the LAST block of
//   image b to finish (all its z are then visible) runs the per-image part on the compact
//   sequence of the valid pixels in shared memory:
//     p = softmax(z), H = -(p+1e-8) log2 (p+1e-8), smoothed = gauss * H (same length, zero
//     padded), step = curvature > 0, regions = runs of equal step (row breaks optional),
//     bounds [start_r, end_r) and (max, 1/sum) of exp(smoothed) per region,
//     and for the backward: rank / cidx (pixel <-> compact position), the softmax max and sum,
//     a = gauss * (p dH/dp) so that sum_k p_k dH/dp_k (gauss * g)_k = sum_m g_m a_m
//     (the smoothing matrix is symmetric).
// Backward (fused_bwd_kernel; backward mode 0 of fused_bindings.cpp, NOT validated: a device
// diagnostic gave a wrong grad z for one image, so mode 1 is the default), with g = grad smoothed and
// dot_b = sum_m g_m a_m (sum of cluster_backward's per-region partials):
//   gz_i = p_i (dH/dp_i (gauss * g)_i - dot_b), then per pixel row
//   gx_i = [w_i G_{r_i} if the keys are clustered tensor 0] + gz_i w,
//   grad w += sum_i gz_i keys_i, grad bias += sum_i gz_i (block partials, atomics).
#include "common.cuh"
#include "enact.h"
#include "info_common.cuh"

namespace enact {
namespace {

constexpr int kFwdThreads = 512;
constexpr int kRowsPerWarp = 4;
constexpr int kRows = (kFwdThreads / 32) * kRowsPerWarp;  // 64 logits rows per block
constexpr int kBwdThreads = 256;
constexpr int kBwdRows = 64;  // pixels per backward block
constexpr int kBwdUnroll = 4;

template <typename T, int VEC>
struct RawVec {
  uint4 v;
  __device__ __forceinline__ void load(const T* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void zero() { v = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ float get(int i) const {
    return to_float(reinterpret_cast<const T*>(&v)[i]);
  }
};
template <typename T>
struct RawVec<T, 1> {
  T v;
  __device__ __forceinline__ void load(const T* p) { v = *p; }
  __device__ __forceinline__ void zero() { v = from_float<T>(0.f); }
  __device__ __forceinline__ float get(int) const { return to_float(v); }
};

// The per-image part of the forward, run by one whole block (all threads) for image b.
// base: 4N floats (shared memory or global scratch). taps synced by the caller.
__device__ __noinline__ void image_part(const FusedFwdArgs& a, int b, float* base,
                                        const float* taps, float* fbuf, int* ibuf) {
  const int N = a.N, tid = threadIdx.x, nt = blockDim.x, T = 3 * a.sigma;
  float* hb = base;                                  // z, then information, then region ids
  float* sb = base + N;                              // smoothed
  int* cidx = reinterpret_cast<int*>(base + 2 * N);  // compact -> pixel
  float* qb = base + 3 * N;                          // p dH/dp
  const int64_t off = static_cast<int64_t>(b) * N;
  const bool* m = a.mask ? a.mask + off : nullptr;

  // 1. compaction (+ padding outputs, + valid pixels of the first row for row breaks)
  int L = 0, first_row = 0;
  for (int i0 = 0; i0 < N; i0 += nt) {
    const int i = i0 + tid;
    const bool valid = i < N && !(m && m[i]);
    int total;
    const int incl = block_inclusive_scan(valid ? 1 : 0, ibuf, total);
    if (valid) {
      const int j = L + incl - 1;
      cidx[j] = i;
      hb[j] = __ldcg(a.z + off + i);  // written by other blocks: read from L2
      a.rank[off + i] = j;
    } else if (i < N) {
      a.info_out[off + i] = 0.f;
      a.smoothed_out[off + i] = 0.f;
      a.region_out[off + i] = -1;
      a.aux_a[off + i] = 0.f;
      a.rank[off + i] = -1;
    }
    if (a.row_breaks && i0 < a.W) first_row += __syncthreads_count(valid && i < a.W);
    L += total;
  }
  __syncthreads();

  // 2. information and p dH/dp
  float mx = -INFINITY;
  for (int j = tid; j < L; j += nt) mx = fmaxf(mx, hb[j]);
  mx = block_max(mx, fbuf);
  float sum = 0.f;
  for (int j = tid; j < L; j += nt) sum += expf(hb[j] - mx);
  sum = block_sum(sum, fbuf);
  for (int j = tid; j < L; j += nt) {
    const int i = cidx[j];
    a.cidx[off + j] = i;
    const float p = expf(hb[j] - mx) / sum;
    const float pt = p + 1e-8f;
    const float h = -pt * log2f(pt);
    hb[j] = h;
    qb[j] = p * (-(logf(pt) + 1.f) / kLn2);
    a.info_out[off + i] = h;
  }
  if (tid == 0) {
    a.softmax[2 * b] = mx;
    a.softmax[2 * b + 1] = sum;
    a.lengths[b] = L;
  }
  __syncthreads();

  // 3. smoothing, and the backward's a = gauss * q
  for (int j = tid; j < L; j += nt) {
    const int i = cidx[j];
    const float s = smooth_at(hb, taps, j, L, T);
    sb[j] = s;
    a.smoothed_out[off + i] = s;
    a.aux_a[off + i] = smooth_at(qb, taps, j, L, T);
  }
  __syncthreads();

  // 4. curvature, step, region starts, region ids (kept in hb as ints)
  int* rid = reinterpret_cast<int*>(hb);
  const int width = max(first_row, 1);
  int regions = 0;
  for (int j0 = 0; j0 < L; j0 += nt) {
    const int j = j0 + tid;
    int start = 0;
    if (j < L) {
      if (j == 0) {
        start = 1;
      } else {
        start = step_at(sb, j, L) != step_at(sb, j - 1, L);
        if (a.row_breaks && (j % width) == 0) start = 1;
      }
    }
    int total;
    const int incl = block_inclusive_scan(start, ibuf, total);
    if (j < L) {
      const int r = regions + incl - 1;
      rid[j] = r;
      a.region_out[off + cidx[j]] = r;
    }
    regions += total;
  }
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
      RawVec<T, VEC> raw[kRowsPerWarp];
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
  make_taps(taps, a.sigma);
  __syncthreads();
  float* base = a.scratch ? a.scratch + off * 4 : reinterpret_cast<float*>(dyn_smem4);
  image_part(a, b, base, taps, fbuf, ibuf);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBwdThreads) fused_bwd_kernel(FusedBwdArgs a) {
  __shared__ float taps[kMaxTapHalf + 1];
  __shared__ float fbuf[32];
  __shared__ float s_gz[kBwdRows];
  __shared__ float s_w[kBwdRows];
  __shared__ int s_r[kBwdRows];
  __shared__ float s_red[kBwdThreads * VEC];
  const int b = blockIdx.y, tid = threadIdx.x, N = a.N, d = a.d;
  const int64_t off = static_cast<int64_t>(b) * N;
  const int th = 3 * a.sigma;  // taps on each side
  make_taps(taps, a.sigma);

  // dot_b = sum_m g_m a_m (per-region partials of cluster_backward); block_sum syncs (taps too)
  float part = 0.f;
  for (int r = tid; r < a.R; r += kBwdThreads) part += a.dotp[static_cast<int64_t>(b) * a.R + r];
  const float dot_b = block_sum(part, fbuf);

  // grad z of the block's pixels (one thread each)
  const int i0 = blockIdx.x * kBwdRows;
  float gzs = 0.f;
  if (tid < kBwdRows) {
    const int i = i0 + tid;
    float gz = 0.f, w = 0.f;
    int r = -1;
    if (i < N) {
      const int j = a.rank[off + i];
      if (j >= 0) {
        const int L = a.lengths[b];
        const int* cb = a.cidx + off;
        const float* gs = a.grad_sm + off;
        const int lo = max(-th, -j), hi = min(th, L - 1 - j);
        float gh = 0.f;
        for (int t = lo; t <= hi; ++t) gh = fmaf(taps[t < 0 ? -t : t], gs[cb[j + t]], gh);
        const float p = expf(a.z[off + i] - a.softmax[2 * b]) / a.softmax[2 * b + 1];
        const float dh = -(logf(p + 1e-8f) + 1.f) / kLn2;
        gz = p * (dh * gh - dot_b);
        if (a.g0 != nullptr) {
          r = static_cast<int>(a.region_index[off + i]);
          const int64_t bs = static_cast<int64_t>(b) * a.S + r;
          w = expf(a.smoothed[off + i] - a.rstats[2 * bs]) * a.rstats[2 * bs + 1];
        }
      }
    }
    s_gz[tid] = gz;
    s_w[tid] = w;
    s_r[tid] = r;
    gzs = gz;
  }
  // grad bias: warps 0 and 1 hold the block's 64 values
  if (tid < kBwdRows) {
    const float s = warp_sum(gzs);
    if ((tid & 31) == 0) atomicAdd(a.gw + d, s);
  }
  __syncthreads();

  // rows: thread (grp, cv) handles columns [cv*VEC, cv*VEC + VEC) of rows grp, grp + G, ...
  const int CV = (d + VEC - 1) / VEC;
  const int G = kBwdThreads / CV;  // >= 1 (d <= 256 * VEC)
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
    const T* G0 = static_cast<const T*>(a.g0);
    T* GX = static_cast<T*>(a.gx) + off * d + col;
    for (int rr0 = grp; rr0 < kBwdRows; rr0 += kBwdUnroll * G) {
      RawVec<T, VEC> kr[kBwdUnroll], gr[kBwdUnroll];
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        const int rr = rr0 + u * G;
        const int i = i0 + rr;
        const bool row = rr < kBwdRows && i < N;
        const float gz = row ? s_gz[rr] : 0.f;
        const int r = row ? s_r[rr] : -1;
        if (gz != 0.f) {
          kr[u].load(K + static_cast<int64_t>(i) * a.key_row_stride);
        } else {
          kr[u].zero();
        }
        if (G0 != nullptr && r >= 0) {
          gr[u].load(G0 + (static_cast<int64_t>(b) * a.R + r) * d + col);
        } else {
          gr[u].zero();
        }
      }
#pragma unroll
      for (int u = 0; u < kBwdUnroll; ++u) {
        const int rr = rr0 + u * G;
        const int i = i0 + rr;
        if (rr >= kBwdRows || i >= N) continue;
        const float gz = s_gz[rr], w = s_w[rr];
        float o[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          o[v] = fmaf(w, gr[u].get(v), gz * wv[v]);
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
cudaError_t launch_fused_bwd(const FusedBwdArgs& a, cudaStream_t stream) {
  const dim3 grid((a.N + kBwdRows - 1) / kBwdRows, a.B);
  fused_bwd_kernel<T, VEC><<<grid, kBwdThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t fwd_t(const FusedFwdArgs& a, bool vec, int smem_limit, cudaStream_t stream) {
  return vec ? launch_fused_fwd<T, 16 / sizeof(T)>(a, smem_limit, stream)
             : launch_fused_fwd<T, 1>(a, smem_limit, stream);
}

template <typename T>
cudaError_t bwd_t(const FusedBwdArgs& a, bool vec, cudaStream_t stream) {
  return vec ? launch_fused_bwd<T, 16 / sizeof(T)>(a, stream) : launch_fused_bwd<T, 1>(a, stream);
}

}  // namespace

size_t fused_forward_smem_bytes(int N) { return static_cast<size_t>(N) * 16; }

cudaError_t fused_forward(const FusedFwdArgs& a, DType key_dtype, bool vec, int smem_limit,
                          cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if (a.sigma < 1 || 3 * a.sigma > kMaxTapHalf) return cudaErrorInvalidValue;
  switch (key_dtype) {
    case DType::kFloat: return fwd_t<float>(a, vec, smem_limit, stream);
    case DType::kBFloat16: return fwd_t<__nv_bfloat16>(a, vec, smem_limit, stream);
    case DType::kHalf: return fwd_t<__half>(a, vec, smem_limit, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t fused_backward(const FusedBwdArgs& a, DType key_dtype, bool vec, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  if ((a.d + (vec ? 16 / (key_dtype == DType::kFloat ? 4 : 2) : 1) - 1) /
          (vec ? 16 / (key_dtype == DType::kFloat ? 4 : 2) : 1) > kBwdThreads)
    return cudaErrorInvalidValue;
  switch (key_dtype) {
    case DType::kFloat: return bwd_t<float>(a, vec, stream);
    case DType::kBFloat16: return bwd_t<__nv_bfloat16>(a, vec, stream);
    case DType::kHalf: return bwd_t<__half>(a, vec, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace enact
