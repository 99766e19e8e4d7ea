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
};
cudaError_t info_backward(const InfoBwdArgs& a, int smem_limit, cudaStream_t stream);
size_t info_backward_smem_bytes(int N, int sigma);

// ------------------------------------- clustering (cluster.cu) --------------------------------
constexpr int kMaxClusterTensors = 4;

// Region bounds from region_index (B, N): starts (B, R+1) int32 first pixel of region r (N where
// absent), ends (B, R) int32 last valid pixel + 1 (0 where absent), counts (B,) int32 (max id+1).
cudaError_t cluster_bounds(const int64_t* region_index, int B, int N, int R, int* starts,
                           int* ends, int* counts, cudaStream_t stream);

struct ClusterFwdArgs {
  const float* smoothed;       // (B, N)
  const int64_t* region_index; // (B, N)
  const int* starts;           // (B, R+1)
  const int* ends;             // (B, R)
  const int* counts;           // (B,)
  float* stats;                // (B, R, 2) region softmax max and 1/sum (written)
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
  const int* counts;
  const float* stats;          // (B, R, 2) from the forward
  const void* g[kMaxClusterTensors];   // (B, R, d_t) contiguous grads of the outputs
  const void* x[kMaxClusterTensors];   // (B, N, d_t) forward inputs
  void* gx[kMaxClusterTensors];        // (B, N, d_t) contiguous
  int64_t x_row_stride[kMaxClusterTensors];
  int64_t x_batch_stride[kMaxClusterTensors];
  int d[kMaxClusterTensors];
  float* dots;                 // (B, N) scratch: sum_t <G_t[region], X_t[i]> per pixel
  float* grad_sm;              // (B, N) written by the finalising launch (0 on padding)
  int n_tensors, B, N, R;
};
// One launch per dtype group of tensors. accumulate: add to `dots` from earlier groups;
// finalize: turn dots into grad_sm = w_i (dots_i - sum_{k in region} w_k dots_k).
cudaError_t cluster_backward(const ClusterBwdArgs& a, DType dtype, bool vec, bool accumulate,
                             bool finalize, cudaStream_t stream);

// -------------------------------- clustered attention (attn_*.cu) -----------------------------
struct AttnArgs {
  const void* q;  const void* k;  const void* v;  // (B,H,N,E), (B,H,R,E), (B,H,R,E)
  const bool* kpm;                                // (B, R) True = no cluster (a suffix)
  const void* o;  const void* dout;               // (B,H,N,E) out (bwd reads, fwd writes)
  void* o_mut;                                    // forward output
  float* lse;                                     // (B,H,N) natural-log LSE of scaled scores
  float* delta;                                   // (B,H,N) rowsum(dO * O) (bwd scratch)
  void* dq;                                       // (B,H,N,E)
  float* dk_acc; float* dv_acc;                   // (B,H,R,E) fp32, zero-initialised
  int64_t sq[3], sk[3], sv[3], so[3], sdo[3], sdq[3];  // strides of dims (B, H, L)
  int B, H, N, R, E;
  float scale;
  float dropout_p;
  uint64_t seed;
  int nsplit;  // query splits of the dk/dv kernel
};
cudaError_t attn_forward(const AttnArgs& a, DType dtype, cudaStream_t stream);
cudaError_t attn_backward(const AttnArgs& a, DType dtype, int num_sms, cudaStream_t stream);
// keep mask (B,H,N,R) uint8 of the dropout the kernels apply (tests)
cudaError_t attn_dropout_mask(uint8_t* out, int B, int H, int N, int R, float p, uint64_t seed,
                              cudaStream_t stream);

}  // namespace enact
