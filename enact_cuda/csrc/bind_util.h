// Helpers shared by the extension's C++ translation units (bindings.cpp, fused_bindings.cpp):
// error checks, dtype mapping, device attributes, tensor checks. Header-only, internal linkage.
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

}  // namespace
