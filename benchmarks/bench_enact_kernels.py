"""Benchmark of the enact_cuda kernels against the torch backend and dense attention (GPU).

Measures, per dtype (fp32, bf16) and feature-map size (B = 8 images, H x W from 25x38 (C5)
to 50x76 (DC5), d = 256, 8 heads, padded batch with random valid sizes >= 75 %):
  * attention core, forward and forward+backward time and peak memory: dense eager
    (materialised N x N weights), dense SDPA, clustered torch backend (padded clusters through
    SDPA), clustered CUDA kernel (fused online softmax);
  * ENACT's own overhead per layer (W_prob logits, information, smoothing, curvature, regions,
    the R_max read, clustering of keys and values; forward+backward) for the CUDA backend's
    fused path (cuda_backend.fused_begin / fused_finish), the unfused CUDA calls and the torch
    backend, against the clustered attention time. Overhead and attention are measured the
    same way: wall clock = CUDA events around forward + torch.autograd.grad with gradients
    made beforehand; GPU kernel time = the sum of the CUDA kernels (and memsets / copies) the
    profiler records per call;
  * whole layers (projections included): ENACTAttention (impl auto = fused CUDA clustering +
    the per-dtype attention choice, the same in mode="official_fixed_chunk", and torch) vs a
    dense layer with the same projections (SDPA / eager); bf16 runs under autocast; and the
    ENACT layer with its clusters computed beforehand, so that the difference is ENACT's own
    work inside a layer, wall clock, where the host launches ahead of the GPU as in training
    (isolated, the overhead's small kernels and the autograd call are host-bound);
  * the clustering kernels' achieved memory bandwidth on a large input against the GPU's
    measured device-to-device copy bandwidth and its datasheet peak: whole calls (region
    bounds + sums) timed back to back, and the sum kernel alone from the profiler.
Timing: CUDA events around each call, warm-ups first, median of the repeats. Prints the GPU,
torch version and shapes, a table, and writes JSON (--out, default
benchmarks/results/enact_kernels_<gpu>.json).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import enact_cuda  # noqa: E402
from enact_cuda.attention import clustered_attention_torch  # noqa: E402
from enact_cuda.clustering import cluster_tensors as torch_cluster_tensors  # noqa: E402
from enact_cuda.information import information_from_logits, regions as torch_regions  # noqa: E402
from bench_reference import gpu_slug  # noqa: E402

# Datasheet memory bandwidth (bytes/s) by device-name substring.
NOMINAL_BW = [("H200", 4.8e12), ("H100 80GB HBM3", 3.35e12), ("H100 PCIe", 2.0e12),
              ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12), ("A100", 1.56e12)]


# ----------------------------------------------------------------------------- timing
def bench(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() measured with CUDA events after warm-ups."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_mb(fn) -> float:
    """Peak extra memory (MiB) allocated while fn() runs, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure(name, fwd, fwdbwd, args, rows, **info):
    row = dict(info, op=name)
    try:
        row["fwd_ms"] = bench(fwd, args.warmup, args.iters)
        row["fwdbwd_ms"] = bench(fwdbwd, args.warmup, args.iters)
        row["peak_mb"] = peak_mb(fwdbwd)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        torch.cuda.empty_cache()
    except Exception as exc:  # record and go on with the other measurements
        row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
    rows.append(row)
    return row


# ----------------------------------------------------------------------------- inputs
def padded_mask(B, H, W, gen, device):
    mask = torch.ones(B, H, W, dtype=torch.bool)
    for b in range(B):
        if b == 0:
            h, w = H, W
        else:
            h = int(torch.randint(math.ceil(0.75 * H), H + 1, (1,), generator=gen))
            w = int(torch.randint(math.ceil(0.75 * W), W + 1, (1,), generator=gen))
        mask[b, :h, :w] = False
    return mask.reshape(B, H * W).to(device)


class DenseLayer(nn.Module):
    """Dense encoder self-attention with ENACTAttention's projections (q = k = src + pos)."""

    def __init__(self, d, nhead, impl):
        super().__init__()
        self.h, self.impl = nhead, impl
        self.W_q, self.W_k, self.W_v, self.W_o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, src, pos, key_padding_mask, hw=None):
        B, N, d = src.shape
        h, e = self.h, d // self.h
        x = src + pos
        q = self.W_q(x).view(B, N, h, e).transpose(1, 2)
        k = self.W_k(x).view(B, N, h, e).transpose(1, 2)
        v = self.W_v(src).view(B, N, h, e).transpose(1, 2)
        out = dense_attention(q, k, v, key_padding_mask, self.impl)
        return self.W_o(out.transpose(1, 2).reshape(B, N, d))


