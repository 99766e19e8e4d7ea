"""Generic training and evaluation loops shared by the three detectors.

The model maps an ImageBatch to {"pred_logits", "pred_boxes", "aux_outputs"}; the criterion
returns named losses and carries a ``weight_dict``; the post-processor turns outputs into
absolute xyxy boxes in each image's original size.
"""
import functools
import math
import time
from contextlib import nullcontext

import torch
from enact_cuda import cluster_overflow, exact_cluster_counts
from tqdm import tqdm

from .coco_eval import CocoEvaluator
from .distributed import get_world_size, is_main_process, reduce_dict

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(RuntimeError):
    """The training loss or its gradient became NaN or infinite (the optimizer step was not
    taken, so the weights are those the failing step started from). ``images`` / ``targets``:
    the failing batch, ``epoch`` / ``step``: where."""

    def __init__(self, message, images=None, targets=None, epoch=None, step=None):
        super().__init__(message)
        self.images, self.targets, self.epoch, self.step = images, targets, epoch, step


def autocast(device, amp):
    if amp == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def to_float(outputs):
    """Outputs cast to fp32 (the matcher and the losses always run in fp32); fp32 tensors are
    passed through as they are."""
    if isinstance(outputs, torch.Tensor):
        return outputs if outputs.dtype == torch.float32 else outputs.float()
    if isinstance(outputs, dict):
        return {k: to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float(v) for v in outputs)
    return outputs


def move_targets(targets, device):
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]


def weighted_total(losses, weight_dict):
    """Sum of the losses that have a weight, each times its weight (tensors or floats)."""
    return sum(losses[k] * weight_dict[k] for k in losses if k in weight_dict)


