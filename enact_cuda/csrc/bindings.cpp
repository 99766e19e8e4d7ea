// Python bindings of the enact_cuda kernels: tensor checks, allocation, stream/device handling.
// The autograd wiring lives in enact_cuda/cuda_backend.py; these are the raw forward/backward
// entry points (see enact.h for what each kernel computes).
#include <optional>
#include <vector>

#include "bind_util.h"

void register_fused(pybind11::module& m);  // fused_bindings.cpp

namespace {

// ------------------------------------------------------------------- information + regions
constexpr int kInfoStaticSmem = 2048;  // taps + reduction buffers, with margin

std::vector<at::Tensor> info_forward(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                                     int64_t sigma, int64_t taps_half, bool row_breaks, int64_t W,
                                     int64_t mode) {
  check_cuda(x_in, "z");
  TORCH_CHECK(x_in.dim() == 2, "enact_cuda: z / information must be (B, N)");
  check_taps(sigma, taps_half);
  TORCH_CHECK(mode == 0 || mode == 1, "enact_cuda: mode must be 0 or 1");
  TORCH_CHECK(x_in.size(1) < (1LL << 31), "enact_cuda: N too large");
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = float_contig(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  auto mask = check_mask(mask_in, B, N, x);
  at::Tensor info = mode == 0 ? at::empty_like(x) : at::Tensor();
  at::Tensor smoothed = at::empty_like(x);
  at::Tensor region = at::empty({B, N}, x.options().dtype(at::kLong));
  at::Tensor counts = at::empty({B}, x.options().dtype(at::kLong));
  const int limit = dynamic_smem_limit(x.get_device(), kInfoStaticSmem);
  const at::Tensor scratch =
      scratch_if_needed(enact::info_forward_smem_bytes(N, sigma), limit, B, 3, N, x.options());
  enact::InfoFwdArgs a{};
  a.x = x.data_ptr<float>();
  a.mask = mask ? mask->data_ptr<bool>() : nullptr;
  a.info_out = mode == 0 ? info.data_ptr<float>() : nullptr;
  a.smoothed_out = smoothed.data_ptr<float>();
  a.region_out = region.data_ptr<int64_t>();
  a.counts_out = counts.data_ptr<int64_t>();
  a.scratch = float_ptr_or_null(scratch);
  set_scan(a, B, N, sigma, taps_half, row_breaks, W);
  a.mode = static_cast<int>(mode);
  ENACT_CHECK_CUDA(enact::info_forward(a, limit, c10::cuda::getCurrentCUDAStream()));
  return {mode == 0 ? info : smoothed.new_empty({0}), smoothed, region, counts};
}

at::Tensor info_backward(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                         const std::optional<at::Tensor>& grad_info,
                         const std::optional<at::Tensor>& grad_sm, int64_t sigma,
                         int64_t taps_half, int64_t mode) {
  check_cuda(x_in, "z");
  check_taps(sigma, taps_half);
  c10::cuda::CUDAGuard guard(x_in.device());
  at::Tensor x = float_contig(x_in);
  const int64_t B = x.size(0), N = x.size(1);
  auto mask = check_mask(mask_in, B, N, x);
  at::Tensor gi, gs;
  if (grad_info.has_value() && grad_info->defined() && mode == 0) gi = float_contig(*grad_info);
  if (grad_sm.has_value() && grad_sm->defined()) gs = float_contig(*grad_sm);
  at::Tensor gx = at::empty_like(x);
  const int limit = dynamic_smem_limit(x.get_device(), kInfoStaticSmem);
  const at::Tensor scratch =
      scratch_if_needed(enact::info_backward_smem_bytes(N, sigma), limit, B, 4, N, x.options());
  enact::InfoBwdArgs a{};
  a.x = x.data_ptr<float>();
  a.mask = mask ? mask->data_ptr<bool>() : nullptr;
  a.grad_info = gi.defined() ? gi.data_ptr<float>() : nullptr;
  a.grad_sm = gs.defined() ? gs.data_ptr<float>() : nullptr;
  a.grad_x = gx.data_ptr<float>();
  a.scratch = float_ptr_or_null(scratch);
  a.B = static_cast<int>(B);
  a.N = static_cast<int>(N);
  a.sigma = static_cast<int>(sigma);
  a.taps_half = static_cast<int>(taps_half);
  a.mode = static_cast<int>(mode);
  ENACT_CHECK_CUDA(enact::info_backward(a, limit, c10::cuda::getCurrentCUDAStream()));
  return gx;
}

// ------------------------------------------------------------------------------ clustering
struct Group {
  enact::DType dtype;
  std::vector<size_t> idx;
};

// Tensors grouped by dtype, at most kMaxClusterTensors per launch.
std::vector<Group> group_tensors(const std::vector<at::Tensor>& ts) {
  std::vector<Group> groups;
  for (size_t i = 0; i < ts.size(); ++i) {
    const enact::DType dt = dtype_of(ts[i]);
    bool placed = false;
    for (auto& g : groups) {
      if (g.dtype == dt && g.idx.size() < static_cast<size_t>(enact::kMaxClusterTensors)) {
        g.idx.push_back(i);
        placed = true;
        break;
      }
    }
    if (!placed) groups.push_back({dt, {i}});
  }
  return groups;
}

std::vector<at::Tensor> cluster_forward(const std::vector<at::Tensor>& tensors_in,
                                        const at::Tensor& smoothed_in,
                                        const at::Tensor& region_in, int64_t R) {
  check_cuda(smoothed_in, "smoothed");
  TORCH_CHECK(smoothed_in.dim() == 2, "enact_cuda: smoothed must be (B, N)");
  TORCH_CHECK(!tensors_in.empty(), "enact_cuda: cluster_tensors needs at least one tensor");
  TORCH_CHECK(R >= 0, "enact_cuda: num_clusters must be >= 0");
  c10::cuda::CUDAGuard guard(smoothed_in.device());
  at::Tensor sm = float_contig(smoothed_in);
  const int64_t B = sm.size(0), N = sm.size(1);
  at::Tensor ri = region_in.to(at::kLong).contiguous();
  TORCH_CHECK(ri.sizes() == sm.sizes(), "enact_cuda: region_index must be (B, N)");
  std::vector<at::Tensor> xs;
  for (const auto& t : tensors_in) xs.push_back(prep_cluster_input(t, B, N, "tensor"));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // bounds (B, R) x 2 and counts (B,) in one int32 buffer; region stats (B, R, 2)
  at::Tensor ibuf = at::empty({2 * B * R + B}, sm.options().dtype(at::kInt));
  at::Tensor starts = ibuf.narrow(0, 0, B * R).view({B, R});
  at::Tensor ends = ibuf.narrow(0, B * R, B * R).view({B, R});
  at::Tensor counts = ibuf.narrow(0, 2 * B * R, B);
  at::Tensor stats = at::empty({B, R, 2}, sm.options());
  ENACT_CHECK_CUDA(enact::cluster_bounds(ri.data_ptr<int64_t>(), sm.data_ptr<float>(), B, N, R,
                                         starts.data_ptr<int>(), ends.data_ptr<int>(),
                                         stats.data_ptr<float>(), counts.data_ptr<int>(), stream));
  std::vector<at::Tensor> outs(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) outs[i] = at::empty({B, R, xs[i].size(2)}, xs[i].options());
  for (const auto& g : group_tensors(xs)) {
    enact::ClusterFwdArgs a{};
    set_regions(a, sm.data_ptr<float>(), ri.data_ptr<int64_t>(), starts.data_ptr<int>(),
                ends.data_ptr<int>(), stats.data_ptr<float>(), counts.data_ptr<int>(), R, B, N, R);
    a.kpm = nullptr;
    a.n_tensors = static_cast<int>(g.idx.size());
    bool vec_all = true;
    for (size_t k = 0; k < g.idx.size(); ++k) {
      const bool vec = set_cluster_input(a, static_cast<int>(k), xs[g.idx[k]]);
      a.out[k] = outs[g.idx[k]].data_ptr();
      vec_all = vec_all && vec && aligned16(outs[g.idx[k]]);
    }
    ENACT_CHECK_CUDA(enact::cluster_forward(a, g.dtype, vec_all, stream));
  }
  outs.push_back(stats);
  outs.push_back(starts);
  outs.push_back(ends);
  outs.push_back(counts);
  return outs;
}

std::vector<at::Tensor> cluster_backward(const std::vector<at::Tensor>& grads_in,
                                         const std::vector<at::Tensor>& tensors_in,
                                         const at::Tensor& smoothed_in, const at::Tensor& stats,
                                         const at::Tensor& region_in, const at::Tensor& starts,
                                         const at::Tensor& ends, const at::Tensor& counts,
                                         int64_t R) {
  TORCH_CHECK(grads_in.size() == tensors_in.size(), "enact_cuda: one grad per tensor");
  c10::cuda::CUDAGuard guard(smoothed_in.device());
  at::Tensor sm = float_contig(smoothed_in);
  const int64_t B = sm.size(0), N = sm.size(1);
  at::Tensor ri = region_in.to(at::kLong).contiguous();
  std::vector<at::Tensor> xs, gs, gxs;
  for (size_t i = 0; i < tensors_in.size(); ++i) {
    xs.push_back(prep_cluster_input(tensors_in[i], B, N, "tensor"));
    gs.push_back(grads_in[i].to(xs[i].scalar_type()).contiguous());
    TORCH_CHECK(gs[i].dim() == 3 && gs[i].size(0) == B && gs[i].size(1) == R &&
                    gs[i].size(2) == xs[i].size(2),
                "enact_cuda: grad of a clustered tensor must be (B, R, d)");
    gxs.push_back(at::empty({B, N, xs[i].size(2)}, xs[i].options()));
  }
  at::Tensor dots = at::empty({B, N}, sm.options());
  at::Tensor gsm = at::empty({B, N}, sm.options());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto groups = group_tensors(xs);
  if (R == 0) {
    for (auto& g : gxs) g.zero_();
    gsm.zero_();
  }
  for (size_t gi = 0; gi < groups.size() && R > 0; ++gi) {
    const auto& g = groups[gi];
    enact::ClusterBwdArgs a{};
    set_regions(a, sm.data_ptr<float>(), ri.data_ptr<int64_t>(), starts.data_ptr<int>(),
                ends.data_ptr<int>(), stats.data_ptr<float>(), counts.data_ptr<int>(), R, B, N, R);
    a.dots = dots.data_ptr<float>();
    a.grad_sm = gsm.data_ptr<float>();
    a.zero_ptr = nullptr;
    a.zero_n = 0;
    a.n_tensors = static_cast<int>(g.idx.size());
    bool vec_all = true;
    for (size_t k = 0; k < g.idx.size(); ++k) {
      const size_t i = g.idx[k];
      const bool vec = set_cluster_input(a, static_cast<int>(k), xs[i]);
      a.g[k] = gs[i].data_ptr();
      a.gx[k] = gxs[i].data_ptr();
      vec_all = vec_all && vec && aligned16(gs[i]) && aligned16(gxs[i]);
    }
    ENACT_CHECK_CUDA(enact::cluster_backward(a, g.dtype, vec_all, gi > 0, gi + 1 == groups.size(),
                                             stream));
  }
  gxs.push_back(gsm);
  return gxs;
}

// ------------------------------------------------------------------- clustered attention
at::Tensor prep_attn(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  TORCH_CHECK(t.dim() == 4, "enact_cuda: ", name, " must be (B, heads, L, e)");
  const int64_t vec = 16 / t.element_size();
  const bool ok = t.stride(3) == 1 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0 &&
                  t.stride(2) % vec == 0 && aligned16(t);
  return ok ? t : t.contiguous();
}

void set_strides(int64_t (&s)[3], const at::Tensor& t) {
  s[0] = t.stride(0);
  s[1] = t.stride(1);
  s[2] = t.stride(2);
}

// The dropout seed arrives as a CPU int64 scalar tensor (host memory: reading it is no sync).
uint64_t seed_value(const at::Tensor& seed) {
  TORCH_CHECK(seed.device().is_cpu() && seed.scalar_type() == at::kLong && seed.numel() == 1,
              "enact_cuda: the dropout seed must be a CPU int64 tensor with one element");
  return static_cast<uint64_t>(*seed.data_ptr<int64_t>());
}

enact::AttnArgs attn_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& kpm, double scale, double dropout_p,
                          const at::Tensor& seed) {
  enact::AttnArgs a{};
  a.q = q.data_ptr();
  a.k = k.data_ptr();
  a.v = v.data_ptr();
  a.kpm = kpm.data_ptr<bool>();
  set_strides(a.sq, q);
  set_strides(a.sk, k);
  set_strides(a.sv, v);
  a.B = static_cast<int>(q.size(0));
  a.H = static_cast<int>(q.size(1));
  a.N = static_cast<int>(q.size(2));
  a.R = static_cast<int>(k.size(2));
  a.E = static_cast<int>(q.size(3));
  a.EV = static_cast<int>(v.size(3));
  a.scale = static_cast<float>(scale);
  a.dropout_p = static_cast<float>(dropout_p);
  a.seed = seed_value(seed);
  return a;
}

void check_attn_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& kpm) {
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "enact_cuda: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "enact_cuda: clustered attention supports float32 and bfloat16");
  const int64_t E = q.size(3), EV = v.size(3);
  TORCH_CHECK(E == 32 || E == 64, "enact_cuda: q / k head dim must be 32 or 64, got ", E);
  TORCH_CHECK(k.size(3) == E, "enact_cuda: q and k head dims must match");
  TORCH_CHECK(EV == E || (E == 64 && EV == 32),
              "enact_cuda: value head dim must equal the q / k head dim or be 32 with 64, got ",
              EV, " with ", E);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  v.size(1) == q.size(1) && v.size(2) == k.size(2),
              "enact_cuda: q (B,h,N,e), k (B,h,R,e) and v (B,h,R,e_v) shapes do not agree");
  TORCH_CHECK(kpm.scalar_type() == at::kBool && kpm.dim() == 2 && kpm.size(0) == q.size(0) &&
                  kpm.size(1) == k.size(2),
              "enact_cuda: key_padding_mask must be bool (B, R)");
  TORCH_CHECK(q.size(0) * q.size(1) < 65536, "enact_cuda: batch * heads must be < 65536");
}

