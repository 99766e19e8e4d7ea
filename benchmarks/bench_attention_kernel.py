"""Benchmark of the fused clustered-attention kernel at the three detectors' encoder shapes (GPU).

One ENACT encoder layer's attention per detector, as in bench_detectors.py's fp32 rows:
  DETR R50 (C5)            B = 8, 8 heads, N = 25 x 38 = 950, q / k head dim 32, values 32, dropout 0.1
  Conditional DETR R101    B = 8, 8 heads, N = 950, q / k 64 (content + position), values 32, dropout 0.1
  Anchor DETR R50-DC5      B = 4, 8 heads, N = 50 x 76 = 3800, q / k 64 (row + column), values 32, no dropout
with per-image cluster counts like those the detector benchmark logs (SHAPES: shares of N), and
clusters allocated at a training guess's rows (the largest count x 1.25 + 8). Random fp32 inputs.
Two times per case: wall (CUDA events around each call, median of --iters after --warmup), which
includes the host's work per call, and GPU kernel time (the profiler's sum of the call's device
events, averaged over --iters calls), which does not. Cases: the forward, and forward + backward
(torch.autograd.grad with the output gradient made beforehand) with the automatic query split of
the dK/dV kernel and with each fixed split of --splits (cuda_backend.DKDV_NSPLIT), so the split
the kernel chooses can be compared with the best fixed one. The splits are ranked by GPU kernel
time: at DETR's and Conditional DETR's shapes the autograd forward + backward takes more host
time than GPU time (about 0.3 ms of kernels), so their wall times cannot rank them.
Prints the GPU, torch version, shapes and a table; writes JSON (--out, default
benchmarks/results/attention_kernel_<gpu>.json).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_enact_kernels import bench, profile  # noqa: E402
from bench_reference import gpu_slug  # noqa: E402

# name: (batch, heads, pixels, q / k head dim, value head dim, attention dropout, counts / N)
SHAPES = {
    "detr": (8, 8, 950, 32, 32, 0.1, (0.153, 0.158, 0.159, 0.160, 0.162, 0.163, 0.155, 0.150)),
    "conditional_detr": (8, 8, 950, 64, 32, 0.1, (0.156, 0.158, 0.160, 0.161, 0.162, 0.166,
                                                  0.155, 0.150)),
    "anchor_detr": (4, 8, 3800, 64, 32, 0.0, (0.129, 0.131, 0.133, 0.135)),
}


def layer_inputs(shape, device, seed=0):
    """Random q (B,h,N,e), k (B,h,R,e), v (B,h,R,ev), key padding mask (B,R), output gradient,
    and the largest cluster count."""
    B, H, N, e, ev, _, shares = shape
    counts = [max(1, round(s * N)) for s in shares[:B]]
    rows = min(N, math.ceil(max(counts) * 1.25) + 8)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, N, e, generator=gen).to(device).requires_grad_()
    k = torch.randn(B, H, rows, e, generator=gen).to(device).requires_grad_()
    v = torch.randn(B, H, rows, ev, generator=gen).to(device).requires_grad_()
    kpm = torch.arange(rows)[None, :] >= torch.tensor(counts)[:, None]
    grad = torch.randn(B, H, N, ev, generator=gen).to(device)
    return q, k, v, kpm.to(device), grad, max(counts)


def measure_shape(name, cb, args, device):
    shape = SHAPES[name]
    B, H, N, e, ev, drop, _ = shape
    q, k, v, kpm, grad, kmax = layer_inputs(shape, device)

    def forward():
        with torch.no_grad():
            cb.clustered_attention(q, k, v, kpm, drop, seed=1, key_count_hint=lambda: kmax)

    def forward_backward():
        out = cb.clustered_attention(q, k, v, kpm, drop, seed=1, key_count_hint=lambda: kmax)
        torch.autograd.grad(out, (q, k, v), grad)

    def timed(fn):
        """(wall ms, GPU kernel ms) per call of fn."""
        wall = bench(fn, args.warmup, args.iters)
        return wall, profile(name, fn, reps=args.iters, quiet=True) / 1e3

    fwd_ms, fwd_gpu_ms = timed(forward)
    row = {"detector": name, "B": B, "heads": H, "N": N, "rows": k.shape[2], "max_clusters": kmax,
           "e": e, "ev": ev, "dropout": drop, "fwd_ms": fwd_ms, "fwd_gpu_ms": fwd_gpu_ms}
    saved = cb.DKDV_NSPLIT
    try:
        cb.DKDV_NSPLIT = 0
        row["fwdbwd_ms_auto"], row["fwdbwd_gpu_ms_auto"] = timed(forward_backward)
        row["fwdbwd_ms_by_split"], row["fwdbwd_gpu_ms_by_split"] = {}, {}
        for s in args.splits:
            cb.DKDV_NSPLIT = s
            row["fwdbwd_ms_by_split"][s], row["fwdbwd_gpu_ms_by_split"][s] = timed(
                forward_backward)
    finally:
        cb.DKDV_NSPLIT = saved
    by_split = row["fwdbwd_gpu_ms_by_split"]
    best = min(by_split, key=by_split.get)
    row["best_split"] = best
    row["auto_vs_best_pct"] = 100.0 * (row["fwdbwd_gpu_ms_auto"] / by_split[best] - 1)
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--detectors", default=",".join(SHAPES), help="comma-separated, of: "
                   + ", ".join(SHAPES))
    p.add_argument("--splits", default="1,2,3,4,6,8,12,16",
                   help="fixed dK/dV query splits to time besides the automatic one")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default=None, help="JSON path (default "
                   "benchmarks/results/attention_kernel_<gpu>.json)")
    args = p.parse_args(argv)
    args.splits = [int(s) for s in args.splits.split(",") if s]
    names = [n for n in args.detectors.split(",") if n]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        p.error(f"unknown detector(s) {unknown}; choose from {sorted(SHAPES)}")
    if any(s < 1 for s in args.splits):
        p.error("--splits must be positive integers")
    if not torch.cuda.is_available():
        sys.exit("bench_attention_kernel.py needs a CUDA GPU")
    from enact_cuda import cuda_backend as cb
    cb.extension()  # build / load before timing (raises BuildError with the reason)

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    print(f"GPU: {gpu}  torch {torch.__version__}  CUDA {torch.version.cuda}  backend: enact_cuda "
          f"fused clustered attention, fp32")
    rows = []
    for name in names:
        row = measure_shape(name, cb, args, device)
        rows.append(row)
        splits = "  ".join(f"{s}:{t:.3f}" for s, t in row["fwdbwd_gpu_ms_by_split"].items())
        print(f"{name:17s} B={row['B']} h={row['heads']} N={row['N']} rows={row['rows']} "
              f"max clusters={row['max_clusters']} e={row['e']} ev={row['ev']} "
              f"dropout={row['dropout']}\n  GPU kernel time (wall): forward "
              f"{row['fwd_gpu_ms']:.3f} ({row['fwd_ms']:.3f}) ms   forward+backward, automatic "
              f"split {row['fwdbwd_gpu_ms_auto']:.3f} ({row['fwdbwd_ms_auto']:.3f}) ms, "
              f"{row['auto_vs_best_pct']:+.1f} % vs the best fixed split ({row['best_split']})"
              f"\n  fixed splits, GPU kernel ms: {splits}")
    out = Path(args.out) if args.out else (ROOT / "benchmarks" / "results"
                                           / f"attention_kernel_{gpu_slug(gpu)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                               "command": " ".join(["python"] + sys.argv), "dtype": "float32",
                               "warmup": args.warmup, "iters": args.iters, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
