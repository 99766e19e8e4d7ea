"""enact_cuda clustered attention (spec §1.7) and backend selection, CPU."""
import logging
import math
import sys

import pytest
import torch

import enact_cuda
from enact_cuda import cluster, clustered_attention, self_information
from enact_cuda import information as info_mod


@pytest.fixture(autouse=True)
def fresh_backend_cache():
    info_mod._reset_backend_cache()
    yield
    info_mod._reset_backend_cache()


def dense_block_diagonal(q, k, v, kpm, scale):
    """Reference: pack all images' clusters into ONE key set and mask the other images' keys."""
    B, h, N, e = q.shape
    counts = (~kpm).sum(1)
    keys = torch.cat([k[b, :, : int(counts[b])] for b in range(B)], dim=1)    # (h, T, e)
    vals = torch.cat([v[b, :, : int(counts[b])] for b in range(B)], dim=1)    # (h, T, ev)
    owner = torch.repeat_interleave(torch.arange(B), counts)                 # (T,)
    queries = q.permute(1, 0, 2, 3).reshape(h, B * N, e)                      # (h, B*N, e)
    q_owner = torch.arange(B).repeat_interleave(N)                            # (B*N,)
    allowed = q_owner[:, None] == owner[None, :]                              # block-diagonal
    logits = (queries @ keys.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, -1) @ vals                                    # (h, B*N, ev)
    return out.reshape(h, B, N, -1).permute(1, 0, 2, 3)


def random_case(B=3, h=2, N=7, R=5, e=4, ev=3, counts=(5, 2, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, h, N, e, generator=g, dtype=torch.float64)
    k = torch.randn(B, h, R, e, generator=g, dtype=torch.float64)
    v = torch.randn(B, h, R, ev, generator=g, dtype=torch.float64)
    kpm = torch.arange(R)[None, :] >= torch.tensor(counts)[:, None]
    return q, k, v, kpm


def test_matches_dense_block_diagonal_attention():
    q, k, v, kpm = random_case()
    out = clustered_attention(q, k, v, kpm, impl="torch")
    assert out.shape == (3, 2, 7, 3)
    assert torch.allclose(out, dense_block_diagonal(q, k, v, kpm, 1 / math.sqrt(4)), atol=1e-12)
    out = clustered_attention(q, k, v, kpm, impl="auto", scale=0.3)
    assert torch.allclose(out, dense_block_diagonal(q, k, v, kpm, 0.3), atol=1e-12)


def test_padded_clusters_do_not_matter():
    q, k, v, kpm = random_case(seed=1)
    k2, v2 = k.clone(), v.clone()
    k2[kpm[:, None, :, None].expand_as(k2)] = 1e3
    v2[kpm[:, None, :, None].expand_as(v2)] = -1e3
    assert torch.allclose(clustered_attention(q, k2, v2, kpm, impl="torch"),
                          clustered_attention(q, k, v, kpm, impl="torch"), atol=1e-12)


def test_no_mask_and_image_without_clusters():
    q, k, v, kpm = random_case(counts=(5, 0, 1), seed=2)
    q.requires_grad_()
    out = clustered_attention(q, k, v, kpm, impl="torch")
    assert torch.all(out[1] == 0)
    assert torch.allclose(out[2], v[2, :, :1].expand(-1, 7, -1))  # one key: weight 1
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    full = torch.zeros_like(kpm)
    assert torch.allclose(clustered_attention(q, k, v, None, impl="torch"),
                          clustered_attention(q, k, v, full, impl="torch"), atol=1e-12)


def test_attention_dropout_is_applied():
    q, k, v, kpm = random_case(seed=3)
    q, k, v = q.float(), k.float(), v.float()
    torch.manual_seed(0)
    a = clustered_attention(q, k, v, kpm, dropout_p=0.5, impl="torch")
    b = clustered_attention(q, k, v, kpm, dropout_p=0.0, impl="torch")
    assert torch.isfinite(a).all()
    assert not torch.allclose(a, b)


def test_gradcheck_information_clustering_attention():
    """float64 gradcheck through W_prob -> information -> regions/clusters -> attention."""
    torch.manual_seed(4)
    B, H, W, d, h = 2, 3, 4, 4, 2
    N, e = H * W, d // h
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 2:, :] = True
    mask[1, :, 3:] = True
    mask = mask.flatten(1)
    keys = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    vals = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    queries = torch.randn(B, h, N, e, dtype=torch.float64, requires_grad=True)
    w_prob = (torch.randn(1, d, dtype=torch.float64) * 3).requires_grad_()
    b_prob = torch.zeros(1, dtype=torch.float64, requires_grad=True)

    def f(keys, vals, queries, w_prob, b_prob):
        info = self_information(keys, w_prob, b_prob, mask)
        c = cluster(keys, vals, info, mask, 1, impl="torch")
        R = c.keys.shape[1]
        k = c.keys.view(B, R, h, e).transpose(1, 2)
        v = c.values.view(B, R, h, e).transpose(1, 2)
        return clustered_attention(queries, k, v, c.key_padding_mask, impl="torch")

    inputs = (keys, vals, queries, w_prob, b_prob)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, fast_mode=True)
    # full (not fast-mode) check of the W_prob gradient on a scalar loss
    proj = torch.randn(B, h, N, e, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda w, b: (f(keys, vals, queries, w, b) * proj).sum(), (w_prob, b_prob), eps=1e-6)
    # W_prob really receives a gradient (the entropy path is live)
    f(*inputs).pow(2).sum().backward()
    assert w_prob.grad.abs().sum() > 0


