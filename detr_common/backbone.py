"""ResNet backbone with frozen batch norm (spec §3.1), or fully trainable for training from
scratch.

``Backbone.forward(batch)`` takes an ImageBatch (images (B,3,H,W), mask (B,H,W) bool, True =
padding) and returns a list, one entry per returned layer, of (feat (B,C,h,w), mask (B,h,w))
where the mask is the padding mask resized to (h, w) by nearest interpolation.
``Joiner(backbone, position_embedding)`` adds the positional encoding (B,d,h,w) per level; its
state_dict keys are ``0.body.*`` so a detector holding it as ``backbone`` has the upstream keys
``backbone.0.body.conv1.weight`` etc.
"""
import os
from typing import Iterable, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# (importing checkpoint also lets weights_only loads read our checkpoints' args)
from .checkpoint import strip_ddp_prefix

_LAYERS = ("layer1", "layer2", "layer3", "layer4")
_STEM = ("conv1", "bn1", "relu", "maxpool")
_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_WEIGHTS = {
    "resnet18": "ResNet18_Weights",
    "resnet34": "ResNet34_Weights",
    "resnet50": "ResNet50_Weights",
    "resnet101": "ResNet101_Weights",
}


def _torchvision_models():
    """torchvision.models, imported when a backbone is built: importing torchvision takes
    about 3 s (it loads torch._dynamo), which a command that stops before the model (--help,
    a missing --coco_path, a malformed annotation file) need not wait for."""
    import torchvision.models
    return torchvision.models


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (all buffers, never trained).

    y = (x - running_mean) * weight * rsqrt(running_var + eps) + bias, eps = 1e-5, computed as
    one fused multiply-add x * scale + shift; the per-channel (scale, shift) are cached until a
    buffer changes (in place, e.g. load_state_dict, or replaced, e.g. .to()), so a forward is
    one kernel instead of six (a ResNet-50 forward launches ~270 fewer kernels). In the
    backbone the layer is not called: `fold` merges it into the preceding convolution
    (conv_bn), which saves the multiply-add over the activations and, in training, its
    backward.
    ``num_batches_tracked`` entries of a BatchNorm2d state_dict are ignored on load.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self._affine_key = None
        self._affine = None
        self._fold_key = None
        self._fold = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)

    def scale_shift(self, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """(scale, shift), each (1, C, 1, 1) in ``dtype``: y = x * scale + shift."""
        buffers = (self.weight, self.bias, self.running_mean, self.running_var)
        key = (dtype, torch.is_inference_mode_enabled(),
               *((b.data_ptr(), b._version) for b in buffers))
        if key != self._affine_key:
            with torch.no_grad():
                scale = self.weight * (self.running_var + self.eps).rsqrt()
                shift = self.bias - self.running_mean * scale
            self._affine = tuple(t.reshape(1, -1, 1, 1).to(dtype) for t in (scale, shift))
            self._affine_key = key
        return self._affine

    def forward(self, x: Tensor) -> Tensor:
        scale, shift = self.scale_shift(x.dtype)
        return torch.addcmul(shift, x, scale)

    def fold(self, conv: nn.Conv2d) -> Tuple[Tensor, Tensor]:
        """(weight, bias) of ``conv`` followed by this layer as one convolution: conv.weight
        times scale per output channel, bias shift (+ conv.bias * scale). Differentiable w.r.t.
        the conv's parameters when autograd needs them. Cached until a parameter or buffer
        changes for a frozen conv, and in eval mode for a trainable one; train() drops the
        cache, so that a training run holds no copy of the weights it trains."""
        weight, bias = conv.weight, conv.bias
        scale, shift = self.scale_shift(weight.dtype)
        params = (weight,) if bias is None else (weight, bias)
        if any(p.requires_grad for p in params) and (self.training or torch.is_grad_enabled()):
            return _folded(weight, bias, scale, shift)
        key = (self._affine_key, *((p.data_ptr(), p._version) for p in params))
        if key != self._fold_key:
            with torch.no_grad():
                self._fold = _folded(weight, bias, scale, shift)
            self._fold_key = key
        return self._fold

    def train(self, mode: bool = True):
        if mode:
            self._fold, self._fold_key = None, None
        return super().train(mode)


def _folded(weight: Tensor, bias, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """conv weight (C, ...) and bias (C,) or None, then y * scale + shift ((1, C, 1, 1) each)
    -> the one convolution's (weight, bias)."""
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    if bias is None:
        return weight, shift.flatten()
    return weight, torch.addcmul(shift.flatten(), bias, scale.flatten())


class _ScaledConv(torch.autograd.Function):
    """conv2d(x, weight * scale, bias) for a trainable weight and a constant (scale, bias): it
    saves the weight itself and recomputes the scaled copy in the backward (saving that copy
    would add the trainable convolutions' weights to the activation memory). Under autocast it
    computes in the autocast dtype, as F.conv2d would."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, stride, padding, dilation, groups):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                x = x.to(dtype)
                out = F.conv2d(x, (weight * scale).to(dtype), bias.to(dtype), stride, padding,
                               dilation, groups)
        else:  # no autocast context to enter: a third of this call's host time
            out = F.conv2d(x, weight * scale, bias, stride, padding, dilation, groups)
        ctx.save_for_backward(x, weight, scale)
        ctx.conv = (stride, padding, dilation, groups)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad.to(x.dtype), x, (weight * scale).to(x.dtype), None, stride, padding, dilation,
            False, [0] * len(stride), groups,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype) * scale
        return grad_x, grad_w, None, None, None, None, None, None


def conv_bn(conv: nn.Conv2d, bn: nn.Module, x: Tensor) -> Tensor:
    """bn(conv(x)): one convolution with a FrozenBatchNorm2d folded in (no per-pixel
    multiply-add forward or backward), else the two modules (BatchNorm2d). A trainable
    bias-free conv goes through _ScaledConv (no extra saved tensor); the rest through
    FrozenBatchNorm2d.fold (cached when nothing needs gradients)."""
    if not isinstance(bn, FrozenBatchNorm2d):
        return bn(conv(x))
    if torch.is_grad_enabled() and conv.weight.requires_grad and conv.bias is None:
        scale, shift = bn.scale_shift(conv.weight.dtype)
        return _ScaledConv.apply(x, conv.weight, scale.view(-1, 1, 1, 1), shift.flatten(),
                                 conv.stride, conv.padding, conv.dilation, conv.groups)
    weight, bias = bn.fold(conv)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _Block(nn.Module):
    """A torchvision BasicBlock / Bottleneck computed with conv_bn: the same children, hence the
    same state_dict keys, and the same function (relu after every conv / BN pair, the residual
    added before the last relu)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.downsample = block.downsample  # None (no child) when the shapes match
        convs = [self.conv1, self.conv2] + ([self.conv3] if hasattr(self, "conv3") else [])
        if self.downsample is not None:
            convs.append(self.downsample[0])
        if any(c.padding_mode != "zeros" for c in convs):
            raise ValueError("conv_bn expects zero-padded convolutions, as torchvision's ResNets")
        self.num_pairs = 3 if hasattr(self, "conv3") else 2

    def forward(self, x: Tensor) -> Tensor:
        out = x
        for i in range(1, self.num_pairs + 1):
            out = conv_bn(getattr(self, f"conv{i}"), getattr(self, f"bn{i}"), out)
            if i < self.num_pairs:
                out = self.relu(out)
        identity = x if self.downsample is None else conv_bn(*self.downsample, x)
        out += identity
        return self.relu(out)


@torch.no_grad()
def calibrate_frozen_batchnorm(model: nn.Module, images: Tensor) -> None:
    """Give every FrozenBatchNorm2d of ``model`` the statistics of its own input on ``images``
    (each layer in forward order, so later layers see normalised activations), as a trained
    BatchNorm would have them.

    For random-initialised backbones: with a fresh BatchNorm's identity statistics the
    activations of a frozen-BN ResNet roughly double at every residual block (about 1e5 at
    the end of a random ResNet-101), and attention logits of 1e10 and more make fused
    attention backward passes overflow.
    """
    called = []

    def use_input_statistics(bn, inputs):
        x = inputs[0].float()
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3), unbiased=False))
        called.append(bn)

    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    handles = [m.register_forward_pre_hook(use_input_statistics) for m in frozen]
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    if len(called) != len(frozen):
        raise RuntimeError(f"calibrate_frozen_batchnorm: {len(frozen) - len(called)} of "
                           f"{len(frozen)} FrozenBatchNorm2d layers were not called (folded "
                           "into their convolutions: calibrate the torchvision ResNet first)")


