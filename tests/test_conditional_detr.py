"""Conditional DETR (+ ENACT): upstream state_dict layout, conditional cross-attention against a
slow reference, decoder composition, init, padding invariance of the encoder, ENACT key counts,
overfitting two images, and (at the end) 1-epoch runs through main.py."""
import math

import pytest
import torch
import torch.nn.functional as F

from detr_common.box_ops import box_cxcywh_to_xyxy, box_iou
from detr_common.data.collate import ImageBatch
from _cli import TINY, load_main, one_epoch_run, run_main

import conditional_detr
from conditional_detr.transformer import ConditionalDecoderLayer
from detr_common.position_encoding import sine_2d

FOLDER = "Conditional-DETR-ENACT"
PARSER = load_main(FOLDER).get_parser()        # Conditional-DETR-ENACT/main.py's paper defaults


def make_args(enact=True, **over):
    """Tiny CPU configuration: resnet18 (random weights), d 64, 4 heads, 1 enc / 1 dec layer."""
    argv = ["--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
            "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "128",
            "--num_queries", "20", "--dropout", "0.0", "--device", "cpu", "--enact_impl", "torch",
            "--num_classes", "5"]
    if not enact:
        argv.append("--no_enact")
    args = PARSER.parse_args(argv)
    for k, v in over.items():
        setattr(args, k, v)
    return args


# --------------------------------------------------------------------------------------------
# state_dict layout (spec §4.2)
# --------------------------------------------------------------------------------------------

def _resnet50_keys():
    """Hand-written torchvision ResNet-50 trunk keys (Bottleneck [3,4,6,3], expansion 4)."""
    shapes = {}

    def bn(prefix, c):
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (c,)

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"layer{li}.{b}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            bn(f"{p}.bn3", planes * 4)
            if b == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return {f"backbone.0.body.{k}": v for k, v in shapes.items()}


def _upstream_conditional_keys(enact, d=256, ffn=2048, layers=6, queries=300, classes=91):
    """Key -> shape of an upstream Conditional DETR (R50) checkpoint, written from spec §4.2."""
    s = _resnet50_keys()

    def lin(prefix, out_f, in_f):
        s[f"{prefix}.weight"] = (out_f, in_f)
        s[f"{prefix}.bias"] = (out_f,)

    def ln(prefix):
        s[f"{prefix}.weight"] = (d,)
        s[f"{prefix}.bias"] = (d,)

    s["input_proj.weight"] = (d, 2048, 1, 1)
    s["input_proj.bias"] = (d,)
    s["query_embed.weight"] = (queries, d)
    lin("class_embed", classes, d)
    for i in range(3):
        lin(f"bbox_embed.layers.{i}", 4 if i == 2 else d, d)
    for n in range(layers):
        p = f"transformer.encoder.layers.{n}"
        if enact:
            for w in ("W_q", "W_k", "W_v", "W_o"):
                lin(f"{p}.self_attn.{w}", d, d)
            lin(f"{p}.self_attn.W_prob", 1, d)
        else:
            s[f"{p}.self_attn.in_proj_weight"] = (3 * d, d)
            s[f"{p}.self_attn.in_proj_bias"] = (3 * d,)
            lin(f"{p}.self_attn.out_proj", d, d)
        lin(f"{p}.linear1", ffn, d)
        lin(f"{p}.linear2", d, ffn)
        ln(f"{p}.norm1")
        ln(f"{p}.norm2")
    for n in range(layers):
        p = f"transformer.decoder.layers.{n}"
        names = ["sa_qcontent_proj", "sa_qpos_proj", "sa_kcontent_proj", "sa_kpos_proj",
                 "sa_v_proj", "ca_qcontent_proj", "ca_kcontent_proj", "ca_kpos_proj",
                 "ca_v_proj", "ca_qpos_sine_proj"]
        if n == 0:
            names.append("ca_qpos_proj")
        for name in names:
            lin(f"{p}.{name}", d, d)
        lin(f"{p}.self_attn.out_proj", d, d)
        lin(f"{p}.cross_attn.out_proj", d, d)
        lin(f"{p}.linear1", ffn, d)
        lin(f"{p}.linear2", d, ffn)
        for k in (1, 2, 3):
            ln(f"{p}.norm{k}")
    ln("transformer.decoder.norm")
    lin("transformer.decoder.query_scale.layers.0", d, d)
    lin("transformer.decoder.query_scale.layers.1", d, d)
    lin("transformer.decoder.ref_point_head.layers.0", d, d)
    lin("transformer.decoder.ref_point_head.layers.1", 2, d)
    return s


