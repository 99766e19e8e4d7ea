"""Anchor DETR (+ ENACT paper mode): RCDA and ENACT attention against slow references, batch
independence, padding invariance, multi-level, upstream state_dict keys, overfitting, main.py.

CPU, tiny: resnet18 (weights none), hidden 32-64, 4 heads, 1-2 layers, 64-96 px images.
"""
import math
import types

import pytest
import torch

import anchor_detr
import enact_cuda
from anchor_detr.layers import EncoderLayerSpatial
from anchor_detr.posemb import mask_to_positions
from detr_common.position_encoding import sine_1d, sine_2d
from anchor_detr import rcda
from anchor_detr.rcda import RCDA, grid_mask, pool_keys
from anchor_detr.transformer import AnchorTransformer
from detr_common.box_ops import box_cxcywh_to_xyxy, box_iou
from detr_common.data.collate import ImageBatch

from _cli import TINY, load_main, one_epoch_run, run_main, without


FOLDER = "Anchor-DETR-ENACT"
PARSER = load_main(FOLDER).get_parser()     # Anchor-DETR-ENACT/main.py with the paper defaults


def tiny_args(**kw):
    """main.py's flags for a tiny CPU model: resnet18-DC5 (random weights), d 64, 4 heads,
    1 encoder / 2 decoder layers, 10 anchors x 3 patterns, 5 classes, sigma 1."""
    args = PARSER.parse_args([
        "--backbone", "resnet18", "--backbone_weights", "none", "--hidden_dim", "64",
        "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2", "--dim_feedforward", "128",
        "--num_query_position", "10", "--num_query_pattern", "3", "--num_classes", "5",
        "--smoothing_sigma", "1", "--enact_impl", "torch"])
    for key, value in kw.items():
        assert hasattr(args, key), key
        setattr(args, key, value)
    return args


def tiny_transformer(enact, levels=1, d=32, enc=2, sigma=1, **kw):
    return AnchorTransformer(num_classes=4, d_model=d, nhead=4, num_encoder_layers=enc,
                             num_decoder_layers=2, dim_feedforward=64, dropout=0.0,
                             num_feature_levels=levels, num_query_position=6, num_query_pattern=2,
                             enact=enact, sigma=sigma, enact_impl="torch", **kw).eval()


def padding_mask(b, h, w, sizes):
    """(B,H,W) True outside each image's top-left (h_i, w_i) block."""
    mask = torch.ones(b, h, w, dtype=torch.bool)
    for i, (hi, wi) in enumerate(sizes):
        mask[i, :hi, :wi] = False
    return mask


