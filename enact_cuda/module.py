"""ENACT modules: a drop-in encoder self-attention, and a clustering-only entry for Anchor DETR.

Initialisation (spec §6.15, chosen deliberately): zero biases everywhere, as the paper states.
W_prob is Xavier-uniform (the paper). W_q, W_k, W_v, W_o are drawn as torch's
nn.MultiheadAttention draws its own: Xavier-uniform over the stacked (3d, d) matrix
[W_q; W_k; W_v] and torch's default nn.Linear init for W_o. Inside the DETR and Conditional
DETR transformers this is then overwritten: their reset draws every parameter with dim > 1
Xavier-uniform, i.e. these four per d x d matrix (as upstream, and the official code, do;
tests/test_detector_init.py). Loading an official checkpoint overwrites all of them.
Attention dropout (spec §6.16): `dropout` is applied to the attention weights in training
(the official ClustAttn ignores its dropout argument).
Clusters (spec §6.4): mode="paper_regions" (default) clusters each region of equal curvature
sign; mode="official_fixed_chunk" keeps only the regions' mean length and clusters fixed
chunks of that many pixels, as the official code does (`clustering.fixed_chunks`; a compat
mode for its checkpoints and for comparisons; on CUDA the regions' information and clustering
kernels, unfused, since chunks, like regions, are runs of consecutive valid pixels).
Attention numerics (spec §2.1, §6.2): numerics="standard" (default) is softmax(Q K^T / sqrt(d_h));
numerics="official" is the official DETR / Conditional DETR ClustAttn's softmax(Q K^T) / d_h (no
temperature, each row of weights summing to 1 / d_h), for training as the official code did. The
two are the same function of the weights up to W_q <- sqrt(d_h) W_q, W_o <- W_o / d_h (what
tools/convert_official_checkpoint.py folds in), but they train differently.
Gaussian (spec §1.3, §6.11): gauss_taps="paper" (default) smooths with the paper's 6 sigma + 1
taps, "code" with the official code's 6 sigma - 1 (same formula, both unnormalised).
Padding (spec §2.1 step 9, §6.3): honour_mask=True (default) clusters each image's valid pixels
only. honour_mask=False is the official code's handling: the key-padding mask is ignored, so
padded pixels enter the information softmax, the regions and the clusters (the attention keys),
and fixed chunks take one size for the whole batch, round(mean_b N / R_b); an image's output
then depends on the batch it is in.
Waiting for the cluster count (wait_for_counts, spec-neutral): the clusters are a padded
(B, R, d) tensor, R = the largest cluster count, which the host must read back once per layer
(fused_finish); in eval with the CUDA attention kernel, whose cost follows each image's count,
they are allocated at R = N rows instead and nothing waits. wait_for_counts=False never waits
in training either, whatever attends to the clusters (the CUDA kernel, or torch's SDPA in bf16,
whose cost follows R and so is a guess's few extra rows): each layer allocates its clusters at
a guess of R_max, the largest share R_max / N of its last COUNT_HISTORY training forwards times
(1 + ROWS_MARGIN) times N, plus ROWS_SLACK, at most N (a layer's first training forward,
without history, reads its count, so no step allocates more than the guesses do). Faster where
the step is host-bound (the host keeps launching ahead of the GPU), at nearly the memory of
exact counts. A guess can fall short: the forward then leaves clusters out, so its output and
gradients are wrong. The training loop must check `cluster_overflow(model)` once per step (a
device flag covering the step's forwards, read with the loss) and redo such a step under
`exact_cluster_counts(model)`; detr_common.engine.train_step does. Otherwise, the same outputs
and gradients.
Row breaks (row_breaks=True, off in the paper): a region also starts at each valid row start.
The valid row width is read from an image's first row, so the mask must pad at the bottom and
right only (each image's valid pixels its top-left h x w block), as the detectors' batching
does; with other masks, use row_breaks=False.
"""
from __future__ import annotations

import math
from collections import deque
from contextlib import contextmanager

import torch
from torch import nn

from .attention import clustered_attention, uses_cuda_kernel
from .clustering import Clusters, _cluster_mask, _num_clusters, cluster_tensors, fixed_chunks
from .information import (check_gauss_taps, check_sigma, cuda_backend_or_reason,
                          information_from_logits, regions, resolve_impl, wprob_logits)

__all__ = ["ENACTAttention", "ENACTClustering", "MODES", "NUMERICS", "cluster_overflow",
           "exact_cluster_counts"]

