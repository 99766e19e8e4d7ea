"""engine.train_one_epoch on a two-parameter toy model: the logged gradient norm, clipping,
the stop before the optimizer step on a non-finite loss or gradient, and the redo of a step
whose ENACT cluster rows fell short; the training loss and to_float."""
import math
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from detr_common.data.collate import ImageBatch
from detr_common.engine import (NonFiniteLossError, to_float, train_one_epoch, training_loss,
                                weighted_total)


class Toy(nn.Module):
    """Outputs w * mean(image) and v; the criterion below turns them into losses."""

    def __init__(self, w, v):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(float(w)))
        self.v = nn.Parameter(torch.tensor(float(v)))

    def forward(self, batch):
        return {"a": self.w * batch.images.mean(), "b": self.v}


class ToyCriterion(nn.Module):
    """loss_a = a^2; loss_b = sqrt(b^2) (finite at b = 0, with a NaN gradient there)."""

    weight_dict = {"loss_a": 1.0, "loss_b": 2.0}

    def forward(self, outputs, targets):
        return {"loss_a": outputs["a"] ** 2, "loss_b": torch.sqrt(outputs["b"] ** 2)}


def _loader(value=1.0, steps=1):
    batch = ImageBatch(torch.full((2, 3, 4, 4), value), torch.zeros(2, 4, 4, dtype=torch.bool))
    return [(batch, [{"labels": torch.zeros(1, dtype=torch.int64)}] * 2)] * steps


# clip_grads_with_norm_'s coefficient at clip 0.1 for the toy's gradients (6, 2), norm sqrt(40)
CLIP_SCALE = 0.1 / (math.sqrt(40.0) + 1e-6)


def _train(model, clip, lr=1.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return train_one_epoch(model, ToyCriterion(), _loader(), opt, torch.device("cpu"), 0,
                           clip_max_norm=clip)


def test_logged_gradient_norm_is_before_clipping_and_the_step_is_clipped():
    # loss = w^2 + 2|v| at w = 3, v = 4 (image mean 1): grads (6, 2), norm sqrt(40)
    model = Toy(3.0, 4.0)
    stats = _train(model, clip=0.1)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(40.0), rel=1e-6)
    assert stats["loss"] == pytest.approx(9.0 + 8.0)
    assert torch.allclose(model.w.detach(), torch.tensor(3.0 - 6.0 * CLIP_SCALE))
    assert torch.allclose(model.v.detach(), torch.tensor(4.0 - 2.0 * CLIP_SCALE))

    unclipped = Toy(3.0, 4.0)
    _train(unclipped, clip=0.0, lr=0.5)
    assert torch.allclose(unclipped.w.detach(), torch.tensor(0.0))  # 3 - 0.5 * 6


def test_non_finite_gradient_stops_before_the_step_and_names_the_parameter():
    model = Toy(3.0, 0.0)  # loss_b = sqrt(0) = 0 is finite, its gradient is NaN
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is nan at epoch 0, step 0 "
                                                 r"\(loss 9 is finite; non-finite gradients "
                                                 r"in v\)") as info:
        _train(model, clip=0.1)
    assert model.w.item() == 3.0 and model.v.item() == 0.0  # no optimizer step
    # the NaN norm left the gradients unclipped (clipping runs before the read)
    assert model.w.grad.item() == 6.0 and math.isnan(model.v.grad.item())
    assert info.value.step == 0 and info.value.images.images.shape == (2, 3, 4, 4)


def test_the_autograd_graph_is_released_and_the_gradients_clipped_before_the_read(monkeypatch):
    """The step's device->host read comes after the graph's teardown and the clipping (both
    host work that would otherwise run while the GPU waits)."""
    import weakref

    import detr_common.engine as engine

    model = Toy(3.0, 4.0)
    forward, outputs = model.forward, []

    def watched_forward(batch):
        out = forward(batch)
        outputs.append(weakref.ref(out["a"]))
        return out

    model.forward = watched_forward
    seen, engine_reduce = {}, engine.reduce_dict

    def read(values):
        seen["output_alive"] = outputs[0]() is not None
        seen["grads"] = (model.w.grad.item(), model.v.grad.item())
        return engine_reduce(values)

    monkeypatch.setattr(engine, "reduce_dict", read)
    _train(model, clip=0.1)
    assert seen["output_alive"] is False
    assert seen["grads"] == pytest.approx((6.0 * CLIP_SCALE, 2.0 * CLIP_SCALE), rel=1e-6)


def test_the_previous_steps_gradients_are_released_before_the_forward():
    model = Toy(3.0, 4.0)
    forward, grads_at_forward = model.forward, []

    def watched_forward(batch):
        grads_at_forward.append((model.w.grad, model.v.grad))
        return forward(batch)

    model.forward = watched_forward
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train_one_epoch(model, ToyCriterion(), _loader(steps=2), opt, torch.device("cpu"), 0,
                    clip_max_norm=0.0)
    assert grads_at_forward == [(None, None), (None, None)]
    assert model.w.grad is not None  # the last step's gradients stay until the next step


