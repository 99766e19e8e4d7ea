"""Conditional DETR transformer (spec §3.3), batch-first.

Shapes: memory / src / pos are (B, N, d) with N = H*W in raster order; masks (B, N) bool,
True = padding. Queries are (B, Q, d). Reference points are normalised (x, y) in [0, 1] of the
unpadded image.

The encoder is DETR's post-norm encoder (detr_common.encoder) with an injected self-attention:
`detr_common.attention.EncoderSelfAttention` (--no_enact) or `enact_cuda.ENACTAttention`, both
called as ``self_attn(src, pos, key_padding_mask, hw)``. The decoder is Conditional DETR's.
"""
import math
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from detr_common.attention import attention
from detr_common.encoder import TransformerEncoder, build_encoder
from detr_common.mlp import MLP, add_ffn_and_norms, feed_forward
from detr_common.position_encoding import sine_2d


class HeadAttention(nn.Module):
    """Multi-head attention without input projections (inputs arrive projected), with out_proj.

    q, k: (B, L, nhead*e) laid out head-major (head h owns channels h*e:(h+1)*e);
    v: (B, Lk, vdim). Scale 1/sqrt(e) with e = embed_dim / nhead. Output (B, Lq, vdim).
    """

    def __init__(self, embed_dim: int, nhead: int, vdim: int, dropout: float, impl: str = "sdpa"):
        super().__init__()
        assert embed_dim % nhead == 0 and vdim % nhead == 0
        self.nhead = nhead
        self.head_dim = embed_dim // nhead
        self.dropout = dropout
        self.impl = impl
        self.out_proj = nn.Linear(vdim, vdim)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q: Tensor, k: Tensor, v: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, Lq, _ = q.shape
        Lk = k.shape[1]
        q = q.view(B, Lq, self.nhead, -1).transpose(1, 2)
        k = k.view(B, Lk, self.nhead, -1).transpose(1, 2)
        v = v.view(B, Lk, self.nhead, -1).transpose(1, 2)
        out = attention(q, k, v, key_padding_mask, self.dropout if self.training else 0.0,
                        self.impl, scale=1.0 / math.sqrt(self.head_dim))
        return self.out_proj(out.transpose(1, 2).reshape(B, Lq, -1))


