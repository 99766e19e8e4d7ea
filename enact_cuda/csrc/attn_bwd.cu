// Fused clustered attention, backward (FlashAttention-style recomputation from q, k, v, LSE).
// With S = scale q k^T, P = softmax(S) (keys [0, R_b)), M the dropout keep mask / (1 - p):
//   D_i  = sum_e dO_ie O_ie                 (= sum_j P_ij M_ij dP'_ij)
//   dP_ij = M_ij <dO_i, v_j>,  dS_ij = P_ij (dP_ij - D_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij M_ij dO_i
// Kernel 1 (query-major, one query per TP threads): D and dq, no atomics.
// Kernel 2 (key-major, one key per TP threads, queries split over gridDim.z): dk and dv,
// fp32 atomics into zero-initialised buffers when the queries are split.
#include <algorithm>

#include "attn_common.cuh"

namespace enact {
namespace {

constexpr int kThreads = 128;
constexpr int kBN = 64;  // keys per shared tile (dq kernel)
constexpr int kBQ = 64;  // queries per shared tile (dk/dv kernel)

template <typename T, int E, int EV, bool DROP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(AttnArgs a, DropoutParams dp) {
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

  const float c = a.scale * kLog2e;
  float q[WK], g[WV], acc[WK];
  load_part_or_zero<T, WK>(active, head_row<T>(a.q, a.sq, b, h, qi) + part * WK, q);
  load_part_or_zero<T, WV>(active, head_row<T>(a.dout, a.sdo, b, h, qi) + part * WV, g);
  float D = 0.f, lse2 = 0.f;
  if (active) {
    float o[WV];  // D = <dO, O>
    load_part<T, WV>(head_row<T>(a.o, a.so, b, h, qi) + part * WV, o);
#pragma unroll
    for (int e = 0; e < WV; ++e) D = fmaf(g[e], o[e], D);
    lse2 = a.lse[query_row(a, bh, qi)] * kLog2e;
  }
  D = finish_dot<TP>(D);
  if (active && part == 0) a.delta[query_row(a, bh, qi)] = D;
#pragma unroll
  for (int e = 0; e < WK; ++e) q[e] *= c;
  fill<WK>(acc, 0.f);
  uint32_t rk = 0;
  if (DROP) rk = dropout_row_key(a.seed, static_cast<uint64_t>(query_row(a, bh, qi)));

  for (int kt = 0; kt < Lk; kt += kBN) {
    const int nk = min(kBN, Lk - kt);
    load_tile<T, LayK, kBN>(Ks, kb, a.sk[2], kt, nk);
    load_tile<T, LayV, kBN>(Vs, vb, a.sv[2], kt, nk);
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < nk; ++j) {
      const float* krow = Ks + j * LayK::RS + part * LayK::PW;
      const float sj = finish_dot<TP>(dot_part<WK>(q, krow));
      const float dpv = finish_dot<TP>(dot_part<WV>(g, Vs + j * LayV::RS + part * LayV::PW));
      const float p = exp2f(sj - lse2);
      float dpj = dpv;
      if (DROP) dpj = dropout_keep(rk, kt + j, dp.threshold) ? dpj * dp.inv_keep : 0.f;
      axpy_part<WK>(acc, p * (dpj - D), krow);
    }
    __syncthreads();
  }
  if (!active) return;
  store_part<T, WK>(head_row_out<T>(a.dq, a.sdq, b, h, qi) + part * WK, acc, a.scale);
}

template <typename T, int E, int EV, bool DROP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(AttnArgs a, DropoutParams dp) {
  using P = AttnParts<E, EV>;
  using LayK = typename P::LayK;
  using LayV = typename P::LayV;
  constexpr int TP = P::TP, WK = P::WK, WV = P::WV, BK = kThreads / TP;
  __shared__ __align__(16) float Qs[kBQ * LayK::RS];
  __shared__ __align__(16) float Gs[kBQ * LayV::RS];
  __shared__ float Ls[kBQ];
  __shared__ float Ds[kBQ];

  const auto [bh, b, h, Lk] = block_head(a);
  const int k0 = blockIdx.x * BK;
  if (k0 >= Lk) return;  // block-uniform
  const int tid = threadIdx.x, part = tid % TP, kj = k0 + tid / TP;
  const bool active = kj < Lk;

  float kr[WK], vr[WV], dk[WK], dv[WV];
  if (active) {
    load_part<T, WK>(head_row<T>(a.k, a.sk, b, h, kj) + part * WK, kr);
    load_part<T, WV>(head_row<T>(a.v, a.sv, b, h, kj) + part * WV, vr);
  } else {
    fill<WK>(kr, 0.f);
    fill<WV>(vr, 0.f);
  }
  const float c = a.scale * kLog2e;
#pragma unroll
  for (int e = 0; e < WK; ++e) kr[e] *= c;
  fill<WK>(dk, 0.f);
  fill<WV>(dv, 0.f);

  const int per = ((a.N + a.nsplit - 1) / a.nsplit + kBQ - 1) / kBQ * kBQ;
  const int qs = blockIdx.z * per, qe = min(a.N, qs + per);
  const T* qb = head_row<T>(a.q, a.sq, b, h, 0);
  const T* gb = head_row<T>(a.dout, a.sdo, b, h, 0);
  const float* lse_b = a.lse + query_row(a, bh, 0);
  const float* del_b = a.delta + query_row(a, bh, 0);

  for (int qt = qs; qt < qe; qt += kBQ) {
    const int nq = min(kBQ, qe - qt);
    load_tile<T, LayK, kBQ>(Qs, qb, a.sq[2], qt, nq);
    load_tile<T, LayV, kBQ>(Gs, gb, a.sdo[2], qt, nq);
    for (int i = tid; i < kBQ; i += blockDim.x) {
      Ls[i] = i < nq ? lse_b[qt + i] * kLog2e : 0.f;
      Ds[i] = i < nq ? del_b[qt + i] : 0.f;
    }
    __syncthreads();
#pragma unroll 2
    for (int i = 0; i < nq; ++i) {
      const float* qrow = Qs + i * LayK::RS + part * LayK::PW;
      const float* grow = Gs + i * LayV::RS + part * LayV::PW;
      const float s = finish_dot<TP>(dot_part<WK>(kr, qrow));
      const float dpr = finish_dot<TP>(dot_part<WV>(vr, grow));
      const float p = exp2f(s - Ls[i]);
      float pd = p, dpj = dpr;
      if (DROP) {
        const bool keep = dropout_keep(
            dropout_row_key(a.seed, static_cast<uint64_t>(query_row(a, bh, qt + i))), kj,
            dp.threshold);
        pd = keep ? p * dp.inv_keep : 0.f;
        dpj = keep ? dpr * dp.inv_keep : 0.f;
      }
      const float ds = p * (dpj - Ds[i]);
      axpy_part<WV>(dv, pd, grow);
      axpy_part<WK>(dk, ds, qrow);
    }
    __syncthreads();
  }
  if (!active) return;
  float* dkp = a.dk_acc + (static_cast<int64_t>(bh) * a.R + kj) * E + part * WK;
  float* dvp = a.dv_acc + (static_cast<int64_t>(bh) * a.R + kj) * EV + part * WV;
  if (a.nsplit == 1) {
#pragma unroll
    for (int e = 0; e < WK; e += 4)
      *reinterpret_cast<float4*>(dkp + e) =
          make_float4(dk[e] * a.scale, dk[e + 1] * a.scale, dk[e + 2] * a.scale, dk[e + 3] * a.scale);
#pragma unroll
    for (int e = 0; e < WV; e += 4)
      *reinterpret_cast<float4*>(dvp + e) = make_float4(dv[e], dv[e + 1], dv[e + 2], dv[e + 3]);
  } else {
#pragma unroll
    for (int e = 0; e < WK; ++e) atomicAdd(dkp + e, dk[e] * a.scale);
#pragma unroll
    for (int e = 0; e < WV; ++e) atomicAdd(dvp + e, dv[e]);
  }
}

}  // namespace