def test_a_grad_scaler_skips_a_non_finite_step_and_takes_a_finite_one_clipped():
    """With a GradScaler (--amp fp16) a non-finite gradient is no error: the scaler skips the
    step (weights unchanged, its scale backed off); a finite step is unscaled, then clipped as
    without a scaler."""
    model = Toy(3.0, 0.0)  # NaN gradient for v
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stats = train_one_epoch(model, ToyCriterion(), _loader(), opt, torch.device("cpu"), 0,
                            clip_max_norm=0.1, scaler=scaler)
    assert model.w.item() == 3.0 and model.v.item() == 0.0
    assert scaler.get_scale() == 512.0 and "grad_norm" not in stats

    model = Toy(3.0, 4.0)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stats = train_one_epoch(model, ToyCriterion(), _loader(), opt, torch.device("cpu"), 0,
                            clip_max_norm=0.1, scaler=scaler)
    assert stats["grad_norm"] == pytest.approx(math.sqrt(40.0), rel=1e-6)
    assert torch.allclose(model.w.detach(), torch.tensor(3.0 - 6.0 * CLIP_SCALE))
    assert torch.allclose(model.v.detach(), torch.tensor(4.0 - 2.0 * CLIP_SCALE))


def test_non_finite_loss_stops_with_its_terms():
    model = Toy(float("inf"), 1.0)
    with pytest.raises(NonFiniteLossError, match=r"training loss is inf .*'loss_a': inf"):
        _train(model, clip=0.1)
    assert model.v.item() == 1.0


def test_an_overflowed_step_is_redone_with_exact_counts_before_the_weights_change(monkeypatch):
    """A step whose ENACT cluster rows fell short (cluster_overflow is True) is redone under
    exact_cluster_counts: the logged losses and the optimizer step are those of the redo, and
    the epoch counts the redone step. A stand-in layer gives a wrong output unless exact."""
    import detr_common.engine as engine

    model = Toy(3.0, 4.0)
    model.exact = False
    forward = model.forward
    model.forward = lambda batch: {k: (v if model.exact else 10 * v)
                                   for k, v in forward(batch).items()}
    exact_passes = []

    @contextmanager
    def exact_counts(m):
        exact_passes.append(m is model)
        model.exact = True
        try:
            yield
        finally:
            model.exact = False

    monkeypatch.setattr(engine, "exact_cluster_counts", exact_counts)
    monkeypatch.setattr(engine, "cluster_overflow",
                        lambda m: None if model.exact else torch.tensor(True))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = engine.train_one_epoch(model, ToyCriterion(), _loader(), opt, torch.device("cpu"), 0,
                                   clip_max_norm=0.0, stats_fn=lambda m: {})
    assert exact_passes == [True]
    assert stats["enact_redone_steps"] == 1
    assert stats["loss"] == pytest.approx(9.0 + 8.0)  # w^2 + 2|v|, not the 10x pass
    assert stats["grad_norm"] == pytest.approx(math.sqrt(40.0), rel=1e-6)
    assert torch.allclose(model.w.detach(), torch.tensor(0.0))  # 3 - 0.5 * 6
    assert torch.allclose(model.v.detach(), torch.tensor(3.0))  # 4 - 0.5 * 2


def test_a_step_without_overflow_is_taken_once(monkeypatch):
    import detr_common.engine as engine

    calls = []
    monkeypatch.setattr(engine, "cluster_overflow",
                        lambda m: calls.append(1) or torch.tensor(False))
    model = Toy(3.0, 4.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    stats = engine.train_one_epoch(model, ToyCriterion(), _loader(), opt, torch.device("cpu"), 0,
                                   clip_max_norm=0.0, stats_fn=lambda m: {})
    assert calls == [1] and stats["enact_redone_steps"] == 0
    assert torch.allclose(model.w.detach(), torch.tensor(0.0))


def test_training_loss_is_the_weighted_sum_and_its_gradient():
    # 19 terms as a DETR step has (3 per decoder layer), one unweighted (class_error)
    torch.manual_seed(0)
    raw = torch.rand(19, dtype=torch.float64, requires_grad=True)
    names = ["class_error"] + [f"loss_{i}" for i in range(18)]
    weight_dict = {f"loss_{i}": float(i % 3 + 1) / 2 for i in range(18)}
    losses = dict(zip(names, raw.unbind(0)))
    loss = training_loss(losses, weight_dict)
    (grad,) = torch.autograd.grad(loss, raw)
    reference = weighted_total(losses, weight_dict)  # one multiply and one add per term
    (grad_ref,) = torch.autograd.grad(reference, raw)
    assert loss.dim() == 0 and loss.dtype == torch.float64
    assert torch.allclose(loss, reference)
    assert torch.equal(grad, grad_ref)  # the weights themselves; class_error 0
    assert grad[0] == 0 and grad[1] == 0.5
    with pytest.raises(ValueError, match="no loss has a weight"):
        training_loss({"class_error": raw[0]}, weight_dict)


def test_to_float_casts_other_dtypes_and_passes_float32_through():
    x32, x16 = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    out = to_float({"a": x32, "aux": [{"b": x16}], "n": 3})
    assert out["a"] is x32 and out["aux"][0]["b"].dtype == torch.float32 and out["n"] == 3