MODES = ("paper_regions", "official_fixed_chunk")
NUMERICS = ("standard", "official")
# Rows guessed for R_max without the count read (module docstring): the largest share R_max / N
# of a layer's last COUNT_HISTORY training forwards, times 1 + ROWS_MARGIN, plus ROWS_SLACK.
COUNT_HISTORY = 16
ROWS_MARGIN = 0.25
ROWS_SLACK = 8


def _linear(d_in: int, d_out: int) -> nn.Linear:
    """Xavier-uniform weight, zero bias."""
    layer = nn.Linear(d_in, d_out)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def _attention_projections(d_model: int) -> tuple[nn.Linear, ...]:
    """(W_q, W_k, W_v, W_o) initialised as torch's nn.MultiheadAttention: the three input
    projections are the row blocks of one Xavier-uniform (3d, d) matrix, W_o keeps nn.Linear's
    default weight init; all biases zero."""
    stacked = torch.empty(3 * d_model, d_model)
    nn.init.xavier_uniform_(stacked)
    layers = tuple(nn.Linear(d_model, d_model) for _ in range(4))
    with torch.no_grad():
        for layer, block in zip(layers, stacked.chunk(3)):
            layer.weight.copy_(block)
    for layer in layers:
        nn.init.zeros_(layer.bias)
    return layers


