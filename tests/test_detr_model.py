"""DETR model: upstream state_dict layout, shapes, padding invariance, post-processing, overfit."""
import copy
import time
import types

import pytest
import torch

import detr
from detr.transformer import Transformer
from detr_common.attention import EncoderSelfAttention
from enact_cuda import ENACTAttention
from detr_common.box_ops import box_cxcywh_to_xyxy, box_iou
from detr_common.data.collate import ImageBatch
from detr_common.position_encoding import PositionEmbeddingSine
from detr_common.postprocess import PostProcess, PostProcessTopK


def _args(**kw):
    base = dict(num_classes=91, no_enact=True, backbone="resnet50", backbone_weights="none",
                hidden_dim=256, nheads=8, enc_layers=6, dec_layers=6, dim_feedforward=2048,
                dropout=0.1, num_queries=100, pre_norm=False, aux_loss=True, attn_impl="sdpa",
                lr_backbone=1e-5, dilation=False, enact_impl="auto", smoothing_sigma=3,
                set_cost_class=1.0, set_cost_bbox=5.0, set_cost_giou=2.0, bbox_loss_coef=5.0,
                giou_loss_coef=2.0, eos_coef=0.1, device="cpu")
    base.update(kw)
    return types.SimpleNamespace(**base)


def _tiny_args(**kw):
    return _args(**{**dict(backbone="resnet18", hidden_dim=32, nheads=4, enc_layers=2,
                           dec_layers=3, dim_feedforward=64, num_queries=7, num_classes=5),
                    **kw})