# ---------------------------------------------------------------- positional embeddings
def test_positions_are_pixel_centres_of_the_unpadded_image():
    mask = padding_mask(2, 4, 5, [(4, 5), (2, 4)])
    pos_y, pos_x = mask_to_positions(mask)
    assert torch.allclose(pos_y[0], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(pos_x[1, :4], torch.tensor([0.125, 0.375, 0.625, 0.875]))
    assert torch.allclose(pos_y[1, :2], torch.tensor([0.25, 0.75]))
    emb = sine_1d(torch.tensor([0.3]), 8)[0]
    f = 10000 ** (torch.arange(4, dtype=torch.float32) * 2 / 8)
    expected = torch.stack(((2 * math.pi * 0.3 / f).sin(), (2 * math.pi * 0.3 / f).cos()), -1)
    assert torch.allclose(emb, expected.flatten())
    emb2 = sine_2d(torch.tensor([[0.3, 0.7]]), 4)[0]   # (x, y) -> [y block | x block]
    assert torch.allclose(emb2, torch.cat((sine_1d(torch.tensor([0.7]), 4)[0],
                                           sine_1d(torch.tensor([0.3]), 4)[0])))


def test_grid_embeddings_are_the_adapted_sine_encodings_of_each_axis():
    """pe_row from the x positions, pe_col from the y positions, each through adapt_pos1d (the
    two axes go through one call; compared with one call per axis)."""
    t = tiny_transformer(enact=False)
    torch.nn.init.normal_(t.adapt_pos1d[0].bias, std=0.5)
    mask = padding_mask(2, 4, 6, [(4, 6), (3, 2)])
    pe_row, pe_col = t.grid_embeddings(mask)
    pos_y, pos_x = mask_to_positions(mask)
    assert pe_row.shape == (2, 6, 32) and pe_col.shape == (2, 4, 32)
    assert torch.allclose(pe_row, t.adapt_pos1d(sine_1d(pos_x, 32)), atol=1e-6)
    assert torch.allclose(pe_col, t.adapt_pos1d(sine_1d(pos_y, 32)), atol=1e-6)


# ---------------------------------------------------------------- RCDA vs dense reference
def rcda_dense_reference(m, q_row, q_col, k_row, k_col, value, mask):
    """Float64, per image and head: the product of the row and the column softmax as explicit
    (L, h, w) weights over the image's valid 2-D grid, keys pooled over valid rows/columns."""
    E, nh = m.embed_dim, m.num_heads
    dh = E // nh
    W, bias = m.in_proj_weight.double(), m.in_proj_bias.double()

    def proj(x, s):
        return x.double() @ W[s * E:(s + 1) * E].T + bias[s * E:(s + 1) * E]

    outs = []
    for b in range(value.shape[0]):
        hv, wv = int((~mask[b, :, 0]).sum()), int((~mask[b, 0, :]).sum())
        kr = proj(k_row[b, :hv, :wv], 2).mean(0)      # (wv, E): mean over the valid rows
        kc = proj(k_col[b, :hv, :wv], 3).mean(1)      # (hv, E): mean over the valid columns
        v = proj(value[b, :hv, :wv], 4)               # (hv, wv, E)
        qr, qc = proj(q_row[b], 0), proj(q_col[b], 1)
        out = torch.zeros(qr.shape[0], E, dtype=torch.float64)
        for head in range(nh):
            s = slice(head * dh, (head + 1) * dh)
            a_row = torch.softmax(qr[:, s] @ kr[:, s].T / math.sqrt(dh), -1)   # (L, wv)
            a_col = torch.softmax(qc[:, s] @ kc[:, s].T / math.sqrt(dh), -1)   # (L, hv)
            weights = a_col[:, :, None] * a_row[:, None, :]                     # (L, hv, wv)
            assert torch.allclose(weights.sum((1, 2)), torch.ones(len(weights), dtype=torch.float64))
            out[:, s] = torch.einsum("lyx,yxd->ld", weights, v[..., s])
        outs.append(out @ m.out_proj.weight.double().T + m.out_proj.bias.double())
    return torch.stack(outs)


@pytest.mark.parametrize("hw", [(5, 7), (7, 4)])  # both contraction orders (H <= W, H > W)
def test_rcda_matches_dense_reference_with_padding(hw):
    torch.manual_seed(0)
    H, W = hw
    E, B, L = 32, 3, 9
    m = RCDA(E, 4)
    torch.nn.init.normal_(m.in_proj_bias, std=0.3)     # non-zero biases: pooling must be exact
    mask = padding_mask(B, H, W, [(H, W), (H - 2, W - 1), (2, W)])
    q_row, q_col = torch.randn(B, L, E), torch.randn(B, L, E)
    grid = [torch.randn(B, H, W, E) for _ in range(3)]
    for g in grid:                                      # loud garbage on the padding
        g.masked_fill_(mask[..., None], 1e3)
    out = m(q_row, q_col, *grid, key_padding_mask=mask)
    ref = rcda_dense_reference(m, q_row, q_col, *grid, mask)
    assert torch.allclose(out.double(), ref, atol=1e-5, rtol=1e-4)
    # the packed in_proj's gradient (all five slots, RCDA.slots) against the reference's
    weight = torch.randn_like(ref)
    params = (m.in_proj_weight, m.in_proj_bias)
    grads = torch.autograd.grad((out.double() * weight).sum(), params)
    ref_grads = torch.autograd.grad((ref * weight).sum(), params)
    for got, want in zip(grads, ref_grads):
        assert want.abs().amax() > 0.1
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("padded", [True, False])
def test_rcda_attend_with_shared_grid_terms_equals_forward(padded):
    """The decoder pools memory's keys once and every layer attends with the shared GridMask:
    the same as RCDA.forward on the full grid keys (also without a padding mask)."""
    torch.manual_seed(3)
    H, W, E, B = 4, 6, 32, 2
    m = RCDA(E, 4)
    torch.nn.init.normal_(m.in_proj_bias, std=0.3)
    mask = padding_mask(B, H, W, [(H, W), (H - 1, W - 2)]) if padded else None
    q_row, q_col = torch.randn(B, 5, E), torch.randn(B, 5, E)
    k_row, k_col, value = (torch.randn(B, H, W, E) for _ in range(3))
    grid = grid_mask(mask, (B, H, W), value.dtype, value.device)
    row_keys, col_keys = pool_keys(k_row, k_col, grid)
    assert row_keys.shape == (B, W, E) and col_keys.shape == (B, H, E)
    hv = H if mask is None else int((~mask[1, :, 0]).sum())   # image 1's valid rows
    assert torch.allclose(row_keys[1, :2], k_row[1, :hv, :2].mean(0), atol=1e-6)
    shared = m.attend(q_row, q_col, row_keys, col_keys, value, grid)
    assert torch.allclose(shared, m(q_row, q_col, k_row, k_col, value, key_padding_mask=mask),
                          atol=1e-6)
    if mask is not None:
        ref = rcda_dense_reference(m, q_row, q_col, k_row, k_col, value, mask)
        assert torch.allclose(shared.double(), ref, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- ENACT attention
def enact_layer_inputs(seed=0, B=2, H=6, W=7, E=32):
    torch.manual_seed(seed)
    src = torch.randn(B, H, W, E)
    mask = padding_mask(B, H, W, [(H, W), (H - 2, W - 3)])
    return src, mask, torch.randn(B, W, E), torch.randn(B, H, E)


def test_enact_attention_matches_joint_softmax_reference():
    src, mask, pe_row, pe_col = enact_layer_inputs()
    B, H, W, E = src.shape
    layer = EncoderLayerSpatial(E, 4, 64, 0.0, enact=True, sigma=1, enact_impl="torch").eval()
    torch.nn.init.normal_(layer.self_attn.in_proj_bias, std=0.3)
    out = layer.attention(src, grid_mask(mask, mask.shape, src.dtype, src.device), pe_row, pe_col)

    # the clusters the layer used: information from the ROW keys; row keys, column keys, values
    k_row = (src + pe_row[:, None]).reshape(B, H * W, E)
    k_col = (src + pe_col[:, :, None]).reshape(B, H * W, E)
    flat_mask = mask.reshape(B, H * W)
    cl = layer.ENACT(k_row, (k_row, k_col, src.reshape(B, H * W, E)), flat_mask, (H, W))
    c_row, c_col, c_val = cl.values
    counts = (~cl.key_padding_mask).sum(1)
    valid = (~flat_mask).sum(1)
    assert bool((counts > 1).all()) and bool((counts < valid).all()), "test needs real clustering"

    m = layer.self_attn
    dh = E // 4
    Wi, bi = m.in_proj_weight.double(), m.in_proj_bias.double()

    def proj(x, s):
        return x.double() @ Wi[s * E:(s + 1) * E].T + bi[s * E:(s + 1) * E]

    for b in range(B):
        R = int(counts[b])
        qr, qc = proj(k_row[b], 0), proj(k_col[b], 1)                  # every pixel's own queries
        kr, kc, v = proj(c_row[b, :R], 2), proj(c_col[b, :R], 3), proj(c_val[b, :R], 4)
        ref = torch.zeros(H * W, E, dtype=torch.float64)
        for i in range(H * W):
            if flat_mask[b, i]:
                continue
            for head in range(4):
                s = slice(head * dh, (head + 1) * dh)
                logits = torch.tensor([(qr[i, s] @ kr[r, s] + qc[i, s] @ kc[r, s]).item()
                                       for r in range(R)], dtype=torch.float64) / math.sqrt(dh)
                w = torch.exp(logits - logits.max())
                w = w / w.sum()                                         # ONE softmax over clusters
                ref[i, s] = (w[:, None] * v[:, s]).sum(0)
        ref = ref @ m.out_proj.weight.double().T + m.out_proj.bias.double()
        got = out[b].reshape(H * W, E).double()
        keep = ~flat_mask[b]
        assert torch.allclose(got[keep], ref[keep], atol=1e-5, rtol=1e-4)


def test_enact_zero_padded_values_give_the_same_output():
    """The CUDA path pads the value head dim d_h to the query/key head dim 2*d_h; exact."""
    src, mask, pe_row, pe_col = enact_layer_inputs(seed=2)
    layer = EncoderLayerSpatial(src.shape[-1], 4, 64, 0.0, enact=True, sigma=1,
                                enact_impl="torch").eval()
    layer.self_attn.pad_values = False
    grid = grid_mask(mask, mask.shape, src.dtype, src.device)
    plain = layer.attention(src, grid, pe_row, pe_col)
    layer.self_attn.pad_values = True
    padded = layer.attention(src, grid, pe_row, pe_col)
    keep = ~mask
    assert torch.allclose(padded[keep], plain[keep], atol=1e-6)


@pytest.mark.parametrize("dtype,head_dim,impl,pads", [
    (torch.float32, 32, "auto", False),   # the kernel takes (64, 32) as it is
    (torch.float32, 16, "auto", True),    # it lacks (32, 16) and has (32, 32)
    (torch.bfloat16, 16, "cuda", True),
    (torch.bfloat16, 32, "auto", False),  # torch's SDPA attends, unequal dims and all
    (torch.bfloat16, 16, "auto", False),
    (torch.float32, 8, "auto", False),    # no kernel pair at (16, 8) or (16, 16)
    (torch.float32, 16, "torch", False),
])
def test_values_are_padded_only_where_that_lets_the_kernel_attend(dtype, head_dim, impl, pads):
    # uses_cuda_kernel reads only a tensor's device and dtype: a stand-in for a GPU tensor
    on_gpu = types.SimpleNamespace(is_cuda=True, dtype=dtype)
    assert rcda.pads_values(on_gpu, head_dim, impl) is pads
    assert rcda.pads_values(torch.zeros(1, dtype=dtype), head_dim, impl) is False
    attn = rcda.RCDA(8 * head_dim, 8)
    assert attn.clustered_value_dim(on_gpu, impl) == (2 if pads else 1) * head_dim
    for forced in (False, True):  # pad_values overrides the rule
        attn.pad_values = forced
        assert attn.clustered_value_dim(on_gpu, impl) == (2 if forced else 1) * head_dim


def test_enact_clustering_before_projection_is_exact():
    src, mask, pe_row, _ = enact_layer_inputs(seed=1)
    B, H, W, E = src.shape
    layer = EncoderLayerSpatial(E, 4, 64, 0.0, enact=True, sigma=1, enact_impl="torch").eval()
    torch.nn.init.normal_(layer.self_attn.in_proj_bias, std=0.3)
    k_row = (src + pe_row[:, None]).reshape(B, H * W, E)
    projected = layer.self_attn.project(k_row, 2)
    cl = layer.ENACT(k_row, (k_row, projected), mask.reshape(B, H * W), (H, W))
    before, after = cl.values
    keep = ~cl.key_padding_mask
    assert torch.allclose(layer.self_attn.project(before, 2)[keep], after[keep], atol=1e-5)


# ---------------------------------------------------------------- batch / padding behaviour
@pytest.mark.parametrize("enact", [False, True])
def test_full_model_batch_independence(enact):
    torch.manual_seed(0)
    model, _, _ = anchor_detr.build(tiny_args(no_enact=not enact))
    model.eval()
    a, b, c = torch.randn(3, 3, 80, 96)
    mask = torch.zeros(2, 80, 96, dtype=torch.bool)
    with torch.no_grad():
        out_ab = model(ImageBatch(torch.stack((a, b)), mask))
        out_ac = model(ImageBatch(torch.stack((a, c)), mask))
        out_a = model(ImageBatch(a[None], mask[:1]))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(out_ab[key][0], out_ac[key][0], atol=1e-5)
        assert torch.allclose(out_ab[key][0], out_a[key][0], atol=1e-5)
    # the test can see a difference: image 1 differs between the batches (boxes are the
    # anchors at init, so compare the logits)
    assert not torch.allclose(out_ab["pred_logits"][1], out_ac["pred_logits"][1], atol=1e-5)
    if enact:
        stats = model.transformer.enact_stats()
        assert len(stats) == 1 and stats[0]["clusters_per_image"].shape == (1,)


def _alone_and_padded(levels, seed=0, d=32, small=(4, 5), big=(6, 8)):
    torch.manual_seed(seed)
    alone = torch.randn(1, levels, d, *small)
    other = torch.randn(1, levels, d, *big)
    batch = torch.randn(2, levels, d, *big) * 10             # garbage everywhere ...
    batch[0, :, :, :small[0], :small[1]] = alone[0]           # ... except image 0's valid block
    batch[1] = other[0]
    mask = padding_mask(2, *big, [small, big])
    return alone, other, batch, mask


@pytest.mark.parametrize("enact", [False, True])
def test_encoder_and_decoder_padding_invariance(enact):
    t = tiny_transformer(enact)
    alone, _, batch, mask = _alone_and_padded(levels=1)
    h, w = alone.shape[-2:]
    with torch.no_grad():
        mem_alone = t.encode(alone, torch.zeros(1, h, w, dtype=torch.bool))[0]
        mem_batch = t.encode(batch, mask)[0]
        out_alone = t(alone, torch.zeros(1, h, w, dtype=torch.bool))
        out_batch = t(batch, mask)
    assert torch.allclose(mem_batch[0, :h, :w], mem_alone[0], atol=1e-5)
    for x_alone, x_batch in zip(out_alone, out_batch):
        assert torch.allclose(x_batch[:, 0], x_alone[:, 0], atol=1e-5)


@pytest.mark.parametrize("enact", [False, True])
def test_multi_level_is_batch_independent(enact):
    t = tiny_transformer(enact, levels=3)
    assert len(t.encoder_layers) == 1 and len(t.encoder_layers_level) == 1
    alone, other, batch, mask = _alone_and_padded(levels=3, seed=3)
    with torch.no_grad():
        out_batch = t(batch, mask)
        out_alone = t(alone, torch.zeros(1, *alone.shape[-2:], dtype=torch.bool))
        out_other = t(other, torch.zeros(1, *other.shape[-2:], dtype=torch.bool))
    for x_batch, x_alone, x_other in zip(out_batch, out_alone, out_other):
        assert torch.allclose(x_batch[:, 0], x_alone[:, 0], atol=1e-5)
        assert torch.allclose(x_batch[:, 1], x_other[:, 0], atol=1e-5)


def test_multi_level_full_model_forward():
    torch.manual_seed(0)
    model, criterion, _ = anchor_detr.build(tiny_args(num_feature_levels=3, enc_layers=2))
    keys = model.state_dict().keys()
    assert {"input_proj.0.0.weight", "input_proj.2.1.bias", "transformer.level_embed.weight",
            "transformer.encoder_layers_level.0.self_attn_level.in_proj_weight",
            "transformer.decoder_layers.1.level_fc.weight"} <= set(keys)
    assert model.input_proj[0][0].weight.shape == (64, 128, 3, 3)       # C3: 3x3 stride 2
    images = torch.randn(2, 3, 64, 80)
    mask = padding_mask(2, 64, 80, [(64, 80), (48, 64)])
    out = model(ImageBatch(images, mask))
    assert out["pred_boxes"].shape == (2, 30, 4)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]), "labels": torch.tensor([1])}] * 2
    losses = criterion(out, targets)
    sum(losses[k] * w for k, w in criterion.weight_dict.items()).backward()
    assert model.transformer.level_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dilation"):
        anchor_detr.build(tiny_args(num_feature_levels=3, dilation=False))