class FixedClusterLayer(nn.Module):
    """An ENACTAttention's projections and attention over clusters computed once beforehand:
    the ENACT layer minus ENACT's own work (information, regions, clustering, their backward
    and the R_max read), so (ENACT layer - this layer) is that work's wall-clock cost inside a
    layer, where the host runs ahead of the GPU as in training."""

    def __init__(self, enact, ck, cv, kpm):
        super().__init__()
        self.enact, self.ck, self.cv, self.kpm = enact, ck, cv, kpm

    def forward(self, src, pos, key_padding_mask, hw=None):
        return self.enact.attend(self.enact.W_q(src + pos), self.ck, self.cv, self.kpm,
                                 impl=self.enact.impl)


def dense_attention(q, k, v, key_padding_mask, impl):
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding_mask[:, None, None, :])
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


# ------------------------------------------------------------------------- benchmarks
def enact_overhead_fn(kind, cb, keys, src, w_prob, mask, sigma, hw):
    """ENACT's own work for one layer: W_prob logits -> information -> regions -> R_max read ->
    clustering of keys and values. kind: "cuda" (fused path), "cuda_unfused" (the separate
    CUDA calls), "torch". Returns (fwd, fwdbwd); fwdbwd's gradients are made beforehand."""
    params = (w_prob.weight, w_prob.bias)

    def fwd():
        if kind == "cuda":
            st = cb.fused_begin(keys, w_prob.weight, w_prob.bias, mask, sigma, False, hw)
            return cb.fused_finish(st, keys, (keys, src))[0]
        w, b = w_prob.weight.to(keys.dtype), w_prob.bias.to(keys.dtype)  # as under autocast
        z = F.linear(keys, w, b).squeeze(-1).float()
        if kind == "cuda_unfused":
            _, sm, ri, counts = cb.information_regions(z, mask, sigma, False, hw)
            R = max(int(counts.max()), 1)
            return cb.cluster_tensors((keys, src), sm, ri, R)
        info = information_from_logits(z, mask)
        sm, ri, counts = torch_regions(info, mask, sigma, False, hw)
        R = max(int(counts.max()), 1)
        return torch_cluster_tensors((keys, src), sm, ri, R)

    grads = [torch.randn_like(o) for o in fwd()]  # R_max is fixed for fixed inputs

    def fwdbwd():
        return torch.autograd.grad(fwd(), (keys, src) + params, grads)
    return fwd, fwdbwd


def attention_fns(kind, cb, q, k, v, kpm):
    def fwd():
        if kind == "cuda":
            return cb.clustered_attention(q, k, v, kpm, 0.0, None)
        if kind == "torch":
            return clustered_attention_torch(q, k, v, kpm, 0.0, None)
        return dense_attention(q, k, v, kpm, kind)

    go = torch.randn_like(q)

    def fwdbwd():
        return torch.autograd.grad(fwd(), (q, k, v), go)
    return fwd, fwdbwd


