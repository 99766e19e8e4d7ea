"""SetCriterion losses against hand computations; focal loss against a direct formula."""
import math

import pytest
import torch

import detr_common.criterion as criterion_mod
from detr_common.criterion import SetCriterion, expand_aux_weights, sigmoid_focal_loss
from detr_common.matcher import HungarianMatcher

WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _criterion(num_classes=3, class_loss="ce", eos_coef=0.1):
    matcher = HungarianMatcher(1.0, 5.0, 2.0,
                               class_cost="softmax" if class_loss == "ce" else "focal")
    return SetCriterion(num_classes, matcher, WEIGHTS, class_loss=class_loss, eos_coef=eos_coef)


def _log_softmax(values, index):
    m = max(values)
    return values[index] - m - math.log(sum(math.exp(v - m) for v in values))


# pred (0.5, 0.5, 0.2, 0.2) -> xyxy (0.4, 0.4, 0.6, 0.6); target (0.55, 0.5, 0.2, 0.2) ->
# (0.45, 0.4, 0.65, 0.6): inter 0.15 x 0.2 = 0.03, union 0.05, hull 0.25 x 0.2 = 0.05:
# GIoU = IoU = 0.6; L1 = 0.05.
PRED_BOX = [0.5, 0.5, 0.2, 0.2]
TGT_BOX = [0.55, 0.5, 0.2, 0.2]


def test_one_query_hand_computed():
    logits = [0.3, 1.2, -0.5, 0.1]  # 3 classes + no-object
    outputs = {"pred_logits": torch.tensor([[logits]]), "pred_boxes": torch.tensor([[PRED_BOX]])}
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([TGT_BOX])}]
    losses = _criterion()(outputs, targets)
    assert torch.allclose(losses["loss_ce"], torch.tensor(-_log_softmax(logits, 2)), atol=1e-6)
    assert torch.allclose(losses["loss_bbox"], torch.tensor(0.05), atol=1e-6)
    assert torch.allclose(losses["loss_giou"], torch.tensor(0.4), atol=1e-6)
    # argmax is class 1, target 2 -> 100 % error; argmax is a real class -> 1 predicted, 1 target.
    assert torch.allclose(losses["class_error"], torch.tensor(100.0))
    assert torch.allclose(losses["cardinality_error"], torch.tensor(0.0))


def test_eos_coef_weights_unmatched_queries():
    l0, l1 = [0.3, 2.0, -0.5, 0.1], [0.2, -0.4, 0.9, 0.7]
    outputs = {"pred_logits": torch.tensor([[l0, l1]]),
               "pred_boxes": torch.tensor([[TGT_BOX, [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([TGT_BOX])}]
    losses = _criterion(eos_coef=0.1)(outputs, targets)
    # query 0 matched (label 1, weight 1), query 1 -> no-object (index 3, weight 0.1);
    # weighted mean of the NLLs.
    expected = (-_log_softmax(l0, 1) - 0.1 * _log_softmax(l1, 3)) / 1.1
    assert torch.allclose(losses["loss_ce"], torch.tensor(expected), atol=1e-6)
    assert torch.allclose(losses["class_error"], torch.tensor(0.0))
    # argmax of both queries is a real class: 2 predicted vs 1 target.
    assert torch.allclose(losses["cardinality_error"], torch.tensor(1.0))
    assert torch.allclose(losses["loss_bbox"], torch.tensor(0.0), atol=1e-7)


def _focal_direct(logits, onehot, num_boxes, alpha=0.25, gamma=2.0):
    """Element-wise Python formula: mean over queries, sum over the rest, / num_boxes."""
    b, q, c = logits.shape
    total = 0.0
    for i in range(b):
        for j in range(q):
            for k in range(c):
                x, t = float(logits[i, j, k]), float(onehot[i, j, k])
                p = 1 / (1 + math.exp(-x))
                ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
                p_t = p * t + (1 - p) * (1 - t)
                a_t = alpha * t + (1 - alpha) * (1 - t)
                total += a_t * (1 - p_t) ** gamma * ce / q
    return total / num_boxes


def test_sigmoid_focal_loss_direct_formula():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g) * 2
    onehot = torch.zeros(2, 3, 4)
    onehot[0, 1, 2] = onehot[1, 0, 0] = onehot[1, 2, 3] = 1
    got = sigmoid_focal_loss(logits, onehot, 3.0)
    assert torch.allclose(got, torch.tensor(_focal_direct(logits, onehot, 3.0)), atol=1e-6)


def test_focal_class_loss_one_query_times_num_queries():
    logits = torch.tensor([[[0.5, -1.0, 2.0], [-0.3, 0.8, -2.0]]])  # 3 classes, sigmoid
    outputs = {"pred_logits": logits,
               "pred_boxes": torch.tensor([[TGT_BOX, [0.2, 0.2, 0.1, 0.1]]])}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([TGT_BOX])}]
    losses = _criterion(class_loss="focal")(outputs, targets)
    onehot = torch.zeros(1, 2, 3)
    onehot[0, 0, 1] = 1  # query 0 matched to class 1; query 1 all zeros
    expected = _focal_direct(logits, onehot, 1.0) * 2  # x num_queries
    assert torch.allclose(losses["loss_ce"], torch.tensor(expected), atol=1e-6)
    # sigmoid head cardinality: queries with max prob > 0.5 -> query 0 (2.0) and 1 (0.8).
    assert torch.allclose(losses["cardinality_error"], torch.tensor(1.0))