std::vector<at::Tensor> attn_forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                     const at::Tensor& v_in, const at::Tensor& kpm_in, double scale,
                                     double dropout_p, const at::Tensor& seed) {
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = prep_attn(q_in, "q"), k = prep_attn(k_in, "k"), v = prep_attn(v_in, "v");
  at::Tensor kpm = kpm_in.contiguous();
  check_cuda(kpm, "key_padding_mask");
  check_attn_shapes(q, k, v, kpm);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), EV = v.size(3);
  // (B, N, H, EV) storage viewed as (B, H, N, EV): transpose(1, 2).reshape(B, N, H*EV) is free.
  at::Tensor out = at::empty({B, N, H, EV}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  enact::AttnArgs a = attn_args(q, k, v, kpm, scale, dropout_p, seed);
  a.o_mut = out.data_ptr();
  set_strides(a.so, out);
  a.lse = lse.data_ptr<float>();
  ENACT_CHECK_CUDA(enact::attn_forward(a, dtype_of(q), c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::vector<at::Tensor> attn_backward(const at::Tensor& dout_in, const at::Tensor& q_in,
                                      const at::Tensor& k_in, const at::Tensor& v_in,
                                      const at::Tensor& kpm_in, const at::Tensor& out_in,
                                      const at::Tensor& lse_in, double scale, double dropout_p,
                                      const at::Tensor& seed, int64_t nsplit,
                                      int64_t key_hint) {
  c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = prep_attn(q_in, "q"), k = prep_attn(k_in, "k"), v = prep_attn(v_in, "v");
  at::Tensor out = prep_attn(out_in, "out");
  at::Tensor dout = prep_attn(dout_in.to(q.scalar_type()), "grad_out");
  at::Tensor kpm = kpm_in.contiguous();
  at::Tensor lse = lse_in.contiguous();
  check_attn_shapes(q, k, v, kpm);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), R = k.size(2), E = q.size(3),
                EV = v.size(3);
  const std::vector<int64_t> out_shape{B, H, N, EV};
  TORCH_CHECK(dout.sizes().vec() == out_shape && out.sizes().vec() == out_shape,
              "enact_cuda: grad_out / out must be (B, h, N, e_v)");
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::zeros({B, H, R, E}, q.options().dtype(at::kFloat));
  at::Tensor dv = at::zeros({B, H, R, EV}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  enact::AttnArgs a = attn_args(q, k, v, kpm, scale, dropout_p, seed);
  a.o = out.data_ptr();
  set_strides(a.so, out);
  a.dout = dout.data_ptr();
  set_strides(a.sdo, dout);
  a.dq = dq.data_ptr();
  set_strides(a.sdq, dq);
  a.lse = lse.data_ptr<float>();
  a.delta = delta.data_ptr<float>();
  a.dk_acc = dk.data_ptr<float>();
  a.dv_acc = dv.data_ptr<float>();
  a.nsplit = static_cast<int>(nsplit);
  TORCH_CHECK(key_hint >= 0, "enact_cuda: key_hint must be >= 0");
  a.key_hint = static_cast<int>(std::min<int64_t>(key_hint, R));
  const int sms = device_attr(cudaDevAttrMultiProcessorCount, q.get_device());
  ENACT_CHECK_CUDA(enact::attn_backward(a, dtype_of(q), sms, c10::cuda::getCurrentCUDAStream()));
  if (q.scalar_type() != at::kFloat) {
    dk = dk.to(q.scalar_type());
    dv = dv.to(q.scalar_type());
  }
  return {dq, dk, dv};
}

at::Tensor dropout_mask(int64_t B, int64_t H, int64_t N, int64_t R, double p, int64_t seed,
                        const at::Tensor& like) {
  check_cuda(like, "like");
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty({B, H, N, R}, like.options().dtype(at::kByte));
  ENACT_CHECK_CUDA(enact::attn_dropout_mask(out.data_ptr<uint8_t>(), B, H, N, R,
                                            static_cast<float>(p), static_cast<uint64_t>(seed),
                                            c10::cuda::getCurrentCUDAStream()));
  return out.to(at::kBool);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "enact_cuda kernels: fused information/regions, clustering, clustered attention";
  m.def("info_forward", &info_forward, "information + smoothing + regions (forward)");
  m.def("info_backward", &info_backward, "gradient of the information/smoothing wrt the input");
  m.def("cluster_forward", &cluster_forward, "region-softmax weighted sums (forward)");
  m.def("cluster_backward", &cluster_backward, "clustering backward (inputs and smoothed)");
  m.def("attn_forward", &attn_forward, "clustered attention forward -> (out, lse)");
  m.def("attn_backward", &attn_backward, "clustered attention backward -> (dq, dk, dv)");
  m.def("dropout_mask", &dropout_mask, "the attention dropout keep mask (B, H, N, R) (tests)");
  register_fused(m);
}
