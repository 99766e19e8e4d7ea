"""DETR: backbone -> input_proj -> transformer -> class / box heads (spec §3.2).

forward(batch: ImageBatch (images (B,3,H,W), mask (B,H,W) True = padding)) ->
  {'pred_logits': (B,Q,C+1) (last = no object), 'pred_boxes': (B,Q,4) sigmoid normalised cxcywh,
   'aux_outputs': [{'pred_logits', 'pred_boxes'} for decoder layers 0..L-2] (empty if aux off)}.
"""
from typing import Dict

from torch import nn

from detr_common.mlp import MLP


class DETR(nn.Module):
    """backbone: detr_common.backbone.Joiner; transformer: detr.transformer.Transformer."""

    def __init__(self, backbone: nn.Module, transformer: nn.Module, num_classes: int,
                 num_queries: int, aux_loss: bool = True):
        super().__init__()
        hidden_dim = transformer.d_model
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, batch) -> Dict:
        features, positions = self.backbone(batch)
        feat, mask = features[-1]
        hs = self.transformer(self.input_proj(feat), mask, self.query_embed.weight,
                              positions[-1])[0]
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        aux = []
        if self.aux_loss:
            aux = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}