def _upstream_detr_r50_keys():
    """Upstream DETR R50 (hidden 256, 6+6 layers, 100 queries, 91 classes), spec §4.2."""
    keys = {}

    def bn(prefix, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{s}"] = (c,)

    body = "backbone.0.body"
    keys[f"{body}.conv1.weight"] = (64, 3, 7, 7)
    bn(f"{body}.bn1", 64)
    inplanes = 64
    for layer, (planes, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)], start=1):
        for k in range(blocks):
            p = f"{body}.layer{layer}.{k}"
            keys[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            bn(f"{p}.bn1", planes)
            keys[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            bn(f"{p}.bn2", planes)
            keys[f"{p}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{p}.bn3", 4 * planes)
            if k == 0:
                keys[f"{p}.downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                bn(f"{p}.downsample.1", 4 * planes)
            inplanes = 4 * planes

    def mha(prefix):
        keys[f"{prefix}.in_proj_weight"] = (768, 256)
        keys[f"{prefix}.in_proj_bias"] = (768,)
        keys[f"{prefix}.out_proj.weight"] = (256, 256)
        keys[f"{prefix}.out_proj.bias"] = (256,)

    def ffn_norms(prefix, norms):
        keys[f"{prefix}.linear1.weight"] = (2048, 256)
        keys[f"{prefix}.linear1.bias"] = (2048,)
        keys[f"{prefix}.linear2.weight"] = (256, 2048)
        keys[f"{prefix}.linear2.bias"] = (256,)
        for n in norms:
            keys[f"{prefix}.{n}.weight"] = (256,)
            keys[f"{prefix}.{n}.bias"] = (256,)

    for n in range(6):
        p = f"transformer.encoder.layers.{n}"
        mha(f"{p}.self_attn")
        ffn_norms(p, ("norm1", "norm2"))
    for n in range(6):
        p = f"transformer.decoder.layers.{n}"
        mha(f"{p}.self_attn")
        mha(f"{p}.multihead_attn")
        ffn_norms(p, ("norm1", "norm2", "norm3"))
    keys["transformer.decoder.norm.weight"] = (256,)
    keys["transformer.decoder.norm.bias"] = (256,)
    keys["class_embed.weight"] = (92, 256)
    keys["class_embed.bias"] = (92,)
    for i, (o, n) in enumerate([(256, 256), (256, 256), (4, 256)]):
        keys[f"bbox_embed.layers.{i}.weight"] = (o, n)
        keys[f"bbox_embed.layers.{i}.bias"] = (o,)
    keys["query_embed.weight"] = (100, 256)
    keys["input_proj.weight"] = (256, 2048, 1, 1)
    keys["input_proj.bias"] = (256,)
    return keys


@pytest.fixture(scope="module")
def detr_r50():
    torch.manual_seed(0)
    return detr.build(_args())


def test_state_dict_matches_upstream_layout(detr_r50):
    model = detr_r50[0]
    expected = _upstream_detr_r50_keys()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    assert got == expected
    for key in ("transformer.encoder.layers.0.self_attn.in_proj_weight",
                "transformer.decoder.layers.0.multihead_attn.out_proj.weight",
                "transformer.decoder.norm.weight", "backbone.0.body.layer1.0.conv1.weight",
                "input_proj.weight", "query_embed.weight", "class_embed.weight",
                "bbox_embed.layers.2.bias"):
        assert key in got


def test_synthetic_upstream_checkpoint_loads_strict(detr_r50):
    model = copy.deepcopy(detr_r50[0])
    g = torch.Generator().manual_seed(1)
    checkpoint = {k: torch.randn(shape, generator=g)
                  for k, shape in _upstream_detr_r50_keys().items()}
    result = model.load_state_dict(checkpoint, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    state = model.state_dict()
    for key in ("transformer.encoder.layers.3.self_attn.in_proj_weight",
                "backbone.0.body.layer3.5.bn2.running_var", "class_embed.bias"):
        assert torch.allclose(state[key], checkpoint[key])


def test_init_follows_upstream(detr_r50):
    model = detr_r50[0]
    for n in range(6):
        bias = model.transformer.encoder.layers[n].self_attn.in_proj_bias
        assert torch.allclose(bias, torch.zeros_like(bias))
        bias = model.transformer.decoder.layers[n].multihead_attn.in_proj_bias
        assert torch.allclose(bias, torch.zeros_like(bias))
    w = model.transformer.encoder.layers[0].linear1.weight  # xavier: U(-b, b), b=sqrt(6/(in+out))
    bound = (6 / (256 + 2048)) ** 0.5
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.allclose(w.std(), torch.tensor(bound / 3 ** 0.5), rtol=0.05)


def test_forward_shapes_and_aux_outputs():
    torch.manual_seed(0)
    model, criterion, post = detr.build(_tiny_args())
    batch = ImageBatch(torch.randn(2, 3, 64, 80), torch.zeros(2, 64, 80, dtype=torch.bool))
    out = model(batch)
    assert out["pred_logits"].shape == (2, 7, 6) and out["pred_boxes"].shape == (2, 7, 4)
    assert len(out["aux_outputs"]) == 2
    assert all(a["pred_logits"].shape == (2, 7, 6) for a in out["aux_outputs"])
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0",
                                          "loss_bbox_0", "loss_giou_0", "loss_ce_1",
                                          "loss_bbox_1", "loss_giou_1"}
    assert criterion.weight_dict["loss_bbox_1"] == 5.0 and criterion.weight_dict["loss_giou"] == 2.0
    assert isinstance(post, PostProcess)
    no_aux = detr.build(_tiny_args(aux_loss=False))
    assert no_aux[0](batch)["aux_outputs"] == []
    assert set(no_aux[1].weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_enact_encoder_keys_and_token_counts():
    """ENACT replaces the encoder self-attention (keys W_q..W_o, W_prob as the official
    DETR-ENACT, spec §4.2); its keys per image are fewer than H*W while the encoder output
    keeps H*W tokens."""
    torch.manual_seed(0)
    model = detr.build(_tiny_args(no_enact=False, enact_impl="torch"))[0].eval()
    keys = {k for k in model.state_dict() if k.startswith("transformer.encoder.layers.0.self_attn")}
    assert keys == {f"transformer.encoder.layers.0.self_attn.{m}.{p}"
                    for m in ("W_q", "W_k", "W_v", "W_o", "W_prob") for p in ("weight", "bias")}
    batch = ImageBatch(torch.randn(2, 3, 128, 160), torch.zeros(2, 128, 160, dtype=torch.bool))
    batch.mask[1, 96:] = True
    with torch.no_grad():
        features, positions = model.backbone(batch)
        feat, mask = features[-1]
        hs, memory = model.transformer(model.input_proj(feat), mask, model.query_embed.weight,
                                       positions[-1])
    h, w = feat.shape[-2:]
    assert memory.shape == (2, h * w, 32)
    valid = (~mask).flatten(1).sum(1)
    for layer in model.transformer.encoder.layers:
        clusters = layer.self_attn.last_stats["clusters_per_image"]
        assert torch.equal(layer.self_attn.last_stats["pixels_per_image"].long(), valid)
        assert (clusters >= 1).all() and (clusters < valid).all()


def test_missing_num_classes_is_a_clear_error():
    with pytest.raises(ValueError, match="num_classes"):
        detr.build(_tiny_args(num_classes=None))


def test_pre_norm_builds_final_encoder_norm_and_runs():
    model = detr.build(_tiny_args(pre_norm=True))[0]
    keys = model.state_dict()
    assert "transformer.encoder.norm.weight" in keys
    assert "transformer.encoder.norm.weight" not in detr.build(_tiny_args())[0].state_dict()
    batch = ImageBatch(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    out = model(batch)
    assert torch.isfinite(out["pred_boxes"]).all()


def _encoder_attention(kind, d):
    if kind == "enact":
        return lambda: ENACTAttention(d, 4, sigma=1, dropout=0.1, impl="torch")
    return lambda: EncoderSelfAttention(d, 4, dropout=0.1, impl=kind)


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager", "enact"])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_padding_invariance(attn_impl, pre_norm):
    """Same backbone features alone or in a padded batch: same encoder/decoder outputs
    (plain attention and ENACT)."""
    torch.manual_seed(0)
    d = 32
    transformer = Transformer(_encoder_attention(attn_impl, d),
                              d_model=d, nhead=4, num_encoder_layers=2, num_decoder_layers=2,
                              dim_feedforward=64, dropout=0.1, normalize_before=pre_norm,
                              attn_impl="sdpa" if attn_impl == "enact" else attn_impl).eval()
    pe = PositionEmbeddingSine(d // 2)
    queries = torch.randn(5, d)
    h, w, big_h, big_w = 3, 4, 5, 6
    feat = torch.randn(1, d, h, w)
    mask = torch.zeros(1, h, w, dtype=torch.bool)
    with torch.no_grad():
        hs_alone, mem_alone = transformer(feat, mask, queries, pe(mask))
        src = torch.randn(2, d, big_h, big_w) * 5  # garbage in the padding
        src[0, :, :h, :w] = feat[0]
        big_mask = torch.zeros(2, big_h, big_w, dtype=torch.bool)
        big_mask[0] = True
        big_mask[0, :h, :w] = False
        hs, mem = transformer(src, big_mask, queries, pe(big_mask))
    mem = mem[0].reshape(big_h, big_w, d)[:h, :w].reshape(h * w, d)
    assert torch.allclose(mem, mem_alone[0], atol=1e-5)
    assert torch.allclose(hs[:, 0], hs_alone[:, 0], atol=1e-5)


def test_postprocess_softmax_excludes_no_object():
    logits = torch.tensor([[[0.0, 2.0, 1.0, 5.0], [3.0, 0.0, 1.0, -1.0]]])  # 3 classes + no-obj
    boxes = torch.tensor([[[0.5, 0.5, 0.5, 0.5], [0.25, 0.5, 0.5, 1.0]]])
    (res,) = PostProcess()({"pred_logits": logits, "pred_boxes": boxes},
                           torch.tensor([[100, 200]]))
    prob = torch.softmax(logits[0], -1)
    assert torch.equal(res["labels"], torch.tensor([1, 0]))
    assert torch.allclose(res["scores"], torch.stack([prob[0, 1], prob[1, 0]]))
    # (h, w) = (100, 200): x scaled by 200, y by 100.
    assert torch.allclose(res["boxes"], torch.tensor([[50.0, 25.0, 150.0, 75.0],
                                                      [0.0, 0.0, 100.0, 100.0]]))


def test_postprocess_topk_indices():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 3, generator=g)
    boxes = torch.rand(2, 4, 4, generator=g) * 0.4 + 0.2
    sizes = torch.tensor([[60, 80], [100, 50]])
    results = PostProcessTopK(k=5)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for b, res in enumerate(results):
        ranked = sorted(((float(torch.sigmoid(logits[b, q, c])), q, c)
                         for q in range(4) for c in range(3)), reverse=True)[:5]
        assert res["labels"].tolist() == [c for _, _, c in ranked]
        assert torch.allclose(res["scores"], torch.tensor([s for s, _, _ in ranked]))
        h, w = sizes[b].tolist()
        for i, (_, q, _) in enumerate(ranked):
            cx, cy, bw, bh = boxes[b, q].tolist()
            expected = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h,
                                     (cx + bw / 2) * w, (cy + bh / 2) * h])
            assert torch.allclose(res["boxes"][i], expected, atol=1e-4)
    everything = PostProcessTopK(k=100)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert everything[0]["scores"].shape == (12,)


def _synthetic_pair():
    g = torch.Generator().manual_seed(0)
    specs = [((64, 80), [(8, 10, 40, 50), (50, 30, 76, 60)], [(1.0, 0, 0), (0, 0, 1.0)], [1, 3]),
             ((96, 72), [(20, 30, 60, 80)], [(0, 1.0, 0)], [2])]
    big_h, big_w = 96, 80
    images = torch.zeros(2, 3, big_h, big_w)
    mask = torch.ones(2, big_h, big_w, dtype=torch.bool)
    targets = []
    for i, ((h, w), boxes, colours, labels) in enumerate(specs):
        images[i, :, :h, :w] = torch.rand(3, h, w, generator=g) * 0.3
        for (x1, y1, x2, y2), c in zip(boxes, colours):
            images[i, :, y1:y2, x1:x2] = torch.tensor(c)[:, None, None]
        mask[i, :h, :w] = False
        b = torch.tensor(boxes, dtype=torch.float32)
        cxcywh = torch.stack([(b[:, 0] + b[:, 2]) / 2 / w, (b[:, 1] + b[:, 3]) / 2 / h,
                              (b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], 1)
        targets.append({"boxes": cxcywh, "labels": torch.tensor(labels)})
    return ImageBatch(images, mask), targets


def _all_matched_correct(model, criterion, batch, targets):
    model.eval()
    with torch.no_grad():
        out = model(batch)
    model.train()
    indices = criterion.matcher(out, targets)
    for i, (src, tgt) in enumerate(indices):
        iou = box_iou(box_cxcywh_to_xyxy(out["pred_boxes"][i, src]),
                      box_cxcywh_to_xyxy(targets[i]["boxes"][tgt]))[0].diag()
        labels = out["pred_logits"][i, src].argmax(-1)  # argmax includes no-object
        if not ((iou > 0.7).all() and torch.equal(labels, targets[i]["labels"][tgt])):
            return False
    return True


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread, and much faster when the 2 cores are
    shared with other test processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("no_enact", [True, False], ids=["plain", "enact"])
def test_tiny_detr_overfits_two_images(one_thread, no_enact):
    torch.manual_seed(0)
    args = _tiny_args(hidden_dim=64, enc_layers=1, dec_layers=1, dim_feedforward=128,
                      dropout=0.0, num_queries=10, num_classes=4, lr_backbone=1e-4,
                      no_enact=no_enact, enact_impl="torch")
    model, criterion, _ = detr.build(args)
    batch, targets = _synthetic_pair()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if "backbone" not in n]},
         {"params": [p for n, p in named if "backbone" in n], "lr": 1e-4}],
        lr=1e-3, weight_decay=1e-4)
    assert not _all_matched_correct(model, criterion, batch, targets)
    start, reached = time.time(), None
    for step in range(1, 201):
        losses = criterion(model(batch), targets)
        loss = sum(losses[k] * criterion.weight_dict[k] for k in losses
                   if k in criterion.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()
        if step % 5 == 0 and _all_matched_correct(model, criterion, batch, targets):
            reached = step
            break
    assert reached is not None, f"no overfit within 200 steps ({time.time() - start:.0f} s)"


def _torch_mha(ours):
    ref = torch.nn.MultiheadAttention(ours.embed_dim, ours.num_heads, batch_first=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


def _reference_transformer(t, src, mask, queries, pos, pre_norm):
    """Spec §3.2 layer equations with torch.nn.MultiheadAttention and our weights."""
    def ln(norm, x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], norm.weight, norm.bias)

    def ffn(layer, x):
        return layer.linear2(torch.relu(layer.linear1(x)))

    b = src.shape[0]
    x = src.flatten(2).transpose(1, 2)
    p = pos.flatten(2).transpose(1, 2)
    m = mask.flatten(1)
    for layer in t.encoder.layers:
        attn = _torch_mha(layer.self_attn)
        if pre_norm:
            y = ln(layer.norm1, x)
            x = x + attn(y + p, y + p, y, key_padding_mask=m)[0]
            x = x + ffn(layer, ln(layer.norm2, x))
        else:
            x = ln(layer.norm1, x + attn(x + p, x + p, x, key_padding_mask=m)[0])
            x = ln(layer.norm2, x + ffn(layer, x))
    if pre_norm:
        x = ln(t.encoder.norm, x)
    memory, qpos = x, queries[None].expand(b, -1, -1)
    tgt, outs = torch.zeros_like(qpos), []
    for layer in t.decoder.layers:
        sa, ca = _torch_mha(layer.self_attn), _torch_mha(layer.multihead_attn)
        if pre_norm:
            y = ln(layer.norm1, tgt)
            tgt = tgt + sa(y + qpos, y + qpos, y)[0]
            y = ln(layer.norm2, tgt)
            tgt = tgt + ca(y + qpos, memory + p, memory, key_padding_mask=m)[0]
            tgt = tgt + ffn(layer, ln(layer.norm3, tgt))
        else:
            tgt = ln(layer.norm1, tgt + sa(tgt + qpos, tgt + qpos, tgt)[0])
            tgt = ln(layer.norm2, tgt + ca(tgt + qpos, memory + p, memory, key_padding_mask=m)[0])
            tgt = ln(layer.norm3, tgt + ffn(layer, tgt))
        outs.append(ln(t.decoder.norm, tgt))
    return torch.stack(outs), memory


@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_matches_reference_equations(pre_norm):
    torch.manual_seed(0)
    d = 32
    t = Transformer(lambda: EncoderSelfAttention(d, 4, dropout=0.1), d_model=d, nhead=4,
                    num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48,
                    normalize_before=pre_norm).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in t.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    src = torch.randn(2, d, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask[1, :, 3:] = True
    pos = PositionEmbeddingSine(d // 2)(mask)
    queries = torch.randn(5, d)
    with torch.no_grad():
        hs, memory = t(src, mask, queries, pos)
        ref_hs, ref_memory = _reference_transformer(t, src, mask, queries, pos, pre_norm)
    assert hs.shape == (2, 2, 5, d)
    assert torch.allclose(memory, ref_memory, atol=1e-5)
    assert torch.allclose(hs, ref_hs, atol=1e-5)


def test_loss_coefficients_reach_the_weight_dict():
    criterion = detr.build(_tiny_args(cls_loss_coef=3.0, bbox_loss_coef=4.0, giou_loss_coef=1.5,
                                      dec_layers=2))[1]
    assert criterion.weight_dict == {"loss_ce": 3.0, "loss_bbox": 4.0, "loss_giou": 1.5,
                                     "loss_ce_0": 3.0, "loss_bbox_0": 4.0, "loss_giou_0": 1.5}