@functools.lru_cache(maxsize=16)
def _weight_vector(weights: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(weights, device=device, dtype=dtype)


def training_loss(losses, weight_dict) -> torch.Tensor:
    """weighted_total of scalar loss tensors as one dot product of their stack with the
    weights: two kernels forward and a few backward, where a sum of weighted terms launches
    two per term (3 per decoder layer with the auxiliary losses), in the stretch of a step
    where the GPU waits for the host (after the matcher's read)."""
    keys = [k for k in losses if k in weight_dict]
    if not keys:
        raise ValueError(f"no loss has a weight: losses {sorted(losses)}, weight_dict "
                         f"{sorted(weight_dict)}")
    terms = torch.stack([losses[k] for k in keys])
    weights = _weight_vector(tuple(float(weight_dict[k]) for k in keys), terms.device,
                             terms.dtype)
    return torch.dot(terms, weights)


class RunningMeans:
    """Running means of named scalars, kept as device tensors until read (no per-step sync)."""

    def __init__(self):
        self.sums, self.counts = {}, {}

    def add(self, values, n=1):
        for k, v in values.items():
            v = v.detach().float().mean() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
            self.sums[k] = self.sums.get(k, 0) + v * n
            self.counts[k] = self.counts.get(k, 0) + n

    def means(self):
        return {k: self.sums[k] / self.counts[k] for k in self.sums}


def _check_finite(loss_value, logged, model, scaler, images, targets, epoch, step):
    """Raise NonFiniteLossError, before the optimizer step, for a non-finite loss or (without
    an fp16 GradScaler, which skips such steps itself) a non-finite gradient; the message
    names the loss terms or the first parameters whose gradients are not finite."""
    if not math.isfinite(loss_value):
        bad = {k: v for k, v in logged.items() if k != "grad_norm" and not math.isfinite(v)}
        raise NonFiniteLossError(
            f"training loss is {loss_value} at epoch {epoch}, step {step} "
            f"(non-finite terms: {bad}); stopping. Try a lower --lr, --amp off, "
            f"or a smaller --clip_max_norm.", images, targets, epoch, step)
    if scaler is None and not math.isfinite(logged["grad_norm"]):
        model = getattr(model, "module", model)
        names = [n for n, p in model.named_parameters()
                 if p.grad is not None and not torch.isfinite(p.grad).all()]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise NonFiniteLossError(
            f"gradient norm is {logged['grad_norm']} at epoch {epoch}, step {step} (loss "
            f"{loss_value:.4g} is finite; non-finite gradients in {shown}); stopping before "
            f"the optimizer step. Try a lower --lr.", images, targets, epoch, step)


def _peak_memory_gib(device):
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def _progress(data_loader, desc):
    return tqdm(data_loader, desc=desc, disable=not is_main_process(), dynamic_ncols=True,
                leave=True)


_OVERFLOW = "enact_cluster_overflow"


def _backward(model, criterion, optimizer, images, targets, amp, scaler):
    """Forward, losses and backward -> the loss terms, detached ({name: 0-dim tensor}).

    The previous step's gradients are released before the forward, so they do not add to the
    memory held at the end of the forward. The autograd graph's last references are this
    function's locals, so the graph is torn down on return (a few milliseconds of host time
    for a detector), while the GPU is still busy with the backward, instead of after the
    step's read, where the GPU would wait."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(images.images.device, amp):
        outputs = model(images)
    loss_dict = criterion(to_float(outputs), targets)
    loss = training_loss(loss_dict, criterion.weight_dict)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    return {name: value.detach() for name, value in loss_dict.items()}


def _clip_gradients(params, max_norm, grad_norm):
    """clip_grads_with_norm_ without a host read, so it is launched before the step's read. A
    non-finite norm leaves the gradients as they are (the step stops, and _check_finite names
    the parameters whose gradients are not finite; an fp16 GradScaler skips the step)."""
    finite_norm = torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0, neginf=0.0)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, finite_norm)


def _forward_backward(model, criterion, optimizer, images, targets, amp, scaler,
                      clip_max_norm):
    """Forward, losses, backward, gradient norm, clipping (``clip_max_norm`` > 0), and the
    step's one device->host read -> (logged {loss name: float, "grad_norm" (before clipping),
    _OVERFLOW: > 0 when an ENACT layer's guessed cluster rows fell short on any process})."""
    losses = _backward(model, criterion, optimizer, images, targets, amp, scaler)
    params = [p for p in model.parameters() if p.grad is not None]
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip_max_norm > 0:
        _clip_gradients(params, clip_max_norm, grad_norm)
    overflow = cluster_overflow(model)
    # Every process sends the flag (a zero where nothing was guessed: the all-reduce pairs
    # values by position), and the mean tells every process of an overflow of any of them.
    read = {**losses, "grad_norm": grad_norm,
            _OVERFLOW: grad_norm.new_zeros(()) if overflow is None else overflow}
    return reduce_dict(read)


def train_step(model, criterion, optimizer, images, targets, *, amp="off", scaler=None,
               clip_max_norm=0.1, epoch=None, step=None):
    """One optimisation step on an ImageBatch and its targets: autocast forward, fp32
    criterion, backward, gradient clipping, ONE device->host read (losses, gradient norm and
    ENACT's cluster overflow flag, averaged over processes), finiteness check
    (NonFiniteLossError, before the weights change; ``epoch`` / ``step`` name the place),
    optimizer step.

    A step in which an ENACT layer's guessed cluster rows fell short
    (enact_cuda.cluster_overflow; the detectors guess unless --enact_wait_for_counts) is redone
    with exact cluster counts before any weight changes; the redo draws its dropout anew. Under
    fp16 the detectors' ENACT layers read their counts (cli.enact_waits_for_counts), so a
    GradScaler never meets a redo.
    -> (loss value, {name: float} of the losses and "grad_norm", whether the step was redone).
    """
    logged = _forward_backward(model, criterion, optimizer, images, targets, amp, scaler,
                               clip_max_norm)
    redone = logged.pop(_OVERFLOW) > 0
    if redone:
        # unscale_ may run once per step: a GradScaler (fp16) must never get here
        assert scaler is None, "under fp16, ENACT's layers must read their cluster counts"
        with exact_cluster_counts(model):
            logged = _forward_backward(model, criterion, optimizer, images, targets, amp,
                                       scaler, clip_max_norm)
        logged.pop(_OVERFLOW)
    loss_value = weighted_total(logged, criterion.weight_dict)
    _check_finite(loss_value, logged, model, scaler, images, targets, epoch, step)
    if scaler is not None:
        scaler.step(optimizer)  # skips steps whose fp16 gradients overflowed
        scaler.update()
    else:
        optimizer.step()
    return loss_value, logged, redone


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, *,
                    clip_max_norm=0.1, amp="off", scaler=None, print_freq=10, stats_fn=None):
    """One pass over ``data_loader`` (train_step per batch); returns the epoch's mean losses
    and throughput figures.

    ``stats_fn(model)`` (ENACT models) may return extra per-step statistics (e.g. ENACT's
    clusters per image) as tensors; they are averaged over the epoch like the losses, and the
    epoch's count of redone steps is added (``enact_redone_steps``, train_step).
    """
    model.train()
    criterion.train()
    means = RunningMeans()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    n_images, redone_steps, start = 0, 0, time.perf_counter()
    bar = _progress(data_loader, f"train epoch {epoch}")
    for step, (images, targets) in enumerate(bar):
        images = images.to(device)
        targets = move_targets(targets, device)
        loss_value, logged, redone = train_step(
            model, criterion, optimizer, images, targets, amp=amp, scaler=scaler,
            clip_max_norm=clip_max_norm, epoch=epoch, step=step)
        redone_steps += redone

        batch = images.images.shape[0]
        n_images += batch
        if not math.isfinite(logged["grad_norm"]):  # an fp16 step the scaler skipped
            del logged["grad_norm"]
        means.add({"loss": loss_value, **logged})
        if stats_fn is not None:
            means.add(stats_fn(model))
        if step % print_freq == 0 or step == len(data_loader) - 1:
            elapsed = time.perf_counter() - start
            postfix = {"loss": f"{loss_value:.3f}", "img/s": f"{n_images / elapsed:.1f}",
                       "lr": f"{optimizer.param_groups[0]['lr']:.1e}"}
            if stats_fn is not None:
                postfix.update({k: f"{v.item():.3g}" for k, v in means.means().items()
                                if k.startswith("enact_")})
            if redone_steps:
                postfix["redone"] = redone_steps
            if device.type == "cuda":
                postfix["mem"] = f"{_peak_memory_gib(device):.2f}G"
            bar.set_postfix(postfix)

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    stats = {k: float(v) for k, v in means.means().items()}
    stats["lr"] = optimizer.param_groups[0]["lr"]
    stats["peak_mem_gib"] = _peak_memory_gib(device)
    stats["s_per_img"] = elapsed / max(n_images, 1)
    stats["img_per_s_all_gpus"] = n_images * get_world_size() / elapsed
    if stats_fn is not None:
        stats["enact_redone_steps"] = redone_steps
    return stats


