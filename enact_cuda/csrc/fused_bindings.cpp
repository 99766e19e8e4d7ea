// Fused ENACT clustering path (see fused.cu): a C++ autograd Function, so the whole chain
// (W_prob logits -> information -> regions -> clusters of all tensors) is ONE autograd node with
// few launches and no Python in its forward or backward:
//   fused_begin(keys, w, bias, mask, sigma, taps_half, row_breaks, W) -> FusedPending: one
//     memset, ONE kernel launch (logits + information + regions + bounds + region
//     statistics), then R_max is copied (4 bytes, non-blocking) into pinned host memory behind
//     an event; nothing waits yet, so the caller can launch work that does not depend on
//     R_max (e.g. the query projection).
//   fused_finish(pending, keys, tensors, w, bias, alias, rows) -> [clustered tensors...,
//     key mask]: rows = 0 waits on the event (the one device->host read) and allocates R =
//     R_max cluster rows; rows > 0 allocates R = min(rows, N) without waiting (rows = N always
//     holds every cluster: each region has at least one pixel); rows r >= R_b are zero and
//     masked. With R < R_max the clusters r >= R are left out (the caller checks the counts
//     and redoes the step; the backward then leaves those pixels' gradients unwritten).
//     ONE launch clusters every tensor and writes the key padding mask. Differentiable w.r.t.
//     keys, tensors, w and bias. fused_begin's read_rmax = false skips the copy and the event
//     (for rows > 0 without autograd).
//   backward, 3 launches: cluster_backward (grads of the tensors and of smoothed; it also zeroes
//     the grad w / bias accumulator), info_backward (grad z), key_grad (gz * w into the keys'
//     gradient, grad w = sum gz keys, grad bias = sum gz).
// alias = the information keys ARE tensors[0] (ENACTAttention: keys = src + pos), so the keys'
// two gradient terms are written once into one tensor.
#include <algorithm>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "bind_util.h"

