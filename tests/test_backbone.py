"""Backbone: frozen BN math, freezing, dilation, weights handling; sine positional encoding."""
import argparse
import math
import urllib.error

import pytest
import torch
import torchvision

from detr_common.backbone import (Backbone, FrozenBatchNorm2d, Joiner, build_backbone,
                                  calibrate_frozen_batchnorm, conv_bn)
from detr_common.data.collate import ImageBatch
from detr_common.position_encoding import PositionEmbeddingSine


def _bn_with_stats(c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = torch.nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.1)
    return bn.eval()


def test_frozen_bn_math_and_state_dict():
    bn = _bn_with_stats()
    frozen = FrozenBatchNorm2d(5)
    frozen.load_state_dict(bn.state_dict(), strict=True)  # num_batches_tracked ignored
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.parameters()) == []
    x = torch.randn(2, 5, 3, 4)
    shape = (1, 5, 1, 1)
    manual = ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + 1e-5)
              * bn.weight.view(shape) + bn.bias.view(shape))
    assert torch.allclose(frozen(x), manual, atol=1e-5)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)


def test_frozen_bn_cache_follows_buffer_changes():
    """The cached (scale, shift) are rebuilt after a state_dict load, an in-place edit of a
    buffer and a dtype change; the gradient w.r.t. the input is scale per channel."""
    frozen = FrozenBatchNorm2d(5)
    x = torch.randn(2, 5, 3, 4, requires_grad=True)
    assert torch.allclose(frozen(x), x / (1 + 1e-5) ** 0.5)  # identity statistics
    bn = _bn_with_stats()
    frozen.load_state_dict(bn.state_dict())
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)
    frozen.running_var.mul_(4.0)
    bn.running_var.mul_(4.0)
    assert torch.allclose(frozen(x), bn(x), atol=1e-5)
    frozen.double()
    y = frozen(x.double())
    assert y.dtype == torch.float64
    assert torch.allclose(y, bn.double()(x.double()), atol=1e-10)
    frozen(x.double()).sum().backward()
    scale = bn.weight / (bn.running_var + 1e-5).sqrt()
    assert torch.allclose(x.grad, scale.view(1, 5, 1, 1).float().expand_as(x), atol=1e-6)


