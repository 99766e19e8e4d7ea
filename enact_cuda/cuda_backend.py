"""CUDA backend of enact_cuda: autograd wrappers around the kernels in csrc/ (build.py).

Same signatures and semantics as the torch backend (information.py, clustering.py,
attention.py); all tensors batch-first, masks bool with True = padding.

- information_regions(z (B,N), padding_mask (B,N)|None, sigma, row_breaks, hw, gauss_taps)
    -> (information, smoothed, region_index, counts): ONE fused kernel per direction
    (softmax over valid pixels, +1e-8, -p log2 p, Gaussian smoothing, [-1,2,-1] curvature,
    step, region scan); differentiable w.r.t. z (through information and smoothed).
- regions(information, padding_mask, sigma, row_breaks, hw, gauss_taps) -> (smoothed, region_index,
    counts): the same kernel starting from the information (differentiable w.r.t. it).
- cluster_tensors(tensors, smoothed, region_index, num_clusters) -> tuple of (B, R, d_t):
    region-softmax weighted sums, exact backward into the tensors and into `smoothed`.
- fused_begin(keys, weight, bias, padding_mask, sigma, row_breaks, hw, gauss_taps) -> FusedState and
  fused_finish(state, keys, tensors, rows) -> (clustered tensors, key_padding_mask): the whole
  ENACT clustering path (W_prob logits -> information -> regions -> clusters of every tensor) as
  ONE C++ autograd node: forward = 1 memset + 1 launch, the R_max read (4 bytes into pinned
  memory behind an event; fused_begin returns before it, so work that does not need R_max can be
  launched in between; not waited for with fused_finish(rows > 0), which allocates that many
  cluster rows instead) + 1 launch; backward = 3 launches (clustering backward, information
  backward, and one pass over the keys for their information term, grad W_prob and grad
  bias). `fused_supported` says when it applies.
- clustered_attention(q, k, v, key_padding_mask, dropout_p, scale) -> (B, h, N, e):
    fused online-softmax attention over each image's clusters [0, R_b), fp32 / bf16, head
    dims 32 and 64, never materialising N x R; FlashAttention-style recomputing backward.
    Attention dropout uses a counter-based hash of (seed, b, h, query, key): the backward
    recomputes the forward's mask. The seed is drawn from torch's default CPU generator
    (so torch.manual_seed makes runs repeatable) unless `seed=` is given; it travels to the
    kernels as a CPU int64 scalar tensor, never as a Python number read back from a tensor.

Inputs the kernels do not cover fall back to the torch backend, documented per function:
float64 inputs (gradcheck), attention dtypes other than fp32/bf16, or (q / k, value) head
dims other than (32, 32), (64, 64) and (64, 32) (attention.kernel_gap).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

from . import build
from .attention import kernel_gap
from .information import MAX_SIGMA, check_sigma, taps_half_width

__all__ = ["information_regions", "regions", "cluster_tensors", "clustered_attention",
           "dropout_keep_mask", "extension", "fused_supported", "fused_begin", "fused_finish",
           "FusedState"]

# Query splits of the dk/dv backward kernel (0 = automatic: sized to the GPU's waves of
# resident blocks); tests set 1 (the non-atomic path) and more splits than query tiles.
DKDV_NSPLIT = 0


def extension():
    """The compiled extension module (raises build.BuildError if it cannot be built)."""
    return build.load_extension()


def _row_width(hw, N: int, row_breaks: bool) -> int:
    if not row_breaks:
        return 0
    if hw is None:
        raise ValueError("row_breaks=True needs hw=(H, W), the feature map size")
    H, W = int(hw[0]), int(hw[1])
    if H * W != N:
        raise ValueError(f"hw={tuple(hw)} does not match N={N} (H*W={H * W})")
    return W


def _check_mask(mask, shape, who):
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: padding_mask must be bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{who}: padding_mask shape {tuple(mask.shape)} != {tuple(shape)}")
    return mask.contiguous()


# ------------------------------------------------------------------ information + regions
class _InfoRegions(torch.autograd.Function):
    """mode 0: x = logits z; mode 1: x = unsmoothed information."""

    @staticmethod
    def forward(ctx, x, mask, sigma, half, row_breaks, width, mode):
        info, smoothed, region_index, counts = extension().info_forward(
            x, mask, sigma, half, row_breaks, width, mode)
        ctx.save_for_backward(x, mask)
        ctx.sigma, ctx.half, ctx.mode = sigma, half, mode
        ctx.mark_non_differentiable(region_index, counts)
        ctx.set_materialize_grads(False)
        if mode == 1:
            return smoothed, region_index, counts
        return info, smoothed, region_index, counts

    @staticmethod
    def backward(ctx, *grads):
        x, mask = ctx.saved_tensors
        if ctx.mode == 0:
            g_info, g_sm = grads[0], grads[1]
        else:
            g_info, g_sm = None, grads[0]
        if g_info is None and g_sm is None:
            return None, None, None, None, None, None, None
        gx = extension().info_backward(x, mask, g_info, g_sm, ctx.sigma, ctx.half, ctx.mode)
        return gx, None, None, None, None, None, None


def information_regions(z: torch.Tensor, padding_mask: torch.Tensor | None, sigma,
                        row_breaks: bool = False, hw=None, gauss_taps: str = "paper"):
    """z (B, N) W_prob logits -> (information, smoothed, region_index, counts).

    information / smoothed (B, N) float32 (0 on padding); region_index (B, N) int64, -1 on
    padding; counts (B,) int64. Equals information_from_logits followed by regions().
    float64 z uses the torch backend (the kernel computes in float32).
    """
    s = check_sigma(sigma)
    half = taps_half_width(s, gauss_taps)
    if z.dim() != 2:
        raise ValueError(f"information_regions: z must be (B, N), got {tuple(z.shape)}")
    mask = _check_mask(padding_mask, z.shape, "information_regions")
    if z.dtype == torch.float64:
        from .information import information_from_logits, regions as torch_regions
        info = information_from_logits(z, padding_mask)
        return (info,) + tuple(torch_regions(info, padding_mask, s, row_breaks, hw, gauss_taps))
    width = _row_width(hw, z.shape[1], row_breaks)
    return _InfoRegions.apply(z.float().contiguous(), mask, s, half, bool(row_breaks), width, 0)


def regions(information: torch.Tensor, padding_mask: torch.Tensor | None, sigma,
            row_breaks: bool = False, hw=None, gauss_taps: str = "paper"):
    """information (B, N) unsmoothed -> (smoothed, region_index, counts), as the torch
    backend's `regions` (float64 input uses it)."""
    s = check_sigma(sigma)
    half = taps_half_width(s, gauss_taps)
    if information.dim() != 2:
        raise ValueError(f"regions: information must be (B, N), got {tuple(information.shape)}")
    mask = _check_mask(padding_mask, information.shape, "regions")
    if information.dtype == torch.float64:
        from .information import regions as torch_regions
        return torch_regions(information, padding_mask, s, row_breaks, hw, gauss_taps)
    width = _row_width(hw, information.shape[1], row_breaks)
    return _InfoRegions.apply(information.float().contiguous(), mask, s, half, bool(row_breaks),
                              width, 1)