class _Body(nn.Module):
    """The ResNet trunk (conv1, bn1, relu, maxpool, layer1..layerK) returning chosen layers,
    with torchvision's children and state_dict keys; every conv / BN pair is computed by
    conv_bn (a frozen BN folded into its convolution)."""

    def __init__(self, resnet: nn.Module, return_layers: Tuple[str, ...]):
        super().__init__()
        last = max(_LAYERS.index(name) for name in return_layers)
        for name in _STEM:
            self.add_module(name, getattr(resnet, name))
        self.layers = _LAYERS[: last + 1]
        for name in self.layers:
            self.add_module(name, nn.Sequential(*(_Block(b) for b in getattr(resnet, name))))
        self.return_layers = tuple(return_layers)

    def forward(self, x: Tensor) -> List[Tensor]:
        x = self.maxpool(self.relu(conv_bn(self.conv1, self.bn1, x)))
        out = []
        for name in self.layers:
            x = getattr(self, name)(x)
            if name in self.return_layers:
                out.append(x)
        return out


def _dilate_basic_layer4(layer4: nn.Sequential) -> None:
    """Replace layer4's stride by dilation 2 for BasicBlock ResNets (18/34), in place.

    Mirrors torchvision's convention for Bottleneck: the first block keeps dilation 1 with stride
    1, later blocks use dilation 2 (padding 2). Weight shapes are unchanged.
    """
    first = layer4[0]
    first.conv1.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    for block in list(layer4)[1:]:
        for conv in (block.conv1, block.conv2):
            conv.dilation = (2, 2)
            conv.padding = (2, 2)


