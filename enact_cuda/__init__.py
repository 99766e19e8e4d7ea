"""enact_cuda: ENACT clustering and clustered attention (spec §1; DESIGN.md §4).

Conventions: batch-first, sequences (B, N, d) with N = H*W in raster order; masks are bool with
True = padding. Every function honours the padding mask: an image's sequence is its valid
pixels in raster order, so results do not depend on batch composition.

Public API
- self_information(keys (B,N,d), weight (1,d), bias (1,)|None, padding_mask (B,N)|None)
  -> (B, N) base-2 self-information, 0 on padding.
- cluster(keys (B,N,d), values (B,N,dv) | tuple, information (B,N), padding_mask, sigma,
  row_breaks=False, hw=None, impl="auto", gauss_taps="paper") -> Clusters(keys (B,R,d),
  values (B,R,dv) | tuple, key_padding_mask (B,R), region_index (B,N)); `pack(clusters)` /
  `clusters.packed()` gives the packed (total clusters x d) view with per-image offsets (B+1,).
- clustered_attention(q (B,h,N,e), k (B,h,R,e), v (B,h,R,ev), key_padding_mask (B,R),
  dropout_p=0.0, impl="auto", scale=None) -> (B, h, N, ev).
- ENACTAttention(d_model, nhead, sigma, dropout=0.0, impl="auto", row_breaks=False,
  mode="paper_regions", numerics="standard", gauss_taps="paper", honour_mask=True)
  (src (B,N,d), pos, key_padding_mask (B,N), hw) -> (B, N, d); mode="official_fixed_chunk":
  the official code's fixed chunks (`fixed_chunks`); numerics="official": the official
  softmax(Q K^T) / d_h; gauss_taps="code": the official code's 6 sigma - 1 Gaussian taps
  (paper: 6 sigma + 1); honour_mask=False: the official code's padding handling (padded
  pixels clustered too, one chunk size per batch).
- ENACTClustering(d_model, sigma, impl="auto", row_breaks=False, mode="paper_regions",
  gauss_taps="paper", honour_mask=True)
  (info_keys (B,N,d), tensors tuple, key_padding_mask, hw) -> Clusters (values = tuple).
  Both take wait_for_counts=True; with False, training guesses the cluster rows instead of
  reading the count back: a training loop then checks cluster_overflow(model) (0-d bool device
  tensor or None) with the step's loss and redoes an overflowed step under
  exact_cluster_counts(model).
- backend_info() -> dict: which backend impl="auto" picks here and why.
Lower-level pieces (mirrored by the CUDA backend): information_from_logits, gaussian_taps,
regions, regions_from_steps, cluster_tensors, fixed_chunks, clustered_attention_torch.
"""
from __future__ import annotations

import torch

from .attention import clustered_attention, clustered_attention_torch, uses_cuda_kernel
from .clustering import Clusters, PackedClusters, cluster, cluster_tensors, fixed_chunks, pack
from .information import (GAUSS_TAPS, check_sigma, cuda_backend_or_reason, gaussian_taps,
                          information_from_logits, regions, regions_from_steps, resolve_impl,
                          self_information)
from .module import (MODES, NUMERICS, ENACTAttention, ENACTClustering, cluster_overflow,
                     exact_cluster_counts)

__all__ = [
    "self_information", "information_from_logits", "gaussian_taps", "check_sigma", "regions",
    "regions_from_steps", "cluster", "cluster_tensors", "fixed_chunks", "Clusters",
    "PackedClusters", "pack", "MODES", "NUMERICS", "GAUSS_TAPS",
    "clustered_attention", "clustered_attention_torch", "uses_cuda_kernel", "ENACTAttention",
    "ENACTClustering", "cluster_overflow", "exact_cluster_counts",
    "backend_info", "resolve_impl",
]


def backend_info() -> dict:
    """Which backend impl="auto" picks on this machine for CUDA inputs, and why.

    -> {"auto": "cuda" | "torch", "reason": str, "cuda_device": bool}. On a GPU machine this
    may trigger the (cached) JIT build of the extension. CPU inputs always use torch.
    """
    backend, why = cuda_backend_or_reason()
    if backend is not None:
        return {"auto": "cuda", "reason": "CUDA device present and the extension loaded",
                "cuda_device": True}
    return {"auto": "torch", "reason": why, "cuda_device": torch.cuda.is_available()}
