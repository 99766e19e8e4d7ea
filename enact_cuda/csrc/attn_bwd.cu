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

template <typename T, int E, bool DROP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(AttnArgs a, DropoutParams dp) {
  using Lay = AttnLayout<E>;
  constexpr int TP = Lay::TP, BM = kThreads / TP;
  __shared__ __align__(16) float Ks[kBN * Lay::RS];
  __shared__ __align__(16) float Vs[kBN * Lay::RS];

  const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int tid = threadIdx.x, part = tid % TP, qi = blockIdx.x * BM + tid / TP;
  const bool active = qi < a.N;
  const int Lk = block_key_count(a.kpm + static_cast<int64_t>(b) * a.R, a.R);
  const T* kb = static_cast<const T*>(a.k) + b * a.sk[0] + h * a.sk[1];
  const T* vb = static_cast<const T*>(a.v) + b * a.sv[0] + h * a.sv[1];

  const float c = a.scale * kLog2e;
  float q[32], g[32], acc[32];
  float D = 0.f, lse2 = 0.f;
  if (active) {
    load_part<T>(static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1] + qi * a.sq[2] + part * 32, q);
    load_part<T>(static_cast<const T*>(a.dout) + b * a.sdo[0] + h * a.sdo[1] + qi * a.sdo[2] +
                     part * 32, g);
    // D = <dO, O>, with O re-read into acc (acc is zeroed below)
    load_part<T>(static_cast<const T*>(a.o) + b * a.so[0] + h * a.so[1] + qi * a.so[2] + part * 32,
                 acc);
#pragma unroll
    for (int e = 0; e < 32; ++e) D = fmaf(g[e], acc[e], D);
    lse2 = a.lse[static_cast<int64_t>(bh) * a.N + qi] * kLog2e;
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) q[e] = g[e] = 0.f;
  }
  D = finish_dot<TP>(D);
  if (active && part == 0) a.delta[static_cast<int64_t>(bh) * a.N + qi] = D;
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    q[e] *= c;
    acc[e] = 0.f;
  }
  uint32_t rk = 0;
  if (DROP) rk = dropout_row_key(a.seed, static_cast<uint64_t>(bh) * a.N + qi);

  for (int kt = 0; kt < Lk; kt += kBN) {
    const int nk = min(kBN, Lk - kt);
    load_tile<T, E, kBN>(Ks, kb, a.sk[2], kt, nk);
    load_tile<T, E, kBN>(Vs, vb, a.sv[2], kt, nk);
    __syncthreads();
#pragma unroll 2
    for (int j = 0; j < nk; ++j) {
      const float* krow = Ks + j * Lay::RS + part * Lay::PW;
      const float sj = finish_dot<TP>(dot_part(q, krow));
      const float dpv = finish_dot<TP>(dot_part(g, Vs + j * Lay::RS + part * Lay::PW));
      const float p = exp2f(sj - lse2);
      float dpj = dpv;
      if (DROP) dpj = dropout_keep(rk, kt + j, dp.threshold) ? dpj * dp.inv_keep : 0.f;
      axpy_part(acc, p * (dpj - D), krow);
    }
    __syncthreads();
  }
  if (!active) return;
  store_part<T>(static_cast<T*>(a.dq) + b * a.sdq[0] + h * a.sdq[1] + qi * a.sdq[2] + part * 32, acc,
                a.scale);
}

template <typename T, int E, bool DROP>
__global__ void __launch_bounds__(kThreads) attn_bwd_dkdv_kernel(AttnArgs a, DropoutParams dp) {
  using Lay = AttnLayout<E>;
  constexpr int TP = Lay::TP, BK = kThreads / TP;
  __shared__ __align__(16) float Qs[kBQ * Lay::RS];
  __shared__ __align__(16) float Gs[kBQ * Lay::RS];
  __shared__ float Ls[kBQ];
  __shared__ float Ds[kBQ];

  const int bh = blockIdx.y, b = bh / a.H, h = bh % a.H;
  const int Lk = block_key_count(a.kpm + static_cast<int64_t>(b) * a.R, a.R);
  const int k0 = blockIdx.x * BK;
  if (k0 >= Lk) return;  // block-uniform
  const int tid = threadIdx.x, part = tid % TP, kj = k0 + tid / TP;
  const bool active = kj < Lk;

  float kr[32], vr[32], dk[32], dv[32];
  if (active) {
    load_part<T>(static_cast<const T*>(a.k) + b * a.sk[0] + h * a.sk[1] + kj * a.sk[2] + part * 32, kr);
    load_part<T>(static_cast<const T*>(a.v) + b * a.sv[0] + h * a.sv[1] + kj * a.sv[2] + part * 32, vr);
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) kr[e] = vr[e] = 0.f;
  }
  const float c = a.scale * kLog2e;
