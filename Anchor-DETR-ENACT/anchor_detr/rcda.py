"""Row-column decoupled attention (RCDA, Anchor DETR spec §3.4), batch-first, and its ENACT form.

Parameters as upstream ``MultiheadRCDA``: ``in_proj_weight`` (5E, E) with row slices
[q_row | q_col | k_row | k_col | v] (each E x E), ``in_proj_bias`` (5E,), ``out_proj``
Linear(E, E). Head split is head-major (head i = channels i*d_h .. (i+1)*d_h - 1).

``forward`` (upstream RCDA): queries (B, L, E); keys/value on the grid (B, H, W, E);
key_padding_mask (B, H, W) True = padding (padding is bottom/right, so a valid region is a
rectangle: row validity is read from the first column, column validity from the first row).
Row keys = k_row projection averaged over the VALID rows (W keys); column keys = k_col
projection averaged over the VALID columns (H keys). Upstream averages over all rows/columns,
padding included; averaging over valid ones only is our fix so an image's result does not depend
on the padding of its batch (identical when there is no padding).
``attend`` is ``forward`` with the keys pooled (``pool_keys``) and the padding's terms
(``grid_mask``: the pooling weights and the key masks) computed by the caller, once per grid:
the encoder's layers share one GridMask, and the decoder pools its memory's row and column keys
once for all its layers (they attend to the same memory), instead of once per layer.
A_row = softmax over the W keys, A_col = softmax over the H keys (each scaled by 1/sqrt(d_h),
padding masked), out[l] = sum_y sum_x A_col[l,y] A_row[l,x] v[y,x], then out_proj.

``forward_clustered`` (ENACT paper mode, DESIGN §4, spec §6 items 17-18): every pixel keeps its
own row and column queries; row keys, column keys and values are the image's clusters (B, R, E)
(clustered before projection, which is exact because the region weights sum to 1). One joint
softmax over the clusters of the summed row and column logits:
    w[i, r] = softmax_r((q_row_i . k_row_r + q_col_i . k_col_r) / sqrt(d_h))
which is SDPA of [q_row, q_col] against [k_row, k_col] at head dim 2*d_h with scale 1/sqrt(d_h).
The value head dim stays d_h. enact_cuda's fused kernel takes (q / k, value) head dims (64, 32)
as they are (d_h = 32, the paper's setting); for other d_h, where the kernel lacks the
(2*d_h, d_h) pair but has (2*d_h, 2*d_h), the values are zero-padded to 2*d_h and the output
sliced back (exact), so that the kernel attends (`pads_values`); torch's SDPA takes unequal
head dims as they are. ``pad_values`` = True/False forces the padding on/off (None = that
automatic choice).
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# in_proj slot order (upstream meaning, kept in ENACT mode too)
Q_ROW, Q_COL, K_ROW, K_COL, V = range(5)


class GridMask(NamedTuple):
    """A key grid's padding as RCDA uses it, computed once per grid by `grid_mask` and shared
    by every layer that attends to the grid (the encoder's layers, the decoder's layers).

    key_padding_mask (B, H, W) bool True = padding, or None; row_weights (B, H): 1 / (valid
    rows) on the valid rows, 0 on padded ones (the row keys' mean over y); col_weights (B, W)
    likewise over x; padded_cols (B, 1, 1, W) / padded_rows (B, 1, 1, H) bool, True where a
    row key (one per column x) / column key (one per row y) is padding; None without a mask.
    """
    key_padding_mask: Optional[Tensor]
    row_weights: Tensor
    col_weights: Tensor
    padded_cols: Optional[Tensor]
    padded_rows: Optional[Tensor]


def _mean_weights(valid: Tensor, dtype: torch.dtype) -> Tensor:
    w = valid.to(dtype)
    return w / w.sum(-1, keepdim=True).clamp(min=1)


def grid_mask(key_padding_mask: Optional[Tensor], shape, dtype: torch.dtype,
              device: torch.device) -> GridMask:
    """GridMask of a (B, H, W) grid (``shape``) with this padding mask (None = no padding);
    the weights in ``dtype``. Padding is bottom/right: row validity is read from the first
    column, column validity from the first row."""
    b, h, w = shape
    if key_padding_mask is None:
        return GridMask(None, torch.full((b, h), 1.0 / h, dtype=dtype, device=device),
                        torch.full((b, w), 1.0 / w, dtype=dtype, device=device), None, None)
    padded_rows, padded_cols = key_padding_mask[:, :, 0], key_padding_mask[:, 0, :]
    return GridMask(key_padding_mask, _mean_weights(~padded_rows, dtype),
                    _mean_weights(~padded_cols, dtype), padded_cols[:, None, None, :],
                    padded_rows[:, None, None, :])


def pool_keys(key_row: Tensor, key_col: Tensor, grid: GridMask) -> tuple[Tensor, Tensor]:
    """Grid keys (B, H, W, E) -> (row keys (B, W, E): key_row averaged over the valid rows,
    column keys (B, H, E): key_col averaged over the valid columns), unprojected."""
    return (torch.einsum("bhwe,bh->bwe", key_row, grid.row_weights),
            torch.einsum("bhwe,bw->bhe", key_col, grid.col_weights))


def pads_values(x, head_dim: int, impl: str) -> bool:
    """Whether forward_clustered zero-pads its values from head dim d_h = ``head_dim`` to the
    joint q / k head dim 2 d_h for attention inputs computed from ``x`` (a tensor; its device,
    and its dtype or autocast's): only where that lets enact_cuda's kernel attend, i.e. the
    kernel lacks the (2 d_h, d_h) pair and has (2 d_h, 2 d_h). Where the kernel does not attend
    either way (the CPU, impl="torch", torch's SDPA in bf16 under impl="auto"), padding would
    only double the values' work."""
    from enact_cuda import uses_cuda_kernel

    e = 2 * head_dim
    return not uses_cuda_kernel(x, e, impl, head_dim) and uses_cuda_kernel(x, e, impl, e)


class RCDA(nn.Module):
    """Multi-head row-column decoupled attention; see the module docstring."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.pad_values = None
        self.in_proj_weight = nn.Parameter(torch.empty(5 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(5 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def slots(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The five in_proj slots (Q_ROW .. V) as views: (weights, each (E, E); biases, each
        (E,)). One unbind per forward, so the backward stacks the five slots' gradients in one
        kernel instead of zero-filling, copying and summing five slices."""
        e = self.embed_dim
        return self.in_proj_weight.view(5, e, e).unbind(0), self.in_proj_bias.view(5, e).unbind(0)

    def project(self, x: Tensor, slot: int, slots=None) -> Tensor:
        """Apply in_proj slot ``slot`` (Q_ROW .. V) to x (..., E); ``slots``: this forward's
        `slots()`, or None to take them here."""
        weights, biases = self.slots() if slots is None else slots
        return F.linear(x, weights[slot], biases[slot])

    def _heads(self, x: Tensor) -> Tensor:
        """(B, L, E) -> (B, h, L, d_h)."""
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _merge(self, x: Tensor) -> Tensor:
        """(B, h, L, d_h) -> out_proj of (B, L, E)."""
        b, _, n, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, n, self.embed_dim))

    def forward(self, query_row: Tensor, query_col: Tensor, key_row: Tensor, key_col: Tensor,
                value: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """query_row/col (B,L,E); key_row/key_col/value (B,H,W,E); mask (B,H,W) -> (B,L,E)."""
        grid = grid_mask(key_padding_mask, value.shape[:3], value.dtype, value.device)
        return self.attend(query_row, query_col, *pool_keys(key_row, key_col, grid), value, grid)

    def attend(self, query_row: Tensor, query_col: Tensor, row_keys: Tensor, col_keys: Tensor,
               value: Tensor, grid: GridMask) -> Tensor:
        """`forward` with the keys already pooled (`pool_keys`) and the grid's mask terms
        computed (`grid_mask`), so that layers attending to one grid share them.
        query_row/col (B,L,E); row_keys (B,W,E); col_keys (B,H,E); value (B,H,W,E) -> (B,L,E)."""
        b, h, w, e = value.shape
        nh, dh = self.num_heads, self.head_dim
        scale = dh ** -0.5
        # averaging commutes with the affine projection, so pool first (W and H rows, not H*W)
        slots = self.slots()
        k_row = self._heads(self.project(row_keys, K_ROW, slots))                     # (B,h,W,d)
        k_col = self._heads(self.project(col_keys, K_COL, slots))                     # (B,h,H,d)
        q_row = self._heads(self.project(query_row, Q_ROW, slots)) * scale             # (B,h,L,d)
        q_col = self._heads(self.project(query_col, Q_COL, slots)) * scale
        v = self.project(value, V, slots).reshape(b, h, w, nh, dh)
        v = v.permute(0, 3, 1, 2, 4)                                                  # (B,h,H,W,d)

        a_row = torch.matmul(q_row, k_row.transpose(-2, -1))                          # (B,h,L,W)
        a_col = torch.matmul(q_col, k_col.transpose(-2, -1))                          # (B,h,L,H)
        if grid.key_padding_mask is not None:
            a_row = a_row.masked_fill(grid.padded_cols, float("-inf"))
            a_col = a_col.masked_fill(grid.padded_rows, float("-inf"))
        a_row = a_row.softmax(-1)
        a_col = a_col.softmax(-1)
        if self.training and self.dropout > 0:
            a_row = F.dropout(a_row, self.dropout)
            a_col = F.dropout(a_col, self.dropout)
        n_q = a_row.shape[2]
        if h <= w:  # contract the longer axis (x) first: intermediate (B,h,L,H,d)
            t = torch.matmul(a_row, v.transpose(2, 3).reshape(b, nh, w, h * dh))
            out = torch.matmul(a_col[..., None, :], t.reshape(b, nh, n_q, h, dh))
        else:       # contract y first: intermediate (B,h,L,W,d)
            t = torch.matmul(a_col, v.reshape(b, nh, h, w * dh))
            out = torch.matmul(a_row[..., None, :], t.reshape(b, nh, n_q, w, dh))
        return self._merge(out.squeeze(-2))

    def clustered_value_dim(self, x: Tensor, impl: str) -> int:
        """The value head dim forward_clustered attends with, for attention inputs computed from
        ``x`` under ``impl``: 2 d_h where its values are padded (``pad_values``, or by
        default where `pads_values` says so), else d_h."""
        pad = self.pad_values
        if pad is None:
            pad = pads_values(x, self.head_dim, impl)
        return 2 * self.head_dim if pad else self.head_dim

    def forward_clustered(self, query_row: Tensor, query_col: Tensor, key_row: Tensor,
                          key_col: Tensor, value: Tensor, key_padding_mask: Optional[Tensor],
                          impl: str = "auto", key_count_hint=None,
                          value_dim: Optional[int] = None) -> Tensor:
        """ENACT joint softmax over clusters.

        query_row/col (B,N,E) per pixel; key_row/key_col/value (B,R,E) clustered (unprojected);
        key_padding_mask (B,R) True = no cluster -> (B,N,E). key_count_hint: as in
        enact_cuda.clustered_attention. value_dim: `clustered_value_dim` of these inputs where
        the caller has it already (None: asked here).
        """
        import enact_cuda

        slots = self.slots()
        q = torch.cat((self._heads(self.project(query_row, Q_ROW, slots)),
                       self._heads(self.project(query_col, Q_COL, slots))), dim=-1)  # (B,h,N,2d)
        k = torch.cat((self._heads(self.project(key_row, K_ROW, slots)),
                       self._heads(self.project(key_col, K_COL, slots))), dim=-1)    # (B,h,R,2d)
        v = self._heads(self.project(value, V, slots))                                # (B,h,R,d)
        if value_dim is None:
            value_dim = self.clustered_value_dim(q, impl)
        if value_dim > v.shape[-1]:
            v = F.pad(v, (0, value_dim - v.shape[-1]))
        out = enact_cuda.clustered_attention(
            q, k, v, key_padding_mask, dropout_p=self.dropout if self.training else 0.0,
            impl=impl, scale=1.0 / math.sqrt(self.head_dim), key_count_hint=key_count_hint)
        return self._merge(out[..., :self.head_dim])

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}"