def test_aux_losses_suffixed_and_equal_to_main_on_same_outputs():
    g = torch.Generator().manual_seed(1)
    main = {"pred_logits": torch.randn(2, 4, 5, generator=g),
            "pred_boxes": torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2}
    aux = [{"pred_logits": torch.randn(2, 4, 5, generator=g),
            "pred_boxes": torch.rand(2, 4, 4, generator=g) * 0.3 + 0.2} for _ in range(2)]
    targets = [{"labels": torch.tensor([0, 3]), "boxes": torch.tensor([TGT_BOX, PRED_BOX])},
               {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.1]])}]
    crit = _criterion(num_classes=4)
    losses = crit({**main, "aux_outputs": aux}, targets)
    expected_keys = {"loss_ce", "loss_bbox", "loss_giou", "class_error", "cardinality_error"}
    for i in range(2):
        expected_keys |= {f"loss_ce_{i}", f"loss_bbox_{i}", f"loss_giou_{i}",
                          f"cardinality_error_{i}"}
    assert set(losses) == expected_keys
    alone = crit(aux[1], targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
        assert torch.allclose(losses[f"{name}_1"], alone[name])
    weights = expand_aux_weights(WEIGHTS, 3)
    assert weights == {**WEIGHTS, "loss_ce_0": 1.0, "loss_bbox_0": 5.0, "loss_giou_0": 2.0,
                       "loss_ce_1": 1.0, "loss_bbox_1": 5.0, "loss_giou_1": 2.0}


def test_empty_targets_and_gradients():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    boxes = torch.rand(2, 3, 4, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, [empty, empty])
    assert torch.allclose(losses["loss_bbox"], torch.tensor(0.0))
    assert torch.allclose(losses["loss_giou"], torch.tensor(0.0))
    # every query's target is no-object
    expected = torch.nn.functional.cross_entropy(logits.detach().reshape(-1, 4),
                                                 torch.full((6,), 3))
    assert torch.allclose(losses["loss_ce"], expected, atol=1e-6)
    losses["loss_ce"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_fp32_under_autocast():
    logits = torch.randn(1, 3, 4).to(torch.bfloat16)
    boxes = (torch.rand(1, 3, 4) * 0.3 + 0.2).to(torch.bfloat16)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([TGT_BOX])}]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _criterion()({"pred_logits": logits, "pred_boxes": boxes}, targets)
    ref = _criterion()({"pred_logits": logits.float(), "pred_boxes": boxes.float()}, targets)
    for name in ("loss_ce", "loss_bbox", "loss_giou"):
        assert losses[name].dtype == torch.float32
        assert torch.allclose(losses[name], ref[name], atol=1e-6)


def test_num_boxes_is_averaged_over_workers(monkeypatch):
    """Simulate 2 workers where the other one holds 3 boxes: num_boxes = (1 + 3) / 2 = 2."""
    outputs = {"pred_logits": torch.tensor([[[0.1, 0.2, 0.3, 0.4]]]),
               "pred_boxes": torch.tensor([[PRED_BOX]])}
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([TGT_BOX])}]
    monkeypatch.setattr(criterion_mod, "_is_dist", lambda: True)
    monkeypatch.setattr(criterion_mod.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criterion_mod.dist, "all_reduce", lambda t: t.add_(3.0))
    losses = _criterion()(outputs, targets)
    assert torch.allclose(losses["loss_bbox"], torch.tensor(0.05 / 2), atol=1e-6)
    assert torch.allclose(losses["loss_giou"], torch.tensor(0.4 / 2), atol=1e-6)