def _check_inputs(x: torch.Tensor, key_padding_mask, hw, who: str):
    if x.dim() != 3:
        raise ValueError(f"{who}: expected (B, N, d) batch-first input, got {tuple(x.shape)}")
    B, N = x.shape[:2]
    if hw is not None and int(hw[0]) * int(hw[1]) != N:
        raise ValueError(f"{who}: hw={tuple(hw)} does not match N={N}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
        raise ValueError(f"{who}: key_padding_mask shape {tuple(key_padding_mask.shape)} "
                         f"!= (B, N) = {(B, N)}")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _ENACTRegions(nn.Module):
    """Shared part: W_prob, information, smoothing, regions, clustering, statistics."""

    def __init__(self, d_model: int, sigma, impl: str = "auto", row_breaks: bool = False,
                 mode: str = "paper_regions", gauss_taps: str = "paper",
                 honour_mask: bool = True, wait_for_counts: bool = True):
        super().__init__()
        if impl not in ("auto", "cuda", "torch"):
            raise ValueError(f"impl must be 'auto', 'cuda' or 'torch', got {impl!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "official_fixed_chunk" and row_breaks:
            raise ValueError("row_breaks does not apply to mode='official_fixed_chunk' (its "
                             "chunks run over row ends, as in the official code)")
        self.mode = mode
        self.gauss_taps = check_gauss_taps(gauss_taps)
        self.honour_mask = bool(honour_mask)
        self.d_model = int(d_model)
        self.sigma = check_sigma(sigma)
        self.impl = impl
        self.row_breaks = bool(row_breaks)
        self.wait_for_counts = bool(wait_for_counts)
        # A training forward without the count read: its pending R_max copy (kept until the
        # next forward: releasing it before the copy lands would wait for the GPU) and its N.
        # _shares: R_max / N of the last training forwards, for the next guess. _overflow:
        # device flag, whether a guess since the last count_overflow() fell short.
        self._pending, self._pending_n = None, 0
        self._shares = deque(maxlen=COUNT_HISTORY)
        self._overflow = None
        self.W_prob = _linear(d_model, 1)
        self.last_stats: dict = {}
        self.information: torch.Tensor | None = None
        self.smoothed_information: torch.Tensor | None = None

    def _cluster(self, info_keys, tensors, key_padding_mask, hw, before_sync=None,
                 skip_count_read=False):
        """-> (backend, tuple of clustered tensors (B, R, d_t), cluster mask (B, R),
        region_index (B, N), before_sync() or None).

        CUDA backend: the fused path (cuda_backend.fused_begin / fused_finish, one autograd
        node, 3 launches forward) when it supports the inputs; `before_sync` (work that does not
        need R_max, e.g. the query projection) is launched while the GPU computes the regions,
        before the one device->host read of R_max. skip_count_read (fused path only; decided by
        `skips_count_read`): no read of R_max; R = N rows without autograd (for consumers whose
        cost follows the mask), else R = the guess of `_guessed_rows` (module docstring; without
        history the count is read), zero and masked beyond each image's count. With autograd,
        R_max is still copied to the host asynchronously: `key_count_hint` returns it once it
        has arrived (0 before), for the attention backward's work split, and the next guess uses
        it.
        """
        if not self.honour_mask:
            key_padding_mask = None  # the official code's padding handling (module docstring)
        backend = resolve_impl(self.impl, info_keys, *tensors)
        if info_keys.shape[0] == 0:
            backend = "torch"  # an empty batch: nothing for the kernels to do
        paper = self.mode == "paper_regions"
        cb = cuda_backend_or_reason()[0] if backend == "cuda" else None
        if cb is not None and paper:
            # The fused kernels read rows of unit stride; a flattened (B, d, H, W) feature map
            # transposed to (B, N, d) (every detector's first encoder layer) is copied once
            # here rather than falling back to the unfused path and its blocking R_max read.
            # `is` identity (keys among the tensors) is kept.
            unit = _unit_stride(info_keys)
            tensors = tuple(unit if t is info_keys else _unit_stride(t) for t in tensors)
            info_keys = unit
        self._note_last_guess()
        if cb is not None and paper and cb.fused_supported(info_keys, tensors, self.sigma):
            N = info_keys.shape[1]
            training = torch.is_grad_enabled()
            if not skip_count_read:
                rows = 0  # read R_max
            elif training:
                rows = self._guessed_rows(N)  # 0 (read R_max) without history
            else:
                rows = N  # eval: every image's clusters fit
            state = cb.fused_begin(info_keys, self.W_prob.weight, self.W_prob.bias,
                                   key_padding_mask, self.sigma, self.row_breaks, hw,
                                   read_rmax=training or not skip_count_read,
                                   gauss_taps=self.gauss_taps)
            early = before_sync() if before_sync is not None else None
            clustered, cluster_mask = cb.fused_finish(state, info_keys, tensors, rows)
            pend = state.pending
            if training and rows:
                self._pending, self._pending_n = pend, N
                self._note_overflow(pend.counts, clustered[0].shape[1], N)
            elif training:
                self._shares.append(clustered[0].shape[1] / N)  # R_max, read back
            stats = pend.stats  # (3, B): clusters, valid pixels, mean region length
            self.last_stats = {"clusters_per_image": stats[0], "pixels_per_image": stats[1],
                               "mean_region_length": stats[2]}
            self.information = pend.information
            self.smoothed_information = pend.smoothed
            return backend, clustered, cluster_mask, pend.region_index, early
        z = wprob_logits(info_keys, self.W_prob.weight, self.W_prob.bias)
        if cb is not None:
            info, smoothed, region_index, counts = cb.information_regions(
                z, key_padding_mask, self.sigma, self.row_breaks, hw, self.gauss_taps)
        else:
            info = information_from_logits(z, key_padding_mask)
            smoothed, region_index, counts = regions(info, key_padding_mask, self.sigma,
                                                     self.row_breaks, hw, self.gauss_taps)
        region_counts = counts
        if not paper:  # chunks are runs of consecutive pixels, like regions: same kernels
            region_index, counts = fixed_chunks(counts, key_padding_mask, z.shape[1],
                                                per_batch=not self.honour_mask)
        cluster_fn = cb.cluster_tensors if cb is not None else cluster_tensors
        clustered = cluster_fn(tensors, smoothed, region_index, _num_clusters(counts))
        R = clustered[0].shape[1]
        self._record(info, smoothed, counts, region_counts, key_padding_mask, info_keys)
        early = before_sync() if before_sync is not None else None
        return backend, clustered, _cluster_mask(counts, R), region_index, early

    def _note_last_guess(self):
        """Forget the last forward's pending count, keeping its R_max / N share if the count has
        reached the host (it has after the step's read; never waits)."""
        if self._pending is not None:
            r_max = self._pending.r_max_if_ready()
            if r_max > 0:
                self._shares.append(r_max / self._pending_n)
        self._pending, self._pending_n = None, 0

    def _note_overflow(self, counts: torch.Tensor, rows: int, N: int):
        """Fold "an image of this forward has more than `rows` clusters" (counts (B,) on the
        device) into the flag count_overflow() returns; rows = N cannot fall short."""
        if rows >= N:
            return
        short = (counts > rows).any()
        self._overflow = short if self._overflow is None else self._overflow | short

    def _guessed_rows(self, N: int) -> int:
        """Cluster rows for a training forward without the count read (module docstring); 0 =
        read the count (no history yet)."""
        if not self._shares:
            return 0
        return min(N, math.ceil(max(self._shares) * (1.0 + ROWS_MARGIN) * N) + ROWS_SLACK)

    @property
    def key_count_hint(self):
        """After a training forward without the count read: () -> R_max once it has reached
        the host, else 0 (for clustered_attention's key_count_hint); None otherwise."""
        return None if self._pending is None else self._pending.r_max_if_ready

    def count_overflow(self) -> torch.Tensor | None:
        """Whether a training forward since the last call guessed too few cluster rows: 0-d
        bool device tensor, True when an image had more clusters than its forward's rows (that
        forward left clusters out; its output and gradients are wrong); None when no guess
        since the last call could fall short. Each call starts a new period."""
        flag, self._overflow = self._overflow, None
        return flag

    def skips_count_read(self, kernel_attends: bool) -> bool:
        """skip_count_read for this forward: whether it allocates its clusters without reading
        the cluster count back. With autograd: unless wait_for_counts (guessed rows, a few more
        than the counts need, fit for any attention). Without autograd (N rows): only where
        `kernel_attends`, i.e. the CUDA attention kernel, whose cost follows the mask, attends
        to the clusters (enact_cuda.uses_cuda_kernel)."""
        if torch.is_grad_enabled():
            return not self.wait_for_counts
        return bool(kernel_attends)

    def _record(self, info, smoothed, counts, region_counts, key_padding_mask, x):
        """last_stats from the clusters' and the regions' counts (B,) (the same tensor unless
        the clusters are the official code's fixed chunks)."""
        B, N = x.shape[:2]
        clusters = counts.detach().float()
        if key_padding_mask is None:
            pixels = torch.full((B,), float(N), device=x.device)
        else:
            pixels = (~key_padding_mask).sum(1).float()
        self.last_stats = {
            "clusters_per_image": clusters,
            "pixels_per_image": pixels,
            "mean_region_length": pixels / region_counts.detach().float().clamp_min(1.0),
        }
        self.information = info.detach()
        self.smoothed_information = smoothed.detach()

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, sigma={self.sigma}, impl={self.impl!r}, "
                f"row_breaks={self.row_breaks}, mode={self.mode!r}, "
                f"gauss_taps={self.gauss_taps!r}, honour_mask={self.honour_mask}"
                + ("" if self.wait_for_counts else ", wait_for_counts=False"))


class ENACTAttention(_ENACTRegions):
    """ENACT multi-head self-attention, a drop-in for an encoder self-attention.

    forward(src (B, N, d), pos (B, N, d) or None, key_padding_mask (B, N) bool True = padding
    or None, hw = (H, W) python ints or None) -> (B, N, d).
    keys = src + pos, values = src; information from W_prob(keys); keys and values are
    clustered BEFORE the projections (exact, spec §1.6); q = W_q(src + pos) on all N pixels,
    k = W_k(K'), v = W_v(V'); per-head clustered attention with scale 1/sqrt(d/nhead) and
    attention dropout `dropout` in training; then W_o. hw is needed only for row_breaks.
    After a forward: `last_stats` (detached (B,) float tensors: clusters_per_image,
    pixels_per_image, mean_region_length), `information` and `smoothed_information` (B, N).
    In training with wait_for_counts=False the clusters are allocated at guessed rows, and in
    eval with the CUDA attention kernel (whose cost follows the mask) at N rows, so the forward
    never waits for the GPU (module docstring).
    mode: "paper_regions" or "official_fixed_chunk"; numerics: "standard" or "official";
    gauss_taps: "paper" or "code"; honour_mask: False = the official padding handling (module
    docstring).
    """

    def __init__(self, d_model: int, nhead: int, sigma, dropout: float = 0.0,
                 impl: str = "auto", row_breaks: bool = False, mode: str = "paper_regions",
                 numerics: str = "standard", gauss_taps: str = "paper", honour_mask: bool = True,
                 wait_for_counts: bool = True):
        super().__init__(d_model, sigma, impl, row_breaks, mode, gauss_taps, honour_mask,
                         wait_for_counts)
        if d_model % nhead != 0:
            raise ValueError(f"d_model={d_model} is not divisible by nhead={nhead}")
        if numerics not in NUMERICS:
            raise ValueError(f"numerics must be one of {', '.join(NUMERICS)}, got {numerics!r}")
        self.nhead = int(nhead)
        self.dropout = float(dropout)
        self.numerics = numerics
        self.W_q, self.W_k, self.W_v, self.W_o = _attention_projections(d_model)

    def forward(self, src: torch.Tensor, pos: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, hw=None) -> torch.Tensor:
        _check_inputs(src, key_padding_mask, hw, "ENACTAttention")
        keys = src if pos is None else src + pos
        skip = self.skips_count_read(uses_cuda_kernel(src, self.d_model // self.nhead, self.impl))
        backend, (ck, cv), cluster_mask, _, q = self._cluster(
            keys, (keys, src), key_padding_mask, hw, before_sync=lambda: self.W_q(keys),
            skip_count_read=skip)
        return self.attend(q, ck, cv, cluster_mask,
                           impl="torch" if backend == "torch" else self.impl,
                           key_count_hint=self.key_count_hint)

    def attend(self, q: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor,
               cluster_mask: torch.Tensor, impl: str, key_count_hint=None) -> torch.Tensor:
        """The layer after clustering: q (B, N, d) = W_q(src + pos), clustered keys and values
        (B, R, d), cluster_mask (B, R) True = no cluster -> W_o(attention) (B, N, d);
        key_count_hint as in clustered_attention."""
        B, N, d = q.shape
        h, e, R = self.nhead, d // self.nhead, ck.shape[1]
        q = q.view(B, N, h, e).transpose(1, 2)
        k = self.W_k(ck).view(B, R, h, e).transpose(1, 2)
        v = self.W_v(cv).view(B, R, h, e).transpose(1, 2)
        official = self.numerics == "official"
        out = clustered_attention(q, k, v, cluster_mask,
                                  dropout_p=self.dropout if self.training else 0.0, impl=impl,
                                  scale=1.0 if official else None,
                                  key_count_hint=key_count_hint)
        if official:
            out = out / e  # softmax(Q K^T) / d_h
        return self.W_o(out.transpose(1, 2).reshape(B, N, d))

    def extra_repr(self) -> str:
        return (f"nhead={self.nhead}, dropout={self.dropout}, numerics={self.numerics!r}, "
                + super().extra_repr())


class ENACTClustering(_ENACTRegions):
    """ENACT clustering only (Anchor DETR): one set of regions for several tensors.

    forward(info_keys (B, N, d) the keys the information is computed from, tensors: tuple of
    (B, N, d_t), key_padding_mask (B, N) or None, hw, skip_count_read) -> Clusters(keys=None,
    values=tuple of (B, R, d_t), key_padding_mask (B, R), region_index (B, N)). Same
    attributes as ENACTAttention after a forward (last_stats, information,
    smoothed_information); the same constructor (mode, gauss_taps, honour_mask,
    wait_for_counts, as in ENACTAttention; wait_for_counts is read by the caller, which decides
    skip_count_read with skips_count_read()). skip_count_read=True lets the fused CUDA path
    allocate the clusters without waiting for the GPU: R = N rows without autograd (pass it
    then only when the consumer's cost follows the mask: enact_cuda.uses_cuda_kernel), guessed
    rows in training (module docstring), zero and masked beyond each image's count. After such a
    training forward, `key_count_hint` is the hint to give the consumer's clustered_attention.
    """

    def forward(self, info_keys: torch.Tensor, tensors, key_padding_mask=None,
                hw=None, skip_count_read: bool = False) -> Clusters:
        _check_inputs(info_keys, key_padding_mask, hw, "ENACTClustering")
        tensors = tuple(tensors)
        if not tensors:
            raise ValueError("ENACTClustering: tensors must be a non-empty tuple")
        _, clustered, cluster_mask, region_index, _ = self._cluster(
            info_keys, tensors, key_padding_mask, hw, skip_count_read=skip_count_read)
        return Clusters(None, tuple(clustered), cluster_mask, region_index)


def _regions_modules(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, _ENACTRegions)]


def cluster_overflow(model: nn.Module) -> torch.Tensor | None:
    """Whether an ENACT layer of `model` that guessed its cluster rows (wait_for_counts=False)
    left clusters out in a training forward since the last call: 0-d bool device tensor (then
    the step must be redone under exact_cluster_counts(model)); None when no layer guessed
    short of N rows. Call it once per step, after the step's forwards (a layer run twice is
    covered), and read it with the step's other values (it does not wait for the GPU)."""
    flags = [f for m in _regions_modules(model) if (f := m.count_overflow()) is not None]
    return torch.stack(flags).any() if flags else None


@contextmanager
def exact_cluster_counts(model: nn.Module):
    """Within the block, every ENACT layer of `model` reads its cluster count back in training
    (wait_for_counts=True): for redoing a step whose guessed rows fell short."""
    layers = _regions_modules(model)
    saved = [m.wait_for_counts for m in layers]
    for m in layers:
        m.wait_for_counts = True
    try:
        yield
    finally:
        for m, w in zip(layers, saved):
            m.wait_for_counts = w
