"""Clustered attention: every query pixel of image b against image b's clusters (spec §1.7).

Torch backend: padded clusters + key mask through F.scaled_dot_product_attention. The CUDA
backend (enact_cuda.cuda_backend, optional) is a fused varlen kernel with the same semantics
(CUDA cores, float32 and bfloat16). impl="auto" chooses per dtype from the benchmark
(AUTO_CUDA_ATTENTION_DTYPES): the kernel for float32, torch's SDPA (tensor cores) for
bfloat16/float16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .information import resolve_impl, cuda_backend_or_reason, _log_fallback

__all__ = ["clustered_attention", "clustered_attention_torch", "uses_cuda_kernel"]

# What the fused CUDA kernel handles (issue 3): other inputs use torch under impl="auto".
_CUDA_DTYPES = (torch.float32, torch.bfloat16)
# (q / k head dim, value head dim); (64, 32) is Anchor DETR's joint row-column attention
_CUDA_HEAD_DIMS = ((32, 32), (64, 64), (64, 32))

# Which dtypes impl="auto" sends to the fused CUDA kernel; the benchmark decides (DESIGN §4).
# benchmarks/results/enact_kernels_nvidia_h200.json (H200, torch 2.11, B=8, 8 heads x 32,
# forward+backward, C5 25x38 .. DC5 50x76): in float32 the CUDA-core kernel is 1.8-2.1x faster
# than the torch backend (padded clusters through SDPA's memory-efficient kernel); in bfloat16
# the torch backend takes 0.71-0.88x of the kernel's GPU time (tensor cores), while in wall
# clock the kernel is 2x faster at 25x38 (fewer launches) and about equal at the larger sizes.
# Whole detectors in bf16 (benchmarks/results/nvidia_h200_bf16_profiled.*): GPU time per training
# step equal (DETR, Conditional DETR) or 12 % less with SDPA (Anchor DETR). So "auto" uses the
# kernel for float32 and torch's SDPA for bfloat16 / float16; impl="cuda" still forces the
# kernel for bfloat16.
AUTO_CUDA_ATTENTION_DTYPES = (torch.float32,)

# SDPA backends for the padded clusters. cuDNN is left out: it builds (and caches) an execution
# graph per new shape, and the cluster count R changes with every layer and batch, so in
# training nearly every call paid a graph build (bf16 ENACT training ran 2x slower than plain
# on an H200 with torch 2.11; see benchmarks/README.md). Flash needs no mask; the
# memory-efficient kernel takes the key mask and dropout at any R without a per-shape cost.
_VARYING_R_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                       SDPBackend.MATH]


def _check_attention_args(q, k, v, key_padding_mask, dropout_p):
    """ValueError / TypeError for arguments no backend takes (the CUDA binding checks the same)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("clustered_attention: q, k, v must be (B, heads, L, e)")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"clustered_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit (B, heads, N, e), (B, heads, R, e), "
                         f"(B, heads, R, e_v)")
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"clustered_attention: key_padding_mask must be bool (True = no "
                            f"cluster), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(f"key_padding_mask {tuple(key_padding_mask.shape)} does not match "
                             f"k {tuple(k.shape)}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"clustered_attention: dropout_p must be in [0, 1], got {dropout_p}")


def clustered_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              key_padding_mask: torch.Tensor | None, dropout_p: float = 0.0,
                              scale: float | None = None) -> torch.Tensor:
    """Torch backend of `clustered_attention` (same arguments, no impl)."""
    _check_attention_args(q, k, v, key_padding_mask, dropout_p)
    return _attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)


def _attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale):
    """`clustered_attention_torch` on arguments already checked."""
    if key_padding_mask is None:
        with sdpa_kernel(_VARYING_R_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    has_key = ~key_padding_mask.all(1)  # (B,)
    # attn_mask True = attend. An image without any cluster attends to its (zero, masked)
    # padding rows instead of producing NaN; its output is then set to 0.
    keep = (~key_padding_mask) | ~has_key[:, None]
    with sdpa_kernel(_VARYING_R_BACKENDS):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :],
                                             dropout_p=dropout_p, scale=scale)
    return torch.where(has_key[:, None, None, None], out, out.new_zeros(()))


