// Shared device helpers for the enact_cuda kernels: warp/block reductions and scans, element
// conversions between storage types (float, bf16, half) and float, and 16-byte vector I/O.
// No torch headers here: the .cu files only see raw pointers (see enact.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#define ENACT_FULL_MASK 0xffffffffu

namespace enact {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------
// Element conversion
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// VEC consecutive elements <-> VEC floats. VEC * sizeof(T) must be 16 (one 16-byte access),
// or VEC == 1 (scalar path for unaligned / odd sizes). The pointer must be aligned to that.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector access must be 16 bytes");
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const float (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_float<T>(in[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector access must be 16 bytes");
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    *reinterpret_cast<uint4*>(p) = raw;
  }
}

// ---------------------------------------------------------------------------------------------
// Warp and block reductions / scans (blockDim.x a multiple of 32, <= 1024)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(ENACT_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(ENACT_FULL_MASK, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `buf` holds >= 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* buf) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) buf[wid] = v;
  __syncthreads();
  float t = lane < nw ? buf[lane] : 0.f;
  t = warp_sum(t);
  __syncthreads();  // buf may be reused right after
  return t;
}

__device__ __forceinline__ float block_max(float v, float* buf) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) buf[wid] = v;
  __syncthreads();
  float t = lane < nw ? buf[lane] : -INFINITY;
  t = warp_max(t);
  __syncthreads();
  return t;
}

// Block-wide inclusive scan of ints; `total` receives the block total. `buf` >= 32 ints.
__device__ __forceinline__ int block_inclusive_scan(int v, int* buf, int& total) {
  const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    int n = __shfl_up_sync(ENACT_FULL_MASK, v, o);
    if (lane >= o) v += n;
  }
  if (lane == 31) buf[wid] = v;
  __syncthreads();
  if (wid == 0) {
    int s = lane < nw ? buf[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      int n = __shfl_up_sync(ENACT_FULL_MASK, s, o);
      if (lane >= o) s += n;
    }
    buf[lane] = s;
  }
  __syncthreads();
  const int prefix = wid > 0 ? buf[wid - 1] : 0;
  total = buf[nw - 1];
  __syncthreads();
  return v + prefix;
}

// ---------------------------------------------------------------------------------------------
// Counter-based dropout RNG: a stateless 32-bit integer hash (Wellons' "lowbias32" constants)
// of (seed, attention row, key). The same (seed, b, h, query, key) always gives the same
// decision, so the backward pass recomputes the forward's mask without storing it.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// row = (b * H + h) * N + query
__device__ __forceinline__ uint32_t dropout_row_key(uint64_t seed, uint64_t row) {
  uint32_t s0 = static_cast<uint32_t>(seed), s1 = static_cast<uint32_t>(seed >> 32);
  uint32_t r0 = static_cast<uint32_t>(row), r1 = static_cast<uint32_t>(row >> 32);
  return mix32(r0 ^ mix32(s0 ^ mix32(r1 + 0x68e31da4U))) ^ s1;
}

// True = keep (probability 1 - p, with threshold = round(p * 2^32)).
__device__ __forceinline__ bool dropout_keep(uint32_t row_key, int key, uint32_t threshold) {
  return mix32(row_key + static_cast<uint32_t>(key) * 0x9e3779b9U) >= threshold;
}

// Raw storage of VEC elements (one 16-byte access, or one scalar): loads are issued into
// registers first and converted to float only when used, so many stay in flight cheaply.
template <typename T, int VEC>
struct Raw {
  uint4 v;
  __device__ __forceinline__ void load(const T* p) { v = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void zero() { v = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ float get(int i) const {
    return to_float(reinterpret_cast<const T*>(&v)[i]);
  }
};
template <typename T>
struct Raw<T, 1> {
  T v;
  __device__ __forceinline__ void load(const T* p) { v = *p; }
  __device__ __forceinline__ void zero() { v = from_float<T>(0.f); }
  __device__ __forceinline__ float get(int) const { return to_float(v); }
};

}  // namespace enact
