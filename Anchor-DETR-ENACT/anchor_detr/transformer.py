"""Anchor DETR transformer (spec §3.4): anchors x patterns queries, RCDA encoder/decoder, heads.

forward(srcs (B, L, E, H, W), mask (B, H, W) bool True = padding) ->
  (logits (D, B, Q, C), boxes (D, B, Q, 4) normalised cxcywh), D = decoder layers,
  Q = num_pattern * num_position; query q = p * num_position + a has pattern p and anchor a.
Boxes are predicted against the anchors: sigmoid(bbox_embed(out) + [inverse_sigmoid(anchor), 0, 0])
(anchors are the same in every layer, as upstream). ``class_embed`` / ``bbox_embed`` are ONE
module referenced D times (state_dict repeats them as class_embed.{0..D-1}).
"""
import math

import torch
from torch import Tensor, nn

from detr_common.box_ops import inverse_sigmoid
from detr_common.cli import (enact_attention_dropout, enact_gauss_taps, enact_honours_padding,
                             enact_mode, enact_row_breaks, enact_waits_for_counts)
from detr_common.mlp import MLP
from detr_common.position_encoding import sine_1d, sine_2d

from .layers import DecoderLayer, EncoderLayerLevel, EncoderLayerSpatial
from .posemb import mask_to_positions
from .rcda import grid_mask, pool_keys

SPATIAL_PRIORS = ("learned", "grid")


def _adapter(d_model: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Linear(d_model, d_model))


def grid_anchors(num_position: int) -> Tensor:
    """n x n anchors (n = round(sqrt(num_position))) at cell centres, x-major order -> (n*n, 2)."""
    n = int(round(math.sqrt(num_position)))
    centres = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    x, y = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack((x.reshape(-1), y.reshape(-1)), dim=-1)