# where a detector's state_dict keeps its ResNet: DETR / Conditional DETR (Joiner), Anchor DETR
_DETECTOR_PREFIXES = ("backbone.0.body.", "backbone.body.")


class BackboneWeightsError(RuntimeError):
    """--backbone_weights cannot be used: not found, unreadable or of another network."""


def _resnet_state_dict(name: str, weights: str) -> dict:
    """State dict (torchvision key names) for ``weights`` = "imagenet" or a file path: a ResNet
    state_dict, or a detector checkpoint whose ``backbone.0.body.*`` / ``backbone.body.*``
    entries are taken (e.g. a backbone trained by another detector on the same data); either
    may have been saved from a DDP wrapper (every key under ``module.``)."""
    if weights == "imagenet":
        enum = getattr(_torchvision_models(), _WEIGHTS[name]).IMAGENET1K_V1
        try:
            return enum.get_state_dict(progress=False)
        except Exception as exc:  # offline, proxy, corrupt cache ...
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BackboneWeightsError(
                f"could not fetch ImageNet weights for {name}: {reason}; "
                "pass --backbone_weights none or a local .pth") from None
    path = weights
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"--backbone_weights {path}: file not found (expected "
                                   "imagenet, none or a local .pth state_dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise BackboneWeightsError(f"--backbone_weights {path}: cannot read the "
                                   f"state_dict: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"--backbone_weights {path}: expected a state_dict (dict "
                                   f"of tensors), got {type(state).__name__}")
    state = strip_ddp_prefix(state)  # saved from a DistributedDataParallel wrapper
    if any(k.startswith(_DETECTOR_PREFIXES) for k in state):
        # a detector checkpoint (ours or upstream): its backbone only
        state = {k: v for k, v in state.items() if k.startswith(_DETECTOR_PREFIXES)}
    out = {}
    for key, value in state.items():
        for prefix in (*_DETECTOR_PREFIXES, "body."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out


def _load_resnet_weights(resnet: nn.Module, name: str, weights: str) -> None:
    state = _resnet_state_dict(name, weights)
    state = {k: v for k, v in state.items()
             if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {k: v.shape for k, v in resnet.state_dict().items()
                if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state)
                   if tuple(state[k].shape) != tuple(expected[k]))
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches (e.g. {wrong[0]}: "
                         f"{tuple(state[wrong[0]].shape)} vs {tuple(expected[wrong[0]])})")
        raise BackboneWeightsError(f"--backbone_weights {weights}: not a {name} "
                                   "state_dict: " + "; ".join(parts))
    resnet.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """torchvision ResNet trunk with FrozenBatchNorm2d (or BatchNorm2d with train_all).

    Args: name resnet18|34|50|101; train_backbone: layer2-4 get requires_grad (stem and layer1
    stay frozen, the ImageNet recipe); return_layers: names among layer1..layer4; dilation:
    layer4 stride 2 -> dilation 2 (stride 16 instead of 32); weights: "imagenet" (torchvision
    V1), "none" or a path. With "none" the frozen BatchNorm statistics are calibrated on noise
    images (see calibrate_frozen_batchnorm), so a random backbone's activations stay of order
    one. train_all (with train_backbone): every layer trains, stem and layer1 included, with
    ordinary BatchNorm2d (batch statistics in training) — for training from scratch, where a
    frozen random stem and frozen statistics leave the detector with poor features.
    Attributes: ``body``, ``num_channels`` (list per returned layer), ``strides`` (list).
    """

    def __init__(self, name: str, train_backbone: bool, return_layers: Iterable[str] = ("layer4",),
                 dilation: bool = False, weights: str = "none", train_all: bool = False):
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(_CHANNELS)}")
        return_layers = tuple(return_layers)
        bad = [r for r in return_layers if r not in _LAYERS]
        if bad or not return_layers:
            raise ValueError(f"return_layers must be names among {_LAYERS}, got {return_layers}")
        basic = name in ("resnet18", "resnet34")
        train_all = bool(train_all) and train_backbone
        resnet = getattr(_torchvision_models(), name)(
            weights=None, norm_layer=nn.BatchNorm2d if train_all else FrozenBatchNorm2d,
            replace_stride_with_dilation=[False, False, bool(dilation) and not basic])
        if dilation and basic:
            _dilate_basic_layer4(resnet.layer4)
        weights = "none" if weights is None else str(weights)
        if weights.lower() != "none":
            _load_resnet_weights(resnet, name, weights)
        elif not train_all:  # random init: frozen statistics of standard-normal noise
            noise = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            calibrate_frozen_batchnorm(resnet, noise)  # (own seed, no global RNG)
        for pname, param in resnet.named_parameters():
            trainable = train_backbone and (
                train_all or pname.split(".")[0] in ("layer2", "layer3", "layer4"))
            param.requires_grad_(trainable)
        self.body = _Body(resnet, return_layers)
        order = sorted(return_layers, key=_LAYERS.index)
        self.body.return_layers = tuple(order)
        self.num_channels = [_CHANNELS[name][_LAYERS.index(r)] for r in order]
        self.strides = [{"layer1": 4, "layer2": 8, "layer3": 16,
                         "layer4": 16 if dilation else 32}[r] for r in order]

    def forward(self, batch) -> List[Tuple[Tensor, Tensor]]:
        images, mask = _unpack(batch)
        out = []
        for feat in self.body(images):
            m = F.interpolate(mask[:, None].float(), size=feat.shape[-2:], mode="nearest")[:, 0]
            out.append((feat, m.to(torch.bool)))
        return out