# ---------------------------------------------------------------- state_dict layout
def _upstream_keys(enact, levels=1, d=256, layers=6, ffn=1024, classes=91):
    """Hand-written upstream Anchor DETR (R50-DC5) key list with shapes (spec §4.2)."""
    keys = {"backbone.body.conv1.weight": (64, 3, 7, 7)}
    bn = ("weight", "bias", "running_mean", "running_var")
    keys.update({f"backbone.body.bn1.{n}": (64,) for n in bn})
    inplanes = 64
    for li, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for bi in range(blocks):
            p = f"backbone.body.layer{li}.{bi}."
            cin = inplanes if bi == 0 else planes * 4
            keys[p + "conv1.weight"] = (planes, cin, 1, 1)
            keys[p + "conv2.weight"] = (planes, planes, 3, 3)
            keys[p + "conv3.weight"] = (planes * 4, planes, 1, 1)
            for j, c in ((1, planes), (2, planes), (3, planes * 4)):
                keys.update({f"{p}bn{j}.{n}": (c,) for n in bn})
            if bi == 0:
                keys[p + "downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                keys.update({f"{p}downsample.1.{n}": (planes * 4,) for n in bn})
        inplanes = planes * 4
    if levels == 1:
        projs = [(2048, 1)]
    else:
        projs = [(512, 3), (1024, 1), (2048, 1)]
    for i, (cin, k) in enumerate(projs):
        keys.update({f"input_proj.{i}.0.weight": (d, cin, k, k), f"input_proj.{i}.0.bias": (d,),
                     f"input_proj.{i}.1.weight": (d,), f"input_proj.{i}.1.bias": (d,)})
    t = "transformer."

    def ffn_keys(p):
        return {p + "ffn.linear1.weight": (ffn, d), p + "ffn.linear1.bias": (ffn,),
                p + "ffn.linear2.weight": (d, ffn), p + "ffn.linear2.bias": (d,),
                p + "ffn.norm2.weight": (d,), p + "ffn.norm2.bias": (d,)}

    def attn_keys(p, rows):
        return {p + "in_proj_weight": (rows * d, d), p + "in_proj_bias": (rows * d,),
                p + "out_proj.weight": (d, d), p + "out_proj.bias": (d,)}

    n_level = layers // 2 if levels > 1 else 0
    for n in range(layers - n_level):
        p = f"{t}encoder_layers.{n}."
        keys.update(attn_keys(p + "self_attn.", 5))
        keys.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,)})
        keys.update(ffn_keys(p))
        if enact:
            keys.update({p + "ENACT.W_prob.weight": (1, d), p + "ENACT.W_prob.bias": (1,)})
    for n in range(n_level):
        p = f"{t}encoder_layers_level.{n}."
        keys.update(attn_keys(p + "self_attn_level.", 3))
        keys.update({p + "norm1.weight": (d,), p + "norm1.bias": (d,)})
        keys.update(ffn_keys(p))
    for n in range(layers):
        p = f"{t}decoder_layers.{n}."
        keys.update(attn_keys(p + "cross_attn.", 5))
        keys.update(attn_keys(p + "self_attn.", 3))
        for norm in ("norm1", "norm2"):
            keys.update({f"{p}{norm}.weight": (d,), f"{p}{norm}.bias": (d,)})
        keys.update(ffn_keys(p))
        if levels > 1:
            keys.update({p + "level_fc.weight": (d, d * levels), p + "level_fc.bias": (d,)})
    if levels > 1:
        keys[t + "level_embed.weight"] = (levels, d)
    keys.update({t + "pattern.weight": (3, d), t + "position.weight": (300, 2)})
    for a in ("adapt_pos1d", "adapt_pos2d"):
        keys.update({f"{t}{a}.0.weight": (d, d), f"{t}{a}.0.bias": (d,),
                     f"{t}{a}.2.weight": (d, d), f"{t}{a}.2.bias": (d,)})
    for n in range(layers):
        keys.update({f"{t}class_embed.{n}.weight": (classes, d), f"{t}class_embed.{n}.bias": (classes,)})
        for j, out in enumerate((d, d, 4)):
            keys.update({f"{t}bbox_embed.{n}.layers.{j}.weight": (out, d),
                         f"{t}bbox_embed.{n}.layers.{j}.bias": (out,)})
    return keys


