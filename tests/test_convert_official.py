"""tools/convert_official_checkpoint.py: the official ClustAttn numerics folded into our weights
(checked against an independent implementation of spec §2.1), key handling, Anchor's in_proj
slots, and clear errors; --enact_attn_numerics official, the same numerics kept at training."""
import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from _cli import TINY, load_main, without
from detr_common.checkpoint import load_weights, save_checkpoint
from detr_common.data.collate import pad_images

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location(
    "convert_official_checkpoint", ROOT / "tools" / "convert_official_checkpoint.py")
conv = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conv)

FOLDERS = {"detr": "DETR-ENACT", "conditional_detr": "Conditional-DETR-ENACT",
           "anchor_detr": "Anchor-DETR-ENACT"}


def official_clustattn(q_in, ck, cv, w, nhead):
    """The official attention on given clusters (spec §2.1 steps 7-8), float64, by heads:
    Q'' = W_q q, K'' = W_k K', V'' = W_v V'; A = softmax(Q'' K''^T) / d_h (no temperature);
    out = W_o(concat_h A_h V''_h)."""
    B, N, d = q_in.shape
    e = d // nhead
    lin = {n: (lambda x, n=n: x @ w[n + ".weight"].T + w[n + ".bias"])
           for n in ("W_q", "W_k", "W_v", "W_o")}
    Q, K, V = lin["W_q"](q_in), lin["W_k"](ck), lin["W_v"](cv)
    out = torch.zeros(B, N, d, dtype=torch.float64)
    for h in range(nhead):
        s = slice(h * e, (h + 1) * e)
        A = torch.softmax(Q[..., s] @ K[..., s].transpose(1, 2), dim=-1) / e
        out[..., s] = A @ V[..., s]
    return lin["W_o"](out)


def test_folded_numerics_equal_the_official_attention():
    import enact_cuda
    torch.manual_seed(0)
    d, nhead, B, N, R = 64, 4, 2, 30, 7
    prefix = "transformer.encoder.layers.0.self_attn."
    official = {}
    for name in ("W_q", "W_k", "W_v", "W_o"):
        official[prefix + name + ".weight"] = torch.randn(d, d, dtype=torch.float64) / 8
        official[prefix + name + ".bias"] = torch.randn(d, dtype=torch.float64) / 4
    official[prefix + "W_prob.weight"] = torch.randn(1, d, dtype=torch.float64)
    official[prefix + "W_prob.bias"] = torch.zeros(1, dtype=torch.float64)
    ours = conv.convert_state(official, "detr", nhead)

    m = enact_cuda.ENACTAttention(d, nhead, sigma=1, impl="torch").double()
    m.load_state_dict({k[len(prefix):]: v for k, v in ours.items()})
    q_in = torch.randn(B, N, d, dtype=torch.float64)
    ck, cv = torch.randn(B, R, d, dtype=torch.float64), torch.randn(B, R, d, dtype=torch.float64)
    got = m.attend(m.W_q(q_in), ck, cv, torch.zeros(B, R, dtype=torch.bool), impl="torch")
    ref = official_clustattn(q_in, ck, cv, {k[len(prefix):]: v for k, v in official.items()},
                             nhead)
    assert torch.allclose(got, ref, atol=1e-10, rtol=1e-9)
    # and without the conversion the two differ (the test can fail)
    m.load_state_dict({k[len(prefix):]: v for k, v in official.items()})
    raw = m.attend(m.W_q(q_in), ck, cv, torch.zeros(B, R, dtype=torch.bool), impl="torch")
    assert not torch.allclose(raw, ref, atol=1e-3)


