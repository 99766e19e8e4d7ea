"""DETR: backbone -> input_proj -> transformer -> class / box heads (spec §3.2).

forward(batch: ImageBatch (images (B,3,H,W), mask (B,H,W) True = padding)) ->
  {'pred_logits': (B,Q,C+1) (last = no object), 'pred_boxes': (B,Q,4) sigmoid normalised cxcywh,
   'aux_outputs': [{'pred_logits', 'pred_boxes'} for decoder layers 0..L-2] (empty if aux off)}.
"""
from typing import Dict

import torch.nn.functional as F
from torch import Tensor, nn

from detr_common.attention import EncoderSelfAttention


class MLP(nn.Module):
    """num_layers Linear layers (in -> hidden ... -> out) with ReLU between; keys layers.N."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        outs = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, outs))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


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


def encoder_attention(args) -> nn.Module:
    """The encoder self-attention module, called as (src, pos, key_padding_mask, hw).

    --no_enact: EncoderSelfAttention (standard MHA, --attn_impl sdpa|eager);
    otherwise ENACT (enact_cuda.ENACTAttention), wired in a later issue.
    """
    if getattr(args, "no_enact", False):
        return EncoderSelfAttention(args.hidden_dim, args.nheads, dropout=args.dropout,
                                    impl=getattr(args, "attn_impl", "sdpa"))
    # Later: enact_cuda.ENACTAttention(args.hidden_dim, args.nheads, sigma=args.smoothing_sigma,
    #                                  dropout=args.dropout, impl=args.enact_impl)
    raise NotImplementedError("ENACT is not available yet; run with --no_enact")
