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
constexpr int kBN = 32;  // keys per shared tile (two tiles staged)
constexpr int kQPT = 2;  // query rows per TP-thread group (kQPT * kThreads / TP per block)
constexpr int kKC = 8;   // keys per online-softmax step

// Each TP-thread group owns QPT query rows, so that every key / value row read from shared
// memory serves QPT queries (its shared-memory reads rather than its FMAs seem to limit this
// kernel: halving them per query row is what made it faster); KC keys per online-softmax
// step. QPT = 2, KC = 8: 1.2-1.5x faster than one row per group on an H200 (fp32, Anchor /
// DETR shapes), at 159-241 registers.
template <typename T, int E, int EV, bool DROP, int QPT, int KC>
__global__ void __launch_bounds__(kThreads, capped_min_blocks<E, EV>())
    attn_fwd_kernel(AttnArgs a, DropoutParams dp) {
  using P = AttnParts<E, EV>;
  using LayK = typename P::LayK;
  using LayV = typename P::LayV;
  constexpr int TP = P::TP, WK = P::WK, WV = P::WV, G = kThreads / TP, BM = G * QPT;
  __shared__ __align__(16) float Ks[2][kBN * LayK::RS];
  __shared__ __align__(16) float Vs[2][kBN * LayV::RS];

  const auto [bh, b, h, Lk] = block_head(a);
  const int tid = threadIdx.x, part = tid % TP;
  const auto load = key_value_loader<T, LayK, LayV, kBN, kThreads>(Ks, Vs, a, b, h);

  const float c = a.scale * kLog2e;  // scores in log2 units
  float q[QPT][WK], o[QPT][WV], m[QPT], l[QPT];
  uint32_t rk[QPT];
#pragma unroll
  for (int r = 0; r < QPT; ++r) {
    const int qi = blockIdx.x * BM + r * G + tid / TP;
    load_part_or_zero<T, WK>(qi < a.N, head_row<T>(a.q, a.sq, b, h, qi) + part * WK, q[r]);
#pragma unroll
    for (int e = 0; e < WK; ++e) q[r][e] *= c;
    fill<WV>(o[r], 0.f);
    m[r] = -INFINITY;
    l[r] = 0.f;
    rk[r] = DROP ? dropout_row_key(a.seed, static_cast<uint64_t>(query_row(a, bh, qi))) : 0u;
  }

  for_each_staged_tile<kBN>(0, Lk, load, [&](int stage, int kt, int nk) {
    for (int c0 = 0; c0 < nk; c0 += KC) {
      float s[QPT][KC];
#pragma unroll
      for (int j = 0; j < KC; ++j) {
        const float* krow = Ks[stage] + (c0 + j) * LayK::RS + part * LayK::PW;
#pragma unroll
        for (int r = 0; r < QPT; ++r) s[r][j] = dot_part<WK>(q[r], krow);
      }
      float alpha[QPT];
#pragma unroll
      for (int r = 0; r < QPT; ++r) {
        float cm = -INFINITY;
#pragma unroll
        for (int j = 0; j < KC; ++j) {
          s[r][j] = finish_dot<TP>(s[r][j]);
          if (c0 + j >= nk) s[r][j] = -INFINITY;
          cm = fmaxf(cm, s[r][j]);
        }
        const float mn = fmaxf(m[r], cm);
        alpha[r] = exp2f(m[r] - mn);
        m[r] = mn;
        l[r] *= alpha[r];
#pragma unroll
        for (int e = 0; e < WV; ++e) o[r][e] *= alpha[r];
      }
#pragma unroll
      for (int j = 0; j < KC; ++j) {
        const float* vrow = Vs[stage] + (c0 + j) * LayV::RS + part * LayV::PW;
#pragma unroll
        for (int r = 0; r < QPT; ++r) {
          float p = exp2f(s[r][j] - m[r]);
          l[r] += p;
          if (DROP) p = dropout_keep(rk[r], kt + c0 + j, dp.threshold) ? p * dp.inv_keep : 0.f;
          axpy_part<WV>(o[r], p, vrow);
        }
      }
    }
  });

#pragma unroll
  for (int r = 0; r < QPT; ++r) {
    const int qi = blockIdx.x * BM + r * G + tid / TP;
    if (qi >= a.N) continue;
    const float inv = Lk > 0 ? 1.f / l[r] : 0.f;
    store_part<T, WV>(head_row_out<T>(a.o_mut, a.so, b, h, qi) + part * WV, o[r], inv);
    if (part == 0) a.lse[query_row(a, bh, qi)] = Lk > 0 ? (m[r] + log2f(l[r])) * kLn2 : 0.f;
  }
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
    constexpr int BM = kThreads / RowThreads<E>::value * kQPT;
    const dim3 grid((a.N + BM - 1) / BM, a.B * a.H);
    if (a.dropout_p > 0.f)
      attn_fwd_kernel<T, E, EV, true, kQPT, kKC><<<grid, kThreads, 0, stream>>>(a, dp);
    else
      attn_fwd_kernel<T, E, EV, false, kQPT, kKC><<<grid, kThreads, 0, stream>>>(a, dp);
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
