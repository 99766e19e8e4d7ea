"""Hungarian matcher against brute force over all assignments (scalar reference costs)."""
import itertools
import math

import pytest
import torch

from detr_common.matcher import HungarianMatcher

W_CLS, W_L1, W_GIOU = 1.5, 5.0, 2.0


def _xyxy(b):
    cx, cy, w, h = b
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def _giou(a, b):
    ax1, ay1, ax2, ay2 = _xyxy(a)
    bx1, by1, bx2, by2 = _xyxy(b)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = (ax2 - ax1) * (ay2 - ay1) + (bx2 - bx1) * (by2 - by1) - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _cls_cost(logits, label, kind):
    if kind == "softmax":
        m = max(logits)
        exps = [math.exp(x - m) for x in logits]
        return -exps[label] / sum(exps)
    p = 1 / (1 + math.exp(-logits[label]))
    alpha, gamma = 0.25, 2.0
    pos = alpha * (1 - p) ** gamma * -math.log(p + 1e-8)
    neg = (1 - alpha) * p ** gamma * -math.log(1 - p + 1e-8)
    return pos - neg


def _ref_cost(logits, boxes, labels, tgt_boxes, kind):
    """Python-scalar cost matrix (Q, T); None where the prediction is non-finite."""
    cost = []
    for q in range(len(logits)):
        lq, bq = logits[q].tolist(), boxes[q].tolist()
        if not all(math.isfinite(v) for v in lq + bq):
            cost.append([None] * len(labels))
            continue
        row = []
        for t in range(len(labels)):
            bt = tgt_boxes[t].tolist()
            l1 = sum(abs(x - y) for x, y in zip(bq, bt))
            row.append(W_CLS * _cls_cost(lq, int(labels[t]), kind) + W_L1 * l1
                       - W_GIOU * _giou(bq, bt))
        cost.append(row)
    return cost


def _brute_force(cost, queries):
    """Minimum total cost over injective maps targets -> allowed queries."""
    num_t = len(cost[0]) if cost else 0
    best = math.inf
    for perm in itertools.permutations(queries, num_t):
        best = min(best, sum(cost[q][t] for t, q in enumerate(perm)))
    return best


def _random_case(num_queries, sizes, num_logits, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(sizes), num_queries, num_logits, generator=g) * 2
    centers = torch.rand(len(sizes), num_queries, 2, generator=g) * 0.6 + 0.2
    wh = torch.rand(len(sizes), num_queries, 2, generator=g) * 0.3 + 0.05
    targets = []
    for n in sizes:
        tc = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        twh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(0, num_logits - 1, (n,), generator=g),
                        "boxes": torch.cat([tc, twh], 1)})
    return {"pred_logits": logits, "pred_boxes": torch.cat([centers, wh], -1)}, targets


def _check(matcher, outputs, targets, kind, allowed=None):
    indices = matcher(outputs, targets)
    assert len(indices) == len(targets)
    num_queries = outputs["pred_logits"].shape[1]
    for i, (src, tgt) in enumerate(indices):
        n = len(targets[i]["labels"])
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert len(src) == len(tgt) == min(n, num_queries)
        assert sorted(tgt.tolist()) == list(range(n))
        assert len(set(src.tolist())) == len(src)
        if n == 0:
            continue
        cost = _ref_cost(outputs["pred_logits"][i], outputs["pred_boxes"][i],
                         targets[i]["labels"], targets[i]["boxes"], kind)
        queries = allowed if allowed is not None else range(num_queries)
        assert all(q in queries for q in src.tolist())
        got = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
        best = _brute_force(cost, list(queries))
        assert torch.allclose(torch.tensor(got, dtype=torch.float64),
                              torch.tensor(best, dtype=torch.float64), atol=1e-4)
    return indices


@pytest.mark.parametrize("kind", ["softmax", "focal"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force(kind, seed):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(5, [3, 0, 4, 1, 2], num_logits=6, seed=seed)
    _check(matcher, outputs, targets, kind)


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_more_targets_than_queries_matches_every_query(kind):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(2, [3], num_logits=4, seed=7)
    (src, tgt), = matcher(outputs, targets)
    assert sorted(src.tolist()) == [0, 1] and len(set(tgt.tolist())) == 2
    cost = _ref_cost(outputs["pred_logits"][0], outputs["pred_boxes"][0],
                     targets[0]["labels"], targets[0]["boxes"], kind)
    best = min(sum(cost[q][t] for q, t in zip((0, 1), pair))
               for pair in itertools.permutations(range(3), 2))
    got = sum(cost[q][t] for q, t in zip(src.tolist(), tgt.tolist()))
    assert torch.allclose(torch.tensor(got), torch.tensor(best), atol=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_all_targets_empty(kind):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(4, [0, 0], num_logits=3, seed=3)
    indices = matcher(outputs, targets)
    assert len(indices) == 2
    for src, tgt in indices:
        assert src.dtype == torch.int64 and tgt.dtype == torch.int64
        assert src.numel() == 0 and tgt.numel() == 0


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_non_finite_predictions_do_not_break_scipy(kind):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(5, [3, 2], num_logits=5, seed=11)
    outputs["pred_logits"][0, 0, :] = float("nan")
    outputs["pred_logits"][0, 2, :] = float("nan")
    outputs["pred_logits"][0, 2, 1] = float("inf")
    outputs["pred_boxes"][0, 4, 0] = float("inf")
    outputs["pred_logits"][1] = float("nan")  # every cost of image 1 is non-finite
    indices = matcher(outputs, targets)
    # Image 0 has 3 targets but only 2 healthy queries (1, 3): both must be used, plus one of
    # the broken ones (which cost a large finite value instead of NaN/inf).
    src, tgt = indices[0]
    assert len(src) == 3 and sorted(tgt.tolist()) == [0, 1, 2]
    healthy = [1, 3]
    assert set(healthy) <= set(src.tolist())
    # Image 1 still gets a complete, valid assignment.
    src1, tgt1 = indices[1]
    assert len(src1) == 2 and sorted(tgt1.tolist()) == [0, 1] and len(set(src1.tolist())) == 2


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_non_finite_query_is_avoided_when_enough_healthy_queries(kind):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(5, [3], num_logits=5, seed=5)
    outputs["pred_logits"][0, 0, :] = float("nan")
    outputs["pred_boxes"][0, 3, 2] = float("nan")
    _check(matcher, outputs, targets, kind, allowed=[1, 2, 4])


def test_bfloat16_outputs_under_autocast_match_fp32_matching():
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost="softmax")
    outputs, targets = _random_case(5, [4, 2], num_logits=6, seed=9)
    low = {k: v.to(torch.bfloat16) for k, v in outputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = matcher(low, targets)
    ref = _check(matcher, {k: v.float() for k, v in low.items()}, targets, "softmax")
    for (s1, t1), (s2, t2) in zip(got, ref):
        assert torch.equal(s1, s2) and torch.equal(t1, t2)


@pytest.mark.parametrize("kind", ["softmax", "focal"])
def test_cost_matrix_values(kind):
    matcher = HungarianMatcher(W_CLS, W_L1, W_GIOU, class_cost=kind)
    outputs, targets = _random_case(5, [4], num_logits=6, seed=13)
    logits, boxes = outputs["pred_logits"][0], outputs["pred_boxes"][0]
    got = matcher.cost_matrix(logits, boxes, targets[0]["labels"], targets[0]["boxes"])
    ref = _ref_cost(logits, boxes, targets[0]["labels"], targets[0]["boxes"], kind)
    assert torch.allclose(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5)