def _paper_args(**kw):
    """main.py's defaults (R50-DC5, d 256, 6+6 layers, 300 x 3 queries) with 91 classes."""
    args = PARSER.parse_args(["--backbone_weights", "none", "--num_classes", "91"])
    assert (args.backbone, args.dilation, args.hidden_dim, args.dim_feedforward, args.dropout,
            args.smoothing_sigma, args.batch_size, args.num_query_position,
            args.num_query_pattern) == ("resnet50", True, 256, 1024, 0.0, 5, 4, 300, 3)
    for key, value in kw.items():
        setattr(args, key, value)
    return args


@pytest.mark.parametrize("enact,levels", [(False, 1), (True, 1), (False, 3)])
def test_upstream_state_dict_loads_strict(enact, levels):
    torch.manual_seed(0)
    model, _, _ = anchor_detr.build(_paper_args(no_enact=not enact, num_feature_levels=levels))
    expected = _upstream_keys(enact, levels)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    synthetic = {k: torch.randn(shape) for k, shape in expected.items()}
    # upstream repeats the shared heads' tensors; the last copy wins when loading
    for n in range(6):
        synthetic[f"transformer.class_embed.{n}.weight"] = synthetic["transformer.class_embed.5.weight"]
    model.load_state_dict(synthetic, strict=True)
    t = model.transformer
    assert t.class_embed[0] is t.class_embed[5] and t.bbox_embed[0] is t.bbox_embed[3]
    assert torch.allclose(t.class_embed[2].weight, synthetic["transformer.class_embed.5.weight"])
    assert torch.allclose(model.backbone.body.layer4[2].conv3.weight,
                          synthetic["backbone.body.layer4.2.conv3.weight"])
    if enact:
        assert torch.allclose(t.encoder_layers[3].ENACT.W_prob.weight,
                              synthetic["transformer.encoder_layers.3.ENACT.W_prob.weight"])
    # shared heads are one set of parameters for the optimiser
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < sum(v.numel() for k, v in model.state_dict().items() if "running" not in k)


