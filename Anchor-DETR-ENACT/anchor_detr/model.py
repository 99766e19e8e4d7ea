"""AnchorDETR: backbone (no positional-encoding container: keys ``backbone.body.*``), per-level
input projections (Conv + GroupNorm(32)), the Anchor transformer.

forward(batch: ImageBatch (images (B,3,H,W), mask (B,H,W) True = padding)) ->
  {'pred_logits' (B,Q,C), 'pred_boxes' (B,Q,4) normalised cxcywh of the unpadded image,
   'aux_outputs': [{'pred_logits', 'pred_boxes'} for the first D-1 decoder layers]}.
With 3 levels (needs DC5) the levels are C3 (3x3 conv, stride 2), C4 and C5 (1x1), all stride 16.
"""
import torch
from torch import nn

from .transformer import AnchorTransformer


def _projection(in_channels: int, d_model: int, kernel: int = 1, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, d_model, kernel_size=kernel, stride=stride, padding=kernel // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, d_model))


class AnchorDETR(nn.Module):
    def __init__(self, backbone: nn.Module, transformer: AnchorTransformer, aux_loss: bool = True):
        super().__init__()
        d_model = transformer.d_model
        levels = transformer.num_levels
        channels = list(backbone.num_channels)
        if len(channels) != levels:
            raise ValueError(f"backbone returns {len(channels)} levels, transformer expects {levels}")
        if levels == 1:
            projs = [_projection(channels[0], d_model)]
        else:
            strides = list(backbone.strides)
            if strides[0] * 2 != strides[-1] or any(s != strides[-1] for s in strides[1:]):
                raise ValueError("multi-level Anchor DETR needs C3 at half the stride of C4/C5 "
                                 f"(use --dilation with 3 levels); got strides {strides}")
            projs = [_projection(channels[0], d_model, kernel=3, stride=2)]
            projs += [_projection(c, d_model) for c in channels[1:]]
        self.backbone = backbone
        self.input_proj = nn.ModuleList(projs)
        self.transformer = transformer
        self.aux_loss = aux_loss

    def forward(self, batch):
        features = self.backbone(batch)
        srcs = torch.stack([proj(feat) for proj, (feat, _) in zip(self.input_proj, features)], dim=1)
        mask = features[-1][1]
        logits, boxes = self.transformer(srcs, mask)
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out