namespace {

constexpr int kFusedStaticSmem = 2048;  // taps, reduction buffers, ticket, with margin

// Offsets into the int32 workspace `iws` and the float32 workspace `fws` (B images, N pixels).
struct Layout {
  int64_t B, N;
  // iws: [counter B][rmax 1][counts B][starts BN][ends BN]
  int64_t counter() const { return 0; }
  int64_t rmax() const { return B; }
  int64_t counts() const { return B + 1; }
  int64_t starts() const { return 2 * B + 1; }
  int64_t ends() const { return 2 * B + 1 + B * N; }
  int64_t iws_size() const { return 2 * B + 1 + 2 * B * N; }
  // fws: [z BN][rstats 2BN]
  int64_t z() const { return 0; }
  int64_t rstats() const { return B * N; }
  int64_t fws_size() const { return 3 * B * N; }
};

bool key_vec_ok(const at::Tensor& keys) {
  const int64_t vec = 16 / keys.element_size();
  return keys.stride(2) == 1 && vec_ok(keys, vec);
}

void check_keys(const at::Tensor& keys) {
  check_cuda(keys, "keys");
  TORCH_CHECK(keys.dim() == 3, "enact_cuda: keys must be (B, N, d)");
  TORCH_CHECK(keys.stride(2) == 1, "enact_cuda: keys need unit stride along d");
  dtype_of(keys);
  const int64_t vec = key_vec_ok(keys) ? 16 / keys.element_size() : 1;
  TORCH_CHECK((keys.size(2) + vec - 1) / vec <= 256, "enact_cuda: fused clustering supports ",
              "keys d <= 256 (or <= 256 * 16/element bytes with aligned rows), got ",
              keys.size(2));
}

// Events for the R_max read, reused across calls (creating one per call costs host time).
std::mutex g_event_mutex;
std::vector<std::pair<int, cudaEvent_t>> g_events;  // (device, event)

cudaEvent_t acquire_event(int device) {
  {
    std::lock_guard<std::mutex> lock(g_event_mutex);
    for (size_t k = g_events.size(); k-- > 0;) {
      if (g_events[k].first == device) {
        cudaEvent_t e = g_events[k].second;
        g_events.erase(g_events.begin() + static_cast<std::ptrdiff_t>(k));
        return e;
      }
    }
  }
  cudaEvent_t e = nullptr;
  ENACT_CHECK_CUDA(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

void release_event(int device, cudaEvent_t e) {
  std::lock_guard<std::mutex> lock(g_event_mutex);
  if (g_events.size() < 64) {
    g_events.emplace_back(device, e);
  } else {
    cudaEventDestroy(e);
  }
}

}  // namespace

struct FusedPending {
  at::Tensor info, smoothed, region_index, counts, stats;  // public, detached
  at::Tensor fws, iws, pinned, mask;
  cudaEvent_t event = nullptr;
  int device = 0;
  int64_t B = 0, N = 0, d = 0, sigma = 0, taps_half = 0, r_max = -1;

  // R_max = max(max_b R_b, 1): waits for the forward kernel (the one device->host read).
  int64_t R() {
    TORCH_CHECK(event != nullptr, "enact_cuda: fused_begin was called with read_rmax=False");
    if (r_max < 0) {
      ENACT_CHECK_CUDA(cudaEventSynchronize(event));
      read_landed();
    }
    return r_max;
  }
  // R_max once the copy has landed, else 0; never waits (a work-split hint for later kernels).
  int64_t R_if_ready() {
    if (r_max >= 0 || event == nullptr) return std::max<int64_t>(r_max, 0);
    const cudaError_t st = cudaEventQuery(event);
    if (st == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it, as torch's Event.query does
      return 0;
    }
    ENACT_CHECK_CUDA(st);
    read_landed();
    return r_max;
  }
  // r_max from the pinned copy, once the event says it has landed.
  void read_landed() {
    r_max = std::max<int64_t>(static_cast<int64_t>(pinned.data_ptr<int>()[0]), 1);
  }
  ~FusedPending() {
    if (event != nullptr) {
      cudaEventSynchronize(event);  // the copy into `pinned` must be done before it is reused
      release_event(device, event);
    }
  }
};

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::shared_ptr<FusedPending> fused_begin(const at::Tensor& keys, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& mask_in,
                                          int64_t sigma, int64_t taps_half, bool row_breaks,
                                          int64_t W,
                                          bool read_rmax) {
  check_keys(keys);
  c10::cuda::CUDAGuard guard(keys.device());
  const int64_t B = keys.size(0), N = keys.size(1), d = keys.size(2);
  TORCH_CHECK(N < (1LL << 30) && B < (1LL << 30), "enact_cuda: B or N too large");
  check_taps(sigma, taps_half);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.numel() == d && weight.is_contiguous() &&
                  weight.device() == keys.device(),
              "enact_cuda: W_prob weight must be float32, contiguous, d elements, on the keys' device");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == 1 &&
                    bias->device() == keys.device(),
                "enact_cuda: W_prob bias must be one float32 on the keys' device");
  auto mask = check_mask(mask_in, B, N, keys);

  auto p = std::make_shared<FusedPending>();
  if (mask) p->mask = *mask;
  p->B = B;
  p->N = N;
  p->d = d;
  p->sigma = sigma;
  p->taps_half = taps_half;
  const Layout lay{B, N};
  const auto fopt = keys.options().dtype(at::kFloat);
  p->info = at::empty({B, N}, fopt);
  p->smoothed = at::empty({B, N}, fopt);
  p->region_index = at::empty({B, N}, keys.options().dtype(at::kLong));
  p->counts = at::empty({B}, keys.options().dtype(at::kLong));
  p->stats = at::empty({3, B}, fopt);
  p->fws = at::empty({lay.fws_size()}, fopt);
  p->iws = at::empty({lay.iws_size()}, keys.options().dtype(at::kInt));
  const int limit = dynamic_smem_limit(keys.get_device(), kFusedStaticSmem);
  const at::Tensor scratch = scratch_if_needed(
      enact::fused_forward_smem_bytes(static_cast<int>(N)), limit, B, 3, N, fopt);
  auto stream = c10::cuda::getCurrentCUDAStream();
  int* iw = p->iws.data_ptr<int>();
  float* fw = p->fws.data_ptr<float>();
  ENACT_CHECK_CUDA(cudaMemsetAsync(iw, 0, sizeof(int) * (B + 1), stream));

