"""attention() sdpa / eager vs a dense per-image reference; MultiheadAttention vs torch's."""
import math

import pytest
import torch

from detr_common.attention import EncoderSelfAttention, MultiheadAttention, attention


def _reference(q, k, v, key_padding_mask, scale):
    """float64, per image: softmax over that image's valid keys only (no masking trick)."""
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float64)
    for b in range(q.shape[0]):
        keep = ~key_padding_mask[b] if key_padding_mask is not None else slice(None)
        kb, vb = k[b][:, keep], v[b][:, keep]
        weights = torch.softmax(q[b] @ kb.transpose(-1, -2) * scale, dim=-1)
        out[b] = weights @ vb
    return out


def _inputs(seed=0, ev=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k = torch.randn(3, 2, 7, 8, generator=g)
    v = torch.randn(3, 2, 7, ev, generator=g)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[1, 4:] = True
    mask[2, [0, 3, 6]] = True
    return q, k, v, mask


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("scale", [None, 0.2])
def test_attention_matches_dense_reference(impl, use_mask, scale):
    q, k, v, mask = _inputs(ev=6)
    mask = mask if use_mask else None
    got = attention(q, k, v, mask, impl=impl, scale=scale)
    ref = _reference(q, k, v, mask, 1 / math.sqrt(8) if scale is None else scale)
    assert got.shape == (3, 2, 5, 6)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_sdpa_equals_eager_with_grad():
    q, k, v, mask = _inputs(seed=3)
    grads = []
    for impl in ("sdpa", "eager"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, mask, impl=impl)
        (out * torch.arange(8.0)).sum().backward()
        grads.append((out.detach(), qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
    # padded keys get no gradient
    assert torch.allclose(grads[1][2][1, :, 4:], torch.zeros(2, 3, 8))


def test_unknown_impl_is_rejected():
    q, k, v, _ = _inputs()
    with pytest.raises(ValueError, match="unknown attention impl"):
        attention(q, k, v, None, impl="flash3")


def _copied_pair(impl, embed=16, heads=4, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(embed, heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_bias.normal_()
        ref.out_proj.bias.normal_()
    ours = MultiheadAttention(embed, heads, impl=impl)
    ours.load_state_dict(ref.state_dict(), strict=True)  # same parameter names
    return ours.eval(), ref.eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_multihead_attention_equals_torch(impl):
    ours, ref = _copied_pair(impl)
    g = torch.Generator().manual_seed(1)
    query = torch.randn(2, 5, 16, generator=g)
    key = torch.randn(2, 9, 16, generator=g)
    value = torch.randn(2, 9, 16, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    expected = ref(query, key, value, key_padding_mask=mask, need_weights=False)[0]
    got = ours(query, key, value, key_padding_mask=mask)
    assert got.shape == (2, 5, 16)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(ours(query, key, value), ref(query, key, value)[0], atol=1e-5)


def test_encoder_self_attention_uses_pos_on_queries_and_keys_only():
    ours, ref = _copied_pair("sdpa", seed=2)
    enc = EncoderSelfAttention(16, 4, impl="eager").eval()
    enc.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(4)
    src, pos = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 16, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    expected = ref(src + pos, src + pos, src, key_padding_mask=mask, need_weights=False)[0]
    assert torch.allclose(enc(src, pos, mask, (2, 3)), expected, atol=1e-5)


def test_init_and_dropout_only_in_training():
    mha = MultiheadAttention(16, 4, dropout=0.5)
    assert torch.allclose(mha.in_proj_bias, torch.zeros(48))
    assert torch.allclose(mha.out_proj.bias, torch.zeros(16))
    x = torch.randn(1, 6, 16)
    mha.eval()
    assert torch.allclose(mha(x, x, x), mha(x, x, x))
    mha.train()
    torch.manual_seed(0)
    a = mha(x, x, x)
    assert not torch.allclose(a, mha.eval()(x, x, x))
