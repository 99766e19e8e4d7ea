"""Conditional DETR detector (spec §3.3): backbone + input_proj + transformer + shared heads.

forward(ImageBatch) -> {'pred_logits' (B, Q, C) sigmoid logits, 'pred_boxes' (B, Q, 4)
normalised cxcywh of the unpadded image, 'aux_outputs': [same for decoder layers 0..L-2]}.
Boxes: sigmoid(bbox_embed(hs) + [inverse_sigmoid(reference), 0, 0]).
"""
import math

import torch
from torch import nn

from detr_common.box_ops import inverse_sigmoid
from detr_common.mlp import MLP

from .transformer import Transformer


class ConditionalDETR(nn.Module):
    def __init__(self, backbone: nn.Module, transformer: Transformer, num_classes: int,
                 num_queries: int, aux_loss: bool = True, prior_prob: float = 0.01):
        super().__init__()
        d = transformer.decoder.d_model
        self.backbone = backbone
        self.transformer = transformer
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], d, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes)
        self.bbox_embed = MLP(d, d, 4, 3)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - prior_prob) / prior_prob))
        nn.init.zeros_(self.bbox_embed.layers[-1].weight)
        nn.init.zeros_(self.bbox_embed.layers[-1].bias)

    def forward(self, samples) -> dict:
        features, pos = self.backbone(samples)
        src, mask = features[-1]
        hs, reference = self.transformer(self.input_proj(src), mask, self.query_embed.weight,
                                         pos[-1])                      # (L,B,Q,d), (B,Q,2)
        logits = self.class_embed(hs)                                   # (L, B, Q, C)
        box = self.bbox_embed(hs)                                       # (L, B, Q, 4)
        offset = torch.cat((inverse_sigmoid(reference), torch.zeros_like(reference)), dim=-1)
        boxes = (box + offset).sigmoid()
        out = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                  for a, b in zip(logits[:-1], boxes[:-1])]
        return out

    def enact_modules(self):
        """The encoder self-attention modules that report ENACT `last_stats` (empty if plain)."""
        return [layer.self_attn for layer in self.transformer.encoder.layers
                if hasattr(layer.self_attn, "last_stats")]
