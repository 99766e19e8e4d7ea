"""DETR encoder-decoder transformer, batch-first (spec §3.2).

Module names follow upstream DETR so state_dict keys match (spec §4.2):
``encoder.layers.N.{self_attn,linear1,linear2,norm1,norm2}``, ``encoder.norm`` (pre-norm only),
``decoder.layers.N.{self_attn,multihead_attn,linear1,linear2,norm1,norm2,norm3}``,
``decoder.norm``.

The encoder (detr_common.encoder, shared with Conditional DETR) takes its self-attention from a
factory: any module called as
``self_attn(src (B,N,d), pos (B,N,d), key_padding_mask (B,N) or None, hw=(H, W)) -> (B,N,d)``
(detr_common.attention.EncoderSelfAttention or enact_cuda.ENACTAttention).
"""
import copy
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from detr_common.attention import MultiheadAttention
from detr_common.encoder import TransformerEncoder, TransformerEncoderLayer
from detr_common.mlp import add_ffn_and_norms, feed_forward


class TransformerDecoderLayer(nn.Module):
    """self-attn (q = k = tgt + query_pos) -> cross-attn (q = tgt + query_pos,
    k = memory + pos, v = memory) -> FFN; each with residual dropout and LayerNorm."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False, attn_impl: str = "sdpa"):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, impl=attn_impl)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, impl=attn_impl)
        add_ffn_and_norms(self, d_model, dim_feedforward, dropout, num_norms=3)
        self.normalize_before = normalize_before

    def _self(self, x, query_pos):
        q = x + query_pos
        return self.self_attn(q, q, x)

    def _cross(self, x, query_pos, memory, pos, memory_key_padding_mask):
        return self.multihead_attn(x + query_pos, memory + pos, memory, memory_key_padding_mask)

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor],
                pos: Tensor, query_pos: Tensor) -> Tensor:
        if self.normalize_before:
            tgt = tgt + self.dropout1(self._self(self.norm1(tgt), query_pos))
            tgt = tgt + self.dropout2(self._cross(self.norm2(tgt), query_pos, memory, pos,
                                                  memory_key_padding_mask))
            return tgt + self.dropout3(feed_forward(self, self.norm3(tgt)))
        tgt = self.norm1(tgt + self.dropout1(self._self(tgt, query_pos)))
        tgt = self.norm2(tgt + self.dropout2(self._cross(tgt, query_pos, memory, pos,
                                                         memory_key_padding_mask)))
        return self.norm3(tgt + self.dropout3(feed_forward(self, tgt)))


class TransformerDecoder(nn.Module):
    """Returns the stack of every layer's output after the shared final LN: (L, B, Q, d)."""

    def __init__(self, layers, norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, tgt, memory, memory_key_padding_mask, pos, query_pos):
        outputs = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    """forward(src (B,d,H,W), mask (B,H,W) True = padding, query_embed (Q,d), pos (B,d,H,W))
    -> (hs (L,B,Q,d), memory (B,H*W,d)).

    encoder_attention: zero-argument factory returning a fresh encoder self-attention module
    per layer. All parameters with dim > 1 get Xavier-uniform init (spec §3.2).
    """

    def __init__(self, encoder_attention: Callable[[], nn.Module], d_model: int = 256,
                 nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1,
                 normalize_before: bool = False, attn_impl: str = "sdpa"):
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError("the DETR decoder needs at least one layer (--dec_layers >= 1)")
        self.d_model = d_model
        self.nhead = nhead
        enc = [TransformerEncoderLayer(encoder_attention(), d_model, dim_feedforward, dropout,
                                       normalize_before) for _ in range(num_encoder_layers)]
        self.encoder = TransformerEncoder(
            enc, nn.LayerNorm(d_model) if normalize_before and num_encoder_layers else None)
        dec = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, normalize_before,
                                      attn_impl)
        self.decoder = TransformerDecoder([copy.deepcopy(dec) for _ in range(num_decoder_layers)],
                                          nn.LayerNorm(d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor):
        bs, d, h, w = src.shape
        src = src.flatten(2).transpose(1, 2)
        pos = pos.flatten(2).transpose(1, 2)
        mask = mask.flatten(1)
        memory = self.encoder(src, pos, mask, (h, w))
        query_pos = query_embed[None].expand(bs, -1, -1)
        tgt = torch.zeros_like(query_pos)
        hs = self.decoder(tgt, memory, mask, pos, query_pos)
        return hs, memory