  enact::FusedFwdArgs a{};
  a.keys = keys.data_ptr();
  a.key_row_stride = keys.stride(1);
  a.key_batch_stride = keys.stride(0);
  a.d = static_cast<int>(d);
  a.weight = weight.data_ptr<float>();
  a.bias = has_bias ? bias->data_ptr<float>() : nullptr;
  a.mask = mask ? mask->data_ptr<bool>() : nullptr;
  a.z = fw + lay.z();
  a.info_out = p->info.data_ptr<float>();
  a.smoothed_out = p->smoothed.data_ptr<float>();
  a.region_out = p->region_index.data_ptr<int64_t>();
  a.counts_out = p->counts.data_ptr<int64_t>();
  a.stats3 = p->stats.data_ptr<float>();
  a.counts32 = iw + lay.counts();
  a.starts = iw + lay.starts();
  a.ends = iw + lay.ends();
  a.rstats = fw + lay.rstats();
  a.counter = iw + lay.counter();
  a.rmax = iw + lay.rmax();
  a.scratch = float_ptr_or_null(scratch);
  set_scan(a, B, N, sigma, taps_half, row_breaks, W);
  ENACT_CHECK_CUDA(enact::fused_forward(a, dtype_of(keys), key_vec_ok(keys), limit, stream));

  if (!read_rmax) return p;
  p->pinned = at::empty({1}, at::TensorOptions().dtype(at::kInt).pinned_memory(true));
  ENACT_CHECK_CUDA(cudaMemcpyAsync(p->pinned.data_ptr<int>(), iw + lay.rmax(), sizeof(int),
                                   cudaMemcpyDeviceToHost, stream));
  p->device = keys.get_device();
  p->event = acquire_event(p->device);
  ENACT_CHECK_CUDA(cudaEventRecord(p->event, stream));
  return p;
}

