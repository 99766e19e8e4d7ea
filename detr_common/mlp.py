"""The small MLP used for box heads, reference points and query scaling, and the feed-forward
block + residual norms of the transformer layers (upstream attribute names)."""
import torch.nn.functional as F
from torch import Tensor, nn


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


def add_ffn_and_norms(layer: nn.Module, d_model: int, dim_feedforward: int, dropout: float,
                      num_norms: int) -> None:
    """Register on ``layer``, with upstream DETR's names (so state_dict keys match): the
    feed-forward block ``linear1`` (d_model -> dim_feedforward), ``dropout``, ``linear2`` (back to
    d_model), and per residual sub-block i = 1..num_norms ``norm{i}`` (LayerNorm) and
    ``dropout{i}``. Used with ``feed_forward``."""
    layer.linear1 = nn.Linear(d_model, dim_feedforward)
    layer.dropout = nn.Dropout(dropout)
    layer.linear2 = nn.Linear(dim_feedforward, d_model)
    for i in range(1, num_norms + 1):
        layer.add_module(f"norm{i}", nn.LayerNorm(d_model))
    for i in range(1, num_norms + 1):
        layer.add_module(f"dropout{i}", nn.Dropout(dropout))


def feed_forward(layer: nn.Module, x: Tensor) -> Tensor:
    """linear2(dropout(relu(linear1(x)))) of a layer set up by add_ffn_and_norms; x (..., d)."""
    return layer.linear2(layer.dropout(F.relu(layer.linear1(x))))