@pytest.mark.parametrize("train_backbone", [True, False])
def test_freezing(train_backbone):
    bb = Backbone("resnet18", train_backbone=train_backbone, weights="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bb.modules())
    for name, p in bb.body.named_parameters():
        trainable = train_backbone and name.split(".")[0] in ("layer2", "layer3", "layer4")
        assert p.requires_grad == trainable, name
    assert not hasattr(bb.body, "fc") and not hasattr(bb.body, "avgpool")
    if train_backbone:
        x = torch.randn(1, 3, 64, 64)
        feat, _ = bb(ImageBatch(x, torch.zeros(1, 64, 64, dtype=torch.bool)))[0]
        feat.sum().backward()
        assert bb.body.conv1.weight.grad is None
        assert bb.body.layer1[0].conv1.weight.grad is None
        assert bb.body.layer2[0].conv1.weight.grad is not None


def test_train_all_trains_every_layer_with_batch_statistics(tmp_path):
    """train_all: BatchNorm2d everywhere, every parameter trainable (stem and layer1 too), the
    training forward normalises with the batch's own statistics and updates the running ones;
    a weights file (with num_batches_tracked) still loads; without train_backbone it is off."""
    bb = Backbone("resnet18", train_backbone=True, weights="none", train_all=True)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in bb.modules())
    assert all(p.requires_grad for p in bb.body.parameters())
    x = 3.0 + 2.0 * torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    stem = bb.body.conv1(x)
    (feat, _), = bb.train()(x)
    feat.sum().backward()
    assert bb.body.conv1.weight.grad is not None and bb.body.bn1.weight.grad is not None
    assert torch.allclose(bb.body.bn1.running_mean, 0.1 * stem.mean((0, 2, 3)), atol=1e-5)
    normalised = torch.nn.functional.batch_norm(stem, None, None, training=True)
    assert torch.allclose(bb.body.bn1(stem), normalised, atol=1e-5)  # weight 1, bias 0 at init

    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    loaded = Backbone("resnet18", True, weights=str(tmp_path / "r18.pth"), train_all=True)
    assert torch.allclose(loaded.body.layer1[0].conv1.weight, reference.layer1[0].conv1.weight)
    frozen = Backbone("resnet18", train_backbone=False, weights="none", train_all=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_dilation_doubles_the_feature_size(name):
    x = torch.randn(1, 3, 64, 96)
    batch = ImageBatch(x, torch.zeros(1, 64, 96, dtype=torch.bool))
    plain = Backbone(name, False, weights="none").eval()
    dc5 = Backbone(name, False, dilation=True, weights="none").eval()
    with torch.no_grad():
        f_plain, f_dc5 = plain(batch)[0][0], dc5(batch)[0][0]
    assert f_plain.shape[-2:] == (2, 3)
    assert f_dc5.shape[-2:] == (4, 6)
    assert plain.strides == [32] and dc5.strides == [16]
    assert f_dc5.shape[1] == plain.num_channels[0] == (512 if name == "resnet18" else 2048)
    # the same weights load into both (shapes unchanged by dilation)
    dc5.load_state_dict(plain.state_dict(), strict=True)


def test_multi_level_outputs_and_mask_resizing():
    bb = Backbone("resnet18", False, return_layers=("layer2", "layer3", "layer4"), weights="none")
    assert bb.num_channels == [128, 256, 512] and bb.strides == [8, 16, 32]
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    mask[1, :, 32:] = True  # image 1 is 64 x 32
    with torch.no_grad():
        out = bb(ImageBatch(x, mask))
    for (feat, m), size in zip(out, (8, 4, 2)):
        assert feat.shape[-2:] == (size, size) and m.shape == (2, size, size)
        assert m.dtype == torch.bool and not m[0].any()
        assert m[1, :, : size // 2].logical_not().all() and m[1, :, size // 2:].all()


def test_imagenet_weights_unreachable_gives_one_clear_line(monkeypatch):
    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(RuntimeError) as info:
        Backbone("resnet50", True, weights="imagenet")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("could not fetch ImageNet weights for resnet50: ")
    assert "Name or service not known" in message
    assert message.endswith("pass --backbone_weights none or a local .pth")


def test_imagenet_uses_v1_weights(monkeypatch):
    seen = []

    def fake(self, *args, **kwargs):
        seen.append(self.url)
        sd = torchvision.models.resnet18().state_dict()
        return {k: torch.full_like(v, 0.5) if v.is_floating_point() else v
                for k, v in sd.items()}
    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake)
    bb = Backbone("resnet18", True, weights="imagenet")
    assert seen == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert torch.allclose(bb.body.layer3[1].conv2.weight, torch.full((256, 256, 3, 3), 0.5))


def test_local_weights_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18()  # plain BN: has num_batches_tracked and fc.*
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    bb = Backbone("resnet18", True, weights=str(path))
    assert torch.allclose(bb.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert torch.allclose(bb.body.bn1.running_var, reference.bn1.running_var)

    with pytest.raises(RuntimeError, match="nowhere.pth: file not found"):
        Backbone("resnet18", True, weights=str(tmp_path / "nowhere.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RuntimeError, match=r"r34.pth: not a resnet18 state_dict: .*unexpected"):
        Backbone("resnet18", True, weights=str(tmp_path / "r34.pth"))
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "partial.pth")
    with pytest.raises(RuntimeError, match="missing keys"):
        Backbone("resnet18", True, weights=str(tmp_path / "partial.pth"))
    # a ResNet state_dict saved from a DataParallel / DDP wrapper
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()},
               tmp_path / "wrapped.pth")
    bb = Backbone("resnet18", True, weights=str(tmp_path / "wrapped.pth"))
    assert torch.equal(bb.body.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


@pytest.mark.parametrize("prefix", ["backbone.0.body.", "backbone.body.",
                                    "module.backbone.0.body.", "module.backbone.body."])
def test_backbone_weights_from_a_detector_checkpoint(tmp_path, prefix):
    """A detector checkpoint ({model, args, ...}; DETR / Conditional DETR keys backbone.0.body.*,
    Anchor DETR backbone.body.*, either under module.* if saved from a DDP wrapper) gives its
    backbone; the other entries are ignored, and the weights load into a dilated trunk too
    (same shapes)."""
    wrapper = "module." if prefix.startswith("module.") else ""
    torch.manual_seed(0)
    trained = Backbone("resnet18", True, weights="none", train_all=True)
    trained.train()(torch.randn(2, 3, 64, 64))  # running statistics away from (0, 1)
    model = {prefix + k: v for k, v in trained.body.state_dict().items()}
    model[wrapper + "transformer.encoder.layers.0.linear1.weight"] = torch.zeros(8, 4)
    model[wrapper + "class_embed.weight"] = torch.zeros(3, 8)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": model, "args": argparse.Namespace(no_enact=True), "epoch": 3}, path)
    for dilation in (False, True):
        bb = Backbone("resnet18", True, weights=str(path), dilation=dilation)
        assert torch.equal(bb.body.layer3[0].conv1.weight, trained.body.layer3[0].conv1.weight)
        assert torch.equal(bb.body.bn1.running_mean, trained.body.bn1.running_mean)
    del model[prefix + "layer4.1.conv2.weight"]
    torch.save({"model": model}, path)
    with pytest.raises(RuntimeError, match=r"1 missing keys \(e.g. layer4.1.conv2.weight\)"):
        Backbone("resnet18", True, weights=str(path))


def test_build_backbone_reads_args():
    class Args:
        backbone, lr_backbone, dilation, backbone_weights = "resnet34", 0.0, True, "none"
    bb = build_backbone(Args())
    assert bb.num_channels == [512] and bb.strides == [16]
    assert not any(p.requires_grad for p in bb.parameters())
    Args.lr_backbone, Args.backbone_train_all = 1e-5, True
    assert all(p.requires_grad for p in build_backbone(Args()).parameters())
    with pytest.raises(ValueError, match="unknown backbone"):
        Backbone("resnet7", False)


def test_joiner_keys_and_positions():
    joiner = Joiner(Backbone("resnet18", True, weights="none"), PositionEmbeddingSine(16))
    assert "0.body.conv1.weight" in joiner.state_dict()
    assert "0.body.layer4.1.bn2.running_var" in joiner.state_dict()
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        features, positions = joiner(ImageBatch(x, mask))
    assert len(features) == len(positions) == 1
    assert positions[0].shape == (2, 32, 2, 2)


def test_sine_encoding_hand_values():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000, normalize=True)
    mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    out = pe(mask)
    assert out.shape == (1, 8, 2, 3)
    y = 2 / (2 + 1e-6) * 2 * math.pi  # row 1: 2 valid pixels above-and-including / total 2
    x = 1 / (3 + 1e-6) * 2 * math.pi  # column 0
    f2 = 10000 ** (2 / 4)
    expected_y = torch.tensor([math.sin(y), math.cos(y), math.sin(y / f2), math.cos(y / f2)])
    expected_x = torch.tensor([math.sin(x), math.cos(x), math.sin(x / f2), math.cos(x / f2)])
    assert torch.allclose(out[0, :4, 1, 0], expected_y, atol=1e-6)
    assert torch.allclose(out[0, 4:, 1, 0], expected_x, atol=1e-6)


def test_sine_encoding_is_relative_to_the_unpadded_image():
    pe = PositionEmbeddingSine(8)
    alone = pe(torch.zeros(1, 3, 4, dtype=torch.bool))
    mask = torch.ones(1, 5, 7, dtype=torch.bool)
    mask[0, :3, :4] = False
    padded = pe(mask)
    assert torch.allclose(padded[:, :, :3, :4], alone, atol=1e-6)


def test_random_backbone_has_calibrated_statistics():
    """A random ResNet-101 with frozen BN keeps activations of order one (identity statistics
    would give ~1e5 at layer4), and each BN normalises its input on the calibration noise."""
    torch.manual_seed(0)
    backbone = Backbone("resnet101", train_backbone=True, weights="none").eval()
    images = torch.randn(2, 3, 160, 192, generator=torch.Generator().manual_seed(1))
    (feat, _), = backbone(images)
    assert feat.abs().max() < 100 and 0.1 < feat.std() < 10
    stem_bn = backbone.body.bn1
    conv_out = backbone.body.conv1(torch.randn(2, 3, 224, 224,
                                               generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(stem_bn.running_mean, conv_out.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(stem_bn.running_var, conv_out.var((0, 2, 3), unbiased=False),
                          rtol=1e-4)


def _torchvision_trunk(resnet, x):
    """torchvision's own forward up to layer4 (each FrozenBatchNorm2d called as a module)."""
    x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))
    return resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))


