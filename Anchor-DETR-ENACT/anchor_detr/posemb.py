"""Anchor DETR positional embeddings (spec §3.4), batch-first.

- ``mask_to_positions(mask (B,H,W) bool, True = padding)`` -> (pos_y (B,H), pos_x (B,W)):
  pixel centres in (0, 1) of the UNPADDED image, y = (valid rows so far - 0.5) / valid rows
  (read from the first column of the mask), x likewise from the first row. Padded rows/columns
  get values >= 1 (they are masked everywhere they are used).
- ``sine_1d(pos (...), num_feats)`` -> (..., num_feats): interleaved sin/cos of 2*pi*pos / f_k,
  f_k = 10000^(2*floor(k/2) / num_feats).
- ``sine_2d(pos (..., 2) as (x, y), num_feats)`` -> (..., 2*num_feats): [y block | x block].
"""
import math
from typing import Tuple

import torch
from torch import Tensor


def mask_to_positions(mask: Tensor) -> Tuple[Tensor, Tensor]:
    """(B,H,W) bool padding mask -> (pos_y (B,H), pos_x (B,W)) pixel centres, float32."""
    valid = ~mask
    rows = valid[:, :, 0].to(torch.float32).cumsum(1)
    cols = valid[:, 0, :].to(torch.float32).cumsum(1)
    pos_y = (rows - 0.5) / rows[:, -1:]
    pos_x = (cols - 0.5) / cols[:, -1:]
    return pos_y, pos_x


def _angles(pos: Tensor, num_feats: int, temperature: float) -> Tensor:
    k = torch.arange(num_feats, dtype=torch.float32, device=pos.device)
    freqs = temperature ** (2 * torch.div(k, 2, rounding_mode="floor") / num_feats)
    return (pos.to(torch.float32) * (2 * math.pi))[..., None] / freqs


def sine_1d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """pos (...) in [0, 1] -> (..., num_feats) float32; channel 2j = sin, 2j+1 = cos."""
    if num_feats % 2:
        raise ValueError(f"sine_1d needs an even number of features, got {num_feats}")
    a = _angles(pos, num_feats, temperature)
    return torch.stack((a[..., 0::2].sin(), a[..., 1::2].cos()), dim=-1).flatten(-2)


def sine_2d(pos: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """pos (..., 2) as (x, y) in [0, 1] -> (..., 2*num_feats) float32, y block first."""
    return torch.cat((sine_1d(pos[..., 1], num_feats, temperature),
                      sine_1d(pos[..., 0], num_feats, temperature)), dim=-1)