def kernel_gap(dtypes, head_dims, impl: str = "cuda") -> str:
    """'' if clustered_attention(impl) runs the fused CUDA kernel for CUDA inputs q / k / v of
    these dtypes and head dims, else the reason it does not. head_dims: the q and k head dims
    then the value head dim last, e.g. (e_q, e_k, e_v) or (e_qk, e_v), or one dim for all. The
    kernel takes one dtype of _CUDA_DTYPES, equal q / k head dims and a (q / k, value) pair of
    _CUDA_HEAD_DIMS; impl="auto" also keeps to the dtypes the benchmark measured faster with the kernel
    (AUTO_CUDA_ATTENTION_DTYPES)."""
    dtype = dtypes[0]
    if dtype not in _CUDA_DTYPES or any(d != dtype for d in dtypes):
        return (f"clustered_attention: dtypes {'/'.join(map(str, dtypes))} not one of the CUDA "
                f"kernel's {_CUDA_DTYPES}")
    *qk, e_v = head_dims
    qk = qk or [e_v]  # one head dim: q, k and values alike
    if len(set(qk)) != 1 or (qk[0], e_v) not in _CUDA_HEAD_DIMS:
        return (f"clustered_attention: head dims {tuple(head_dims)} (q / k ..., value) not "
                f"supported by the CUDA kernel (equal q / k dims; (q / k, value) one of "
                f"{_CUDA_HEAD_DIMS})")
    if impl == "auto" and dtype not in AUTO_CUDA_ATTENTION_DTYPES:
        return (f"clustered_attention in {dtype}: torch's SDPA measured faster than the "
                f"CUDA-core kernel (impl='cuda' forces the kernel)")
    return ""


def uses_cuda_kernel(x: torch.Tensor, head_dim: int, impl: str,
                     value_head_dim: int | None = None) -> bool:
    """Whether clustered_attention(impl) runs the fused CUDA kernel on attention inputs computed
    from `x` (its dtype, or autocast's on its device) with this q / k head dim and value head
    dim (default: the same), assuming the extension is usable. The kernel's cost follows each
    image's cluster count, not the padded R, so an eval forward may then allocate its clusters
    at N rows (cuda_backend.fused_finish) instead of reading the count back (guessed rows in
    training, a few more than the counts, need no such kernel)."""
    if impl == "torch" or not x.is_cuda:
        return False
    dtype = (torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda")
             else x.dtype)
    e_v = head_dim if value_head_dim is None else value_head_dim
    return not kernel_gap((dtype,), (head_dim, e_v), impl)


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, dropout_p: float = 0.0,
                        impl: str = "auto", scale: float | None = None,
                        key_count_hint=None) -> torch.Tensor:
    """Scaled dot-product attention of all queries of image b against image b's clusters.

    q (B, heads, N, e), k (B, heads, R, e), v (B, heads, R, e_v), key_padding_mask (B, R) bool
    True = no cluster (None = all present) -> (B, heads, N, e_v). scale defaults to 1/sqrt(e);
    dropout_p is attention dropout (pass 0 in eval). An image with no cluster outputs zeros.
    impl: "auto" | "cuda" | "torch" (see enact_cuda.backend_info()). "auto" picks per dtype
    what the benchmark measured faster: the fused CUDA kernel for float32 CUDA inputs, torch's
    SDPA (tensor cores) for bfloat16 / float16; "cuda" uses the kernel for float32 and
    bfloat16 alike. key_count_hint: None, or for k allocated without reading the key count
    back (N or guessed rows) a callable returning the largest key count once it is known on
    the host (0 before; clamped to R); the CUDA backward sizes its work split with it
    (results do not depend on it).
    """
    _check_attention_args(q, k, v, key_padding_mask, dropout_p)
    backend = resolve_impl(impl, q, k, v)
    if backend == "cuda" and impl == "auto":
        why = kernel_gap((q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]),
                         impl)
        if why:
            _log_fallback(why)
            backend = "torch"
    if backend == "cuda":
        cb = cuda_backend_or_reason()[0]
        if key_padding_mask is None:
            key_padding_mask = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool,
                                           device=k.device)
        return cb.clustered_attention(q, k, v, key_padding_mask, dropout_p, scale,
                                      key_count_hint=key_count_hint)
    return _attention_sdpa(q, k, v, key_padding_mask, dropout_p, scale)
