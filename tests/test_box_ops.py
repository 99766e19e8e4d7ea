"""Box utilities against hand-computed values."""
import math

import torch

from detr_common.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                 generalized_box_iou, inverse_sigmoid, paired_generalized_box_iou)


def test_format_conversions_hand_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [10.0, 20.0, 4.0, 6.0]])
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [8.0, 17.0, 12.0, 23.0]])
    assert torch.allclose(box_cxcywh_to_xyxy(cxcywh), xyxy)
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh)
    batched = torch.rand(2, 3, 4)
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched, atol=1e-6)


def test_area_and_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 3.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 6.0, 6.0], [0.0, 0.0, 2.0, 2.0]])
    assert torch.allclose(box_area(a), torch.tensor([4.0, 6.0]))
    iou, union = box_iou(a, b)
    # a0 vs b0: inter 1, union 4 + 4 - 1 = 7; a0 vs b1 disjoint; a0 vs b2 identical.
    # a1 vs b0: inter 1x2 = 2, union 6 + 4 - 2 = 8; a1 vs b2: inter 4, union 6.
    expected_iou = torch.tensor([[1 / 7, 0.0, 1.0], [2 / 8, 0.0, 4 / 6]])
    expected_union = torch.tensor([[7.0, 5.0, 4.0], [8.0, 7.0, 6.0]])
    assert iou.shape == (2, 3)
    assert torch.allclose(iou, expected_iou)
    assert torch.allclose(union, expected_union)


def test_generalized_iou_hand_values():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0], [1.0, 1.0, 3.0, 3.0]])
    giou = generalized_box_iou(a, b)
    # a0/b0: disjoint, union 2, enclosing 3x1 = 3 -> 0 - (3 - 2) / 3.
    # a0/b1: disjoint, union 1 + 4 = 5, enclosing 3x3 = 9 -> -(9 - 5) / 9.
    # a1/b0: disjoint, union 4 + 1 = 5, enclosing 3x2 = 6 -> -(6 - 5) / 6.
    # a1/b1: inter 1, union 7, enclosing 9 -> 1/7 - 2/9.
    expected = torch.tensor([[-1 / 3, -4 / 9], [-1 / 6, 1 / 7 - 2 / 9]])
    assert torch.allclose(giou, expected, atol=1e-6)
    same = generalized_box_iou(a, a)
    assert torch.allclose(same.diag(), torch.ones(2))


def test_inverse_sigmoid_round_trip_and_clamp():
    x = torch.tensor([-4.0, -1.0, 0.0, 0.5, 3.0])
    assert torch.allclose(inverse_sigmoid(torch.sigmoid(x)), x, atol=1e-4)
    edge = inverse_sigmoid(torch.tensor([0.0, 1.0]))
    assert torch.allclose(edge, torch.tensor([math.log(1e-5), -math.log(1e-5)]))


def test_paired_generalized_iou_is_the_diagonal():
    g = torch.Generator().manual_seed(0)
    a = box_cxcywh_to_xyxy(torch.rand(7, 4, generator=g) * 0.5 + 0.2)
    b = box_cxcywh_to_xyxy(torch.rand(7, 4, generator=g) * 0.5 + 0.2)
    assert torch.allclose(paired_generalized_box_iou(a, b), torch.diag(generalized_box_iou(a, b)))
    assert torch.allclose(paired_generalized_box_iou(a.view(7, 1, 4), b.view(7, 1, 4)),
                          torch.diag(generalized_box_iou(a, b)).view(7, 1))
    assert paired_generalized_box_iou(a[:0], b[:0]).shape == (0,)
