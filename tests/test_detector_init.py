"""The initialisation ENACT's projections get inside the DETR and Conditional DETR detectors.

Their transformers redraw every parameter with dim > 1 Xavier-uniform after construction (as
upstream, and so the official ENACT code): ENACT's W_q, W_k, W_v, W_o per d x d matrix, the
plain attention's q/k/v as one stacked (3d x d) matrix. The accuracy-parity runs were trained
so; the README states it."""
import math

import pytest
import torch

from _cli import load_main
from detr_common.attention import EncoderSelfAttention
from enact_cuda import ENACTAttention

TINY = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
        "--nheads", "4", "--enc_layers", "2", "--dec_layers", "1", "--dim_feedforward", "128",
        "--num_queries", "10", "--device", "cpu", "--enact_impl", "torch", "--num_classes", "5"]


def build(folder, *extra):
    main = load_main(folder)
    args = main.get_parser().parse_args([*TINY, *extra])
    torch.manual_seed(0)
    return main.DETECTOR.build(args)[0]


@pytest.mark.parametrize("folder", ["DETR-ENACT", "Conditional-DETR-ENACT"])
def test_enact_projections_are_xavier_per_matrix(folder):
    d = 64
    per_matrix, stacked = math.sqrt(6.0 / (2 * d)), math.sqrt(6.0 / (4 * d))
    enact = [m for m in build(folder).modules() if isinstance(m, ENACTAttention)]
    assert len(enact) == 2
    for m in enact:
        for lin in (m.W_q, m.W_k, m.W_v, m.W_o):
            w = lin.weight.abs().max().item()
            # a uniform draw of 4096 values reaches beyond 95 % of its bound
            assert 0.95 * per_matrix < w <= per_matrix
            assert torch.equal(lin.bias, torch.zeros(d))
    plain = [m for m in build(folder, "--no_enact").modules()
             if isinstance(m, EncoderSelfAttention)]
    assert len(plain) == 2
    for m in plain:
        assert 0.95 * stacked < m.in_proj_weight.abs().max().item() <= stacked
        assert 0.95 * per_matrix < m.out_proj.weight.abs().max().item() <= per_matrix
