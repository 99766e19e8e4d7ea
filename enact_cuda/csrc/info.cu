// Fused information + smoothing + curvature + regions (forward) and its gradient (backward).
//
// One block per image. The image's valid pixels are compacted in raster order with a block
// scan (any padding pattern works); everything after that runs on the compact sequence of
// length L held in shared memory (or in a global scratch buffer when L does not fit):
//   mode 0 (logits): p = softmax(z over valid), p~ = p + 1e-8, H = -p~ log2 p~
//   smoothed = same-length zero-padded conv of H with the Gaussian taps t = -T..T
//     (T = 3 sigma: the paper's 6 sigma + 1 taps; 3 sigma - 1: the official code's 6 sigma - 1)
//   curvature = (2 s_j - s_{j-1}) - s_{j+1} (zero padded), step = curvature > 0
//   region start: j == 0, step change, or (row_breaks) j % valid_width == 0
//   region id = inclusive scan of starts - 1; counts = number of starts.
// Backward: grad H = (symmetric) conv of grad smoothed over the compact sequence (+ grad of
// the information output), entropy derivative -(ln p~ + 1)/ln 2, softmax Jacobian.
#include "common.cuh"
#include "enact.h"
#include "info_common.cuh"

namespace enact {
namespace {

constexpr int kInfoThreads = 512;

__global__ void __launch_bounds__(kInfoThreads) info_fwd_kernel(InfoFwdArgs a) {
  extern __shared__ float4 dyn_smem4[];
  __shared__ float taps[kMaxTapHalf + 1];
  __shared__ float fbuf[32];
  __shared__ int ibuf[32];

  const int b = blockIdx.x, N = a.N;
  const int T = a.taps_half;
  float* base = a.scratch ? a.scratch + static_cast<int64_t>(b) * 3 * N
                          : reinterpret_cast<float*>(dyn_smem4);
  float* hb = base;                                // compact input, then information
  float* sb = base + N;                            // compact smoothed
  int* cidx = reinterpret_cast<int*>(base + 2 * N);  // compact -> original index

  const float* x = a.x + static_cast<int64_t>(b) * N;
  const bool* m = a.mask ? a.mask + static_cast<int64_t>(b) * N : nullptr;
  float* info_out = a.info_out ? a.info_out + static_cast<int64_t>(b) * N : nullptr;
  float* sm_out = a.smoothed_out + static_cast<int64_t>(b) * N;
  int64_t* reg_out = a.region_out + static_cast<int64_t>(b) * N;

  make_taps(taps, a.sigma, T);

  int first_row;
  const int L = compact_image(N, m, a.row_breaks != 0, a.W, [&](int i) { return x[i]; }, cidx, hb,
                              info_out, sm_out, reg_out, ibuf, first_row);
  if (a.mode == 0) information_in_place(hb, L, cidx, info_out, fbuf);
  smooth_compact(hb, sb, taps, L, T, cidx, sm_out);
  const int regions = region_ids(sb, L, a.row_breaks != 0, max(first_row, 1), ibuf,
                                 [&](int j, int r) { reg_out[cidx[j]] = r; });
  if (threadIdx.x == 0) a.counts_out[b] = regions;
}

__global__ void __launch_bounds__(kInfoThreads) info_bwd_kernel(InfoBwdArgs a) {
  extern __shared__ float4 dyn_smem4[];
  __shared__ float taps[kMaxTapHalf + 1];
  __shared__ float fbuf[32];
  __shared__ int ibuf[32];

  const int b = blockIdx.x, N = a.N, tid = threadIdx.x, nt = blockDim.x;
  const int T = a.taps_half;
  float* base = a.scratch ? a.scratch + static_cast<int64_t>(b) * 4 * N
                          : reinterpret_cast<float*>(dyn_smem4);
  float* xb = base;                                  // compact input (then p)
  float* gsb = base + N;                             // compact grad smoothed
  float* gpb = base + 2 * N;                         // grad wrt p (mode 0)
  int* cidx = reinterpret_cast<int*>(base + 3 * N);

  const int64_t off = static_cast<int64_t>(b) * N;
  const float* x = a.x + off;
  const bool* m = a.mask ? a.mask + off : nullptr;
  const float* g_info = a.grad_info ? a.grad_info + off : nullptr;
  const float* g_sm = a.grad_sm ? a.grad_sm + off : nullptr;
  float* gx = a.grad_x + off;

  make_taps(taps, a.sigma, T);

  int first_row;  // unused: the backward needs no row breaks
  const int L = compact_pixels(
      N, m, false, 0, ibuf, first_row,
      [&](int j, int i) {
        cidx[j] = i;
        xb[j] = x[i];
        gsb[j] = g_sm ? g_sm[i] : 0.f;
      },
      [&](int i) { gx[i] = 0.f; });

  if (a.mode == 1) {  // regions from information: grad information = adjoint of smoothing
    for (int j = tid; j < L; j += nt) gx[cidx[j]] = g_sm ? smooth_at(gsb, taps, j, L, T) : 0.f;
    return;
  }

  float mx, sum;
  block_softmax_stats(xb, L, fbuf, mx, sum);

  float dot = 0.f;
  for (int j = tid; j < L; j += nt) {
    const int i = cidx[j];
    float gh = g_sm ? smooth_at(gsb, taps, j, L, T) : 0.f;
    if (g_info) gh += g_info[i];
    const float p = expf(xb[j] - mx) / sum;
    const float gp = gh * (-(logf(p + 1e-8f) + 1.f) / kLn2);
    xb[j] = p;  // only this thread reads xb[j] from here on
    gpb[j] = gp;
    dot += p * gp;
  }
  dot = block_sum(dot, fbuf);  // contains __syncthreads
  for (int j = tid; j < L; j += nt) gx[cidx[j]] = xb[j] * (gpb[j] - dot);
}

}  // namespace

size_t info_forward_smem_bytes(int N, int /*sigma*/) { return static_cast<size_t>(N) * 12; }
size_t info_backward_smem_bytes(int N, int /*sigma*/) { return static_cast<size_t>(N) * 16; }

cudaError_t info_forward(const InfoFwdArgs& a, int smem_limit, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (!taps_ok(a.sigma, a.taps_half)) return cudaErrorInvalidValue;
  const size_t smem = a.scratch ? 0 : info_forward_smem_bytes(a.N, a.sigma);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(info_fwd_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
    if (e != cudaSuccess) return e;
  }
  info_fwd_kernel<<<a.B, kInfoThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

cudaError_t info_backward(const InfoBwdArgs& a, int smem_limit, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  if (!taps_ok(a.sigma, a.taps_half)) return cudaErrorInvalidValue;
  const size_t smem = a.scratch ? 0 : info_backward_smem_bytes(a.N, a.sigma);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(info_bwd_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, smem_limit);
    if (e != cudaSuccess) return e;
  }
  info_bwd_kernel<<<a.B, kInfoThreads, smem, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace enact