// Query splits for the dk/dv kernel: enough blocks to fill the GPU (about 4 per SM), each
// split at least one query tile. Blocks past an image's key count exit at once, so the blocks
// that work are those of the real keys: a.key_hint of them per image when R is an upper bound.
static int choose_nsplit(const AttnArgs& a, int num_sms) {
  const int TP = a.E / 32, BK = kThreads / TP;
  const int keys = a.key_hint > 0 && a.key_hint < a.R ? a.key_hint : a.R;
  const int64_t base = static_cast<int64_t>((keys + BK - 1) / BK) * a.B * a.H;
  if (base <= 0) return 1;
  const int64_t want = (4LL * num_sms + base - 1) / base;
  const int64_t max_split = (a.N + kBQ - 1) / kBQ;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, std::min<int64_t>(max_split, 64))));
}

cudaError_t attn_backward(const AttnArgs& a_in, DType dtype, int num_sms, cudaStream_t stream) {
  if (a_in.N == 0 || a_in.B * a_in.H == 0) return cudaSuccess;
  AttnArgs a = a_in;
  a.nsplit = a.nsplit > 0 ? a.nsplit : choose_nsplit(a, num_sms);
  const DropoutParams dp = make_dropout_params(a.dropout_p);
  return dispatch_attn(dtype, a.E, a.EV, [&](auto tag, auto e, auto ev) {
    using T = typename decltype(tag)::type;
    constexpr int E = decltype(e)::value, EV = decltype(ev)::value;
    constexpr int BM = kThreads / RowThreads<E>::value, BK = BM;
    const dim3 grid_q((a.N + BM - 1) / BM, a.B * a.H);
    const dim3 grid_k((a.R + BK - 1) / BK, a.B * a.H, a.nsplit);
    if (a.dropout_p > 0.f) {
      attn_bwd_dq_kernel<T, E, EV, true><<<grid_q, kThreads, 0, stream>>>(a, dp);
      if (a.R > 0) attn_bwd_dkdv_kernel<T, E, EV, true><<<grid_k, kThreads, 0, stream>>>(a, dp);
    } else {
      attn_bwd_dq_kernel<T, E, EV, false><<<grid_q, kThreads, 0, stream>>>(a, dp);
      if (a.R > 0) attn_bwd_dkdv_kernel<T, E, EV, false><<<grid_k, kThreads, 0, stream>>>(a, dp);
    }
    return cudaGetLastError();
  });
}

}  // namespace enact