struct FusedClusterFn : public torch::autograd::Function<FusedClusterFn> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& info_keys,
                               at::TensorList tensors, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias,
                               const std::shared_ptr<FusedPending>& p, bool alias,
                               int64_t rows) {
    const int n = static_cast<int>(tensors.size());
    TORCH_CHECK(n >= 1 && n <= enact::kMaxClusterTensors, "enact_cuda: fused clustering takes 1 to ",
                enact::kMaxClusterTensors, " tensors");
    TORCH_CHECK(info_keys.size(0) == p->B && info_keys.size(1) == p->N && info_keys.size(2) == p->d,
                "enact_cuda: fused_finish keys do not match fused_begin's");
    c10::cuda::CUDAGuard guard(info_keys.device());
    const int64_t B = p->B, N = p->N;
    const Layout lay{B, N};
    std::vector<at::Tensor> xs;
    xs.reserve(n);
    for (int t = 0; t < n; ++t) {
      xs.push_back(prep_cluster_input(tensors[t], B, N, "tensor"));
      TORCH_CHECK(xs[t].scalar_type() == xs[0].scalar_type(),
                  "enact_cuda: fused clustering needs one dtype for all tensors");
    }
    TORCH_CHECK(rows >= 0, "enact_cuda: fused_finish rows must be >= 0, got ", rows);
    const int64_t R = rows > 0 ? std::min(rows, N) : p->R();  // R(): waits for the forward kernel
    variable_list outs;
    outs.reserve(n + 1);
    for (int t = 0; t < n; ++t) outs.push_back(at::empty({B, R, xs[t].size(2)}, xs[t].options()));
    at::Tensor kpm = at::empty({B, R}, info_keys.options().dtype(at::kBool));
    int* iw = p->iws.data_ptr<int>();
    float* fw = p->fws.data_ptr<float>();
    enact::ClusterFwdArgs a{};
    set_regions(a, p->smoothed.data_ptr<float>(), p->region_index.data_ptr<int64_t>(),
                iw + lay.starts(), iw + lay.ends(), fw + lay.rstats(), iw + lay.counts(), N, B, N,
                R);
    a.kpm = kpm.data_ptr<bool>();
    a.n_tensors = n;
    bool vec_all = true;
    for (int t = 0; t < n; ++t) {
      const bool vec = set_cluster_input(a, t, xs[t]);
      a.out[t] = outs[t].data_ptr();
      vec_all = vec_all && vec && aligned16(outs[t]);
    }
    ENACT_CHECK_CUDA(enact::cluster_forward(a, dtype_of(xs[0]), vec_all,
                                            c10::cuda::getCurrentCUDAStream()));

    variable_list to_save{info_keys, weight, p->fws, p->iws, p->smoothed, p->region_index};
    for (int t = 0; t < n; ++t) to_save.push_back(tensors[t]);
    ctx->save_for_backward(to_save);
    ctx->saved_data["R"] = R;
    ctx->saved_data["n"] = static_cast<int64_t>(n);
    ctx->saved_data["alias"] = alias;
    ctx->saved_data["sigma"] = p->sigma;
    ctx->saved_data["taps_half"] = p->taps_half;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["mask"] = p->mask;
    ctx->mark_non_differentiable({kpm});
    ctx->set_materialize_grads(false);
    outs.push_back(kpm);
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int n = static_cast<int>(ctx->saved_data["n"].toInt());
    const int64_t R = ctx->saved_data["R"].toInt();
    const bool alias = ctx->saved_data["alias"].toBool();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t sigma = ctx->saved_data["sigma"].toInt();
    const int64_t taps_half = ctx->saved_data["taps_half"].toInt();
    variable_list result(static_cast<size_t>(n) + 6);  // keys, tensors.., w, bias, pending, alias,
                                                       // rows
    bool any = false;
    for (int t = 0; t < n; ++t) any = any || grads[t].defined();
    if (!any) return result;
    auto saved = ctx->get_saved_variables();
    const at::Tensor& keys_in = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& fws = saved[2];
    const at::Tensor& iws = saved[3];
    const at::Tensor& smoothed = saved[4];
    const at::Tensor& region_index = saved[5];
    c10::cuda::CUDAGuard guard(keys_in.device());
    const int64_t B = keys_in.size(0), N = keys_in.size(1), d = keys_in.size(2);
    const Layout lay{B, N};
    auto stream = c10::cuda::getCurrentCUDAStream();

    std::vector<at::Tensor> xs, gs, gxs;
    for (int t = 0; t < n; ++t) {
      xs.push_back(prep_cluster_input(saved[6 + t], B, N, "tensor"));
      const int64_t dt = xs[t].size(2);
      gs.push_back(grads[t].defined() ? grads[t].to(xs[t].scalar_type()).contiguous()
                                      : at::zeros({B, R, dt}, xs[t].options()));
      gxs.push_back(at::empty({B, N, dt}, xs[t].options()));
    }
    // float workspace: dots (B,N), grad smoothed (B,N), grad z (B,N), grad w and bias (d+1)
    at::Tensor bws = at::empty({3 * B * N + d + 1}, fws.options());
    float* bw = bws.data_ptr<float>();
    float* gsm = bw + B * N;
    float* gz = bw + 2 * B * N;
    float* acc = bw + 3 * B * N;
    const int* iw = iws.data_ptr<int>();
    const float* fw = fws.data_ptr<float>();

    enact::ClusterBwdArgs a{};
    set_regions(a, smoothed.data_ptr<float>(), region_index.data_ptr<int64_t>(),
                iw + lay.starts(), iw + lay.ends(), fw + lay.rstats(), iw + lay.counts(), N, B, N,
                R);
    a.dots = bw;
    a.grad_sm = gsm;
    a.zero_ptr = acc;
    a.zero_n = static_cast<int>(d + 1);
    a.n_tensors = n;
    bool vec_all = true;
    for (int t = 0; t < n; ++t) {
      const bool vec = set_cluster_input(a, t, xs[t]);
      a.g[t] = gs[t].data_ptr();
      a.gx[t] = gxs[t].data_ptr();
      vec_all = vec_all && vec && aligned16(gs[t]) && aligned16(gxs[t]);
    }
    ENACT_CHECK_CUDA(enact::cluster_backward(a, dtype_of(xs[0]), vec_all, false, true, stream));

    // grad z from grad smoothed: the information kernel's backward (mode 0 = from logits)
    const int limit = dynamic_smem_limit(keys_in.get_device(), kFusedStaticSmem);
    const at::Tensor scratch = scratch_if_needed(
        enact::info_backward_smem_bytes(static_cast<int>(N), static_cast<int>(sigma)), limit, B,
        4, N, fws.options());
    const at::Tensor mask = ctx->saved_data["mask"].toTensor();
    enact::InfoBwdArgs ib{};
    ib.x = fw + lay.z();
    ib.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    ib.grad_info = nullptr;
    ib.grad_sm = gsm;
    ib.grad_x = gz;
    ib.scratch = float_ptr_or_null(scratch);
    ib.B = static_cast<int>(B);
    ib.N = static_cast<int>(N);
    ib.sigma = static_cast<int>(sigma);
    ib.taps_half = static_cast<int>(taps_half);
    ib.mode = 0;
    ENACT_CHECK_CUDA(enact::info_backward(ib, limit, stream));

    // the keys' information term, grad w and grad bias in one pass over the keys
    const at::Tensor keys = keys_in.stride(2) == 1 ? keys_in : keys_in.contiguous();
    at::Tensor gk = alias ? gxs[0] : at::empty({B, N, d}, keys.options());
    enact::KeyGradArgs k{};
    k.keys = keys.data_ptr();
    k.key_row_stride = keys.stride(1);
    k.key_batch_stride = keys.stride(0);
    k.d = static_cast<int>(d);
    k.gz = gz;
    k.weight = weight.data_ptr<float>();
    k.gx = gk.data_ptr();
    k.accumulate = alias ? 1 : 0;
    k.gw = acc;
    k.B = static_cast<int>(B);
    k.N = static_cast<int>(N);
    ENACT_CHECK_CUDA(enact::key_grad(k, dtype_of(keys), key_vec_ok(keys) && aligned16(gk), stream));

    if (!alias) result[0] = gk;
    for (int t = 0; t < n; ++t) result[1 + t] = gxs[t];
    result[1 + n] = bws.narrow(0, 3 * B * N, d).view(weight.sizes());
    if (has_bias) result[2 + n] = bws.narrow(0, 3 * B * N + d, 1);
    return result;
  }
};