def bench_size(args, cb, dtype, H, W, rows, summary):
    dev = torch.device("cuda")
    B, d, nh, sigma = args.batch, args.d_model, args.heads, args.sigma
    N, e = H * W, args.d_model // args.heads
    gen = torch.Generator().manual_seed(H * W)
    mask = padded_mask(B, H, W, gen, dev)
    src = torch.randn(B, N, d, generator=gen).to(dev)
    pos = torch.randn(B, N, d, generator=gen).to(dev)
    w_prob = nn.Linear(d, 1).to(dev)
    nn.init.xavier_uniform_(w_prob.weight)
    nn.init.zeros_(w_prob.bias)
    keys = (src + pos)
    cdt = dtype  # clustering / attention dtype
    keys_c = keys.to(cdt).requires_grad_(True)
    src_c = src.to(cdt).requires_grad_(True)
    w_prob_c = w_prob  # float32 parameters, as in a module under autocast
    with torch.no_grad():
        _, sm, ri, counts = cb.information_regions(
            F.linear(keys, w_prob.weight, w_prob.bias).squeeze(-1), mask, sigma, False, (H, W))
    R = int(counts.max())
    valid = (~mask).sum(1).float()
    info = dict(dtype=str(dtype).replace("torch.", ""), B=B, H=H, W=W, N=N, d=d, heads=nh,
                head_dim=e, sigma=sigma, R_max=R,
                clusters_mean=float(counts.float().mean()),
                pixels_mean=float(valid.mean()))
    print(f"\n== {info['dtype']}  B={B}  HxW={H}x{W}  N={N}  d={d}  heads={nh}x{e}  "
          f"R_max={R}  clusters/image={info['clusters_mean']:.0f}  "
          f"valid pixels/image={info['pixels_mean']:.0f}", flush=True)

    # ENACT overhead (information + regions + clustering): fused CUDA path, unfused CUDA
    # calls, torch backend
    gpu_us = {}
    verbose = args.profile and f"{H}x{W}" in args.profile_sizes.split(",") \
        and dtype == torch.float32
    for kind in ("cuda", "cuda_unfused", "torch"):
        fwd, fwdbwd = enact_overhead_fn(kind, cb, keys_c, src_c, w_prob_c, mask, sigma, (H, W))
        measure("enact_overhead", fwd, fwdbwd, args, rows, backend=kind, **info)
        if args.profile and kind != "torch":
            gpu_us[f"overhead_{kind}"] = profile(
                f"ENACT overhead fwd+bwd ({kind}) {info['dtype']} {H}x{W}", fwdbwd,
                cpu=verbose and kind == "cuda", quiet=not verbose)

    # attention core on the same queries: dense (N keys) vs clustered (R keys)
    ck, cv = cb.cluster_tensors((keys_c.detach(), src_c.detach()), sm, ri, R)
    kpm_c = torch.arange(R, device=dev)[None, :] >= counts[:, None]
    q = torch.randn(B, N, nh, e, generator=gen).to(dev, dtype).transpose(1, 2).requires_grad_(True)
    kc = ck.view(B, R, nh, e).transpose(1, 2).detach().requires_grad_(True)
    vc = cv.view(B, R, nh, e).transpose(1, 2).detach().requires_grad_(True)
    kd = keys_c.detach().view(B, N, nh, e).transpose(1, 2).requires_grad_(True)
    vd = src_c.detach().view(B, N, nh, e).transpose(1, 2).requires_grad_(True)
    for backend in ("cuda", "torch"):
        fwd, fwdbwd = attention_fns(backend, cb, q, kc, vc, kpm_c)
        measure("clustered_attention", fwd, fwdbwd, args, rows, backend=backend, **info)
        if args.profile:
            gpu_us[f"attention_{backend}"] = profile(
                f"clustered attention fwd+bwd ({backend}) {info['dtype']} {H}x{W}", fwdbwd,
                quiet=not verbose)
    for impl in ("sdpa", "eager"):
        if impl == "eager" and args.skip_eager:
            continue
        fwd, fwdbwd = attention_fns(impl, cb, q, kd, vd, mask)
        measure("dense_attention", fwd, fwdbwd, args, rows, backend=impl, **info)

    # whole layers
    layers = {
        # impl="auto" on a GPU: fused CUDA clustering; attention kernel for float32, torch's
        # flash SDPA for bfloat16 (AUTO_CUDA_ATTENTION_DTYPES)
        "enact_auto": enact_cuda.ENACTAttention(d, nh, sigma, impl="auto"),
        "enact_torch": enact_cuda.ENACTAttention(d, nh, sigma, impl="torch"),
        # --enact_mode official_fixed_chunk: the same kernels unfused, chunks for regions
        "enact_auto_fixed_chunk": enact_cuda.ENACTAttention(d, nh, sigma, impl="auto",
                                                            mode="official_fixed_chunk"),
        "dense_sdpa": DenseLayer(d, nh, "sdpa"),
    }
    if not args.skip_eager:
        layers["dense_eager"] = DenseLayer(d, nh, "eager")
    enact_layer = layers["enact_auto"].to(dev)
    with torch.no_grad():
        keys_l = src + pos
        info_l = enact_cuda.self_information(keys_l, enact_layer.W_prob.weight,
                                             enact_layer.W_prob.bias, mask)
        fixed = enact_cuda.cluster(keys_l, src, info_l, mask, sigma)
    layers["enact_fixed_clusters"] = FixedClusterLayer(enact_layer, fixed.keys, fixed.values,
                                                       fixed.key_padding_mask)
    src_l = src.clone().requires_grad_(True)
    for name, layer in layers.items():
        layer = layer.to(dev)
        amp = dtype == torch.bfloat16

        def fwd(layer=layer, amp=amp):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                return layer(src_l, pos, mask, (H, W))

        def fwdbwd(fwd=fwd, layer=layer):
            out = fwd()
            return torch.autograd.grad(out.float().sum(), [src_l] + list(layer.parameters()),
                                       allow_unused=True)
        measure("layer", fwd, fwdbwd, args, rows, backend=name, **info)

    def get(op, backend):
        for r in rows:
            if (r["op"], r.get("backend"), r["dtype"], r["H"], r["W"]) == \
                    (op, backend, info["dtype"], H, W) and "fwdbwd_ms" in r:
                return r
        return None

    s = dict(info)
    for k, v in gpu_us.items():
        s[f"gpu_kernel_us_{k}"] = v
    for kind in ("cuda", "cuda_unfused"):
        if f"overhead_{kind}" in gpu_us and "attention_cuda" in gpu_us:
            s[f"overhead_over_attention_gpu_kernel_time_{kind}"] = \
                gpu_us[f"overhead_{kind}"] / gpu_us["attention_cuda"]
    at_cuda = get("clustered_attention", "cuda")
    for kind in ("cuda", "cuda_unfused", "torch"):
        ov = get("enact_overhead", kind)
        at = get("clustered_attention", "torch" if kind == "torch" else "cuda")
        lay = get("layer", "enact_torch" if kind == "torch" else "enact_auto")
        if ov and at:
            s[f"overhead_over_attention_{kind}"] = ov["fwdbwd_ms"] / at["fwdbwd_ms"]
        if ov and lay and kind != "cuda_unfused":
            s[f"overhead_share_of_layer_{kind}"] = ov["fwdbwd_ms"] / lay["fwdbwd_ms"]
    if at_cuda:
        s["attention_cuda_fwdbwd_ms"] = at_cuda["fwdbwd_ms"]
    lay_e, lay_f = get("layer", "enact_auto"), get("layer", "enact_fixed_clusters")
    if lay_e and lay_f and at_cuda:
        # ENACT's own work measured inside a layer (wall clock, forward + backward)
        s["enact_in_layer_ms"] = lay_e["fwdbwd_ms"] - lay_f["fwdbwd_ms"]
        s["enact_in_layer_over_attention"] = s["enact_in_layer_ms"] / at_cuda["fwdbwd_ms"]
    c, t, ds = get("clustered_attention", "cuda"), get("clustered_attention", "torch"), \
        get("dense_attention", "sdpa")
    if c and t:
        s["fused_vs_padded_sdpa_speedup_fwdbwd"] = t["fwdbwd_ms"] / c["fwdbwd_ms"]
        s["attention_faster_backend"] = "cuda" if c["fwdbwd_ms"] < t["fwdbwd_ms"] else "torch"
        s["attention_auto_backend"] = ("cuda" if dtype in enact_cuda.attention.AUTO_CUDA_ATTENTION_DTYPES
                                       else "torch")
    lc, ld = get("layer", "enact_auto"), get("layer", "dense_sdpa")
    if lc and ld:
        s["enact_layer_vs_dense_sdpa_speedup_fwdbwd"] = ld["fwdbwd_ms"] / lc["fwdbwd_ms"]
        s["enact_layer_vs_dense_sdpa_memory_ratio"] = lc["peak_mb"] / max(ld["peak_mb"], 1e-9)
    if c and ds:
        s["fused_clustered_vs_dense_sdpa_core_speedup_fwdbwd"] = ds["fwdbwd_ms"] / c["fwdbwd_ms"]
    lx = get("layer", "enact_auto_fixed_chunk")
    if lc and lx:
        s["enact_layer_regions_vs_fixed_chunk_speedup_fwdbwd"] = lx["fwdbwd_ms"] / lc["fwdbwd_ms"]
    summary.append(s)