# ---------------------------------------------------------------- backend selection
def test_gpu_impl_raises_clearly_without_extension():
    q, k, v, kpm = random_case()
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        clustered_attention(q, k, v, kpm, impl="cuda")
    keys = torch.randn(1, 6, 4)
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        cluster(keys, keys, torch.rand(1, 6), None, 1, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        clustered_attention(q, k, v, kpm, impl="triton")


def test_auto_falls_back_with_one_log_line(caplog):
    q, k, v, kpm = random_case()
    caplog.set_level(logging.INFO, logger="enact_cuda")
    a = clustered_attention(q, k, v, kpm)
    clustered_attention(q, k, v, kpm)
    records = [r for r in caplog.records if r.name == "enact_cuda"]
    assert len(records) == 1
    assert "torch backend" in records[0].getMessage()
    assert "not on a CUDA device" in records[0].getMessage()
    assert torch.allclose(a, clustered_attention(q, k, v, kpm, impl="torch"))


def test_missing_build_module_is_reported(monkeypatch):
    """On a 'GPU' machine where enact_cuda/build.py is missing, auto reports why, cuda raises."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delattr(enact_cuda, "build", raising=False)
    monkeypatch.setitem(sys.modules, "enact_cuda.build", None)  # import fails: ImportError
    info = enact_cuda.backend_info()
    assert info["auto"] == "torch"
    assert "enact_cuda.build could not be imported" in info["reason"]
    with pytest.raises(RuntimeError, match="could not be imported"):
        info_mod.resolve_impl("cuda", torch.zeros(1))


def test_backend_info_here():
    info = enact_cuda.backend_info()
    assert info["auto"] in ("torch", "cuda") and isinstance(info["reason"], str)
    if not torch.cuda.is_available():
        assert info["auto"] == "torch" and "no CUDA device" in info["reason"]


def test_auto_attention_backend_is_chosen_per_dtype(monkeypatch, caplog):
    """impl='auto' on CUDA inputs: the fused kernel for float32, torch's SDPA for bfloat16 and
    float16 (what the benchmark measured faster); impl='cuda' forces the kernel. CPU-runnable:
    the backend resolution and the CUDA backend are mocked."""
    import enact_cuda.attention as att
    calls = []

    class FakeCudaBackend:
        @staticmethod
        def clustered_attention(q, k, v, kpm, dropout_p, scale, key_count_hint=None):
            calls.append(q.dtype)
            return torch.full_like(q, 7.0)

    monkeypatch.setattr(att, "resolve_impl",
                        lambda impl, *t: "torch" if impl == "torch" else "cuda")
    monkeypatch.setattr(att, "cuda_backend_or_reason", lambda: (FakeCudaBackend, ""))
    caplog.set_level(logging.INFO, logger="enact_cuda")
    q, k, v, kpm = random_case(e=32, ev=32)
    for dtype, want_kernel in ((torch.float32, True), (torch.bfloat16, False),
                               (torch.float16, False)):
        calls.clear()
        qd, kd, vd = (t.to(dtype) for t in (q, k, v))
        if dtype == torch.float16:  # CPU SDPA lacks fp16 in older torch: stub the torch path
            monkeypatch.setattr(att, "_attention_sdpa",
                                lambda *a, **kw: torch.zeros_like(a[0]))
        out = clustered_attention(qd, kd, vd, kpm, impl="auto")
        assert (calls == [dtype]) == want_kernel, dtype
        assert bool((out == 7.0).all()) == want_kernel
        calls.clear()
        clustered_attention(qd, kd, vd, kpm, impl="cuda")
        if dtype in att._CUDA_DTYPES:
            assert calls == [dtype]  # explicit cuda: the kernel, whatever auto would pick
    assert att.AUTO_CUDA_ATTENTION_DTYPES == (torch.float32,)
    msgs = [r.getMessage() for r in caplog.records if r.name == "enact_cuda"]
    assert any("bfloat16" in m and "SDPA" in m for m in msgs)
    # float64 (gradcheck) never reaches the kernel, and unsupported head dims fall back too
    calls.clear()
    clustered_attention(q, k, v, kpm, impl="auto")
    qe, ke, ve, kpme = random_case(e=16, ev=16)
    clustered_attention(qe.float(), ke.float(), ve.float(), kpme, impl="auto")
    assert calls == []


def test_kernel_gap_says_when_the_cuda_kernel_runs():
    """One rule for clustered_attention's backend choice and uses_cuda_kernel: the kernel
    takes one dtype (fp32 / bf16) and (q / k, value) head dims (32, 32), (64, 64) or (64, 32);
    auto keeps bf16 on torch's SDPA."""
    from enact_cuda.attention import kernel_gap, uses_cuda_kernel
    f32, bf16 = torch.float32, torch.bfloat16
    assert kernel_gap((f32, f32, f32), (32, 32), "auto") == ""
    assert kernel_gap((bf16,), (64,), "cuda") == ""
    assert "SDPA" in kernel_gap((bf16,), (64,), "auto")
    assert "dtypes" in kernel_gap((torch.float16,), (32,), "cuda")
    assert "dtypes" in kernel_gap((f32, bf16, f32), (32,), "cuda")
    assert kernel_gap((f32,), (64, 32), "cuda") == ""          # Anchor DETR's (q / k, value)
    assert kernel_gap((f32,), (64, 64, 32), "auto") == ""
    assert "head dims" in kernel_gap((f32,), (32, 64), "cuda")
    assert "head dims" in kernel_gap((f32,), (64, 32, 32), "cuda")  # q and k differ
    assert uses_cuda_kernel(torch.zeros(1), 64, "cuda", 32) is False
    assert "head dims" in kernel_gap((f32,), (16,), "auto")
    assert not uses_cuda_kernel(torch.zeros(1), 32, "cuda")  # CPU inputs never use it