@pytest.mark.parametrize("name,dilation", [("resnet18", False), ("resnet50", True)])
def test_folded_frozen_bn_matches_torchvision_resnet(name, dilation):
    """The body folds every frozen BN into its convolution (conv_bn): in float64 its output and
    the conv weights' gradients equal torchvision's ResNet calling the BN modules, in training
    and in eval (cached folds), also after an in-place change of a weight and of a BN buffer.
    (In float32 the two differ by rounding only, which a random 50-layer network amplifies to
    ~0.3 % in the first layers' weight gradients.)"""
    torch.manual_seed(0)
    bb = Backbone(name, train_backbone=True, dilation=dilation, weights="none")
    with torch.no_grad():  # an affine map far from the identity in every frozen BN
        for m in bb.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.weight.uniform_(0.7, 1.3)
                m.bias.normal_(0.0, 0.2)
    ref = getattr(torchvision.models, name)(
        norm_layer=FrozenBatchNorm2d, replace_stride_with_dilation=[False, False, dilation])
    missing, unexpected = ref.load_state_dict(bb.body.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("fc.") for k in missing)
    bb.double()
    ref.double()
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64)
    out, expected = bb.body(x)[-1], _torchvision_trunk(ref, x)
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(out)
    convs = ("layer2.0.conv1", "layer3.0.downsample.0", "layer4.1.conv2")
    ours = torch.autograd.grad((out * grad).sum(),
                               [bb.body.get_submodule(c).weight for c in convs])
    theirs = torch.autograd.grad((expected * grad).sum(),
                                 [ref.get_submodule(c).weight for c in convs])
    for got, want in zip(ours, theirs):
        assert want.abs().amax() > 0
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-9)
    bb.eval()
    with torch.no_grad():
        assert torch.allclose(bb.body(x)[-1], expected, rtol=1e-10, atol=1e-10)
        for model in (bb.body, ref):  # the cached folds must follow both
            model.get_submodule("layer3.0.conv1").weight.mul_(1.5)
            model.get_submodule("layer2.1.bn2").running_var.mul_(2.0)
        changed = _torchvision_trunk(ref, x)
        assert not torch.allclose(changed, expected, rtol=1e-3)
        assert torch.allclose(bb.body(x)[-1], changed, rtol=1e-10, atol=1e-10)
    # eval cached the trainable convs' folded weights; training keeps no copy of them
    trained_bn = bb.body.get_submodule("layer3.0.bn1")
    assert trained_bn._fold is not None
    bb.train()
    assert trained_bn._fold is None
    out = bb.body(x)[-1]
    assert trained_bn._fold is None and torch.allclose(out, changed, rtol=1e-10, atol=1e-10)


