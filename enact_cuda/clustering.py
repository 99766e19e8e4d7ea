"""ENACT clustering: per-region softmax-weighted sums (spec §1.6, gradients §1.10).

K'_j = sum_{i in j} w_i K_i, w = softmax of the smoothed information inside region j.
Torch backend: vectorised with scatter / index_add over flat indices b * R_max + r (padding
pixels go to one dummy bucket that is dropped); exact gradients by plain autograd, including
into `smoothed`.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

from .information import _check_mask, _compaction, cuda_backend_or_reason, regions, resolve_impl

__all__ = ["Clusters", "PackedClusters", "cluster", "cluster_tensors", "fixed_chunks", "pack"]

TensorOrTuple = Union[torch.Tensor, tuple]


class PackedClusters(NamedTuple):
    """Ragged (packed) layout: all images' clusters concatenated, image-major.

    keys (T, d) or None, values (T, d_v) or tuple of such, offsets (B + 1,) int64: image b owns
    rows offsets[b]:offsets[b+1]; T = sum_b R_b.
    """
    keys: torch.Tensor | None
    values: TensorOrTuple
    offsets: torch.Tensor


class Clusters(NamedTuple):
    """Padded layout of an image batch's clusters.

    keys (B, R, d) (None from ENACTClustering), values (B, R, d_v) or a tuple of such,
    key_padding_mask (B, R) bool, True where image b has no cluster r (always a suffix:
    cluster r exists iff r < R_b), region_index (B, N) int64, -1 on padding (and, in the
    official fixed-chunk mode, on the valid pixels its chunks trim). R = max_b R_b
    (at least 1). Padding clusters are zero vectors.
    """
    keys: torch.Tensor | None
    values: TensorOrTuple
    key_padding_mask: torch.Tensor
    region_index: torch.Tensor

    @property
    def counts(self) -> torch.Tensor:
        """(B,) int64 clusters per image R_b."""
        return (~self.key_padding_mask).sum(1)

    def packed(self) -> PackedClusters:
        """The packed (T x d) view with per-image offsets; see `pack`."""
        return pack(self)


def pack(clusters: Clusters) -> PackedClusters:
    """Padded `Clusters` -> `PackedClusters` (total clusters x d with per-image offsets).

    Uses boolean indexing, so it reads the total size T from the device (one host sync).
    """
    valid = ~clusters.key_padding_mask
    counts = valid.sum(1)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def take(t):
        if t is None:
            return None
        if isinstance(t, (tuple, list)):
            return tuple(x[valid] for x in t)
        return t[valid]

    return PackedClusters(take(clusters.keys), take(clusters.values), offsets)


def cluster_tensors(tensors: Sequence[torch.Tensor], smoothed: torch.Tensor,
                    region_index: torch.Tensor, num_clusters: int) -> tuple:
    """Softmax-weighted sums of each tensor over each region.

    tensors: tuple of (B, N, d_t); smoothed (B, N) smoothed information; region_index (B, N)
    int64 (-1 on padding); num_clusters: R_max (python int). Returns a tuple of (B, R_max, d_t)
    in each tensor's dtype; clusters r >= R_b are zero. Pixels of a region r >= num_clusters
    are left out (as the CUDA kernel does), never added to another image's clusters. Weights
    w_i = exp(s_i) / sum over the region (a detached per-region max is subtracted for
    stability; the result is unchanged).
    Sums are accumulated in the promoted dtype of the tensor and `smoothed`.
    """
    tensors = tuple(tensors)
    B, N = smoothed.shape
    R = int(num_clusters)
    if B * N == 0:
        return tuple(t.new_zeros(B, R, *t.shape[2:]) for t in tensors)
    valid = (region_index >= 0) & (region_index < R)
    # Flat bucket per pixel: b * R + r, padding -> dummy bucket B * R.
    base = torch.arange(B, device=smoothed.device)[:, None] * R
    flat = torch.where(valid, base + region_index, B * R).reshape(-1)
    if smoothed.dtype not in (torch.float32, torch.float64):
        smoothed = smoothed.float()  # region softmax weights in float32 (also under autocast)
    s = smoothed.reshape(-1)

    with torch.no_grad():
        rmax = s.new_zeros(B * R + 1).scatter_reduce(0, flat, s.detach(), "amax",
                                                     include_self=False)
    e = torch.exp(s - rmax[flat]) * valid.reshape(-1).to(s.dtype)
    denom = s.new_zeros(B * R + 1)
    denom[-1] = 1.0  # the dummy bucket: avoids 0/0 for padding pixels (their e is 0)
    denom = denom.index_add(0, flat, e)
    w = e / denom[flat]  # (B*N,)

    out = []
    for t in tensors:  # a tuple of 1-3 tensors, not a loop over images or regions
        if t.shape[:2] != (B, N):
            raise ValueError(f"cluster_tensors: tensor shape {tuple(t.shape)} does not start "
                             f"with (B, N) = {(B, N)}")
        dtype = torch.promote_types(t.dtype, w.dtype)
        tf = t.reshape(B * N, -1).to(dtype)
        acc = tf.new_zeros(B * R + 1, tf.shape[1])
        acc = acc.index_add(0, flat, w.to(dtype)[:, None] * tf)
        out.append(acc[: B * R].reshape(B, R, *t.shape[2:]).to(t.dtype))
    return tuple(out)


def fixed_chunks(counts: torch.Tensor, padding_mask: torch.Tensor | None, N: int,
                 per_batch: bool = False):
    """The official code's clusters (spec §2.1 steps 4-6), per image: fixed chunks of
    c_b = round(L_b / R_b) consecutive pixels (round half to even, as Python's round) of the
    image's compact sequence of L_b valid pixels, where R_b = counts[b] is its number of
    regions; the r = L_b mod c_b leftover pixels are not clustered, floor(r / 2) at the start
    and the rest at the end.

    counts (B,) int64 regions per image; padding_mask (B, N) bool True = padding, or None ->
    (region_index (B, N) int64: chunk of each pixel, -1 on padding and trimmed pixels;
    chunks (B,) int64: M_b = L_b // c_b, 0 for a fully padded image).
    The official code takes one c for the whole batch, round(mean_b N / R_b), and ignores the
    padding: per_batch=True with padding_mask=None does that. Per image with padding honoured
    (the default), an image's chunks do not depend on the batch it is in; for a batch of one
    unpadded image the two agree.
    """
    if padding_mask is not None:
        _check_mask(padding_mask, (counts.shape[0], N), "fixed_chunks")
    valid, rank, _, lengths = _compaction(padding_mask, counts.shape[0], N, counts.device)
    length_per_region = lengths.double() / counts.clamp_min(1).double()
    if per_batch:
        length_per_region = length_per_region.mean().expand_as(length_per_region)
    size = torch.round(length_per_region).long().clamp_min(1)
    chunks = lengths // size
    front = (lengths - chunks * size) // 2
    position = rank - front[:, None]
    index = torch.div(position, size[:, None], rounding_mode="floor")
    kept = valid & (position >= 0) & (index < chunks[:, None])
    return torch.where(kept, index, torch.full_like(index, -1)), chunks


def _num_clusters(counts: torch.Tensor) -> int:
    # THE single device->host read per call: R_max is a data-dependent shape. At least 1 so
    # that a fully padded batch still has a (masked) key. No other syncs in the forward pass.
    return max(int(counts.max()), 1) if counts.numel() else 1


def _cluster_mask(counts: torch.Tensor, R: int) -> torch.Tensor:
    return torch.arange(R, device=counts.device)[None, :] >= counts[:, None]


def cluster(keys: torch.Tensor, values: TensorOrTuple, information: torch.Tensor,
            padding_mask: torch.Tensor | None, sigma, row_breaks: bool = False, hw=None,
            impl: str = "auto", gauss_taps: str = "paper") -> Clusters:
    """Cluster keys and values with ENACT's information regions.

    keys (B, N, d); values (B, N, d_v) or a tuple of such (clustered with the same regions);
    information (B, N) UNSMOOTHED self-information (e.g. from `self_information`);
    padding_mask (B, N) bool True = padding, or None; sigma: integer Gaussian sigma;
    row_breaks: also start a region at every valid row start (needs hw=(H, W));
    gauss_taps: "paper" (6 sigma + 1 taps) or "code" (6 sigma - 1).
    Returns Clusters(keys (B, R, d), values (B, R, d_v) or tuple, key_padding_mask (B, R),
    region_index (B, N)) with R = max_b R_b (one host read of counts.max()).
    """
    is_tuple = isinstance(values, (tuple, list))
    vals = tuple(values) if is_tuple else (values,)
    backend = resolve_impl(impl, keys, *vals, information)
    cb = cuda_backend_or_reason()[0] if backend == "cuda" else None
    region_fn = getattr(cb, "regions", None) or regions
    smoothed, region_index, counts = region_fn(information, padding_mask, sigma, row_breaks, hw,
                                               gauss_taps)
    R = _num_clusters(counts)
    fn = cb.cluster_tensors if cb is not None else cluster_tensors
    out = fn((keys,) + vals, smoothed, region_index, R)
    out_vals = tuple(out[1:]) if is_tuple else out[1]
    return Clusters(out[0], out_vals, _cluster_mask(counts, R), region_index)
