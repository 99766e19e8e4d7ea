"""Anchor DETR positional embeddings (spec §3.4), batch-first.

- ``mask_to_positions(mask (B,H,W) bool, True = padding)`` -> (pos_y (B,H), pos_x (B,W)):
  pixel centres in (0, 1) of the UNPADDED image, y = (valid rows so far - 0.5) / valid rows
  (read from the first column of the mask), x likewise from the first row. Padded rows/columns
  get values >= 1 (they are masked everywhere they are used).
The 1-D / 2-D sine embeddings of points live in detr_common.position_encoding (shared with
Conditional DETR's reference points).
"""
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
