// Helpers shared by the extension's C++ translation units (bindings.cpp, fused_bindings.cpp):
// error checks, dtype mapping, device attributes, tensor checks, workspaces and the argument
// fields the clustering launches share. Header-only, internal linkage.
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>

#include "enact.h"

namespace {

#define ENACT_CHECK_CUDA(expr)                                                          \
  do {                                                                                  \
    cudaError_t _e = (expr);                                                            \
    TORCH_CHECK(_e == cudaSuccess, "enact_cuda: ", #expr, " failed: ", cudaGetErrorString(_e)); \
  } while (0)

inline int device_attr(cudaDeviceAttr attr, int device) {
  int v = 0;
  ENACT_CHECK_CUDA(cudaDeviceGetAttribute(&v, attr, device));
  return v;
}

// Shared memory a per-image kernel may take dynamically on `device`: the opt-in maximum per
// block (cached per device) less the `static_bytes` the kernel declares itself.
inline int dynamic_smem_limit(int device, int static_bytes) {
  static int cache[64] = {0};
  if (device >= 0 && device < 64) {
    if (cache[device] == 0)
      cache[device] = device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return cache[device] - static_bytes;
  }
  return device_attr(cudaDevAttrMaxSharedMemoryPerBlockOptin, device) - static_bytes;
}

// A global scratch of (B, cols * N) floats when a per-image working set of `bytes` does not
// fit in `limit` bytes of shared memory; undefined otherwise (the kernel uses shared memory).
inline at::Tensor scratch_if_needed(size_t bytes, int limit, int64_t B, int64_t cols, int64_t N,
                                    const at::TensorOptions& float_opts) {
  return bytes > static_cast<size_t>(limit) ? at::empty({B, cols * N}, float_opts) : at::Tensor();
}

inline float* float_ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

inline enact::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return enact::DType::kFloat;
    case at::kBFloat16: return enact::DType::kBFloat16;
    case at::kHalf: return enact::DType::kHalf;
    default: TORCH_CHECK(false, "enact_cuda: unsupported dtype ", t.scalar_type(),
                         " (float32, bfloat16 or float16)");
  }
}

inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "enact_cuda: ", name, " must be a CUDA tensor");
}

// sigma in [1, 64]; the Gaussian half-width taps_half = 3 sigma (paper) or 3 sigma - 1 (code).
inline void check_taps(int64_t sigma, int64_t taps_half) {
  TORCH_CHECK(sigma >= 1 && sigma <= 64, "enact_cuda: sigma must be in [1, 64]");
  TORCH_CHECK(taps_half == 3 * sigma || taps_half == 3 * sigma - 1,
              "enact_cuda: taps_half must be 3 sigma or 3 sigma - 1");
}

inline at::Tensor float_contig(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline std::optional<at::Tensor> check_mask(const std::optional<at::Tensor>& mask, int64_t B, int64_t N,
                                     const at::Tensor& ref) {
  if (!mask.has_value() || !mask->defined()) return std::nullopt;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "enact_cuda: padding_mask must be bool");
  TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) == N,
              "enact_cuda: padding_mask must be (B, N)");
  TORCH_CHECK(mask->device() == ref.device(), "enact_cuda: padding_mask on another device");
  return mask->contiguous();
}

inline bool vec_ok(const at::Tensor& t, int64_t vec) {
  // (B, N, d) with unit stride along d
  return t.size(2) % vec == 0 && t.stride(1) % vec == 0 && t.stride(0) % vec == 0 && aligned16(t);
}

inline at::Tensor prep_cluster_input(const at::Tensor& t, int64_t B, int64_t N, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 3 && t.size(0) == B && t.size(1) == N,
              "enact_cuda: cluster_tensors inputs must be (B, N, d)");
  dtype_of(t);
  const int64_t vec = 16 / t.element_size();
  // 16-byte path: d <= 256 * vec; scalar path (d not a multiple of vec): d <= 256
  TORCH_CHECK(t.size(2) <= (t.size(2) % vec == 0 ? 256 * vec : 256),
              "enact_cuda: cluster_tensors supports d <= ", 256 * vec, " (multiples of ", vec,
              ") or d <= 256, got ", t.size(2));
  if (t.stride(2) != 1 || (t.size(2) % vec == 0 && !vec_ok(t, vec))) return t.contiguous();
  return t;
}

// The region fields shared by enact::ClusterFwdArgs and enact::ClusterBwdArgs (enact.h), and
// the launch sizes.
template <typename Args>
inline void set_regions(Args& a, const float* smoothed, const int64_t* region_index,
                        const int* starts, const int* ends, const float* stats, const int* counts,
                        int64_t S, int64_t B, int64_t N, int64_t R) {
  a.smoothed = smoothed;
  a.region_index = region_index;
  a.starts = starts;
  a.ends = ends;
  a.stats = stats;
  a.counts = counts;
  a.S = S;
  a.B = static_cast<int>(B);
  a.N = static_cast<int>(N);
  a.R = static_cast<int>(R);
}

// The size, smoothing and region-scan fields shared by enact::InfoFwdArgs and
// enact::FusedFwdArgs (enact.h).
template <typename Args>
inline void set_scan(Args& a, int64_t B, int64_t N, int64_t sigma, int64_t taps_half,
                     bool row_breaks, int64_t W) {
  a.B = static_cast<int>(B);
  a.N = static_cast<int>(N);
  a.sigma = static_cast<int>(sigma);
  a.taps_half = static_cast<int>(taps_half);
  a.row_breaks = row_breaks ? 1 : 0;
  a.W = static_cast<int>(W);
}

// Input slot k of a clustering launch: x (B, N, d_t) with unit stride along d. Returns whether
// x allows the kernels' 16-byte accesses.
template <typename Args>
inline bool set_cluster_input(Args& a, int k, const at::Tensor& x) {
  a.x[k] = x.data_ptr();
  a.x_row_stride[k] = x.stride(1);
  a.x_batch_stride[k] = x.stride(0);
  a.d[k] = static_cast<int>(x.size(2));
  return vec_ok(x, 16 / x.element_size());
}

}  // namespace