#pragma unroll
  for (int e = 0; e < 32; ++e) {
    kr[e] *= c;
    dk[e] = dv[e] = 0.f;
  }

  const int per = ((a.N + a.nsplit - 1) / a.nsplit + kBQ - 1) / kBQ * kBQ;
  const int qs = blockIdx.z * per, qe = min(a.N, qs + per);
  const T* qb = static_cast<const T*>(a.q) + b * a.sq[0] + h * a.sq[1];
  const T* gb = static_cast<const T*>(a.dout) + b * a.sdo[0] + h * a.sdo[1];
  const float* lse_b = a.lse + static_cast<int64_t>(bh) * a.N;
  const float* del_b = a.delta + static_cast<int64_t>(bh) * a.N;

  for (int qt = qs; qt < qe; qt += kBQ) {
    const int nq = min(kBQ, qe - qt);
    load_tile<T, E, kBQ>(Qs, qb, a.sq[2], qt, nq);
    load_tile<T, E, kBQ>(Gs, gb, a.sdo[2], qt, nq);
    for (int i = tid; i < kBQ; i += blockDim.x) {
      Ls[i] = i < nq ? lse_b[qt + i] * kLog2e : 0.f;
      Ds[i] = i < nq ? del_b[qt + i] : 0.f;
    }
    __syncthreads();
#pragma unroll 2
    for (int i = 0; i < nq; ++i) {
      const float* qrow = Qs + i * Lay::RS + part * Lay::PW;
      const float* grow = Gs + i * Lay::RS + part * Lay::PW;
      const float s = finish_dot<TP>(dot_part(kr, qrow));
      const float dpr = finish_dot<TP>(dot_part(vr, grow));
      const float p = exp2f(s - Ls[i]);
      float pd = p, dpj = dpr;
      if (DROP) {
        const bool keep = dropout_keep(dropout_row_key(a.seed, static_cast<uint64_t>(bh) * a.N + qt + i),
                                       kj, dp.threshold);
        pd = keep ? p * dp.inv_keep : 0.f;
        dpj = keep ? dpr * dp.inv_keep : 0.f;
      }
      const float ds = p * (dpj - Ds[i]);
      axpy_part(dv, pd, grow);
      axpy_part(dk, ds, qrow);
    }
    __syncthreads();
  }
  if (!active) return;
  float* dkp = a.dk_acc + (static_cast<int64_t>(bh) * a.R + kj) * E + part * 32;
  float* dvp = a.dv_acc + (static_cast<int64_t>(bh) * a.R + kj) * E + part * 32;
  if (a.nsplit == 1) {
#pragma unroll
    for (int e = 0; e < 32; e += 4) {
      *reinterpret_cast<float4*>(dkp + e) =
          make_float4(dk[e] * a.scale, dk[e + 1] * a.scale, dk[e + 2] * a.scale, dk[e + 3] * a.scale);
      *reinterpret_cast<float4*>(dvp + e) = make_float4(dv[e], dv[e + 1], dv[e + 2], dv[e + 3]);
    }
  } else {
#pragma unroll
    for (int e = 0; e < 32; ++e) {
      atomicAdd(dkp + e, dk[e] * a.scale);
      atomicAdd(dvp + e, dv[e]);
    }
  }
}

template <typename T, int E>
cudaError_t launch(const AttnArgs& a, DropoutParams dp, cudaStream_t stream) {
  constexpr int TP = AttnLayout<E>::TP, BM = kThreads / TP, BK = kThreads / TP;
  dim3 grid_q((a.N + BM - 1) / BM, a.B * a.H);
  dim3 grid_k((a.R + BK - 1) / BK, a.B * a.H, a.nsplit);
  if (a.dropout_p > 0.f) {
    attn_bwd_dq_kernel<T, E, true><<<grid_q, kThreads, 0, stream>>>(a, dp);
    if (a.R > 0) attn_bwd_dkdv_kernel<T, E, true><<<grid_k, kThreads, 0, stream>>>(a, dp);
  } else {
    attn_bwd_dq_kernel<T, E, false><<<grid_q, kThreads, 0, stream>>>(a, dp);
    if (a.R > 0) attn_bwd_dkdv_kernel<T, E, false><<<grid_k, kThreads, 0, stream>>>(a, dp);
  }
  return cudaGetLastError();
}

}  // namespace

// Query splits for the dk/dv kernel: enough blocks to fill the GPU (about 4 per SM), each
// split at least one query tile.
static int choose_nsplit(const AttnArgs& a, int num_sms) {
  const int TP = a.E / 32, BK = kThreads / TP;
  const int64_t base = static_cast<int64_t>((a.R + BK - 1) / BK) * a.B * a.H;
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
  if (dtype == DType::kFloat) {
    return a.E == 32 ? launch<float, 32>(a, dp, stream) : launch<float, 64>(a, dp, stream);
  }
  if (dtype == DType::kBFloat16) {
    return a.E == 32 ? launch<__nv_bfloat16, 32>(a, dp, stream)
                     : launch<__nv_bfloat16, 64>(a, dp, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace enact