@torch.no_grad()
def evaluate(model, criterion, postprocessor, data_loader, base_ds, device, *, amp="off",
             stats_fn=None):
    """Validation losses and COCO box AP over ``data_loader``.

    Returns (stats, evaluator): stats holds the mean losses and ``coco_eval_bbox`` (the 12
    COCO numbers), the evaluator the detections and per-class APs.
    """
    model.eval()
    criterion.eval()
    weight_dict = criterion.weight_dict
    means = RunningMeans()
    evaluator = CocoEvaluator(base_ds)
    for images, targets in _progress(data_loader, "eval"):
        images = images.to(device)
        targets = move_targets(targets, device)
        with autocast(device, amp):
            outputs = model(images)
        outputs = to_float(outputs)
        loss_dict = criterion(outputs, targets)
        logged = reduce_dict(loss_dict)
        means.add({"loss": weighted_total(logged, weight_dict), **logged})
        if stats_fn is not None:
            means.add(stats_fn(model))
        orig_sizes = torch.stack([t["orig_size"] for t in targets])
        results = postprocessor(outputs, orig_sizes)
        evaluator.update({int(t["image_id"]): r for t, r in zip(targets, results)})

    evaluator.synchronize_between_processes()
    stats = {k: float(v) for k, v in means.means().items()}
    if is_main_process():
        stats["coco_eval_bbox"] = evaluator.evaluate().tolist()
    return stats, evaluator