def profile(title, fn, reps=5, cpu=False, quiet=False, kernel_filter=None):
    """GPU time per call of fn(): the sum over the CUDA-side events the profiler records
    (kernels, memsets, copies; each counted once, host ops excluded), averaged over reps.
    Prints the top kernels unless quiet; with cpu=True also the host-side ops by self CPU time.
    kernel_filter: a substring; then only matching kernels are summed."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile as tprofile
    fn()
    torch.cuda.synchronize()
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if cpu else [])
    with tprofile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    dev_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
                  and (kernel_filter is None or kernel_filter in e.name)]
    total = sum(e.time_range.elapsed_us() for e in dev_events) / reps
    if quiet:
        return total
    print(f"\n-- profile: {title} (per call, {reps} calls)")
    per_name: dict = {}
    for e in dev_events:
        t, c = per_name.get(e.name, (0.0, 0))
        per_name[e.name] = (t + e.time_range.elapsed_us(), c + 1)
    for name, (t, c) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:12]:
        print(f"   {t / reps:9.1f} us  x{c // reps:<3} {name[:90]}")
    print(f"   {total:9.1f} us  GPU time in total ({len(dev_events) // reps} device events)")
    if cpu:
        host = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
        host.sort(key=lambda e: -e.self_cpu_time_total)
        print("   host side (self CPU time per call):")
        for e in host[:14]:
            print(f"   {e.self_cpu_time_total / reps:9.1f} us  x{e.count // reps:<3} {e.key[:80]}")
    return total


def copy_bandwidth(iters=10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers."""
    x = torch.empty(2 ** 28, device="cuda")
    y = torch.empty_like(x)
    x.normal_()
    ms = bench(lambda: y.copy_(x), 3, iters)
    del x, y
    return 2 * 2 ** 30 / (ms * 1e-3)