def test_init_and_grid_prior():
    t = tiny_transformer(False, spatial_prior="grid")
    assert "position.weight" not in t.state_dict() and t.num_position == 4   # round(sqrt 6)^2
    anchors = t.anchors()
    assert torch.allclose(anchors[:4], torch.tensor([[.25, .25], [.25, .75], [.75, .25], [.75, .75]]))
    assert torch.allclose(anchors[4:], anchors[:4])                          # tiled per pattern
    t = tiny_transformer(False)
    assert torch.allclose(t.class_embed[0].bias, torch.full((4,), -math.log(99.0)))
    assert torch.allclose(t.bbox_embed[0].layers[-1].bias, torch.tensor([0.0, 0.0, -2.0, -2.0]))
    with torch.no_grad():   # at init a box is its anchor with w = h = sigmoid(-2)
        _, boxes = t(torch.randn(1, 1, 32, 4, 5), torch.zeros(1, 4, 5, dtype=torch.bool))
    expected = torch.cat((t.anchors(), torch.full((12, 2), torch.sigmoid(torch.tensor(-2.0)).item())), -1)
    assert torch.allclose(boxes[-1, 0], expected, atol=1e-5)


# ---------------------------------------------------------------- overfitting
def _two_images():
    """Two 64-px images (one padded) with coloured rectangles; targets in normalised cxcywh."""
    torch.manual_seed(0)
    specs = [((64, 64), [((6, 8, 34, 40), 1, (1.0, -1.0, -1.0)), ((40, 26, 60, 54), 3, (-1.0, -1.0, 1.0))]),
             ((48, 64), [((14, 10, 54, 40), 2, (-1.0, 1.0, -1.0))])]
    batch = torch.zeros(2, 3, 64, 64)
    mask = torch.ones(2, 64, 64, dtype=torch.bool)
    targets = []
    for i, ((h, w), objects) in enumerate(specs):
        img = torch.randn(3, h, w) * 0.1
        boxes, labels = [], []
        for (x1, y1, x2, y2), label, colour in objects:
            img[:, y1:y2, x1:x2] = torch.tensor(colour)[:, None, None] * 2
            boxes.append([(x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h])
            labels.append(label)
        batch[i, :, :h, :w] = img
        mask[i, :h, :w] = False
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)})
    return ImageBatch(batch, mask), targets


