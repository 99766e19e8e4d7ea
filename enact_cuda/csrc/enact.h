// Host-side launchers of the enact_cuda kernels. Plain C++ types only, so the .cu files compile
// without torch headers; bindings.cpp does the tensor checks/allocation and calls these.
// Every launcher returns the cudaError_t of its launch(es).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace enact {

// Storage type of a tensor's elements.
enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// ------------------------------- information + regions (info.cu) ------------------------------
// mode 0: input = logits z (softmax over valid pixels, +1e-8, -p log2 p, then regions);
// mode 1: input = unsmoothed information (regions only; `info_out` unused).
struct InfoFwdArgs {
  const float* x;        // (B, N) logits or information
  const bool* mask;      // (B, N) True = padding, or nullptr
  float* info_out;       // (B, N) (mode 0)
  float* smoothed_out;   // (B, N)
  int64_t* region_out;   // (B, N), -1 on padding
  int64_t* counts_out;   // (B,)
  float* scratch;        // nullptr, or (B, 3N) floats when the compact arrays do not fit smem
  int B, N, sigma, row_breaks, W, mode;
  int taps_half;         // the Gaussian covers t = -taps_half..taps_half (3 sigma or 3 sigma - 1)
};
cudaError_t info_forward(const InfoFwdArgs& a, int smem_limit, cudaStream_t stream);
size_t info_forward_smem_bytes(int N, int sigma);

struct InfoBwdArgs {
  const float* x;          // (B, N) the forward's input (logits or information)
  const bool* mask;        // (B, N) or nullptr
  const float* grad_info;  // (B, N) or nullptr (mode 0 only)
  const float* grad_sm;    // (B, N) or nullptr
  float* grad_x;           // (B, N)
  float* scratch;          // nullptr or (B, 4N)
  int B, N, sigma, mode;
  int taps_half;           // as InfoFwdArgs::taps_half
};
cudaError_t info_backward(const InfoBwdArgs& a, int smem_limit, cudaStream_t stream);
size_t info_backward_smem_bytes(int N, int sigma);

// ------------------------------------- clustering (cluster.cu) --------------------------------
constexpr int kMaxClusterTensors = 4;

// Region bounds and region softmax statistics from region_index (B, N) and smoothed (B, N),
// each per image with row stride S (= R here): starts (B, S) first pixel of region r (N where
// absent), ends (B, S) last valid pixel + 1 (0 where absent), stats (B, S, 2) the region's max
// smoothed value and 1 / sum exp(smoothed - max), counts (B,) int32 (max id + 1).
cudaError_t cluster_bounds(const int64_t* region_index, const float* smoothed, int B, int N,
                           int R, int* starts, int* ends, float* stats, int* counts,
                           cudaStream_t stream);

struct ClusterFwdArgs {
  const float* smoothed;       // (B, N)
  const int64_t* region_index; // (B, N)
  const int* starts;           // (B, S)
  const int* ends;             // (B, S)
  const float* stats;          // (B, S, 2) region softmax max and 1/sum
  const int* counts;           // (B,)
  int64_t S;                   // per-image row stride of starts / ends / stats (>= R)
  bool* kpm;                   // (B, R) written (True = no cluster r), or nullptr
  const void* x[kMaxClusterTensors];  // (B, N, d_t), unit stride along d
  void* out[kMaxClusterTensors];      // (B, R, d_t) contiguous
  int64_t x_row_stride[kMaxClusterTensors];
  int64_t x_batch_stride[kMaxClusterTensors];
  int d[kMaxClusterTensors];
  int n_tensors, B, N, R;
};
// vec: 16-byte accesses (all tensors' d, strides and pointers allow it), else scalar.
cudaError_t cluster_forward(const ClusterFwdArgs& a, DType dtype, bool vec, cudaStream_t stream);

struct ClusterBwdArgs {
  const float* smoothed;
  const int64_t* region_index;
  const int* starts;
  const int* ends;
  const float* stats;          // (B, S, 2) region softmax max and 1/sum
  const int* counts;
  int64_t S;
  const void* g[kMaxClusterTensors];   // (B, R, d_t) contiguous grads of the outputs
  const void* x[kMaxClusterTensors];   // (B, N, d_t) forward inputs
  void* gx[kMaxClusterTensors];        // (B, N, d_t) contiguous
  int64_t x_row_stride[kMaxClusterTensors];
  int64_t x_batch_stride[kMaxClusterTensors];
  int d[kMaxClusterTensors];
  float* dots;                 // (B, N) scratch: sum_t <G_t[region], X_t[i]> per pixel
  float* grad_sm;              // (B, N) written by the finalising launch (0 on padding)
  float* zero_ptr;             // nullptr or zero_n floats zeroed by this launch (an accumulator
                               // of a later kernel, saving a memset launch)
  int zero_n;
  int n_tensors, B, N, R;
};
// One launch per dtype group of tensors. accumulate: add to `dots` from earlier groups;
// finalize: turn dots into grad_sm = w_i (dots_i - sum_{k in region} w_k dots_k).
cudaError_t cluster_backward(const ClusterBwdArgs& a, DType dtype, bool vec, bool accumulate,
                             bool finalize, cudaStream_t stream);