class AnchorTransformer(nn.Module):
    def __init__(self, num_classes: int = 91, d_model: int = 256, nhead: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.0, num_feature_levels: int = 1,
                 num_query_position: int = 300, num_query_pattern: int = 3,
                 spatial_prior: str = "learned", enact: bool = True, sigma: int = 5,
                 enact_impl: str = "auto", row_breaks: bool = False, attn_impl: str = "sdpa",
                 enact_attn_dropout: float | None = None, enact_mode: str = "paper_regions",
                 gauss_taps: str = "paper", honour_mask: bool = True,
                 wait_for_counts: bool = True):
        super().__init__()
        if spatial_prior not in SPATIAL_PRIORS:
            raise ValueError(f"unknown spatial prior {spatial_prior!r}; choose one of {SPATIAL_PRIORS}")
        self.d_model = d_model
        self.num_levels = num_feature_levels
        n_level = num_encoder_layers // 2 if num_feature_levels > 1 else 0
        spatial = dict(d_model=d_model, nhead=nhead, d_ffn=dim_feedforward, dropout=dropout)
        self.encoder_layers = nn.ModuleList(
            EncoderLayerSpatial(**spatial, enact=enact, sigma=sigma, enact_impl=enact_impl,
                                row_breaks=row_breaks, enact_attn_dropout=enact_attn_dropout,
                                enact_mode=enact_mode, gauss_taps=gauss_taps,
                                honour_mask=honour_mask, wait_for_counts=wait_for_counts)
            for _ in range(num_encoder_layers - n_level))
        self.encoder_layers_level = nn.ModuleList(
            EncoderLayerLevel(**spatial, attn_impl=attn_impl) for _ in range(n_level))
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(**spatial, num_levels=num_feature_levels, attn_impl=attn_impl)
            for _ in range(num_decoder_layers))
        if num_feature_levels > 1:
            self.level_embed = nn.Embedding(num_feature_levels, d_model)
        self.num_pattern = num_query_pattern
        self.pattern = nn.Embedding(num_query_pattern, d_model)
        self.spatial_prior = spatial_prior
        if spatial_prior == "learned":
            self.num_position = num_query_position
            self.position = nn.Embedding(num_query_position, 2)
            nn.init.uniform_(self.position.weight, 0, 1)
        else:
            anchors = grid_anchors(num_query_position)
            self.num_position = anchors.shape[0]
            self.register_buffer("grid_position", anchors, persistent=False)
        self.adapt_pos2d = _adapter(d_model)
        self.adapt_pos1d = _adapter(d_model)

        class_embed = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        with torch.no_grad():
            bbox_embed.layers[-1].bias.copy_(torch.tensor([0.0, 0.0, -2.0, -2.0]))
        # one module referenced per decoder layer: shared weights, repeated state_dict keys
        self.class_embed = nn.ModuleList([class_embed] * num_decoder_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * num_decoder_layers)

    @property
    def num_queries(self) -> int:
        return self.num_pattern * self.num_position

    def anchors(self) -> Tensor:
        """(Q, 2) reference points (x, y) in [0, 1]: the positions tiled once per pattern."""
        pos = self.position.weight if self.spatial_prior == "learned" else self.grid_position
        return pos.repeat(self.num_pattern, 1)

    def grid_embeddings(self, mask: Tensor):
        """mask (B,H,W) -> (pe_row (B,W,E) indexed by x, pe_col (B,H,E) indexed by y)."""
        pos_y, pos_x = mask_to_positions(mask)
        w = pos_x.shape[1]
        pe = self.adapt_pos1d(sine_1d(torch.cat((pos_x, pos_y), dim=1), self.d_model))
        return pe[:, :w], pe[:, w:]  # one encoding + adapter pass for both axes

    def encode(self, srcs: Tensor, mask: Tensor):
        """srcs (B,L,E,H,W), mask (B,H,W) -> (memory (B*L,H,W,E) image-major, grid (the
        rcda.GridMask of the (B*L,H,W) mask), pe_row (B*L,W,E), pe_col (B*L,H,E))."""
        b, l, e, h, w = srcs.shape
        if l != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {l}")
        mask = mask.repeat_interleave(l, dim=0)
        pe_row, pe_col = self.grid_embeddings(mask)
        x = srcs.permute(0, 1, 3, 4, 2).reshape(b * l, h, w, e)
        grid = grid_mask(mask, (b * l, h, w), x.dtype, x.device)  # shared by all RCDA layers
        for idx, layer in enumerate(self.encoder_layers):
            x = layer(x, grid, pe_row, pe_col)
            if idx < len(self.encoder_layers_level):
                x = self.encoder_layers_level[idx](x.reshape(b, l, h, w, e), self.level_embed.weight)
                x = x.reshape(b * l, h, w, e)
        return x, grid, pe_row, pe_col

    def forward(self, srcs: Tensor, mask: Tensor):
        """srcs (B,L,E,H,W), mask (B,H,W) True = padding -> (logits (D,B,Q,C), boxes (D,B,Q,4)
        normalised cxcywh), one row per decoder layer."""
        b = srcs.shape[0]
        memory, grid, pe_row, pe_col = self.encode(srcs, mask)
        # the decoder's row and column keys, pooled once for all its layers
        memory_keys = pool_keys(memory + pe_row[:, None], memory + pe_col[:, :, None], grid)
        anchors = self.anchors()                                              # (Q, 2)
        query_pos = self.adapt_pos2d(sine_2d(anchors, self.d_model // 2))
        query_pos_x, query_pos_y = self.adapt_pos1d(sine_1d(anchors, self.d_model)).unbind(1)
        tgt = self.pattern.weight.repeat_interleave(self.num_position, dim=0)  # (Q, E)
        tgt = tgt.unsqueeze(0).expand(b, -1, -1)
        ref = inverse_sigmoid(anchors)
        ref = torch.cat((ref, torch.zeros_like(ref)), dim=-1)                 # (Q, 4)
        hs = []
        for layer in self.decoder_layers:
            tgt = layer(tgt, query_pos, query_pos_x, query_pos_y, memory, memory_keys, grid)
            hs.append(tgt)
        hs = torch.stack(hs)                                                  # (D, B, Q, E)
        # the heads are shared by the decoder layers (and the anchors the same for each):
        # one pass over all layers' outputs
        return self.class_embed[0](hs), (self.bbox_embed[0](hs) + ref).sigmoid()

    def enact_stats(self):
        """Per-layer ``ENACT.last_stats`` of the spatial encoder layers (empty without ENACT)."""
        return [layer.ENACT.last_stats for layer in self.encoder_layers if layer.ENACT is not None]


def build_transformer(args, num_classes: int) -> AnchorTransformer:
    return AnchorTransformer(
        num_classes=num_classes, d_model=args.hidden_dim, nhead=args.nheads,
        num_encoder_layers=args.enc_layers, num_decoder_layers=args.dec_layers,
        dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        num_feature_levels=args.num_feature_levels, num_query_position=args.num_query_position,
        num_query_pattern=args.num_query_pattern, spatial_prior=args.spatial_prior,
        enact=not args.no_enact, sigma=args.smoothing_sigma,
        enact_impl=getattr(args, "enact_impl", "auto"),
        row_breaks=enact_row_breaks(args),
        attn_impl=getattr(args, "attn_impl", "sdpa"),
        enact_attn_dropout=enact_attention_dropout(args),
        enact_mode=enact_mode(args),
        gauss_taps=enact_gauss_taps(args),
        honour_mask=enact_honours_padding(args),
        wait_for_counts=enact_waits_for_counts(args))