# ---------------------------------------------------------------------------- clustering
class _Cluster(torch.autograd.Function):

    @staticmethod
    def forward(ctx, smoothed, region_index, num_clusters, *tensors):
        res = extension().cluster_forward(list(tensors), smoothed, region_index, num_clusters)
        outs, aux = res[:-4], res[-4:]  # aux: stats (B,R,2), starts, ends, counts
        ctx.save_for_backward(smoothed, region_index, *aux, *tensors)
        ctx.num_clusters = num_clusters
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        smoothed, region_index, stats, starts, ends, counts, *tensors = ctx.saved_tensors
        grads = [g if g is not None else torch.zeros(t.shape[0], ctx.num_clusters, t.shape[2],
                                                      dtype=t.dtype, device=t.device)
                 for g, t in zip(grads, tensors)]
        res = extension().cluster_backward(grads, list(tensors), smoothed, stats, region_index,
                                           starts, ends, counts, ctx.num_clusters)
        return (res[-1], None, None) + tuple(res[:-1])


def _cluster_kernel_ok(t: torch.Tensor) -> bool:
    """The kernels take float32/bf16/fp16 rows of d <= 256 * (16 bytes / element) when d is a
    multiple of that vector width, else d <= 256; anything else uses the torch backend."""
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    vec = 16 // t.element_size()
    d = t.shape[2]
    return d <= (256 * vec if d % vec == 0 else 256)