def clustering_bandwidth(args, cb, copy_bw, nominal):
    """Achieved bandwidth of the clustering kernels (forward, backward) on a large input."""
    ext = cb.extension()
    dev = torch.device("cuda")
    B, H, W, d = args.bw_batch, 50, 76, args.d_model
    N = H * W
    gen = torch.Generator().manual_seed(0)
    mask = padded_mask(B, H, W, gen, dev)
    res = []
    for dtype in (torch.float32, torch.bfloat16):
        xs = [torch.randn(B, N, d, generator=gen).to(dev, dtype) for _ in range(2)]
        z = torch.randn(B, N, generator=gen).to(dev)
        _, sm, ri, counts = cb.information_regions(z, mask, args.sigma, False, (H, W))
        R = int(counts.max())
        el = xs[0].element_size()
        fwd_out = ext.cluster_forward(xs, sm, ri, R)
        stats, starts, ends, cnt = fwd_out[-4:]
        grads = [torch.randn(B, R, d, generator=gen).to(dev, dtype) for _ in xs]
        loops = 10  # calls back to back per timing, so host launch gaps overlap GPU work

        def fwd_loop():
            for _ in range(loops):
                ext.cluster_forward(xs, sm, ri, R)

        def bwd_loop():
            for _ in range(loops):
                ext.cluster_backward(grads, xs, sm, stats, ri, starts, ends, cnt, R)
        ms_f = bench(fwd_loop, args.warmup, args.iters) / loops
        ms_b = bench(bwd_loop, args.warmup, args.iters) / loops
        us_fk = profile("cluster_fwd_kernel", lambda: ext.cluster_forward(xs, sm, ri, R),
                        reps=10, quiet=True, kernel_filter="cluster_fwd_kernel")
        us_bk = profile("cluster_bwd_kernel",
                        lambda: ext.cluster_backward(grads, xs, sm, stats, ri, starts, ends,
                                                     cnt, R),
                        reps=10, quiet=True, kernel_filter="cluster_bwd_kernel")
        # fewest bytes: fwd reads X, smoothed, region_index, writes X' (+ small bounds/stats);
        # bwd reads G, X, smoothed, region_index, writes dX, grad smoothed (dots scratch r+w)
        bytes_f = 2 * (B * N * d * el + B * R * d * el) + B * N * (4 + 8) + B * R * 16
        bytes_b = 2 * (B * R * d * el + 2 * B * N * d * el) + B * N * (4 + 8 + 4 + 8)
        for name, ms, nbytes in (("cluster_forward", ms_f, bytes_f),
                                 ("cluster_backward", ms_b, bytes_b),
                                 ("cluster_fwd_kernel_only", us_fk * 1e-3, bytes_f),
                                 ("cluster_bwd_kernel_only", us_bk * 1e-3, bytes_b)):
            bw = nbytes / (ms * 1e-3)
            res.append(dict(kernel=name, dtype=str(dtype).replace("torch.", ""), B=B, N=N, d=d,
                            tensors=2, R_max=R, ms=ms, bytes=nbytes, bandwidth_GBps=bw / 1e9,
                            fraction_of_copy_bw=bw / copy_bw,
                            fraction_of_nominal_bw=(bw / nominal) if nominal else None))
    return res


