"""ENACT information module and region finding (torch backend), plus backend selection.

Spec: shared/spec/ENACT_AND_DETECTORS.md §1.2-§1.5. Layout conventions (whole package):
sequences are batch-first (B, N) / (B, N, d) with N = H*W in raster order (i = y*W + x);
`padding_mask` is bool (B, N) with True = padding (None = no padding).

An image's sequence is its VALID pixels in raster order ("compact" sequence), so everything
here is independent of how much padding the batch adds. Compaction uses cumsum ranks and
scatter/gather, so any mask works, not only bottom/right padding.

The step function is mislabelled in the paper (spec §6.13): with the [-1, 2, -1] kernel,
step = 1 marks locally concave parts (bumps). Only changes of the step matter.
"""
from __future__ import annotations

import functools
import logging
import math
import numbers

import torch
import torch.nn.functional as F

logger = logging.getLogger("enact_cuda")

__all__ = [
    "self_information",
    "information_from_logits",
    "gaussian_taps",
    "taps_half_width",
    "check_gauss_taps",
    "GAUSS_TAPS",
    "check_sigma",
    "regions",
    "regions_from_steps",
    "resolve_impl",
    "cuda_backend_or_reason",
]

EPS = 1e-8  # added to the softmax output before the log (spec §1.2, code placement)
# Gaussian kernel lengths (spec §1.3, §7 gauss_taps): the paper's 6 sigma + 1 taps, or the
# official code's 6 sigma - 1.
GAUSS_TAPS = ("paper", "code")