def test_official_numerics_equal_the_official_attention_and_the_folded_weights():
    """ENACTAttention(numerics="official") with the official weights: the attention equals the
    independent official formula, and the whole layer (clusters, padding, gradients) equals the
    standard-numerics layer with the converted weights (spec §7's acceptance test)."""
    import enact_cuda
    torch.manual_seed(0)
    d, nhead, B, H, W, R = 64, 4, 2, 5, 7, 6
    gen = torch.Generator().manual_seed(3)
    official = {}
    for name in ("W_q", "W_k", "W_v", "W_o"):
        official[name + ".weight"] = torch.randn(d, d, dtype=torch.float64, generator=gen) / 8
        official[name + ".bias"] = torch.randn(d, dtype=torch.float64, generator=gen) / 4
    official["W_prob.weight"] = torch.randn(1, d, dtype=torch.float64, generator=gen)
    official["W_prob.bias"] = torch.zeros(1, dtype=torch.float64)
    m_off = enact_cuda.ENACTAttention(d, nhead, sigma=1, impl="torch", numerics="official")
    m_off.double().load_state_dict(official)

    q_in = torch.randn(B, H * W, d, dtype=torch.float64, generator=gen)
    ck, cv = (torch.randn(B, R, d, dtype=torch.float64, generator=gen) for _ in range(2))
    got = m_off.attend(m_off.W_q(q_in), ck, cv, torch.zeros(B, R, dtype=torch.bool),
                       impl="torch")
    assert torch.allclose(got, official_clustattn(q_in, ck, cv, official, nhead),
                          atol=1e-10, rtol=1e-9)

    prefix = "transformer.encoder.layers.0.self_attn."
    folded = conv.convert_state({prefix + k: v for k, v in official.items()}, "detr", nhead)
    m_std = enact_cuda.ENACTAttention(d, nhead, sigma=1, impl="torch").double()
    m_std.load_state_dict({k[len(prefix):]: v for k, v in folded.items()})
    src, pos = (torch.randn(B, H * W, d, dtype=torch.float64, generator=gen) for _ in range(2))
    mask = torch.zeros(B, H * W, dtype=torch.bool)
    mask[1, -2 * W:] = True  # image 1 is padded: two rows
    results = []
    for m in (m_off, m_std):
        x = src.clone().requires_grad_(True)
        out = m(x, pos, mask, (H, W))
        out.square().sum().backward()
        results.append((out, x.grad))
    (out_off, grad_off), (out_std, grad_std) = results
    assert torch.allclose(out_off, out_std, atol=1e-10, rtol=1e-9)
    assert torch.allclose(grad_off, grad_std, atol=1e-10, rtol=1e-9)
    # the official weights under standard numerics compute something else (the test can fail)
    m_std.load_state_dict(official)
    assert not torch.allclose(m_std(src, pos, mask, (H, W)), out_off, atol=1e-3)


@pytest.mark.parametrize("folder", ["DETR-ENACT", "Conditional-DETR-ENACT"])
def test_enact_attn_numerics_flag_reaches_every_encoder_layer(folder):
    main = load_main(folder)
    for flags, numerics in (((), "standard"), (("--enact_attn_numerics", "official"), "official")):
        args = main.get_parser().parse_args([*TINY, "--enc_layers", "2", *flags])
        args.num_classes = 5
        model = main.DETECTOR.build(args)[0]
        assert [layer.self_attn.numerics for layer in model.transformer.encoder.layers] == \
            [numerics] * 2


def test_anchor_detr_has_no_enact_attn_numerics(capsys):
    """Anchor DETR's ENACT only clusters for its row-column attention: the flag is refused."""
    main = load_main("Anchor-DETR-ENACT")
    with pytest.raises(SystemExit):
        main.get_parser().parse_args(["--enact_attn_numerics", "official"])
    assert "unrecognized arguments: --enact_attn_numerics" in capsys.readouterr().err


def build_model(detector, *more_flags):
    main = load_main(FOLDERS[detector])
    flags, extra = TINY, []
    if detector == "anchor_detr":
        flags = without(flags, "--num_queries")
        extra = ["--num_query_position", "6", "--num_query_pattern", "2"]
    args = main.get_parser().parse_args(["--coco_path", "unused", "--enact_impl", "torch",
                                         *flags, *extra, *more_flags])
    args.num_classes = 7
    torch.manual_seed(1)
    model, _, _ = main.DETECTOR.build(args)
    return model, args