@pytest.mark.parametrize("enact", [True, False], ids=["enact", "plain"])
def test_state_dict_matches_upstream_layout(enact):
    args = make_args(enact, backbone="resnet50", hidden_dim=256, nheads=8, enc_layers=6,
                     dec_layers=6, dim_feedforward=2048, num_queries=300, num_classes=91)
    model, _, _ = conditional_detr.build(args)
    expected = _upstream_conditional_keys(enact)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert {k: v for k, v in got.items() if expected[k] != v} == {}
    # A synthetic upstream checkpoint (random tensors, plus BN counters) loads strictly.
    gen = torch.Generator().manual_seed(0)
    ckpt = {k: torch.randn(v, generator=gen) for k, v in expected.items()}
    ckpt["backbone.0.body.bn1.num_batches_tracked"] = torch.tensor(0)
    model.load_state_dict(ckpt, strict=True)
    name = "transformer.decoder.layers.0.ca_qpos_proj.weight"
    assert torch.allclose(model.state_dict()[name], ckpt[name])
    assert model.transformer.decoder.layers[1].ca_qpos_proj is None


def test_pre_norm_is_rejected():
    with pytest.raises(ValueError, match="post-norm"):
        conditional_detr.build(make_args(False, pre_norm=True))


# --------------------------------------------------------------------------------------------
# decoder numerics against slow explicit references
# --------------------------------------------------------------------------------------------

