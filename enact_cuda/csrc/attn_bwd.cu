// Fused clustered attention, backward (FlashAttention-style recomputation from q, k, v, LSE).
// With S = scale q k^T, P = softmax(S) (keys [0, R_b)), M the dropout keep mask / (1 - p):
//   D_i  = sum_e dO_ie O_ie                 (= sum_j P_ij M_ij dP'_ij)
//   dP_ij = M_ij <dO_i, v_j>,  dS_ij = P_ij (dP_ij - D_i)
//   dq_i = scale sum_j dS_ij k_j,  dk_j = scale sum_i dS_ij q_i,  dv_j = sum_i P_ij M_ij dO_i
// Kernel 1 (query-major, two queries per TP threads): D and dq, no atomics.
// Kernel 2 (key-major, one key per TP threads, queries split over gridDim.z): dk and dv,
// fp32 atomics into zero-initialised buffers when the queries are split. Its register budget
// is sized for 3 resident blocks per SM where the head dims allow it without spilling
// (capped_min_blocks).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "attn_common.cuh"

namespace enact {
namespace {

constexpr int kThreads = 128;
constexpr int kBN = 32;  // keys per shared tile (dq kernel; two tiles staged)
constexpr int kBQ = 32;  // queries per shared tile (dk/dv kernel; two tiles staged)
constexpr int kSplitQ = 64;  // the dk/dv kernel's query splits are whole multiples of this

// Query rows per TP-thread group of the dq kernel (kDqQPT * kThreads / TP per block): every
// key / value row read from shared memory serves both (as in the forward). 2 rows need
// 240-255 registers (2 blocks per SM instead of 3); the backward is still 3-9 % faster on an
// H200 (fp32, DETR / Conditional DETR shapes; unchanged for Anchor DETR's).
constexpr int kDqQPT = 2;

// Queries of each of the dk/dv kernel's `nsplit` query splits: N / nsplit rounded up to a
// multiple of kSplitQ (the last splits may get fewer queries or none); the kernel and
// choose_nsplit share it.
__host__ __device__ __forceinline__ int queries_per_split(int N, int nsplit) {
  return ((N + nsplit - 1) / nsplit + kSplitQ - 1) / kSplitQ * kSplitQ;
}

template <typename T, int E, int EV, bool DROP, int QPT>
__global__ void __launch_bounds__(kThreads) attn_bwd_dq_kernel(AttnArgs a, DropoutParams dp) {
  using P = AttnParts<E, EV>;
  using LayK = typename P::LayK;
  using LayV = typename P::LayV;
  constexpr int TP = P::TP, WK = P::WK, WV = P::WV, G = kThreads / TP, BM = G * QPT;
  __shared__ __align__(16) float Ks[2][kBN * LayK::RS];
  __shared__ __align__(16) float Vs[2][kBN * LayV::RS];

  const auto [bh, b, h, Lk] = block_head(a);
  const int tid = threadIdx.x, part = tid % TP;
  const auto load = key_value_loader<T, LayK, LayV, kBN, kThreads>(Ks, Vs, a, b, h);

  const float c = a.scale * kLog2e;
  float q[QPT][WK], g[QPT][WV], acc[QPT][WK], D[QPT], lse2[QPT];
  uint32_t rk[QPT];
#pragma unroll
  for (int r = 0; r < QPT; ++r) {
    const int qi = blockIdx.x * BM + r * G + tid / TP;
    const bool active = qi < a.N;
    load_part_or_zero<T, WK>(active, head_row<T>(a.q, a.sq, b, h, qi) + part * WK, q[r]);
    load_part_or_zero<T, WV>(active, head_row<T>(a.dout, a.sdo, b, h, qi) + part * WV, g[r]);
    D[r] = 0.f;
    lse2[r] = 0.f;
    if (active) {
      float o[WV];  // D = <dO, O>
      load_part<T, WV>(head_row<T>(a.o, a.so, b, h, qi) + part * WV, o);
#pragma unroll
      for (int e = 0; e < WV; ++e) D[r] = fmaf(g[r][e], o[e], D[r]);
      lse2[r] = a.lse[query_row(a, bh, qi)] * kLog2e;
    }
    D[r] = finish_dot<TP>(D[r]);
    if (active && part == 0) a.delta[query_row(a, bh, qi)] = D[r];
#pragma unroll
    for (int e = 0; e < WK; ++e) q[r][e] *= c;
    fill<WK>(acc[r], 0.f);
    rk[r] = DROP ? dropout_row_key(a.seed, static_cast<uint64_t>(query_row(a, bh, qi))) : 0u;
  }

  for_each_staged_tile<kBN>(0, Lk, load, [&](int stage, int kt, int nk) {
#pragma unroll 1
    for (int j = 0; j < nk; ++j) {
      const float* krow = Ks[stage] + j * LayK::RS + part * LayK::PW;
      const float* vrow = Vs[stage] + j * LayV::RS + part * LayV::PW;
#pragma unroll
      for (int r = 0; r < QPT; ++r) {
        const float sj = finish_dot<TP>(dot_part<WK>(q[r], krow));
        const float dpv = finish_dot<TP>(dot_part<WV>(g[r], vrow));
        const float p = exp2f(sj - lse2[r]);
        float dpj = dpv;
        if (DROP) dpj = dropout_keep(rk[r], kt + j, dp.threshold) ? dpj * dp.inv_keep : 0.f;
        axpy_part<WK>(acc[r], p * (dpj - D[r]), krow);
      }
    }
  });
#pragma unroll
  for (int r = 0; r < QPT; ++r) {
    const int qi = blockIdx.x * BM + r * G + tid / TP;
    if (qi < a.N) store_part<T, WK>(head_row_out<T>(a.dq, a.sdq, b, h, qi) + part * WK, acc[r], a.scale);
  }
}

template <typename T, int E, int EV, bool DROP>
__global__ void __launch_bounds__(kThreads, capped_min_blocks<E, EV>())
    attn_bwd_dkdv_kernel(AttnArgs a, DropoutParams dp) {
  using P = AttnParts<E, EV>;
  using LayK = typename P::LayK;
  using LayV = typename P::LayV;
  constexpr int TP = P::TP, WK = P::WK, WV = P::WV, BK = kThreads / TP;
  __shared__ __align__(16) float Qs[2][kBQ * LayK::RS];
  __shared__ __align__(16) float Gs[2][kBQ * LayV::RS];
  __shared__ float Ls[2][kBQ];  // the queries' log-sum-exp (natural log)
  __shared__ float Ds[2][kBQ];
  __shared__ uint32_t Rks[2][kBQ];  // dropout row keys of the tile's queries

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

  const int per = queries_per_split(a.N, a.nsplit);
  const int qs = blockIdx.z * per, qe = min(a.N, qs + per);
  if (qs >= qe) return;  // an empty split (only with nsplit > 1: zeroed accumulators)
  const T* qb = head_row<T>(a.q, a.sq, b, h, 0);
  const T* gb = head_row<T>(a.dout, a.sdo, b, h, 0);
  const int64_t row_b = query_row(a, bh, 0);  // of query 0 in the (B, H, N) per-row arrays
  const float* lse_b = a.lse + row_b;
  const float* del_b = a.delta + row_b;

  auto load = [&](int stage, int qt, int nq) {
    load_tile<T, LayK, kBQ, kThreads>(Qs[stage], qb, a.sq[2], qt, nq);
    load_tile<T, LayV, kBQ, kThreads>(Gs[stage], gb, a.sdo[2], qt, nq);
    load_row_values<kBQ, kThreads>(Ls[stage], lse_b, qt, nq);
    load_row_values<kBQ, kThreads>(Ds[stage], del_b, qt, nq);
    if (DROP) {
      for (int i = tid; i < kBQ; i += kThreads)
        Rks[stage][i] = dropout_row_key(a.seed, static_cast<uint64_t>(row_b + qt + i));
    }
  };
  for_each_staged_tile<kBQ>(qs, qe, load, [&](int stage, int qt, int nq) {
#pragma unroll 2
    for (int i = 0; i < nq; ++i) {
      const float* qrow = Qs[stage] + i * LayK::RS + part * LayK::PW;
      const float* grow = Gs[stage] + i * LayV::RS + part * LayV::PW;
      const float s = finish_dot<TP>(dot_part<WK>(kr, qrow));
      const float dpr = finish_dot<TP>(dot_part<WV>(vr, grow));
      const float p = exp2f(fmaf(Ls[stage][i], -kLog2e, s));
      float pd = p, dpj = dpr;
      if (DROP) {
        const bool keep = dropout_keep(Rks[stage][i], kj, dp.threshold);
        pd = keep ? p * dp.inv_keep : 0.f;
        dpj = keep ? dpr * dp.inv_keep : 0.f;
      }
      const float ds = p * (dpj - Ds[stage][i]);
      axpy_part<WV>(dv, pd, grow);
      axpy_part<WK>(dk, ds, qrow);
    }
  });
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

// Query splits of the dk/dv kernel. Blocks run in waves of `slots` (SMs x resident blocks per
// SM); a block's time is about its queries plus kSplitQ (its fixed cost: loading its keys and
// first query tile, writing their gradients). The split minimises waves x (queries per split
// + kSplitQ) over 1 .. min(N / kSplitQ rounded up, 64), the smaller on ties (fewer atomics).
// Blocks past an image's key count exit at once, so the blocks that work are those of the real
// keys: a.key_hint of them per image when R is an upper bound.
static int choose_nsplit(const AttnArgs& a, int slots) {
  const int TP = a.E / 32, BK = kThreads / TP;
  const int keys = a.key_hint > 0 ? a.key_hint : a.R;  // the binding clamps it to R
  const int64_t per_split = static_cast<int64_t>((keys + BK - 1) / BK) * a.B * a.H;
  if (per_split <= 0 || slots <= 0) return 1;
  const int max_split = std::min((a.N + kSplitQ - 1) / kSplitQ, 64);
  int best = 1;
  int64_t best_cost = INT64_MAX;
  for (int s = 1; s <= max_split; ++s) {
    const int per = queries_per_split(a.N, s);
    const int64_t used = (a.N + per - 1) / per;  // splits with queries
    const int64_t waves = (per_split * used + slots - 1) / slots;
    const int64_t cost = waves * (per + kSplitQ);
    if (cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  return best;
}

// Blocks of `kernel` (kThreads threads, static shared memory only) resident per SM.
template <typename Kernel>
static int resident_blocks(Kernel kernel) {
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0) != cudaSuccess) {
    cudaGetLastError();  // clear it: the launch reports real errors
    return 1;
  }
  return std::max(n, 1);
}

// resident_blocks of the dk/dv kernel instantiation <T, E, EV, DROP> on the current device,
// asked of the runtime once per device (it is a property of the compiled kernel and the GPU).
template <typename T, int E, int EV, bool DROP>
static int dkdv_resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // 0 = not asked yet on that device
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) {
    cudaGetLastError();
    return resident_blocks(attn_bwd_dkdv_kernel<T, E, EV, DROP>);
  }
  int n = cached[device].load(std::memory_order_relaxed);
  if (n == 0) {
    n = resident_blocks(attn_bwd_dkdv_kernel<T, E, EV, DROP>);
    cached[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

template <typename T, int E, int EV, bool DROP>
static void launch_backward(AttnArgs a, const DropoutParams& dp, int num_sms,
                            cudaStream_t stream) {
  constexpr int BK = kThreads / RowThreads<E>::value, BM = BK * kDqQPT;
  const auto dkdv = attn_bwd_dkdv_kernel<T, E, EV, DROP>;
  if (a.nsplit <= 0) a.nsplit = choose_nsplit(a, num_sms * dkdv_resident_blocks<T, E, EV, DROP>());
  const dim3 grid_q((a.N + BM - 1) / BM, a.B * a.H);
  const dim3 grid_k((a.R + BK - 1) / BK, a.B * a.H, a.nsplit);
  attn_bwd_dq_kernel<T, E, EV, DROP, kDqQPT><<<grid_q, kThreads, 0, stream>>>(a, dp);
  if (a.R > 0) dkdv<<<grid_k, kThreads, 0, stream>>>(a, dp);
}

cudaError_t attn_backward(const AttnArgs& a, DType dtype, int num_sms, cudaStream_t stream) {
  if (a.N == 0 || a.B * a.H == 0) return cudaSuccess;
  const DropoutParams dp = make_dropout_params(a.dropout_p);
  return dispatch_attn(dtype, a.E, a.EV, [&](auto tag, auto e, auto ev) {
    using T = typename decltype(tag)::type;
    constexpr int E = decltype(e)::value, EV = decltype(ev)::value;
    if (a.dropout_p > 0.f) launch_backward<T, E, EV, true>(a, dp, num_sms, stream);
    else launch_backward<T, E, EV, false>(a, dp, num_sms, stream);
    return cudaGetLastError();
  });
}

}  // namespace enact