def test_rejects_unknown_loss_names():
    with pytest.raises(ValueError, match="unknown losses"):
        SetCriterion(3, HungarianMatcher(), WEIGHTS, losses=("labels", "masks"))


@pytest.mark.parametrize("class_loss", ["ce", "focal"])
def test_layers_and_images_against_per_image_reference(class_loss):
    """Three decoder layers with different outputs, images with 3, 0 and 2 targets: every
    layer's losses equal a per-image loop over that layer's own matching (so the batched
    layer computation, target offsets and layer order are right)."""
    from detr_common.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
    g = torch.Generator().manual_seed(0)
    B, Q, C = 3, 5, 3
    width = C + 1 if class_loss == "ce" else C
    layers = [{"pred_logits": torch.randn(B, Q, width, generator=g),
               "pred_boxes": torch.rand(B, Q, 4, generator=g) * 0.5 + 0.25} for _ in range(3)]
    targets = [{"labels": torch.randint(0, C, (n,), generator=g),
                "boxes": torch.rand(n, 4, generator=g) * 0.5 + 0.25} for n in (3, 0, 2)]
    outputs = dict(layers[-1], aux_outputs=layers[:-1])
    crit = _criterion(num_classes=C, class_loss=class_loss)
    losses = crit(outputs, targets)
    for suffix, out in zip(("_0", "_1", ""), layers):
        indices = crit.matcher(out, targets)
        l1, giou, hits, classes = 0.0, 0.0, [], torch.full((B, Q), C)
        for b, (src, tgt) in enumerate(indices):
            for q, t in zip(src.tolist(), tgt.tolist()):
                p, y = out["pred_boxes"][b, q], targets[b]["boxes"][t]
                l1 += (p - y).abs().sum()
                giou += 1 - generalized_box_iou(box_cxcywh_to_xyxy(p[None]),
                                                box_cxcywh_to_xyxy(y[None]))[0, 0]
                classes[b, q] = targets[b]["labels"][t]
                hits.append(float(out["pred_logits"][b, q].argmax() == classes[b, q]))
        if class_loss == "ce":
            ce = torch.nn.functional.cross_entropy(out["pred_logits"].transpose(1, 2), classes,
                                                   crit.empty_weight)
            predicted = (out["pred_logits"].argmax(-1) != C).sum(1)
        else:
            onehot = torch.nn.functional.one_hot(classes, C + 1)[..., :C].float()
            ce = sigmoid_focal_loss(out["pred_logits"], onehot, 5.0) * Q
            predicted = (out["pred_logits"].sigmoid().amax(-1) > 0.5).sum(1)
        cardinality = (predicted.float() - torch.tensor([3.0, 0.0, 2.0])).abs().mean()
        assert torch.allclose(losses["loss_bbox" + suffix], l1 / 5.0, atol=1e-6)
        assert torch.allclose(losses["loss_giou" + suffix], giou / 5.0, atol=1e-6)
        assert torch.allclose(losses["loss_ce" + suffix], ce, atol=1e-6)
        assert torch.allclose(losses["cardinality_error" + suffix], cardinality)
        if suffix == "":
            assert torch.allclose(losses["class_error"], torch.tensor(100 - 100 * sum(hits) / 5))
    assert "class_error_0" not in losses


def test_match_layers_equals_one_match_per_layer():
    g = torch.Generator().manual_seed(1)
    layers = [{"pred_logits": torch.randn(2, 6, 4, generator=g),
               "pred_boxes": torch.rand(2, 6, 4, generator=g) * 0.5 + 0.25} for _ in range(3)]
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=g) * 0.5 + 0.25},
               {"labels": torch.tensor([1]), "boxes": torch.rand(1, 4, generator=g) * 0.5 + 0.25}]
    matcher = HungarianMatcher(1.0, 5.0, 2.0)
    together = matcher.match_layers(torch.stack([o["pred_logits"] for o in layers]),
                                    torch.stack([o["pred_boxes"] for o in layers]), targets)
    for layer, got in zip(layers, together):
        for (src, tgt), (ref_src, ref_tgt) in zip(got, matcher(layer, targets)):
            assert torch.equal(src, ref_src) and torch.equal(tgt, ref_tgt)