class ConditionalDecoderLayer(nn.Module):
    """Conditional DETR decoder layer (post-norm). `ca_qpos_proj` exists only if is_first."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float,
                 is_first: bool, attn_impl: str = "sdpa"):
        super().__init__()
        self.nhead = nhead
        self.is_first = is_first
        lin = lambda: nn.Linear(d_model, d_model)  # noqa: E731
        self.sa_qcontent_proj, self.sa_qpos_proj = lin(), lin()
        self.sa_kcontent_proj, self.sa_kpos_proj = lin(), lin()
        self.sa_v_proj = lin()
        self.self_attn = HeadAttention(d_model, nhead, d_model, dropout, attn_impl)

        self.ca_qcontent_proj = lin()
        self.ca_qpos_proj = lin() if is_first else None
        self.ca_kcontent_proj, self.ca_kpos_proj = lin(), lin()
        self.ca_v_proj = lin()
        self.ca_qpos_sine_proj = lin()
        self.cross_attn = HeadAttention(2 * d_model, nhead, d_model, dropout, attn_impl)

        add_ffn_and_norms(self, d_model, dim_feedforward, dropout, num_norms=3)

    def self_attention(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        """Query self-attention (before residual): tgt, query_pos (B, Q, d) -> (B, Q, d)."""
        q = self.sa_qcontent_proj(tgt) + self.sa_qpos_proj(query_pos)
        k = self.sa_kcontent_proj(tgt) + self.sa_kpos_proj(query_pos)
        return self.self_attn(q, k, self.sa_v_proj(tgt))

    def cross_attention(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                        query_sine_embed: Tensor, memory_mask: Optional[Tensor]) -> Tensor:
        """Conditional cross-attention (before residual) -> (B, Q, d).

        Per head the query is [content (d_h), projected spatial query (d_h)] and the key is
        [content (d_h), key position (d_h)]; scale 1/sqrt(2·d_h); values d_h per head.
        """
        B, Q, d = tgt.shape
        N = memory.shape[1]
        h = self.nhead
        q = self.ca_qcontent_proj(tgt)
        k = self.ca_kcontent_proj(memory)
        k_pos = self.ca_kpos_proj(pos)
        if self.is_first:
            q = q + self.ca_qpos_proj(query_pos)
            k = k + k_pos
        q_sine = self.ca_qpos_sine_proj(query_sine_embed)
        q = torch.cat((q.view(B, Q, h, -1), q_sine.view(B, Q, h, -1)), dim=-1).view(B, Q, 2 * d)
        k = torch.cat((k.view(B, N, h, -1), k_pos.view(B, N, h, -1)), dim=-1).view(B, N, 2 * d)
        return self.cross_attn(q, k, self.ca_v_proj(memory), memory_mask)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                query_sine_embed: Tensor, memory_mask: Optional[Tensor]) -> Tensor:
        tgt = self.norm1(tgt + self.dropout1(self.self_attention(tgt, query_pos)))
        ca = self.cross_attention(tgt, memory, pos, query_pos, query_sine_embed, memory_mask)
        tgt = self.norm2(tgt + self.dropout2(ca))
        ffn = feed_forward(self, tgt)
        return self.norm3(tgt + self.dropout3(ffn))


class ConditionalDecoder(nn.Module):
    """Decoder stack with reference points computed once and a per-layer spatial query.

    forward -> (hs (L, B, Q, d) = final norm applied to every layer output,
                reference (B, Q, 2) sigmoid reference points (x, y)).
    """

    def __init__(self, d_model: int, nhead: int, num_layers: int, dim_feedforward: int,
                 dropout: float, attn_impl: str = "sdpa"):
        super().__init__()
        self.d_model = d_model
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(d_model, nhead, dim_feedforward, dropout, i == 0, attn_impl)
            for i in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        # scales the positional query of layers 1.. (layer 0 uses 1); absent with one layer,
        # where it would be a parameter without gradient (DDP stops on those)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if num_layers > 1 else None
        self.ref_point_head = MLP(d_model, d_model, 2, 2)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor,
                memory_mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        reference = self.ref_point_head(query_pos).sigmoid()        # (B, Q, 2)
        sine = sine_2d(reference, self.d_model // 2)           # (B, Q, d)
        out = tgt
        hs = []
        for i, layer in enumerate(self.layers):
            scale = 1.0 if i == 0 else self.query_scale(out)
            out = layer(out, memory, pos, query_pos, sine * scale, memory_mask)
            hs.append(self.norm(out))
        return torch.stack(hs), reference


class Transformer(nn.Module):
    """Encoder + conditional decoder. Xavier-uniform init of every parameter with dim > 1."""

    def __init__(self, encoder: TransformerEncoder, decoder: ConditionalDecoder):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """src (B, d, H, W), mask (B, H, W), pos (B, d, H, W) -> memory (B, H*W, d)."""
        H, W = src.shape[-2:]
        return self.encoder(src.flatten(2).transpose(1, 2), pos.flatten(2).transpose(1, 2),
                            mask.flatten(1), (int(H), int(W)))

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor,
                pos: Tensor) -> Tuple[Tensor, Tensor]:
        """query_embed (Q, d) -> (hs (L, B, Q, d), reference (B, Q, 2))."""
        memory = self.encode(src, mask, pos)
        B = src.shape[0]
        query_pos = query_embed.unsqueeze(0).expand(B, -1, -1)
        tgt = torch.zeros_like(query_pos)
        return self.decoder(tgt, memory, pos.flatten(2).transpose(1, 2), query_pos,
                            mask.flatten(1))


def build_transformer(args) -> Transformer:
    if getattr(args, "pre_norm", False):
        raise ValueError("Conditional DETR supports only the post-norm transformer: "
                         "drop --pre_norm")
    encoder = build_encoder(args, normalize_before=False)
    decoder = ConditionalDecoder(args.hidden_dim, args.nheads, args.dec_layers,
                                 args.dim_feedforward, args.dropout, args.attn_impl)
    return Transformer(encoder, decoder)
