// Fused clustered attention, forward: out = softmax(q k^T * scale) v per (image, head), keys
// limited to the image's clusters [0, R_b) (R_b = count of False in its key padding mask).
// Online softmax over key tiles in shared memory; the N x R weights are never stored.
// Also writes the log-sum-exp (natural log, of the scaled scores) for the backward pass.
// Optional attention dropout (counter-based hash, common.cuh): out = sum_j P_j M_j/(1-p) v_j.
// Images without clusters output zeros.
#include "attn_common.cuh"

namespace enact {
namespace {

constexpr int kThreads = 128;
constexpr int kBN = 64;  // keys per shared tile
constexpr int kKC = 16;  // keys per online-softmax step

template <typename T, int E, int EV, bool DROP>
__global__ void __launch_bounds__(kThreads) attn_fwd_kernel(AttnArgs a, DropoutParams dp) {
  using P = AttnParts<E, EV>;
  using LayK = typename P::LayK;
  using LayV = typename P::LayV;
  constexpr int TP = P::TP, WK = P::WK, WV = P::WV, BM = kThreads / TP;
  __shared__ __align__(16) float Ks[kBN * LayK::RS];
  __shared__ __align__(16) float Vs[kBN * LayV::RS];

  const auto [bh, b, h, Lk] = block_head(a);
  const int tid = threadIdx.x, part = tid % TP, qi = blockIdx.x * BM + tid / TP;
  const bool active = qi < a.N;
  const T* kb = head_row<T>(a.k, a.sk, b, h, 0);
  const T* vb = head_row<T>(a.v, a.sv, b, h, 0);

  const float c = a.scale * kLog2e;  // scores in log2 units
  float q[WK], o[WV];
  load_part_or_zero<T, WK>(active, head_row<T>(a.q, a.sq, b, h, qi) + part * WK, q);
#pragma unroll
  for (int e = 0; e < WK; ++e) q[e] *= c;
  fill<WV>(o, 0.f);
  float m = -INFINITY, l = 0.f;
  uint32_t rk = 0;
  if (DROP) rk = dropout_row_key(a.seed, static_cast<uint64_t>(query_row(a, bh, qi)));

  for (int kt = 0; kt < Lk; kt += kBN) {
    const int nk = min(kBN, Lk - kt);
    load_tile<T, LayK, kBN>(Ks, kb, a.sk[2], kt, nk);
    load_tile<T, LayV, kBN>(Vs, vb, a.sv[2], kt, nk);
    __syncthreads();
    for (int c0 = 0; c0 < nk; c0 += kKC) {
      float s[kKC];
#pragma unroll
      for (int j = 0; j < kKC; ++j)
        s[j] = dot_part<WK>(q, Ks + (c0 + j) * LayK::RS + part * LayK::PW);
      float cm = -INFINITY;
#pragma unroll
      for (int j = 0; j < kKC; ++j) {
        s[j] = finish_dot<TP>(s[j]);
        if (c0 + j >= nk) s[j] = -INFINITY;
        cm = fmaxf(cm, s[j]);
      }
      const float mn = fmaxf(m, cm);
      const float alpha = exp2f(m - mn);
      l *= alpha;
#pragma unroll
      for (int e = 0; e < WV; ++e) o[e] *= alpha;
#pragma unroll
      for (int j = 0; j < kKC; ++j) {
        float p = exp2f(s[j] - mn);
        l += p;
        if (DROP) p = dropout_keep(rk, kt + c0 + j, dp.threshold) ? p * dp.inv_keep : 0.f;
        axpy_part<WV>(o, p, Vs + (c0 + j) * LayV::RS + part * LayV::PW);
      }
      m = mn;
    }
    __syncthreads();
  }

  if (!active) return;
  const float inv = Lk > 0 ? 1.f / l : 0.f;
  store_part<T, WV>(head_row_out<T>(a.o_mut, a.so, b, h, qi) + part * WV, o, inv);
  if (part == 0) a.lse[query_row(a, bh, qi)] = Lk > 0 ? (m + log2f(l)) * kLn2 : 0.f;
}

__global__ void dropout_mask_kernel(uint8_t* out, int B, int H, int N, int R, uint32_t threshold,
                                    uint64_t seed) {
  const int64_t total = static_cast<int64_t>(B) * H * N * R;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / R;
    const int key = static_cast<int>(idx % R);
    out[idx] = dropout_keep(dropout_row_key(seed, static_cast<uint64_t>(row)), key, threshold);
  }
}

}  // namespace

DropoutParams make_dropout_params(float p) {
  DropoutParams d;
  const double t = static_cast<double>(p) * 4294967296.0;
  d.threshold = t >= 4294967295.0 ? 4294967295u : static_cast<uint32_t>(t + 0.5);
  d.inv_keep = p < 1.f ? 1.f / (1.f - p) : 0.f;
  return d;
}

cudaError_t attn_forward(const AttnArgs& a, DType dtype, cudaStream_t stream) {
  if (a.N == 0 || a.B * a.H == 0) return cudaSuccess;
  const DropoutParams dp = make_dropout_params(a.dropout_p);
  return dispatch_attn(dtype, a.E, a.EV, [&](auto tag, auto e, auto ev) {
    using T = typename decltype(tag)::type;
    constexpr int E = decltype(e)::value, EV = decltype(ev)::value;
    constexpr int BM = kThreads / RowThreads<E>::value;
    const dim3 grid((a.N + BM - 1) / BM, a.B * a.H);
    if (a.dropout_p > 0.f)
      attn_fwd_kernel<T, E, EV, true><<<grid, kThreads, 0, stream>>>(a, dp);
    else
      attn_fwd_kernel<T, E, EV, false><<<grid, kThreads, 0, stream>>>(a, dp);
    return cudaGetLastError();
  });
}

cudaError_t attn_dropout_mask(uint8_t* out, int B, int H, int N, int R, float p, uint64_t seed,
                              cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(B) * H * N * R;
  if (total == 0) return cudaSuccess;
  const int blocks = static_cast<int>((total + 255) / 256 < 4096 ? (total + 255) / 256 : 4096);
  dropout_mask_kernel<<<blocks, 256, 0, stream>>>(out, B, H, N, R, make_dropout_params(p).threshold,
                                                  seed);
  return cudaGetLastError();
}

}  // namespace enact
