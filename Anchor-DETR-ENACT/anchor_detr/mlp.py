"""Box-head MLP (Linear-ReLU-...-Linear), keys ``layers.{0..L-1}.{weight,bias}`` as upstream.

Kept minimal here because detr_common has no MLP yet (reported to the lead: the three detectors
each need one, so it belongs in detr_common).
"""
import torch.nn.functional as F
from torch import Tensor, nn


class MLP(nn.Module):
    """(..., in_dim) -> (..., out_dim) through num_layers Linear layers with ReLU between."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x