def _matched_ok(model, criterion, batch, targets):
    """(all matched predictions have IoU > 0.7 and the right arg-max class, IoUs)."""
    model.eval()
    with torch.no_grad():
        out = model(batch)
    indices = criterion.matcher({k: out[k] for k in ("pred_logits", "pred_boxes")}, targets)
    ok, ious = True, []
    for b, (src, tgt) in enumerate(indices):
        pred = box_cxcywh_to_xyxy(out["pred_boxes"][b, src])
        gt = box_cxcywh_to_xyxy(targets[b]["boxes"][tgt])
        iou = box_iou(pred, gt)[0].diagonal()
        ious += iou.tolist()
        ok &= bool((iou > 0.7).all())
        ok &= torch.equal(out["pred_logits"][b, src].argmax(-1), targets[b]["labels"][tgt])
    model.train()
    return ok, ious


@pytest.mark.slow  # ~5-10 s alone; well over 20 s when the 2 cores are shared
@pytest.mark.parametrize("enact", [False, True])
def test_overfit_two_images(enact):
    """Frozen random resnet18-DC5 (features 4x4 / 4x3); the rest learns the two images."""
    torch.manual_seed(0)
    model, criterion, _ = anchor_detr.build(tiny_args(no_enact=not enact, lr_backbone=0.0))
    batch, targets = _two_images()
    assert not any(p.requires_grad for p in model.backbone.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3,
                            weight_decay=1e-4)
    ok, ious = _matched_ok(model, criterion, batch, targets)
    assert not ok
    model.train()
    for step in range(1, 301):
        losses = criterion(model(batch), targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if step % 20 == 0:
            ok, ious = _matched_ok(model, criterion, batch, targets)
            if ok:
                break
    assert ok, f"after {step} steps: IoUs {ious}, loss {loss.item():.3f}"


# ---------------------------------------------------------------- main.py
@pytest.mark.parametrize("enact", [False, True])
def test_main_one_epoch_train_and_eval(shapes_coco, tmp_path, enact):
    out = tmp_path / ("enact" if enact else "plain")
    flags = [] if enact else ["--no_enact"]
    run_main(FOLDER, "--coco_path", shapes_coco, "--output_dir", out,
             *without(TINY, "--num_queries"), *flags,
             "--num_query_position", "5", "--num_query_pattern", "2", "--smoothing_sigma", "1",
             "--enact_impl", "torch", "--epochs", "1", env={"OMP_NUM_THREADS": "1"})
    record, ckpt = one_epoch_run(out, "anchor_detr")
    assert any("enact" in k for k in record) == enact
    groups = ckpt["optimizer"]["param_groups"]
    assert len(groups) == 3 and groups[2]["params"] == []          # upstream's 3 groups
    assert ckpt["model"]["transformer.pattern.weight"].shape == (2, 32)
    assert ("transformer.encoder_layers.0.ENACT.W_prob.weight" in ckpt["model"]) == enact


@pytest.mark.parametrize("wait", [True, False])
def test_enact_layer_skips_the_count_read_in_training_without_the_kernel(skip_spy, wait):
    """The ENACT layer passes skips_count_read's answer to its clustering: in training with
    wait_for_counts=False, True even where the CUDA kernel does not attend (CPU inputs here);
    in eval, False there."""
    torch.manual_seed(0)
    B, H, W, E = 2, 4, 5, 32
    src = torch.randn(B, H, W, E)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    grid = grid_mask(mask, mask.shape, src.dtype, src.device)
    pe_row, pe_col = torch.randn(B, W, E), torch.randn(B, H, E)
    layer = EncoderLayerSpatial(E, 4, 64, 0.0, enact=True, sigma=1, wait_for_counts=wait)
    layer.attention(src, grid, pe_row, pe_col)
    with torch.no_grad():
        layer.attention(src, grid, pe_row, pe_col)
    assert skip_spy == [not wait, False]


@pytest.mark.parametrize("pad", [False, True])
def test_enact_layer_asks_about_the_kernel_at_the_value_head_dim_it_attends_with(monkeypatch, pad):
    """The layer's count-read decision asks enact_cuda.uses_cuda_kernel about the head dims its
    attention gives the kernel: q / k 2 d_h, values d_h or, padded, 2 d_h (pad_values forced)."""
    asked = []

    def spy(x, head_dim, impl, value_head_dim=None):
        asked.append((head_dim, value_head_dim))
        return False

    monkeypatch.setattr(enact_cuda, "uses_cuda_kernel", spy)
    src, mask, pe_row, pe_col = enact_layer_inputs()
    layer = EncoderLayerSpatial(src.shape[-1], 4, 64, 0.0, enact=True, sigma=1).eval()
    layer.self_attn.pad_values = pad
    with torch.no_grad():
        layer.attention(src, grid_mask(mask, mask.shape, src.dtype, src.device), pe_row, pe_col)
    d_h = layer.self_attn.head_dim
    assert asked == [(2 * d_h, 2 * d_h if pad else d_h)]
