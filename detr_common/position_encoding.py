"""Sine positional encoding of DETR (spec §3.1).

``PositionEmbeddingSine(num_pos_feats=128)`` maps a padding mask (B, H, W) bool, True = padding,
to (B, 2*num_pos_feats, H, W): the y block first, then the x block. Within a block channel k
carries sin(pos / f_k) for even k and cos(pos / f_k) for odd k, f_k = T^(2*floor(k/2) / F).
With ``normalize`` the positions (cumulative valid-pixel counts, 1-based) are divided by the
column/row total (+1e-6) and multiplied by ``scale`` (2*pi).

``sine_1d`` / ``sine_2d`` embed normalised point coordinates the same way (Conditional DETR's
reference points, Anchor DETR's anchors and pixel centres).
"""
import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """Fixed sinusoidal 2-D positional encoding; no parameters."""

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000,
                 normalize: bool = True, scale: float = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def _encode(self, positions: Tensor) -> Tensor:
        """positions (B, H, W) float32 -> (B, F, H, W)."""
        k = torch.arange(self.num_pos_feats, dtype=torch.float32, device=positions.device)
        pairs = torch.div(k, 2, rounding_mode="floor")
        freqs = self.temperature ** (2 * pairs / self.num_pos_feats)
        angles = positions[:, None, :, :] / freqs[None, :, None, None]
        even = (k.long() % 2 == 0)[None, :, None, None]
        return torch.where(even, angles.sin(), angles.cos())

    def forward(self, mask: Tensor) -> Tensor:
        """mask (B, H, W) bool (True = padding) -> (B, 2*num_pos_feats, H, W) float32."""
        if mask.dim() != 3:
            raise ValueError("PositionEmbeddingSine expects a (B, H, W) mask, "
                             f"got {tuple(mask.shape)}")
        valid = (~mask).to(torch.float32)
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        if self.normalize:
            eps = 1e-6
            y = y / (y[:, -1:, :] + eps) * self.scale
            x = x / (x[:, :, -1:] + eps) * self.scale
        return torch.cat((self._encode(y), self._encode(x)), dim=1)


def build_position_encoding(args) -> PositionEmbeddingSine:
    """Sine encoding with hidden_dim // 2 features per axis (so y+x = hidden_dim channels)."""
    if args.hidden_dim % 2:
        raise ValueError(f"--hidden_dim must be even for the sine encoding, got {args.hidden_dim}")
    return PositionEmbeddingSine(args.hidden_dim // 2, normalize=True)


def _angles(pos: Tensor, num_feats: int, temperature: float) -> Tensor:
    """Computed in float32, or float64 for float64 positions."""
    dtype = torch.promote_types(pos.dtype, torch.float32)
    k = torch.arange(num_feats, dtype=dtype, device=pos.device)
    freqs = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)
    return (pos.to(dtype) * (2 * math.pi))[..., None] / freqs


def sine_1d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """pos (...) in [0, 1] -> (..., num_feats) (float32 or float64); channel 2j = sin,
    2j+1 = cos."""
    if num_feats % 2:
        raise ValueError(f"sine_1d needs an even number of features, got {num_feats}")
    a = _angles(pos, num_feats, temperature)
    return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_2d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """pos (..., 2) as (x, y) in [0, 1] -> (..., 2*num_feats), y block first."""
    return torch.cat((sine_1d(pos[..., 1], num_feats, temperature),
                      sine_1d(pos[..., 0], num_feats, temperature)), dim=-1)
