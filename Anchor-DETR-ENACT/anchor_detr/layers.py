"""Anchor DETR encoder/decoder layers (spec §3.4), batch-first, post-norm.

Grid features are (B, H, W, E); the padding mask (B, H, W) is True on padding. Row positional
embeddings pe_row (B, W, E) are indexed by x (they make the ROW keys src + pe_x), column
embeddings pe_col (B, H, E) by y. Submodule names follow upstream so checkpoints load.
"""
import torch.nn.functional as F
from torch import Tensor, nn

from detr_common.attention import MultiheadAttention

from .rcda import RCDA, GridMask, pool_keys


class FFN(nn.Module):
    """linear1 -> ReLU -> dropout2 -> linear2 -> dropout3, residual, LayerNorm ``norm2``."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear2(self.dropout2(F.relu(self.linear1(x))))
        return self.norm2(x + self.dropout3(y))


class EncoderLayerSpatial(nn.Module):
    """RCDA self-attention over the grid (or ENACT clustered attention), norm1, FFN.

    With ``enact`` the layer owns ``ENACT`` = enact_cuda.ENACTClustering (only W_prob): the
    information comes from the row keys src + pe_x, and the row keys, column keys and values are
    clustered with the same regions (per image, padding excluded; ``enact_mode``
    "official_fixed_chunk": the official code's fixed chunks; ``gauss_taps`` "code": the
    official code's 6 sigma - 1 Gaussian taps; ``honour_mask`` False: padded pixels clustered
    too). Every pixel keeps its own
    row/column queries; attention is RCDA.forward_clustered (one joint softmax), whose attention
    dropout is ``enact_attn_dropout`` (None: ``dropout``).
    After a forward with ENACT, ``ENACT.last_stats`` holds detached (B,) float tensors
    ``clusters_per_image`` and ``pixels_per_image`` (B = images x levels).
    """

    def __init__(self, d_model: int, nhead: int, d_ffn: int, dropout: float, enact: bool = False,
                 sigma: int = 5, enact_impl: str = "auto", row_breaks: bool = False,
                 enact_attn_dropout: float | None = None, enact_mode: str = "paper_regions",
                 gauss_taps: str = "paper", honour_mask: bool = True,
                 wait_for_counts: bool = True):
        super().__init__()
        attn_dropout = dropout if not enact or enact_attn_dropout is None else enact_attn_dropout
        self.self_attn = RCDA(d_model, nhead, dropout=attn_dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)
        self.enact_impl = enact_impl
        if enact:
            from enact_cuda import ENACTClustering
            self.ENACT = ENACTClustering(d_model, sigma, impl=enact_impl, row_breaks=row_breaks,
                                         mode=enact_mode, gauss_taps=gauss_taps,
                                         honour_mask=honour_mask,
                                         wait_for_counts=wait_for_counts)
        else:
            self.ENACT = None

    def attention(self, src: Tensor, grid: GridMask, pe_row: Tensor, pe_col: Tensor) -> Tensor:
        """The attention output (before residual/norm), (B,H,W,E); grid: rcda.grid_mask of
        the (B,H,W) padding mask."""
        b, h, w, e = src.shape
        k_row = src + pe_row[:, None, :, :]
        k_col = src + pe_col[:, :, None, :]
        q_row, q_col = k_row.reshape(b, h * w, e), k_col.reshape(b, h * w, e)
        if self.ENACT is None:
            out = self.self_attn.attend(q_row, q_col, *pool_keys(k_row, k_col, grid), src, grid)
        else:
            from enact_cuda import uses_cuda_kernel
            mask = grid.key_padding_mask
            flat_mask = None if mask is None else mask.reshape(b, h * w)
            # no wait for R_max in training with wait_for_counts=False (guessed rows), and in
            # eval (N rows) when the CUDA kernel attends (q / k head dim 2 d_h, values at the
            # head dim forward_clustered gives them)
            attn, impl = self.self_attn, self.enact_impl
            value_dim = attn.clustered_value_dim(src, impl)
            skip = self.ENACT.skips_count_read(uses_cuda_kernel(src, 2 * attn.head_dim, impl,
                                                                value_dim))
            clusters = self.ENACT(q_row, (q_row, q_col, src.reshape(b, h * w, e)), flat_mask,
                                  (h, w), skip_count_read=skip)
            c_row, c_col, c_val = clusters.values
            out = attn.forward_clustered(q_row, q_col, c_row, c_col, c_val,
                                         clusters.key_padding_mask, impl=impl,
                                         key_count_hint=self.ENACT.key_count_hint,
                                         value_dim=value_dim)
        return out.reshape(b, h, w, e)

    def forward(self, src: Tensor, grid: GridMask, pe_row: Tensor, pe_col: Tensor) -> Tensor:
        """src (B,H,W,E), grid: rcda.grid_mask of the (B,H,W) padding mask, pe_row (B,W,E),
        pe_col (B,H,E) -> (B,H,W,E)."""
        src = self.norm1(src + self.dropout1(self.attention(src, grid, pe_row, pe_col)))
        return self.ffn(src)


class EncoderLayerLevel(nn.Module):
    """Attention across the L feature levels at each pixel of each image (never across images:
    spec §6 item 24), q = k = src + level_embed, v = src; norm1; FFN."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, dropout: float, attn_impl: str = "sdpa"):
        super().__init__()
        self.self_attn_level = MultiheadAttention(d_model, nhead, dropout=dropout, impl=attn_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(self, src: Tensor, level_embed: Tensor) -> Tensor:
        """src (B,L,H,W,E), level_embed (L,E) -> (B,L,H,W,E)."""
        b, l, h, w, e = src.shape
        x = src.permute(0, 2, 3, 1, 4).reshape(b * h * w, l, e)   # one sequence of L per pixel
        qk = x + level_embed
        x = self.norm1(x + self.dropout1(self.self_attn_level(qk, qk, x)))
        x = self.ffn(x)
        return x.reshape(b, h, w, l, e).permute(0, 3, 1, 2, 4)


class DecoderLayer(nn.Module):
    """Self-attention (MHA, norm2) -> RCDA cross-attention per level (norm1; level_fc merges
    levels when L > 1) -> FFN. The norm names are swapped as upstream."""

    def __init__(self, d_model: int, nhead: int, d_ffn: int, dropout: float, num_levels: int = 1,
                 attn_impl: str = "sdpa"):
        super().__init__()
        self.cross_attn = RCDA(d_model, nhead, dropout=dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, impl=attn_impl)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.num_levels = num_levels
        if num_levels > 1:
            self.level_fc = nn.Linear(d_model * num_levels, d_model)
        self.ffn = FFN(d_model, d_ffn, dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, query_pos_x: Tensor, query_pos_y: Tensor,
                memory: Tensor, memory_keys: tuple[Tensor, Tensor], grid: GridMask) -> Tensor:
        """tgt (B,Q,E); query_pos / query_pos_x / query_pos_y (Q,E) or (B,Q,E);
        memory (B*L,H,W,E) image-major (row b*L + l); memory_keys: its pooled row and column
        keys (rcda.pool_keys of memory + pe_row, memory + pe_col: (B*L,W,E), (B*L,H,E)), the
        same for every decoder layer; grid: rcda.grid_mask of its (B*L,H,W) mask -> (B,Q,E)."""
        qk = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(qk, qk, tgt)))
        b, nq, e = tgt.shape
        l = self.num_levels
        q_row, q_col = tgt + query_pos_x, tgt + query_pos_y
        if l > 1:  # (B*L,Q,E), image-major
            q_row, q_col = q_row.repeat_interleave(l, dim=0), q_col.repeat_interleave(l, dim=0)
        out = self.cross_attn.attend(q_row, q_col, *memory_keys, memory, grid)
        if l > 1:  # upstream feature order: channel-major, level-minor (index c*L + l)
            out = self.level_fc(out.reshape(b, l, nq, e).permute(0, 2, 3, 1).reshape(b, nq, e * l))
        tgt = self.norm1(tgt + self.dropout1(out))
        return self.ffn(tgt)