def to_official(state, detector, nheads):
    """Our state -> what the official code would have saved (the inverse of the conversion),
    with DDP's `module.` prefix."""
    off = {}
    for k, v in state.items():
        m = conv._DETR_ENACT.match(k)
        if m and detector != "anchor_detr":
            d_h = v.shape[0] // nheads  # W_q / W_o: (d, d) weights, (d,) biases
            if m.group(2) == "q":
                v = v / math.sqrt(d_h)
            elif m.group(2) == "o" and m.group(3) == "weight":
                v = v * d_h
        if detector == "anchor_detr" and ".self_attn.in_proj_" in k and k.startswith(
                "transformer.encoder_layers."):
            s = list(v.split(v.shape[0] // 5))
            v = torch.cat((s[2], s[3], s[0], s[1], s[4]))
        off["module." + k] = v.clone()
    return off


@pytest.mark.parametrize("detector", list(FOLDERS))
def test_converted_official_checkpoint_loads_into_our_model(detector, tmp_path, capsys):
    model, args = build_model(detector)
    state = model.state_dict()
    official = {"model": to_official(state, detector, args.nheads),
                "optimizer": {"state": {}, "param_groups": []}, "epoch": 49,
                "args": argparse.Namespace(nheads=args.nheads, hidden_dim=args.hidden_dim)}
    src, dst = tmp_path / "official.pth", tmp_path / "ours.pth"
    save_checkpoint(official, src)
    assert conv.main([str(src), str(dst)]) == 0  # detector recognised from the keys
    out = capsys.readouterr().out
    assert out.startswith(f"{detector}: ") and f"{FOLDERS[detector]}/main.py" in out
    # the printed command is one the detector's parser takes: the official code's clusters
    command = out.split("evaluate: python ")[1].split()
    printed = load_main(FOLDERS[detector]).get_parser().parse_args(command[1:])
    assert (printed.enact_mode, printed.enact_gauss_taps, printed.enact_padding, printed.eval) \
        == ("official_fixed_chunk", "code", "ignore", True)
    if detector != "anchor_detr":  # TINY: hidden 32, 4 heads
        assert "with d_h = 8: 4 heads" in out

    fresh, _ = build_model(detector)
    torch.nn.init.constant_(next(fresh.parameters()), 0.0)
    ckpt = load_weights(fresh, dst, detector, args)  # strict: every key and shape
    assert ckpt["epoch"] == 49 and "optimizer" not in ckpt
    for k, v in fresh.state_dict().items():
        assert torch.allclose(v.float(), state[k].float(), atol=1e-6), k
    # converting the result again (it would fold the numerics twice), or a checkpoint of our
    # main.py, or writing into a folder: refused with one line
    capsys.readouterr()
    assert conv.main([str(dst), str(tmp_path / "twice.pth")]) == 2
    assert "already converted" in capsys.readouterr().err
    save_checkpoint({**official, "detector": detector}, tmp_path / "ours_main.pth")
    assert conv.main([str(tmp_path / "ours_main.pth"), str(tmp_path / "twice.pth")]) == 2
    assert "nothing to convert" in capsys.readouterr().err
    assert not (tmp_path / "twice.pth").exists()
    assert conv.main([str(src), str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_kept_numerics_with_the_official_flag_predict_as_the_folded_weights(tmp_path, capsys):
    """--keep_numerics + --enact_attn_numerics official and the default folding + standard
    numerics are the same Conditional DETR: equal predictions on the same images."""
    model, args = build_model("conditional_detr")
    official = {"model": to_official(model.state_dict(), "conditional_detr", args.nheads),
                "args": argparse.Namespace(nheads=args.nheads)}  # d_h for the folding
    src, folded, kept = tmp_path / "official.pth", tmp_path / "folded.pth", tmp_path / "kept.pth"
    save_checkpoint(official, src)
    assert conv.main([str(src), str(folded)]) == 0
    assert "--enact_attn_numerics" not in capsys.readouterr().out
    assert conv.main([str(src), str(kept), "--keep_numerics"]) == 0
    out = capsys.readouterr().out
    assert "numerics kept" in out and "--enact_attn_numerics official --resume" in out

    std, std_args = build_model("conditional_detr")
    off, off_args = build_model("conditional_detr", "--enact_attn_numerics", "official")
    load_weights(std, folded, "conditional_detr", std_args)
    load_weights(off, kept, "conditional_detr", off_args)
    q = "transformer.encoder.layers.0.self_attn.W_q.weight"
    assert torch.equal(off.state_dict()[q], official["model"]["module." + q])
    assert not torch.allclose(std.state_dict()[q], off.state_dict()[q])
    torch.manual_seed(2)
    images = pad_images([torch.randn(3, 64, 80), torch.randn(3, 48, 64)])
    with torch.no_grad():
        preds = [m.eval()(images) for m in (std, off)]
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(preds[0][key], preds[1][key], atol=1e-5), key


def test_anchor_slots_swap_back():
    d = 4
    w = torch.arange(5 * d, dtype=torch.float32)[:, None].repeat(1, d)  # row i holds i
    state = {"transformer.encoder_layers.0.self_attn.in_proj_weight": w,
             "transformer.encoder_layers.0.self_attn.in_proj_bias": w[:, 0].clone(),
             "transformer.encoder_layers.0.ENACT.W_prob.weight": torch.ones(1, d),
             "transformer.encoder_layers.1.self_attn.in_proj_weight": w.clone()}  # no ENACT
    out = conv.convert_state(state, "anchor_detr", 8)
    rows = out["transformer.encoder_layers.0.self_attn.in_proj_weight"][:, 0]
    s0, s1, s2, s3, s4 = (list(range(i * d, (i + 1) * d)) for i in range(5))
    assert rows.tolist() == s2 + s3 + s0 + s1 + s4
    bias = out["transformer.encoder_layers.0.self_attn.in_proj_bias"]
    assert bias.tolist() == s2 + s3 + s0 + s1 + s4
    assert torch.equal(out["transformer.encoder_layers.1.self_attn.in_proj_weight"], w)


def test_swap_qk_exchanges_before_folding():
    d, prefix = 8, "transformer.encoder.layers.0.self_attn."
    state = {prefix + f"W_{n}.{t}": torch.full((d, d) if t == "weight" else (d,), float(i + 1))
             for i, n in enumerate(("q", "k", "v", "o")) for t in ("weight", "bias")}
    state[prefix + "W_prob.weight"] = torch.ones(1, d)
    state["transformer.decoder.layers.0.multihead_attn.in_proj_weight"] = torch.ones(3 * d, d)
    out = conv.convert_state(state, "detr", nheads=2, swap_qk=True)  # d_h = 4
    assert torch.all(out[prefix + "W_q.weight"] == 2.0 * 2)  # W_k's values x sqrt(4)
    assert torch.all(out[prefix + "W_k.bias"] == 1.0)          # W_q's, unscaled
    assert torch.all(out[prefix + "W_o.weight"] == 4.0 / 4)
    assert torch.all(out[prefix + "W_o.bias"] == 4.0)


def test_clear_errors(tmp_path, capsys):
    assert conv.main([str(tmp_path / "missing.pth"), str(tmp_path / "out.pth")]) == 2
    assert "not found" in capsys.readouterr().err
    plain = {"model": {"transformer.decoder.layers.0.multihead_attn.in_proj_weight":
                       torch.zeros(3, 1)}}
    save_checkpoint(plain, tmp_path / "plain.pth")
    assert conv.main([str(tmp_path / "plain.pth"), str(tmp_path / "out.pth")]) == 2
    assert "no ENACT parameters" in capsys.readouterr().err and not (tmp_path / "out.pth").exists()
    assert conv.main([str(tmp_path / "plain.pth"), str(tmp_path / "plain.pth")]) == 2
    assert "overwrite" in capsys.readouterr().err
    anchor = {"model": {"transformer.encoder_layers.0.ENACT.W_prob.weight": torch.ones(1, 4)}}
    save_checkpoint(anchor, tmp_path / "anchor.pth")
    assert conv.main([str(tmp_path / "anchor.pth"), str(tmp_path / "out.pth"),
                      "--keep_numerics"]) == 2
    assert "--keep_numerics applies to DETR / Conditional DETR" in capsys.readouterr().err
    save_checkpoint({"model": {"foo.weight": torch.zeros(1)}}, tmp_path / "odd.pth")
    assert conv.main([str(tmp_path / "odd.pth"), str(tmp_path / "out.pth")]) == 2
    assert "match none of" in capsys.readouterr().err