def test_calibration_refuses_a_folded_body():
    """calibrate_frozen_batchnorm needs the BN modules called: on the folded body it says so."""
    bb = Backbone("resnet18", train_backbone=False, weights="none")
    with pytest.raises(RuntimeError, match="not called"):
        calibrate_frozen_batchnorm(bb.body, torch.randn(1, 3, 32, 32))


def test_trainable_folded_conv_saves_its_weight_not_a_scaled_copy():
    """A trainable conv with its frozen BN folded in keeps no scaled weight copy for the
    backward (it would add the trainable convs' weights to the activation memory)."""
    bb = Backbone("resnet18", train_backbone=True, weights="none")
    block = bb.body.layer2[0]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(1, 64, 16, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = conv_bn(block.conv1, block.bn1, x)
    weight_like = [t for t in saved if t.shape == block.conv1.weight.shape]
    assert weight_like and all(t.data_ptr() == block.conv1.weight.data_ptr()
                               for t in weight_like)
    out.sum().backward()
    assert block.conv1.weight.grad is not None and x.grad is not None


def test_folded_conv_under_bf16_autocast_matches_the_bn_modules():
    """Under autocast the folded convolutions compute in bf16 as F.conv2d does; forward and
    weight gradients stay within bf16 rounding of the unfolded float32 computation."""
    torch.manual_seed(0)
    bb = Backbone("resnet18", train_backbone=True, weights="none")
    block = bb.body.layer3[0]
    x = torch.randn(2, 128, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv_bn(block.conv1, block.bn1, x)
    assert out.dtype == torch.bfloat16
    (grad,) = torch.autograd.grad(out.float().square().sum(), block.conv1.weight)
    assert grad.dtype == torch.float32
    ref = block.bn1(block.conv1(x))
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), block.conv1.weight)
    assert torch.allclose(out.float(), ref, rtol=0.05, atol=0.05 * ref.abs().amax().item())
    assert torch.allclose(grad, ref_grad, rtol=0.1, atol=0.05 * ref_grad.abs().amax().item())