def _unpack(batch) -> Tuple[Tensor, Tensor]:
    """ImageBatch-like (``.images``, ``.mask``) or a plain (B,3,H,W) tensor (no padding)."""
    if isinstance(batch, Tensor):
        b, _, h, w = batch.shape
        return batch, torch.zeros(b, h, w, dtype=torch.bool, device=batch.device)
    return batch.images, batch.mask


class Joiner(nn.Sequential):
    """(backbone, position_embedding) -> forward(batch) = (features, positions).

    features: list of (feat (B,C,h,w), mask (B,h,w)); positions: list of (B,d,h,w) in the
    features' dtype.
    """

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, batch):
        features = self[0](batch)
        positions = [self[1](mask).to(feat.dtype) for feat, mask in features]
        return features, positions


def build_backbone(args, return_layers=("layer4",)) -> Backbone:
    """Backbone from args.backbone, args.lr_backbone (>0 trains layer2-4), args.dilation,
    args.backbone_weights (imagenet | none | PATH), args.backbone_train_all."""
    return Backbone(args.backbone, train_backbone=args.lr_backbone > 0,
                    return_layers=return_layers, dilation=bool(getattr(args, "dilation", False)),
                    weights=getattr(args, "backbone_weights", "imagenet"),
                    train_all=bool(getattr(args, "backbone_train_all", False)))