def cluster_tensors(tensors: Sequence[torch.Tensor], smoothed: torch.Tensor,
                    region_index: torch.Tensor, num_clusters: int) -> tuple:
    """tensors: tuple of (B, N, d_t) (float32 / bf16 / fp16); smoothed (B, N); region_index
    (B, N) int64, -1 on padding; num_clusters R_max -> tuple of (B, R_max, d_t) in each
    tensor's dtype (fp32 accumulation), zero rows for r >= R_b. float64 inputs and very wide
    rows (see _cluster_kernel_ok) use the torch backend."""
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("cluster_tensors: needs at least one tensor")
    B, N = smoothed.shape
    for t in tensors:
        if t.dim() != 3 or t.shape[:2] != (B, N):
            raise ValueError(f"cluster_tensors: tensor shape {tuple(t.shape)} does not start "
                             f"with (B, N) = {(B, N)}")
    if smoothed.dtype == torch.float64 or any(not _cluster_kernel_ok(t) for t in tensors):
        from .clustering import cluster_tensors as torch_cluster
        return torch_cluster(tensors, smoothed, region_index, num_clusters)
    R = int(num_clusters)
    return _Cluster.apply(smoothed.float().contiguous(), region_index.contiguous(), R, *tensors)


# ------------------------------------------------------------- fused clustering path
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FusedState(NamedTuple):
    """fused_begin's result. pending: the extension's FusedPending (detached `information`,
    `smoothed` (B, N) float32, `region_index` (B, N) int64, `counts` (B,) int64, `stats` (3, B)
    float32 = clusters, valid pixels, mean region length per image); weight / bias: the float32
    W_prob parameters the forward used (fused_finish differentiates through them)."""
    pending: object
    weight: torch.Tensor
    bias: torch.Tensor | None


def _rows_ok(t: torch.Tensor, B: int, N: int, dtype) -> bool:
    if t.dim() != 3 or t.shape[0] != B or t.shape[1] != N or t.dtype != dtype:
        return False
    if t.stride(-1) != 1:
        return False
    d, vec = t.shape[2], 16 // t.element_size()
    if d <= 256:
        return True
    return (d % vec == 0 and d <= 256 * vec and t.data_ptr() % 16 == 0
            and t.stride(0) % vec == 0 and t.stride(1) % vec == 0)


def fused_supported(keys: torch.Tensor, tensors: Sequence[torch.Tensor], sigma) -> bool:
    """True when fused_begin / fused_finish handle these inputs: CUDA tensors on one device,
    keys (B, N, d) and 1-4 tensors (B, N, d_t) of one dtype (float32 / bf16 / fp16), unit
    stride along d, d <= 256 (or 16-byte aligned rows up to 256 * 16 / element bytes),
    sigma <= 64. Otherwise the unfused functions above are used."""
    if not keys.is_cuda or keys.dim() != 3 or keys.dtype not in _FUSED_DTYPES:
        return False
    if not 1 <= len(tensors) <= 4 or not 1 <= int(sigma) <= MAX_SIGMA:
        return False
    B, N = keys.shape[0], keys.shape[1]
    if B == 0 or N == 0 or not _rows_ok(keys, B, N, keys.dtype):
        return False
    dt, dev = tensors[0].dtype, keys.device
    if dt not in _FUSED_DTYPES:
        return False
    return all(t.device == dev and _rows_ok(t, B, N, dt) for t in tensors)


def fused_begin(keys: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                padding_mask: torch.Tensor | None, sigma, row_breaks: bool = False,
                hw=None, read_rmax: bool = True, gauss_taps: str = "paper") -> FusedState:
    """Launch the fused forward: logits z = keys @ weight.T + bias, information, smoothing,
    regions, region bounds and statistics (one kernel); R_max is read asynchronously (not at
    all with read_rmax=False, for fused_finish(rows > 0) without autograd).
    keys (B, N, d); weight (1, d) (cast to float32 if needed); bias (1,) or None; padding_mask
    (B, N) bool or None; gauss_taps "paper" / "code" (information.gaussian_taps). Returns at once;
    fused_finish(rows=0) waits for R_max."""
    s = check_sigma(sigma)
    half = taps_half_width(s, gauss_taps)
    width = _row_width(hw, keys.shape[1], row_breaks)
    mask = _check_mask(padding_mask, keys.shape[:2], "fused_begin")
    w = weight if weight.dtype == torch.float32 else weight.float()
    b = None if bias is None else (bias if bias.dtype == torch.float32 else bias.float())
    pending = extension().fused_begin(keys, w, b, mask, s, half, bool(row_breaks), width,
                                      bool(read_rmax))
    return FusedState(pending, w, b)


