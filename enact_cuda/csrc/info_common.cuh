// Device helpers shared by the information/regions kernels (info.cu) and the fused ENACT
// kernels (fused.cu): the paper's Gaussian taps, the same-length zero-padded smoothing of a
// compact sequence, the curvature step, and the block-wide steps of the per-image forward
// (compaction of the valid pixels, information, smoothing, region ids), run by one whole block
// per image on the compact sequence of its valid pixels.
#pragma once

#include "common.cuh"

namespace enact {

constexpr int kMaxTapHalf = 192;  // T <= 3 * sigma <= 192  (sigma <= 64)

// Host check of (sigma, T): T = 3 sigma (the paper's 6 sigma + 1 taps) or 3 sigma - 1 (the
// official code's 6 sigma - 1).
__host__ __device__ inline bool taps_ok(int sigma, int T) {
  return sigma >= 1 && 3 * sigma <= kMaxTapHalf && (T == 3 * sigma || T == 3 * sigma - 1);
}

// Taps g(t) = exp(-t^2 / (2 s^2)) / (s sqrt(2 pi)) for t = 0..T, computed in double and
// rounded to float (as the torch backend does), written to shared memory. Callers sync after.
__device__ __forceinline__ void make_taps(float* taps, int sigma, int T) {
  const double s = static_cast<double>(sigma);
  const double norm = s * 2.5066282746310002;  // s * sqrt(2 pi)
  for (int t = threadIdx.x; t <= T; t += blockDim.x) {
    const double td = static_cast<double>(t);
    taps[t] = static_cast<float>(exp(-td * td / (2.0 * s * s)) / norm);
  }
}

// Same-length zero-padded symmetric convolution at compact position j (also its own adjoint).
__device__ __forceinline__ float smooth_at(const float* h, const float* taps, int j, int L,
                                           int T) {
  const int lo = max(-T, -j), hi = min(T, L - 1 - j);
  float acc = 0.f;
  for (int t = lo; t <= hi; ++t) acc = fmaf(taps[t < 0 ? -t : t], h[j + t], acc);
  return acc;
}

// step = curvature > 0 with curvature (2 s_j - s_{j-1}) - s_{j+1}, zero padded.
__device__ __forceinline__ bool step_at(const float* s, int j, int L) {
  const float left = j > 0 ? s[j - 1] : 0.f;
  const float right = j + 1 < L ? s[j + 1] : 0.f;
  const float c = __fsub_rn(__fsub_rn(2.f * s[j], left), right);
  return c > 0.f;
}

// Step 1 (block-wide): compaction of one image's valid pixels (m: its padding mask or null) in
// raster order: valid(j, pixel) for compact position j < L, padding(pixel) for the others.
// Returns L; first_row = valid pixels of the first image row (W pixels wide; counted with
// row_breaks only). Ends with a __syncthreads.
template <typename Valid, typename Padding>
__device__ __forceinline__ int compact_pixels(int N, const bool* m, bool row_breaks, int W,
                                              int* ibuf, int& first_row, Valid valid,
                                              Padding padding) {
  const int tid = threadIdx.x, nt = blockDim.x;
  int L = 0;
  first_row = 0;
  for (int i0 = 0; i0 < N; i0 += nt) {
    const int i = i0 + tid;
    const bool ok = i < N && !(m && m[i]);
    int total;
    const int incl = block_inclusive_scan(ok ? 1 : 0, ibuf, total);
    if (ok) {
      valid(L + incl - 1, i);
    } else if (i < N) {
      padding(i);
    }
    if (row_breaks && i0 < W) first_row += __syncthreads_count(ok && i < W);
    L += total;
  }
  __syncthreads();
  return L;
}

// Step 1 of the forward: cidx[j] = pixel, hb[j] = load(pixel); padding pixels get information
// 0 (info_out may be null), smoothed 0 and region -1.
template <typename Load>
__device__ __forceinline__ int compact_image(int N, const bool* m, bool row_breaks, int W,
                                             Load load, int* cidx, float* hb, float* info_out,
                                             float* sm_out, int64_t* reg_out, int* ibuf,
                                             int& first_row) {
  return compact_pixels(
      N, m, row_breaks, W, ibuf, first_row,
      [&](int j, int i) {
        cidx[j] = i;
        hb[j] = load(i);
      },
      [&](int i) {
        if (info_out) info_out[i] = 0.f;
        sm_out[i] = 0.f;
        reg_out[i] = -1;
      });
}

// Block-wide softmax statistics of x[0, L): mx = max x, sum = sum exp(x - mx). Ends synced.
__device__ __forceinline__ void block_softmax_stats(const float* x, int L, float* fbuf,
                                                    float& mx, float& sum) {
  const int tid = threadIdx.x, nt = blockDim.x;
  mx = -INFINITY;
  for (int j = tid; j < L; j += nt) mx = fmaxf(mx, x[j]);
  mx = block_max(mx, fbuf);
  sum = 0.f;
  for (int j = tid; j < L; j += nt) sum += expf(x[j] - mx);
  sum = block_sum(sum, fbuf);
}

// Step 2 (block-wide): the information of the compact logits hb[0, L) in place,
// p = softmax(hb) + 1e-8, hb = -p log2 p, also written to out[cidx[j]]. Ends synced.
__device__ __forceinline__ void information_in_place(float* hb, int L, const int* cidx,
                                                     float* out, float* fbuf) {
  const int tid = threadIdx.x, nt = blockDim.x;
  float mx, sum;
  block_softmax_stats(hb, L, fbuf, mx, sum);
  for (int j = tid; j < L; j += nt) {
    const float p = expf(hb[j] - mx) / sum + 1e-8f;
    const float h = -p * log2f(p);
    hb[j] = h;
    out[cidx[j]] = h;
  }
  __syncthreads();
}

// Step 3 (block-wide): sb = gauss * hb (compact, taps -T..T), also written to out[cidx[j]].
// Ends synced.
__device__ __forceinline__ void smooth_compact(const float* hb, float* sb, const float* taps,
                                               int L, int T, const int* cidx, float* out) {
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const float s = smooth_at(hb, taps, j, L, T);
    sb[j] = s;
    out[cidx[j]] = s;
  }
  __syncthreads();
}

// Step 4 (block-wide): regions = runs of equal curvature step of the smoothed sb[0, L) (with
// row_breaks also a new region at every multiple of width); store(j, region id) for every
// compact position. Returns the number of regions (the same in every thread).
template <typename Store>
__device__ __forceinline__ int region_ids(const float* sb, int L, bool row_breaks, int width,
                                          int* ibuf, Store store) {
  int regions = 0;
  for (int j0 = 0; j0 < L; j0 += blockDim.x) {
    const int j = j0 + threadIdx.x;
    int start = 0;
    if (j < L) {
      if (j == 0) {
        start = 1;
      } else {
        start = step_at(sb, j, L) != step_at(sb, j - 1, L);
        if (row_breaks && (j % width) == 0) start = 1;
      }
    }
    int total;
    const int incl = block_inclusive_scan(start, ibuf, total);
    if (j < L) store(j, regions + incl - 1);
    regions += total;
  }
  return regions;
}

}  // namespace enact
