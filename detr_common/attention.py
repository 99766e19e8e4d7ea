"""Scaled dot-product attention and the multi-head attention modules of the plain detectors.

Shapes are batch-first. ``key_padding_mask`` is bool (B, Lk) with True = padding (ignored key).
A query row whose keys are all padding yields NaN (as torch.nn.MultiheadAttention does); the
detectors never produce such rows.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("sdpa", "eager")


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, impl: str = "sdpa", scale: Optional[float] = None) -> Tensor:
    """softmax(q k^T * scale) v over keys not masked.

    q (B,h,Lq,e), k (B,h,Lk,e), v (B,h,Lk,ev), key_padding_mask (B,Lk) or None -> (B,h,Lq,ev).
    scale defaults to 1/sqrt(e). ``impl="sdpa"`` uses F.scaled_dot_product_attention;
    ``impl="eager"`` materialises the (B,h,Lq,Lk) weights (the upstream DETR path).
    Callers pass dropout_p = 0 in eval mode.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "sdpa":
        attn_mask = None
        if key_padding_mask is not None:
            attn_mask = ~key_padding_mask[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                              scale=scale)
    if impl == "eager":
        return _eager_attention(q, k, v, key_padding_mask, dropout_p, scale)
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")


def _eager_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                     dropout_p: float, scale: float) -> Tensor:
    """Materialised weights with upstream nn.MultiheadAttention's op sequence: the queries are
    scaled (Lq x e, not Lq x Lk, elements), the padding mask enters as an additive -inf bias
    inside the score GEMM (baddbmm), then softmax, dropout and one more GEMM."""
    b, h, lq, e = q.shape
    lk, ev = k.shape[2], v.shape[3]
    q3 = (q * scale).reshape(b * h, lq, e)
    k3 = k.reshape(b * h, lk, e).transpose(1, 2)
    if key_padding_mask is None:
        weights = torch.bmm(q3, k3)
    else:
        bias = torch.zeros(b, 1, 1, lk, dtype=q3.dtype, device=q3.device)
        bias = bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        weights = torch.baddbmm(bias.expand(b, h, 1, lk).reshape(b * h, 1, lk), q3, k3)
    weights = weights.softmax(dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.bmm(weights, v.reshape(b * h, lk, ev)).view(b, h, lq, ev)


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch.nn.MultiheadAttention's parameter names.

    Parameters: ``in_proj_weight`` (3E, E) rows [q | k | v], ``in_proj_bias`` (3E,),
    ``out_proj`` Linear(E, E), so upstream DETR state_dicts load unchanged.
    forward(query (B,Lq,E), key (B,Lk,E), value (B,Lk,E), key_padding_mask (B,Lk) or None)
    -> (B, Lq, E).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, impl: str = "sdpa"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if impl not in IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLS}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.impl = impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None) -> Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3, dim=0)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3, dim=0)
        q = self._heads(F.linear(query, w_q, b_q))
        k = self._heads(F.linear(key, w_k, b_k))
        v = self._heads(F.linear(value, w_v, b_v))
        out = attention(q, k, v, key_padding_mask,
                        dropout_p=self.dropout if self.training else 0.0, impl=self.impl)
        b, _, lq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, self.embed_dim))

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, impl={self.impl}"


class EncoderSelfAttention(MultiheadAttention):
    """Encoder self-attention: q = k = src + pos, v = src.

    forward(src (B,N,d), pos (B,N,d) or None, key_padding_mask (B,N) or None, hw=(H, W)) ->
    (B,N,d). Same call signature as enact_cuda.ENACTAttention; ``hw`` is unused here.
    """

    def forward(self, src: Tensor, pos: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, hw=None) -> Tensor:
        qk = src if pos is None else src + pos
        return super().forward(qk, qk, src, key_padding_mask)