def test_sine_embed_points_formula():
    pts = torch.rand(3, 5, 2)
    d = 64
    out = sine_2d(pts, d // 2)
    ref = torch.empty(3, 5, d)
    nf = d // 2
    for c, (coord, offset) in enumerate(((1, 0), (0, nf))):   # y-block first, then x-block
        for ch in range(nf):
            f = 10000 ** (2 * (ch // 2) / nf)
            a = pts[..., coord] * 2 * math.pi / f
            ref[..., offset + ch] = a.sin() if ch % 2 == 0 else a.cos()
    assert torch.allclose(out, ref, atol=1e-5)


def _mha_reference(q, k, v, mask, nhead, out_proj):
    """Per batch, per head, per query loop: q (B,Lq,h*e), k (B,Lk,h*e), v (B,Lk,h*ev)."""
    B, Lq, E = q.shape
    e = E // nhead
    ev = v.shape[-1] // nhead
    out = torch.zeros(B, Lq, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        keep = [j for j in range(k.shape[1]) if mask is None or not mask[b, j]]
        for h in range(nhead):
            for i in range(Lq):
                qi = q[b, i, h * e:(h + 1) * e]
                scores = torch.stack([qi @ k[b, j, h * e:(h + 1) * e] for j in keep]) / math.sqrt(e)
                w = scores.softmax(0)
                out[b, i, h * ev:(h + 1) * ev] = sum(w[n] * v[b, j, h * ev:(h + 1) * ev]
                                                     for n, j in enumerate(keep))
    return out_proj(out)


def _per_head_cat(a, b, nhead):
    """(B,L,h*e) , (B,L,h*e) -> (B,L,h*2e): head h = [a_h, b_h]."""
    B, L, E = a.shape
    e = E // nhead
    parts = []
    for h in range(nhead):
        parts += [a[..., h * e:(h + 1) * e], b[..., h * e:(h + 1) * e]]
    return torch.cat(parts, -1)


def _decoder_inputs(d=64, B=2, Q=5, N=12):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 8:] = True
    return r(B, Q, d), r(B, N, d), r(B, N, d), r(B, Q, d), r(B, Q, d), mask


@pytest.mark.parametrize("is_first", [True, False], ids=["layer0", "later"])
def test_conditional_cross_attention_matches_reference(is_first):
    d, nhead = 64, 4                                   # head dim 16: per-head query/key 2·16
    torch.manual_seed(0)
    layer = ConditionalDecoderLayer(d, nhead, 128, 0.0, is_first).double().eval()
    for p in layer.parameters():                       # non-trivial biases everywhere
        torch.nn.init.normal_(p, std=0.3)
    tgt, memory, pos, query_pos, sine, mask = _decoder_inputs(d)
    out = layer.cross_attention(tgt, memory, pos, query_pos, sine, mask)

    qc = layer.ca_qcontent_proj(tgt)
    kc = layer.ca_kcontent_proj(memory)
    kp = layer.ca_kpos_proj(pos)
    if is_first:
        qc = qc + layer.ca_qpos_proj(query_pos)
        kc = kc + kp
    q = _per_head_cat(qc, layer.ca_qpos_sine_proj(sine), nhead)
    k = _per_head_cat(kc, kp, nhead)
    ref = _mha_reference(q, k, layer.ca_v_proj(memory), mask, nhead, layer.cross_attn.out_proj)
    assert torch.allclose(out, ref, atol=1e-10)
    # The padded keys of image 1 have no influence.
    memory2, pos2 = memory.clone(), pos.clone()
    memory2[1, 8:] += 100.0
    pos2[1, 8:] -= 50.0
    out2 = layer.cross_attention(tgt, memory2, pos2, query_pos, sine, mask)
    assert torch.allclose(out2, out, atol=1e-10)


def test_decoder_layer_matches_reference():
    d, nhead = 64, 4
    torch.manual_seed(0)
    layer = ConditionalDecoderLayer(d, nhead, 128, 0.0, True).double().eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    tgt, memory, pos, query_pos, sine, mask = _decoder_inputs(d)
    out = layer(tgt, memory, pos, query_pos, sine, mask)

    ln = lambda x, norm: F.layer_norm(x, (d,), norm.weight, norm.bias)  # noqa: E731
    sa = _mha_reference(layer.sa_qcontent_proj(tgt) + layer.sa_qpos_proj(query_pos),
                        layer.sa_kcontent_proj(tgt) + layer.sa_kpos_proj(query_pos),
                        layer.sa_v_proj(tgt), None, nhead, layer.self_attn.out_proj)
    x = ln(tgt + sa, layer.norm1)
    kp = layer.ca_kpos_proj(pos)
    q = _per_head_cat(layer.ca_qcontent_proj(x) + layer.ca_qpos_proj(query_pos),
                      layer.ca_qpos_sine_proj(sine), nhead)
    k = _per_head_cat(layer.ca_kcontent_proj(memory) + kp, kp, nhead)
    x = ln(x + _mha_reference(q, k, layer.ca_v_proj(memory), mask, nhead,
                              layer.cross_attn.out_proj), layer.norm2)
    x = ln(x + layer.linear2(torch.relu(layer.linear1(x))), layer.norm3)
    assert torch.allclose(out, x, atol=1e-9)


def test_decoder_reference_points_and_query_scale():
    """Reference points once from query_pos; λ = 1 at layer 0, query_scale(out) later."""
    args = make_args(False, dec_layers=3)
    model, _, _ = conditional_detr.build(args)
    dec = model.transformer.decoder.double().eval()
    tgt, memory, pos, query_pos, _, mask = _decoder_inputs(64)
    hs, ref = dec(torch.zeros_like(tgt), memory, pos, query_pos, mask)

    exp_ref = torch.sigmoid(dec.ref_point_head.layers[1](
        torch.relu(dec.ref_point_head.layers[0](query_pos))))
    assert torch.allclose(ref, exp_ref, atol=1e-12)
    # sine of (x, y): y-block first (checked independently in test_sine_embed_points_formula)
    sine = sine_2d(exp_ref, 32)
    x = torch.zeros_like(tgt)
    for i, layer in enumerate(dec.layers):
        lam = 1.0 if i == 0 else dec.query_scale.layers[1](
            torch.relu(dec.query_scale.layers[0](x)))
        x = layer(x, memory, pos, query_pos, sine * lam, mask)
        assert torch.allclose(hs[i], F.layer_norm(x, (64,), dec.norm.weight, dec.norm.bias),
                              atol=1e-10)
    assert hs.shape == (3, 2, 5, 64)


def test_heads_init_and_box_refinement():
    torch.manual_seed(0)
    model, _, _ = conditional_detr.build(make_args(False, num_queries=7))
    model.eval()
    assert torch.allclose(model.class_embed.bias,
                          torch.full_like(model.class_embed.bias, -math.log(99.0)))
    images = torch.randn(2, 3, 64, 80)
    mask = torch.zeros(2, 64, 80, dtype=torch.bool)
    mask[1, :, 64:] = True
    with torch.no_grad():
        out = model(ImageBatch(images, mask))
        ref = torch.sigmoid(model.transformer.decoder.ref_point_head(model.query_embed.weight))
    assert out["pred_logits"].shape == (2, 7, 5) and out["pred_boxes"].shape == (2, 7, 4)
    assert out["aux_outputs"] == []                       # 1 decoder layer: no aux outputs
    # last bbox layer zero at init: centre = reference point, w = h = sigmoid(0)
    assert torch.allclose(out["pred_boxes"][..., :2], ref.expand(2, -1, -1), atol=1e-6)
    assert torch.allclose(out["pred_boxes"][..., 2:], torch.full((2, 7, 2), 0.5))
    # refinement is relative to inverse_sigmoid(reference): a bias on the box head shifts it
    with torch.no_grad():
        model.bbox_embed.layers[-1].bias.copy_(torch.tensor([0.5, -0.25, 0.0, 1.0]))
        out = model(ImageBatch(images, mask))
    exp = torch.sigmoid(torch.logit(ref) + torch.tensor([0.5, -0.25]))
    assert torch.allclose(out["pred_boxes"][..., :2], exp.expand(2, -1, -1), atol=1e-5)
    assert torch.allclose(out["pred_boxes"][..., 3], torch.sigmoid(torch.tensor(1.0)).expand(2, 7))


def test_criterion_and_postprocessor_are_focal_topk():
    args = make_args(False, dec_layers=3)
    _, criterion, post = conditional_detr.build(args)
    assert criterion.class_loss == "focal"
    assert criterion.matcher.class_cost == "focal"
    assert (criterion.matcher.cost_class, criterion.matcher.cost_bbox,
            criterion.matcher.cost_giou) == (2.0, 5.0, 2.0)
    w = criterion.weight_dict
    assert (w["loss_ce"], w["loss_bbox"], w["loss_giou"]) == (2.0, 5.0, 2.0)
    assert w["loss_ce_1"] == 2.0 and "loss_ce_2" not in w
    assert post.k == 100


# --------------------------------------------------------------------------------------------
# encoder: padding invariance and ENACT's key counts
# --------------------------------------------------------------------------------------------

def _encode(model, feat, mask):
    joiner = model.backbone
    pos = joiner[1](mask)
    return model.transformer.encode(model.input_proj(feat), mask, pos)


@pytest.mark.parametrize("enact", [True, False], ids=["enact", "plain"])
def test_encoder_padding_invariance(enact):
    torch.manual_seed(0)
    args = make_args(enact, enc_layers=2)
    model, _, _ = conditional_detr.build(args)
    model.eval()
    C = model.backbone.num_channels[-1]
    (ha, wa), (hb, wb) = (6, 7), (9, 11)
    feat_a = torch.randn(1, C, ha, wa)
    feat = torch.randn(2, C, hb, wb) * 3          # garbage in image 0's padding
    feat[0, :, :ha, :wa] = feat_a[0]
    mask = torch.zeros(2, hb, wb, dtype=torch.bool)
    mask[0, ha:, :] = True
    mask[0, :, wa:] = True
    with torch.no_grad():
        alone = _encode(model, feat_a, torch.zeros(1, ha, wa, dtype=torch.bool))
        batch = _encode(model, feat, mask)
    assert alone.shape == (1, ha * wa, 64) and batch.shape == (2, hb * wb, 64)
    mine = batch[0].view(hb, wb, -1)[:ha, :wa].reshape(ha * wa, -1)
    assert torch.allclose(mine, alone[0], atol=1e-5)


def test_enact_uses_fewer_keys_than_pixels():
    torch.manual_seed(0)
    model, _, _ = conditional_detr.build(make_args(True, enc_layers=2))
    model.eval()
    images = torch.randn(2, 3, 192, 256)
    mask = torch.zeros(2, 192, 256, dtype=torch.bool)
    mask[1, 160:, :] = True
    mask[1, :, 224:] = True
    seen = []
    hook = model.transformer.encoder.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        model(ImageBatch(images, mask))
    hook.remove()
    H, W = 6, 8                                          # stride 32
    assert seen[0].shape == (2, H * W, 64)               # encoder output keeps every token
    mods = model.enact_modules()
    assert len(mods) == 2
    for m in mods:
        clusters = m.last_stats["clusters_per_image"]
        pixels = m.last_stats["pixels_per_image"]
        assert torch.allclose(pixels, torch.tensor([H * W, 5 * 7], dtype=pixels.dtype))
        assert bool((clusters >= 1).all()) and bool((clusters < pixels).all())


# --------------------------------------------------------------------------------------------
# overfitting two images, ENACT on and off
# --------------------------------------------------------------------------------------------

def _two_images():
    """Two images with coloured rectangles; targets normalised cxcywh of the unpadded image."""
    g = torch.Generator().manual_seed(3)
    specs = [((64, 96), [((8, 10, 40, 50), 1, (1.0, -1.0, -1.0)), ((50, 20, 90, 60), 3, (-1., 1., -1.))]),
             ((80, 64), [((10, 30, 54, 76), 2, (-1.0, -1.0, 1.0))])]
    H = max(s[0][0] for s in specs)
    W = max(s[0][1] for s in specs)
    images = torch.zeros(2, 3, H, W)
    mask = torch.ones(2, H, W, dtype=torch.bool)
    targets = []
    for b, ((h, w), objs) in enumerate(specs):
        images[b, :, :h, :w] = 0.3 * torch.randn(3, h, w, generator=g)
        mask[b, :h, :w] = False
        boxes, labels = [], []
        for (x1, y1, x2, y2), label, colour in objs:
            images[b, :, y1:y2, x1:x2] = torch.tensor(colour)[:, None, None]
            boxes.append([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
            labels.append(label)
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    return ImageBatch(images, mask), targets


def _matched_ok(outputs, targets, matcher):
    indices = matcher(outputs, targets)
    for b, (src, tgt) in enumerate(indices):
        if len(tgt) != len(targets[b]["labels"]):
            return False
        pred = box_cxcywh_to_xyxy(outputs["pred_boxes"][b, src])
        gt = box_cxcywh_to_xyxy(targets[b]["boxes"][tgt])
        iou = torch.diag(box_iou(pred, gt)[0])
        labels = outputs["pred_logits"][b, src].argmax(-1)
        if not (bool((iou > 0.7).all()) and bool((labels == targets[b]["labels"][tgt]).all())):
            return False
    return True


@pytest.fixture
def one_thread():
    """The CI machine has 2 shared cores: one intra-op thread avoids oversubscription."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("enact", [True, False], ids=["enact", "plain"])
def test_overfit_two_images(enact, one_thread):
    """30-130 steps (0.3 s each) sufficed for seeds 0-9, ENACT on and off; the training path
    is chaotic enough that float rounding moves a seed across that range (seed 0 with ENACT:
    80 steps before the backbone folded its BNs into the convolutions, 130 after, on an AMD
    EPYC CPU; under 120 after on another CI machine). The bound is 300 steps."""
    torch.manual_seed(0)
    model, criterion, _ = conditional_detr.build(make_args(enact, lr_backbone=1e-4))
    batch, targets = _two_images()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.eval()
    with torch.no_grad():
        assert not _matched_ok(model(batch), targets, criterion.matcher)
    ok = False
    for step in range(300):
        model.train()
        losses = criterion(model(batch), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
        if step % 10 == 9:
            model.eval()
            with torch.no_grad():
                ok = _matched_ok(model(batch), targets, criterion.matcher)
            if ok:
                break
    assert ok, f"did not overfit in {step + 1} steps (last loss {float(loss.detach()):.3f})"


# --------------------------------------------------------------------------------------------
# main.py: paper defaults, and a 1-epoch train + eval on the shapes data
# --------------------------------------------------------------------------------------------

def test_main_paper_defaults():
    args = PARSER.parse_args([])
    assert (args.backbone, args.batch_size, args.lr, args.lr_backbone) == ("resnet101", 8, 5e-5, 1e-5)
    assert (args.epochs, args.lr_drop, args.smoothing_sigma, args.num_queries) == (50, 40, 3, 300)
    assert (args.dim_feedforward, args.dropout, args.checkpoint_every) == (2048, 0.1, 10)
    assert (args.set_cost_class, args.set_cost_bbox, args.set_cost_giou) == (2.0, 5.0, 2.0)
    assert (args.cls_loss_coef, args.bbox_loss_coef, args.giou_loss_coef) == (2.0, 5.0, 2.0)
    assert (args.no_enact, args.focal_alpha, args.clip_max_norm) == (False, 0.25, 0.1)


@pytest.mark.parametrize("enact", [True, False], ids=["enact", "plain"])
def test_main_one_epoch_train_and_eval(shapes_coco, tmp_path, enact):
    out = tmp_path / "run"
    flags = ["--enact_impl", "torch"] if enact else ["--no_enact"]
    run_main(FOLDER, "--coco_path", shapes_coco, "--output_dir", out, *TINY, *flags,
             "--epochs", "1", env={"OMP_NUM_THREADS": "1"})
    record, ckpt = one_epoch_run(out, "conditional_detr")
    keys = ckpt["model"]
    assert "transformer.decoder.layers.0.ca_qpos_proj.weight" in keys
    assert keys["query_embed.weight"].shape == (10, 32)
    if enact:
        assert 1 <= record["train_enact_clusters_per_img"]
        assert 0 < record["train_enact_cluster_ratio"] < 1
        assert 0 < record["test_enact_cluster_ratio"] < 1
        assert "transformer.encoder.layers.0.self_attn.W_prob.weight" in keys
    else:
        assert not any(k.startswith(("train_enact", "test_enact")) for k in record)
        assert "transformer.encoder.layers.0.self_attn.in_proj_weight" in keys


@pytest.mark.parametrize("dec_layers", [1, 2])
def test_every_parameter_gets_a_gradient(dec_layers):
    """DDP stops on a parameter without gradient: with one decoder layer the positional-query
    scale (used from layer 1 on) must not exist."""
    torch.manual_seed(0)
    model, criterion, _ = conditional_detr.build(make_args(dec_layers=dec_layers))
    batch = ImageBatch(torch.randn(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.bool))
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}] * 2
    losses = criterion(model(batch), targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert (model.transformer.decoder.query_scale is None) == (dec_layers == 1)