// --------------------------- fused ENACT clustering path (fused.cu) --------------------------
// Forward, ONE launch: z = keys . w + bias (W_prob logits) for all pixels (many blocks), then
// the last block of each image (atomic ticket) runs information, smoothing, curvature, regions,
// region bounds and region softmax statistics. Region arrays use row stride N per image (R is
// not known before this kernel ends).
struct FusedFwdArgs {
  const void* keys;            // (B, N, d), unit stride along d
  int64_t key_row_stride, key_batch_stride;
  int d;
  const float* weight;         // (d,) float32
  const float* bias;           // (1,) float32 or nullptr
  const bool* mask;            // (B, N) or nullptr
  float* z;                    // (B, N) logits (0 on padding)
  float* info_out;             // (B, N)
  float* smoothed_out;         // (B, N)
  int64_t* region_out;         // (B, N), -1 on padding
  int64_t* counts_out;         // (B,)
  float* stats3;               // (3, B) clusters, valid pixels, mean region length
  int* counts32;               // (B,)
  int* starts;                 // (B, N) first pixel of region r
  int* ends;                   // (B, N) last valid pixel of region r + 1
  float* rstats;               // (B, N, 2) region softmax max, 1/sum
  int* counter;                // (B,) zero on entry (tickets), left at gridDim.x
  int* rmax;                   // (1,) zero on entry; max_b R_b on exit
  float* scratch;              // nullptr, or (B, 3N) floats when the compact arrays exceed smem
  int B, N, sigma, row_breaks, W;
  int taps_half;               // as InfoFwdArgs::taps_half
};
cudaError_t fused_forward(const FusedFwdArgs& a, DType key_dtype, bool vec, int smem_limit,
                          cudaStream_t stream);
size_t fused_forward_smem_bytes(int N);

// The information keys' share of the backward, given gz = grad of the W_prob logits (B, N)
// (info_backward): per pixel row gx_i = [gx_i if accumulate] + gz_i * weight, and
// gw[0:d] += sum_i gz_i keys_i, gw[d] += sum_i gz_i (atomics; gw zeroed before).
struct KeyGradArgs {
  const void* keys;            // (B, N, d), unit stride along d
  int64_t key_row_stride, key_batch_stride;
  int d;
  const float* gz;             // (B, N), 0 on padding
  const float* weight;         // (d,) float32
  void* gx;                    // (B, N, d) contiguous, keys' dtype
  int accumulate;              // 1: add to gx (the keys' clustering gradient is already there)
  float* gw;                   // (d + 1,) float32
  int B, N;
};
cudaError_t key_grad(const KeyGradArgs& a, DType key_dtype, bool vec, cudaStream_t stream);

// -------------------------------- clustered attention (attn_*.cu) -----------------------------
struct AttnArgs {
  const void* q;  const void* k;  const void* v;  // (B,H,N,E), (B,H,R,E), (B,H,R,EV)
  const bool* kpm;                                // (B, R) True = no cluster (a suffix)
  const void* o;  const void* dout;               // (B,H,N,EV) out (bwd reads, fwd writes)
  void* o_mut;                                    // forward output
  float* lse;                                     // (B,H,N) natural-log LSE of scaled scores
  float* delta;                                   // (B,H,N) rowsum(dO * O) (bwd scratch)
  void* dq;                                       // (B,H,N,E)
  float* dk_acc; float* dv_acc;                   // (B,H,R,E), (B,H,R,EV) fp32, zeroed
  int64_t sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3];  // strides of dims (B, H, L)
  int B, H, N, R;
  int E, EV;  // q / k head dim (32, 64), value head dim (E, or 32 with E = 64)
  float scale;
  float dropout_p;
  uint64_t seed;
  int nsplit;     // query splits of the dk/dv kernel (0 = automatic)
  int key_hint;   // largest key count if known on the host (0 = not known): when R is an
                  // upper bound (e.g. N), the automatic split is sized for this many keys
};
cudaError_t attn_forward(const AttnArgs& a, DType dtype, cudaStream_t stream);
cudaError_t attn_backward(const AttnArgs& a, DType dtype, int num_sms, cudaStream_t stream);
// keep mask (B,H,N,R) uint8 of the dropout the kernels apply (tests)
cudaError_t attn_dropout_mask(uint8_t* out, int B, int H, int N, int R, float p, uint64_t seed,
                              cudaStream_t stream);

}  // namespace enact
