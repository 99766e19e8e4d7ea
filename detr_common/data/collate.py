"""Batching of variable-size images: zero padding bottom/right plus a padding mask."""
from typing import NamedTuple

import torch


class ImageBatch(NamedTuple):
    """images (B, 3, H, W) float, zero-padded bottom/right to the batch max H, W;
    mask (B, H, W) bool, True on padding (False on each image's own h x w top-left block)."""

    images: torch.Tensor
    mask: torch.Tensor

    def to(self, device, non_blocking=False):
        return ImageBatch(self.images.to(device, non_blocking=non_blocking),
                          self.mask.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return ImageBatch(self.images.pin_memory(), self.mask.pin_memory())


def pad_images(images):
    """list of (C, h_i, w_i) tensors -> ImageBatch padded to (max h, max w)."""
    if len(images) == 0:
        raise ValueError("cannot batch an empty list of images")
    c = images[0].shape[0]
    h = max(int(im.shape[1]) for im in images)
    w = max(int(im.shape[2]) for im in images)
    batch = images[0].new_zeros((len(images), c, h, w))
    mask = torch.ones((len(images), h, w), dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        batch[i, :, :im.shape[1], :im.shape[2]].copy_(im)
        mask[i, :im.shape[1], :im.shape[2]] = False
    return ImageBatch(batch, mask)


def collate_fn(batch):
    """list of (image (3, h, w), target dict) -> (ImageBatch, tuple of target dicts)."""
    images, targets = zip(*batch)
    return pad_images(list(images)), tuple(targets)