std::vector<at::Tensor> fused_finish(const std::shared_ptr<FusedPending>& p,
                                     const at::Tensor& info_keys,
                                     const std::vector<at::Tensor>& tensors,
                                     const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, bool alias,
                                     int64_t rows) {
  TORCH_CHECK(p != nullptr, "enact_cuda: fused_finish needs fused_begin's result");
  return FusedClusterFn::apply(info_keys, at::TensorList(tensors), weight, bias, p, alias, rows);
}

}  // namespace

void register_fused(pybind11::module& m) {
  pybind11::class_<FusedPending, std::shared_ptr<FusedPending>>(
      m, "FusedPending", "fused_begin's state: detached outputs, R_max pending on an event")
      .def_readonly("information", &FusedPending::info)
      .def_readonly("smoothed", &FusedPending::smoothed)
      .def_readonly("region_index", &FusedPending::region_index)
      .def_readonly("counts", &FusedPending::counts)
      .def_readonly("stats", &FusedPending::stats)
      .def("r_max", &FusedPending::R, "max(R_b, 1); waits for the forward kernel")
      .def("r_max_if_ready", &FusedPending::R_if_ready,
           "max(R_b, 1) if it has reached the host, else 0; never waits");
  m.def("fused_begin", &fused_begin,
        "logits + information + regions + region statistics (one launch), R_max read pending "
        "(unless read_rmax is false)");
  m.def("fused_finish", &fused_finish,
        "cluster the tensors (one launch); differentiable w.r.t. keys, tensors, weight, bias");
}