def fused_finish(state: FusedState, keys: torch.Tensor, tensors: Sequence[torch.Tensor],
                 rows: int = 0):
    """Cluster every tensor (one launch) -> (tuple of (B, R, d_t) in each tensor's dtype,
    key_padding_mask (B, R) bool). Differentiable w.r.t. keys, the tensors and the W_prob
    weight / bias given to fused_begin. `keys` must be fused_begin's keys; when tensors[0] is
    keys itself (ENACTAttention), its two gradient terms are written once.
    rows=0: R = R_max (waits for fused_begin's kernel). rows > 0: R = min(rows, N) without
    waiting, rows r >= R_b zero and masked: rows = N for consumers whose cost follows the mask,
    not R (the CUDA attention kernel), or a guess near R_max for any consumer. rows = N holds
    every image's clusters; fewer rows leave out the clusters r >= rows of the images that have
    more (check state.pending.counts, (B,) on the device; the backward of such a forward is not
    meaningful)."""
    tensors = list(tensors)
    alias = tensors[0] is keys
    res = extension().fused_finish(state.pending, keys, tensors, state.weight, state.bias, alias,
                                   int(rows))
    return tuple(res[:-1]), res[-1]


# -------------------------------------------------------------------- clustered attention
class _ClusteredAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, dropout_p, scale, seed, key_count_hint):
        out, lse = extension().attn_forward(q, k, v, key_padding_mask, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, key_padding_mask, out, lse, seed)
        ctx.dropout_p, ctx.scale, ctx.key_count_hint = dropout_p, scale, key_count_hint
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, kpm, out, lse, seed = ctx.saved_tensors
        hint = ctx.key_count_hint() if ctx.key_count_hint is not None else 0
        dq, dk, dv = extension().attn_backward(grad_out, q, k, v, kpm, out, lse, ctx.scale,
                                               ctx.dropout_p, seed, DKDV_NSPLIT, int(hint))
        return dq, dk, dv, None, None, None, None, None


def _unsupported(q, k, v) -> str:
    return kernel_gap((q.dtype, k.dtype, v.dtype), (q.shape[-1], k.shape[-1], v.shape[-1]))


_NO_SEED = torch.zeros((), dtype=torch.int64)  # the seed argument when there is no dropout


def _seed_tensor(dropout_p: float, seed: int | None) -> torch.Tensor:
    """() int64 CPU tensor the kernels read the dropout seed from: `seed` if given, else a
    draw from torch's default CPU generator (repeatable under torch.manual_seed)."""
    if dropout_p == 0.0:
        return _NO_SEED
    if seed is not None:
        return torch.tensor(int(seed), dtype=torch.int64)
    return torch.randint(0, 2 ** 62, (), dtype=torch.int64)


def clustered_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: torch.Tensor | None, dropout_p: float = 0.0,
                        scale: float | None = None, *, seed: int | None = None,
                        return_lse: bool = False, key_count_hint=None):
    """q (B, h, N, e), k (B, h, R, e), v (B, h, R, e_v), key_padding_mask (B, R) bool (True =
    no cluster, a suffix per image; None = all present) -> (B, h, N, e_v) (and the (B, h, N)
    natural-log LSE of the scaled scores with return_lse=True). Output storage is
    (B, N, h, e_v), so out.transpose(1, 2).reshape(B, N, h*e_v) is free. Images without
    clusters give zeros. Unsupported dtypes / head dims (attention.kernel_gap) use the torch
    backend. key_count_hint: see attention.clustered_attention (the backward's work split).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("clustered_attention: q, k, v must be (B, heads, L, e)")
    if key_padding_mask is None:
        key_padding_mask = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if _unsupported(q, k, v):
        from .attention import clustered_attention_torch
        if return_lse:
            raise ValueError(f"clustered_attention: return_lse needs the CUDA kernel "
                             f"({_unsupported(q, k, v)})")
        return clustered_attention_torch(q, k, v, key_padding_mask, dropout_p, scale)
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    seed_t = _seed_tensor(dropout_p, seed)
    kpm = key_padding_mask.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, lse = _ClusteredAttention.apply(q, k, v, kpm, dropout_p, scale, seed_t,
                                             key_count_hint)
    else:  # no autograd node (eval): the extension directly, less host time per call
        out, lse = extension().attn_forward(q, k, v, kpm, scale, dropout_p, seed_t)
    return (out, lse) if return_lse else out


def dropout_keep_mask(B: int, H: int, N: int, R: int, dropout_p: float, seed: int,
                      device) -> torch.Tensor:
    """(B, H, N, R) bool: the keep mask the attention kernels apply for this seed (tests)."""
    like = torch.empty(0, device=device)
    return extension().dropout_mask(B, H, N, R, float(dropout_p), int(seed), like)