def print_table(rows):
    print("\n{:<7} {:>6} {:>5} {:<20} {:<22} {:>9} {:>11} {:>10}".format(
        "dtype", "HxW", "R", "op", "backend", "fwd ms", "fwd+bwd ms", "peak MiB"))
    for r in rows:
        if "error" in r:
            print("{:<7} {:>6} {:>5} {:<20} {:<22} {}".format(
                r["dtype"], f"{r['H']}x{r['W']}", r["R_max"], r["op"], r["backend"], r["error"]))
            continue
        print("{:<7} {:>6} {:>5} {:<20} {:<22} {:>9.3f} {:>11.3f} {:>10.1f}".format(
            r["dtype"], f"{r['H']}x{r['W']}", r["R_max"], r["op"], r["backend"], r["fwd_ms"],
            r["fwdbwd_ms"], r["peak_mb"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default "
                   "benchmarks/results/enact_kernels_<gpu>.json)")
    p.add_argument("--sizes", default="25x38,34x51,42x63,50x76")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bw_batch", type=int, default=16)
    p.add_argument("--d_model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--sigma", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--skip_eager", action="store_true", help="skip dense eager attention")
    p.add_argument("--skip_bandwidth", action="store_true", help="skip the bandwidth part")
    p.add_argument("--profile", action="store_true",
                   help="print per-kernel CUDA times of ENACT's overhead and the attention")
    p.add_argument("--profile_sizes", default="25x38,50x76",
                   help="sizes profiled with --profile")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_enact_kernels: needs a CUDA GPU", file=sys.stderr)
        return 1
    from enact_cuda import build, cuda_backend as cb
    build.load_extension()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    gpu = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    nominal = next((bw for key, bw in NOMINAL_BW if key in gpu), None)
    print(f"GPU: {gpu} ({props.multi_processor_count} SMs, "
          f"{props.total_memory / 2 ** 30:.0f} GiB)  torch {torch.__version__}  "
          f"CUDA {torch.version.cuda}  enact_cuda arch {build.arch_list()}", flush=True)
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy bandwidth: {copy_bw / 1e9:.0f} GB/s (read + write); "
          f"datasheet: {nominal / 1e9 if nominal else float('nan'):.0f} GB/s", flush=True)

    rows, summary = [], []
    dtypes = [getattr(torch, n) for n in args.dtypes.split(",")]
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    bw = []
    if not args.skip_bandwidth:  # first: a device error later must not cost these numbers
        try:
            bw = clustering_bandwidth(args, cb, copy_bw, nominal)
        except Exception as exc:
            print(f"clustering bandwidth failed: {type(exc).__name__}: {exc}")
    broken = None
    for dtype in dtypes:
        for H, W in sizes:
            if broken:
                break
            try:
                bench_size(args, cb, dtype, H, W, rows, summary)
            except Exception as exc:  # keep the other sizes' numbers
                print(f"  size {H}x{W} {dtype} failed: {type(exc).__name__}: {exc}")
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:  # a sticky device error: stop, still write what we have
                broken = f"{type(exc).__name__}: {str(exc)[:200]}"
                print(f"  device error, stopping: {broken}")

    print_table(rows)
    print("\nsummary (ratios; >1 speedup means the first is faster):")
    for s in summary:
        keys = [k for k in s if k.startswith(("overhead", "fused", "enact_layer", "enact_in_layer",
                                               "attention_", "gpu_kernel"))]
        print(f"  {s['dtype']:<8} {s['H']}x{s['W']} R={s['R_max']}: " +
              ", ".join(f"{k}={s[k]:.3f}" if isinstance(s[k], float) else f"{k}={s[k]}"
                        for k in keys))
    print("\nclustering kernels' bandwidth:")
    for r in bw:
        nom = (f", {100 * r['fraction_of_nominal_bw']:.0f}% of datasheet"
               if r["fraction_of_nominal_bw"] else "")
        print(f"  {r['kernel']:<17} {r['dtype']:<8} B={r['B']} N={r['N']} d={r['d']} "
              f"x{r['tensors']} R={r['R_max']}: {r['ms']:.3f} ms, {r['bandwidth_GBps']:.0f} GB/s "
              f"= {100 * r['fraction_of_copy_bw']:.0f}% of measured copy bandwidth{nom}")

    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                           / f"enact_kernels_{gpu_slug(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        gpu=gpu, sms=props.multi_processor_count, torch=torch.__version__,
        cuda=torch.version.cuda, copy_bandwidth_GBps=copy_bw / 1e9,
        nominal_bandwidth_GBps=nominal / 1e9 if nominal else None, args=vars(args),
        rows=rows, summary=summary, clustering_bandwidth=bw, device_error=broken), indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
