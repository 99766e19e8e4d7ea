// Device helpers shared by the information/regions kernels (info.cu) and the fused ENACT
// kernels (fused.cu): the paper's Gaussian taps, the same-length zero-padded smoothing of a
// compact sequence, and the curvature step.
#pragma once

#include "common.cuh"

namespace enact {

constexpr int kMaxTapHalf = 192;  // 3 * sigma <= 192  (sigma <= 64)

// Taps g(t) = exp(-t^2 / (2 s^2)) / (s sqrt(2 pi)) for t = 0..3s, computed in double and
// rounded to float (as the torch backend does), written to shared memory. Callers sync after.
__device__ __forceinline__ void make_taps(float* taps, int sigma) {
  const int T = 3 * sigma;
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

}  // namespace enact
