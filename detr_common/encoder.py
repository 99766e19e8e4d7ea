"""The DETR / Conditional DETR transformer encoder, batch-first, with a pluggable
self-attention: plain multi-head attention or ENACT (spec §3.2, §3.5).

Module names follow upstream DETR so state_dict keys match (spec §4.2):
``layers.N.{self_attn,linear1,linear2,norm1,norm2}`` and ``norm`` (pre-norm only).
"""
from typing import Optional, Tuple

from torch import Tensor, nn

from .attention import EncoderSelfAttention
from .cli import (enact_attention_dropout, enact_attention_numerics, enact_gauss_taps,
                  enact_honours_padding, enact_mode, enact_row_breaks, enact_waits_for_counts)
from .mlp import add_ffn_and_norms, feed_forward


def build_encoder_attention(args) -> nn.Module:
    """A fresh encoder self-attention called as (src, pos, key_padding_mask, hw).

    ``--no_enact``: standard multi-head attention (``--attn_impl sdpa|eager``), keys
    ``self_attn.{in_proj_weight,in_proj_bias,out_proj.*}``. Otherwise ENACT
    (``enact_cuda.ENACTAttention``, σ = ``--smoothing_sigma``, backend ``--enact_impl``), keys
    ``self_attn.{W_q,W_k,W_v,W_o,W_prob}.*``; clusters ``--enact_mode``, Gaussian
    ``--enact_gauss_taps``, padding ``--enact_padding``, attention ``--enact_attn_numerics``.
    Attention dropout:
    ``--dropout``, for ENACT ``--enact_attn_dropout`` where given.
    """
    if args.no_enact:
        return EncoderSelfAttention(args.hidden_dim, args.nheads, dropout=args.dropout,
                                    impl=args.attn_impl)
    from enact_cuda import ENACTAttention
    return ENACTAttention(args.hidden_dim, args.nheads, sigma=args.smoothing_sigma,
                          dropout=enact_attention_dropout(args), impl=args.enact_impl,
                          row_breaks=enact_row_breaks(args),
                          mode=enact_mode(args), numerics=enact_attention_numerics(args),
                          gauss_taps=enact_gauss_taps(args),
                          honour_mask=enact_honours_padding(args),
                          wait_for_counts=enact_waits_for_counts(args))


class TransformerEncoderLayer(nn.Module):
    """self-attn -> add & norm -> FFN -> add & norm (post-norm), or the pre-norm ordering."""

    def __init__(self, self_attn: nn.Module, d_model: int, dim_feedforward: int = 2048,
                 dropout: float = 0.1, normalize_before: bool = False):
        super().__init__()
        self.self_attn = self_attn
        add_ffn_and_norms(self, d_model, dim_feedforward, dropout, num_norms=2)
        self.normalize_before = normalize_before

    def forward(self, src: Tensor, pos: Optional[Tensor], key_padding_mask: Optional[Tensor],
                hw: Tuple[int, int]) -> Tensor:
        """src, pos (B, N, d) with N = H*W raster order; key_padding_mask (B, N) -> (B, N, d)."""
        if self.normalize_before:
            src = src + self.dropout1(self.self_attn(self.norm1(src), pos, key_padding_mask, hw))
            return src + self.dropout2(feed_forward(self, self.norm2(src)))
        src = self.norm1(src + self.dropout1(self.self_attn(src, pos, key_padding_mask, hw)))
        return self.norm2(src + self.dropout2(feed_forward(self, src)))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers; ``norm`` is the final LayerNorm of pre-norm encoders."""

    def __init__(self, layers, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm

    def forward(self, src, pos, key_padding_mask, hw):
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask, hw)
        return self.norm(src) if self.norm is not None else src


def build_encoder(args, normalize_before: bool = False) -> TransformerEncoder:
    """``args.enc_layers`` layers of width ``args.hidden_dim`` with the attention above."""
    layers = [TransformerEncoderLayer(build_encoder_attention(args), args.hidden_dim,
                                      args.dim_feedforward, args.dropout, normalize_before)
              for _ in range(args.enc_layers)]
    norm = nn.LayerNorm(args.hidden_dim) if normalize_before and args.enc_layers else None
    return TransformerEncoder(layers, norm)