# ----------------------------------------------------------------------------------------------
# Information
# ----------------------------------------------------------------------------------------------
def information_from_logits(z: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Base-2 self-information of each pixel from the W_prob logits.

    z (B, N) -> (B, N): p = softmax of z over each image's valid pixels, p~ = p + 1e-8,
    H = -p~ * log2(p~); padding gets exactly 0. Half/bfloat16 logits are computed in float32
    (the values are ~1e-3 bits, too small for 8-bit mantissas); float64 stays float64.
    A fully padded image gives all zeros (no NaN).
    """
    if z.dim() != 2:
        raise ValueError(f"information_from_logits: z must be (B, N), got {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    if padding_mask is not None:
        _check_mask(padding_mask, z.shape, "information_from_logits")
        # A finite fill keeps fully padded images NaN-free (uniform p there, then zeroed).
        z = torch.where(padding_mask, torch.finfo(z.dtype).min, z)
    p = torch.softmax(z, dim=-1) + EPS
    info = -p * torch.log2(p)
    if padding_mask is not None:
        info = info.masked_fill(padding_mask, 0.0)
    return info


def wprob_logits(keys: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """keys (B, N, d), weight (1, d), bias (1,) or None -> (B, N) W_prob logits
    z = keys @ weight.T + bias in float32 (float64 for float64 keys), also under autocast or
    for a bf16 module, as the fused CUDA path computes them: bf16 logits would move region
    boundaries, since the entropy resolves ~1e-3 bits."""
    dtype = torch.promote_types(keys.dtype, torch.float32)
    with torch.autocast(keys.device.type, enabled=False):
        z = F.linear(keys.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    return z.squeeze(-1)


def self_information(keys: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     padding_mask: torch.Tensor | None) -> torch.Tensor:
    """keys (B, N, d), weight (1, d), bias (1,) or None, padding_mask (B, N) -> (B, N) bits.

    `wprob_logits` (the W_prob layer, in float32), then `information_from_logits`.
    """
    if keys.dim() != 3:
        raise ValueError(f"self_information: keys must be (B, N, d), got {tuple(keys.shape)}")
    return information_from_logits(wprob_logits(keys, weight, bias), padding_mask)


# ----------------------------------------------------------------------------------------------
# Gaussian smoothing taps
# ----------------------------------------------------------------------------------------------
MAX_SIGMA = 64  # the CUDA kernels' limit, kept on every backend so that all take the same


def check_sigma(sigma) -> int:
    """Return sigma as a python int in 1..MAX_SIGMA; ValueError for anything else (3.0 is
    accepted as 3).

    A non-integer sigma would give half-integer taps / an asymmetric kernel (spec §1.3).
    """
    if isinstance(sigma, bool):
        raise ValueError(f"sigma must be an integer >= 1, got {sigma!r}")
    if isinstance(sigma, numbers.Integral):
        value = int(sigma)
    elif isinstance(sigma, numbers.Real) and float(sigma).is_integer():
        value = int(sigma)
    else:
        raise ValueError(f"sigma must be an integer >= 1 (the kernel taps are integers), "
                         f"got {sigma!r}")
    if not 1 <= value <= MAX_SIGMA:
        raise ValueError(f"sigma must be an integer in 1..{MAX_SIGMA}, got {sigma!r}")
    return value


def check_gauss_taps(gauss_taps: str) -> str:
    """gauss_taps if it is one of GAUSS_TAPS, else ValueError."""
    if gauss_taps not in GAUSS_TAPS:
        raise ValueError(f"gauss_taps must be one of {', '.join(GAUSS_TAPS)}, got {gauss_taps!r}")
    return gauss_taps


def taps_half_width(sigma, gauss_taps: str = "paper") -> int:
    """T such that the Gaussian kernel covers t = -T..T: 3 sigma for the paper's 6 sigma + 1
    taps (gauss_taps="paper"), 3 sigma - 1 for the official code's 6 sigma - 1 ("code")."""
    s = check_sigma(sigma)
    return 3 * s if check_gauss_taps(gauss_taps) == "paper" else 3 * s - 1


def gaussian_taps(sigma, dtype=torch.float32, device=None,
                  gauss_taps: str = "paper") -> torch.Tensor:
    """The Gaussian kernel, (2T + 1,) taps for t = -T..T, T = taps_half_width(sigma, gauss_taps):
    6 sigma + 1 taps (the paper) or 6 sigma - 1 (the official code; spec §1.3 / §6.11).

    g(t) = exp(-t^2 / (2 sigma^2)) / (sigma * sqrt(2 pi)), the paper's formula with its missing
    minus sign restored; NOT renormalised (at sigma 3 / 5 it sums to ~0.9985 / ~0.9981 with the
    paper's taps, ~0.9956 / ~0.9963 with the code's). Symmetric, so correlation == convolution.
    """
    s = check_sigma(sigma)
    half = taps_half_width(s, gauss_taps)
    t = torch.arange(-half, half + 1, device=device, dtype=torch.float64)
    g = torch.exp(-t * t / (2.0 * s * s)) / (s * math.sqrt(2.0 * math.pi))
    return g.to(dtype)


# ----------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------
def _check_mask(mask, shape, who):
    if mask.dtype != torch.bool:
        raise TypeError(f"{who}: padding_mask must be bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{who}: padding_mask shape {tuple(mask.shape)} != {tuple(shape)}")


def _compaction(padding_mask: torch.Tensor | None, B: int, N: int, device):
    """valid (B, N) bool, rank (B, N) int64 (compact position of each valid pixel, 0 elsewhere),
    dest (B, N) int64 (rank, or the dummy column N for padding), lengths (B,) int64."""
    if padding_mask is None:
        valid = torch.ones(B, N, dtype=torch.bool, device=device)
    else:
        valid = ~padding_mask
    rank = valid.cumsum(1) - 1
    dest = torch.where(valid, rank, N)
    rank = rank.clamp_min(0)
    lengths = valid.sum(1)
    return valid, rank, dest, lengths


def _compact(x: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
    """(B, N) original layout -> (B, N) compact layout, zero beyond each image's length.

    Valid pixel i goes to column rank_i; padding goes to a dummy column N that is dropped.
    """
    B, N = x.shape
    return x.new_zeros(B, N + 1).scatter(1, dest, x)[:, :N]


def _expand(xc: torch.Tensor, rank: torch.Tensor, valid: torch.Tensor, fill) -> torch.Tensor:
    """(B, N) compact layout -> (B, N) original layout with `fill` on padding."""
    return torch.where(valid, xc.gather(1, rank), fill)


def _valid_width(valid: torch.Tensor, hw) -> torch.Tensor:
    """Per-image valid row width = number of valid pixels in the image's first row, >= 1."""
    if hw is None:
        raise ValueError("row_breaks=True needs hw=(H, W), the feature map size")
    H, W = int(hw[0]), int(hw[1])
    if H * W != valid.shape[1]:
        raise ValueError(f"hw={tuple(hw)} does not match N={valid.shape[1]} (H*W={H * W})")
    return valid[:, :W].sum(1).clamp_min(1)


def _regions_compact(step_c: torch.Tensor, lengths: torch.Tensor, width: torch.Tensor | None):
    """Region ids in compact layout.

    step_c (B, N) bool (compact), lengths (B,), width (B,) or None (row breaks off)
    -> (region id (B, N) int64 in compact layout, valid only below each length; counts (B,)).
    A region starts at position 0, where the step changes, and (row breaks) at j % width == 0.
    """
    B, N = step_c.shape
    j = torch.arange(N, device=step_c.device)
    in_length = j[None, :] < lengths[:, None]
    start = torch.ones_like(step_c)
    start[:, 1:] = step_c[:, 1:] != step_c[:, :-1]
    if width is not None:
        start = start | (j[None, :] % width[:, None] == 0)
    start = start & in_length
    rid_c = start.cumsum(1) - 1
    return rid_c, start.sum(1)


def regions_from_steps(step: torch.Tensor, padding_mask: torch.Tensor | None,
                       row_breaks: bool = False, hw=None):
    """Regions from a given step sequence (the region-scan part of `regions`, for tests/tools).

    step (B, N) bool in original layout (ignored on padding) -> (region_index (B, N) int64,
    -1 on padding, counts (B,) int64). Regions are maximal runs of equal step in each image's
    compact sequence; position 0 always starts one; row_breaks also starts one at every valid
    row start (valid width = valid pixels in the image's first row).
    """
    B, N = step.shape
    if padding_mask is not None:
        _check_mask(padding_mask, step.shape, "regions_from_steps")
    valid, rank, dest, lengths = _compaction(padding_mask, B, N, step.device)
    step_c = _compact(step.to(torch.uint8), dest).bool()
    width = _valid_width(valid, hw) if row_breaks else None
    rid_c, counts = _regions_compact(step_c, lengths, width)
    return _expand(rid_c, rank, valid, -1), counts


def regions(information: torch.Tensor, padding_mask: torch.Tensor | None, sigma,
            row_breaks: bool = False, hw=None, gauss_taps: str = "paper"):
    """Smooth the information and cut each image's sequence into regions (spec §1.3-§1.5).

    information (B, N) unsmoothed self-information; padding_mask (B, N) bool or None.
    Returns:
      smoothed (B, N): per-image same-length zero-padded Gaussian smoothing of the compact
        sequence (differentiable w.r.t. information), 0 on padding; float32 (float64 for
        float64 input), also under autocast (computed with autocast disabled);
      region_index (B, N) int64: each pixel's region, -1 on padding; an image's regions are
        numbered 0..R_b-1 in raster order of their first pixel;
      counts (B,) int64: R_b (0 for a fully padded image).
    Curvature = [-1, 2, -1] same conv (zero padded) of the smoothed compact sequence,
    step = curvature > 0, region start where the step changes, at position 0, and with
    row_breaks at every valid row start (needs hw=(H, W) and bottom/right padding: the valid
    width is counted on the first row). gauss_taps: the Gaussian's length, "paper"
    (6 sigma + 1) or "code" (6 sigma - 1). Fully vectorised, no host sync.
    """
    if information.dim() != 2:
        raise ValueError(f"regions: information must be (B, N), got {tuple(information.shape)}")
    s = check_sigma(sigma)
    half = taps_half_width(s, gauss_taps)
    B, N = information.shape
    if N == 0:
        raise ValueError("regions: no pixels (N = 0)")
    if padding_mask is not None:
        _check_mask(padding_mask, information.shape, "regions")
    valid, rank, dest, lengths = _compaction(padding_mask, B, N, information.device)
    j = torch.arange(N, device=information.device)
    in_length = j[None, :] < lengths[:, None]
    width = _valid_width(valid, hw) if row_breaks else None

    # Smoothing and curvature run in float32 (float64 stays float64) with autocast disabled:
    # under autocast F.conv1d would smooth in bf16/fp16 (~1e-3 bits of information lose their
    # curvature signs, and the clustering then mixes dtypes).
    if information.dtype not in (torch.float32, torch.float64):
        information = information.float()
    with torch.autocast(information.device.type, enabled=False):
        # Compact: valid pixels first, raster order; zero beyond each image's length, so the
        # "same" convolution below zero-pads every image at its own ends.
        info_c = _compact(information, dest)
        kernel = gaussian_taps(s, dtype=information.dtype, device=information.device,
                              gauss_taps=gauss_taps)
        smoothed_c = F.conv1d(info_c[:, None, :], kernel[None, None, :], padding=half)[:, 0, :]
        smoothed_c = smoothed_c * in_length.to(smoothed_c.dtype)  # nothing leaks past the end

    with torch.no_grad():  # boundaries are piecewise constant: no gradient (spec §1.5)
        x = smoothed_c.detach()
        xp = F.pad(x, (1, 1))
        curvature = 2.0 * x - xp[:, :-2] - xp[:, 2:]
        step_c = curvature > 0
        rid_c, counts = _regions_compact(step_c, lengths, width)
        region_index = _expand(rid_c, rank, valid, -1)

    smoothed = _expand(smoothed_c, rank, valid, 0.0)
    return smoothed, region_index, counts


# ----------------------------------------------------------------------------------------------
# Backend selection (shared by every enact_cuda entry point)
# ----------------------------------------------------------------------------------------------
_IMPLS = ("auto", "cuda", "torch")
_logged_reasons: set[str] = set()


@functools.lru_cache(maxsize=1)
def cuda_backend_or_reason():
    """(cuda_backend module, "") if the CUDA extension is usable here, else (None, why).

    Imported lazily: enact_cuda/build.py and cuda_backend.py (owned by the kernel side) may be
    missing or fail to build; nothing here depends on them. Cached for the process.
    """
    if not torch.cuda.is_available():
        return None, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        from . import build
    except Exception as exc:  # ImportError, or anything the module raises at import
        return None, f"enact_cuda.build could not be imported ({type(exc).__name__}: {exc})"
    try:
        ok, why = build.cuda_available_reason()
        if not ok:
            return None, f"CUDA extension unavailable: {why}"
        build.load_extension()
        from . import cuda_backend
    except Exception as exc:  # BuildError, compiler missing, import errors ...
        return None, f"CUDA extension failed to load ({type(exc).__name__}: {exc})"
    return cuda_backend, ""


def _reset_backend_cache():
    """Forget the cached backend and the already-logged fallback reasons (tests)."""
    cuda_backend_or_reason.cache_clear()
    _logged_reasons.clear()


def _log_fallback(reason: str, level=logging.INFO):
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.log(level, "impl='auto' uses the torch backend: %s", reason)


def resolve_impl(impl: str, *tensors: torch.Tensor) -> str:
    """Resolve impl ("auto" | "cuda" | "torch") to "cuda" or "torch" for these inputs.

    "auto": CUDA when every input is on a CUDA device and the extension loads, else torch with
    ONE log line per distinct reason (logger "enact_cuda"). "cuda": RuntimeError if unusable.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if impl == "cuda":
        backend, why = cuda_backend_or_reason()
        if backend is None:
            raise RuntimeError(f"enact_cuda: impl='cuda' was requested but the CUDA backend is "
                               f"unavailable: {why}. Use impl='torch' or impl='auto'.")
        if not on_cuda:
            raise RuntimeError("enact_cuda: impl='cuda' needs CUDA tensors, got inputs on "
                               f"{[str(t.device) for t in tensors if t is not None]}")
        return "cuda"
    if not on_cuda:
        _log_fallback("inputs are not on a CUDA device")
        return "torch"
    backend, why = cuda_backend_or_reason()
    if backend is None:
        _log_fallback(why, logging.WARNING)
        return "torch"
    return "cuda"
