"""CUDA backend of enact_cuda vs the torch backend (forward and backward), on a GPU.

Every test is marked `cuda` (skipped without a GPU by conftest). Tolerances: norm-relative
error ||cuda - torch|| / ||torch|| <= 1e-5 in float32, <= 1e-2 in bfloat16. Shapes cover
random and adversarial cases: one region per image, every pixel its own region, H x W not a
multiple of 32, B = 1 and B = 16, padded batches (incl. a fully padded image), head dims 32/64.

Region boundaries are thresholds (curvature > 0) on float32 sums whose order differs between
the fused kernel and torch's conv1d; where the curvature is within rounding of 0 the two may
legitimately disagree. `assert_same_regions` demands equality everywhere else.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import enact_cuda
from enact_cuda.attention import clustered_attention_torch
from enact_cuda.clustering import cluster_tensors as torch_cluster_tensors
from enact_cuda.information import information_from_logits, regions as torch_regions
from enact_cuda.information import regions_from_steps

pytestmark = pytest.mark.cuda

FP32_TOL = 1e-5
BF16_TOL = 1e-2


# ------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def cb():
    from enact_cuda import build, cuda_backend
    build.load_extension()
    return cuda_backend


@pytest.fixture(scope="module")
def dev():
    return torch.device("cuda")


def rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """||a - b|| / max(||b||, floor) in float64; NaN anywhere fails. `floor` (a norm of the
    problem's natural scale) keeps results that are mathematically zero (e.g. dq with a
    single key) from comparing rounding noise against rounding noise."""
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite values in the CUDA result"
    denom = max(b.norm().item(), float(floor))
    return (a - b).norm().item() / (denom if denom > 0 else 1.0)


def layer_inputs(B, H, W, d, device, seed):
    """src, pos (B, H*W, d), a padding mask (make_mask) and an output gradient (B, H*W, d)."""
    gen = torch.Generator().manual_seed(seed)
    src = torch.randn(B, H * W, d, generator=gen).to(device)
    pos = torch.randn(B, H * W, d, generator=gen).to(device)
    mask = make_mask(B, H, W, device, gen=gen)
    return src, pos, mask, torch.randn(B, H * W, d, generator=gen).to(device)


def assert_results_close(got, ref, src_tol=None, rounding_zero=("W_prob.bias", "W_k.bias"),
                         tol=FP32_TOL):
    """got / ref: (output, input gradient, {parameter name: gradient}) of two runs of a layer.
    Output within tol, input gradient within src_tol (default 2 tol), parameter gradients
    within 5 tol, except those in `rounding_zero`, which are exactly zero up to rounding
    (W_prob.bias sums softmax grads over an image; W_k.bias shifts all of a query's scores
    equally): these must stay at noise level, relative to their weight's gradient."""
    (out, grad, params), (out_ref, grad_ref, params_ref) = got, ref
    assert rel(out, out_ref) <= tol
    assert rel(grad, grad_ref) <= (2 * tol if src_tol is None else src_tol)
    for name in params_ref:
        if any(name.endswith(z) for z in rounding_zero):
            weight = name[:-len("bias")] + "weight"
            assert params[name].abs().max() <= (1e-2 * params[weight].abs().max()
                                                + 10 * params_ref[name].abs().max()), name
            continue
        assert rel(params[name], params_ref[name]) <= 5 * tol, name


def make_mask(B, H, W, device, full_first=True, gen=None, empty_image=False):
    """Bottom/right padding (True = padding) with a random valid h x w per image."""
    mask = torch.ones(B, H, W, dtype=torch.bool, device=device)
    for b in range(B):
        if b == 0 and full_first:
            h, w = H, W
        else:
            h = int(torch.randint(1, H + 1, (1,), generator=gen))
            w = int(torch.randint(1, W + 1, (1,), generator=gen))
        mask[b, :h, :w] = False
    if empty_image:
        mask[-1] = True
    return mask.reshape(B, H * W)


def assert_same_regions(ri_cuda, ri_ref, smoothed_ref, mask, rel_tol=1e-5, max_ambiguous=8):
    """region_index equal, except region starts next to a curvature within rounding of 0."""
    assert ri_cuda.shape == ri_ref.shape and ri_cuda.dtype == torch.int64
    if mask is not None:
        assert torch.equal(ri_cuda[mask], torch.full_like(ri_cuda[mask], -1))
    if torch.equal(ri_cuda, ri_ref):
        return
    B = ri_ref.shape[0]
    ambiguous = 0
    for b in range(B):
        valid = torch.ones_like(ri_ref[b], dtype=torch.bool) if mask is None else ~mask[b]
        rc, rr = ri_cuda[b][valid], ri_ref[b][valid]
        if torch.equal(rc, rr):
            continue
        s = smoothed_ref[b][valid].double()
        sp = torch.nn.functional.pad(s, (1, 1))
        curv = 2 * s - sp[:-2] - sp[2:]
        tol = rel_tol * max(s.abs().max().item(), 1e-30)
        start_c = torch.ones_like(rc, dtype=torch.bool)
        start_r = torch.ones_like(rr, dtype=torch.bool)
        start_c[1:] = rc[1:] != rc[:-1]
        start_r[1:] = rr[1:] != rr[:-1]
        for j in torch.nonzero(start_c != start_r).flatten().tolist():
            near = curv[max(j - 1, 0): j + 1].abs().min().item()
            assert near < tol, (f"image {b}: region start differs at compact position {j} "
                                f"where |curvature| = {near:.3e} >> rounding ({tol:.1e})")
            ambiguous += 1
    assert ambiguous <= max_ambiguous, f"{ambiguous} ambiguous region starts"


# ------------------------------------------------------------------ information + regions
INFO_CASES = [
    # B, H, W, sigma, row_breaks, padded
    (4, 13, 17, 3, False, True),
    (1, 25, 38, 3, False, False),
    (16, 9, 11, 3, True, True),
    (3, 50, 76, 5, False, True),   # DC5 size
    (2, 25, 38, 5, True, False),
    (2, 7, 5, 1, False, True),
]


@pytest.mark.parametrize("B,H,W,sigma,row_breaks,padded", INFO_CASES)
@pytest.mark.parametrize("taps", ["paper", "code"])
def test_information_regions_matches_torch(cb, dev, B, H, W, sigma, row_breaks, padded, taps):
    gen = torch.Generator().manual_seed(B * 1000 + H * W + sigma)
    N = H * W
    z = (torch.randn(B, N, generator=gen) * 2.0).to(dev)
    mask = make_mask(B, H, W, dev, gen=gen) if padded else None
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)

    info_c, sm_c, ri_c, cnt_c = cb.information_regions(z1, mask, sigma, row_breaks, (H, W),
                                                       gauss_taps=taps)
    info_t = information_from_logits(z2, mask)
    sm_t, ri_t, cnt_t = torch_regions(info_t, mask, sigma, row_breaks, (H, W), gauss_taps=taps)

    assert info_c.dtype == torch.float32 and sm_c.shape == (B, N) and cnt_c.shape == (B,)
    assert rel(info_c, info_t) <= FP32_TOL
    assert rel(sm_c, sm_t) <= FP32_TOL
    if mask is not None:
        assert torch.all(info_c[mask] == 0) and torch.all(sm_c[mask] == 0)
    assert_same_regions(ri_c, ri_t, sm_t.detach(), mask)
    if torch.equal(ri_c, ri_t):
        assert torch.equal(cnt_c, cnt_t)
    assert torch.equal(cnt_c, ri_c.max(1).values + 1)

    g1 = torch.randn(B, N, generator=gen).to(dev)
    g2 = torch.randn(B, N, generator=gen).to(dev)
    ((sm_c * g1).sum() + (info_c * g2).sum()).backward()
    ((sm_t * g1).sum() + (info_t * g2).sum()).backward()
    assert rel(z1.grad, z2.grad) <= FP32_TOL
    if mask is not None:
        assert torch.all(z1.grad[mask] == 0)


def test_information_regions_grad_through_smoothed_only(cb, dev):
    gen = torch.Generator().manual_seed(3)
    B, H, W = 3, 10, 12
    z = torch.randn(B, H * W, generator=gen).to(dev)
    mask = make_mask(B, H, W, dev, gen=gen)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    g = torch.randn(B, H * W, generator=gen).to(dev)
    _, sm_c, _, _ = cb.information_regions(z1, mask, 3)
    sm_t, _, _ = torch_regions(information_from_logits(z2, mask), mask, 3)
    (sm_c * g).sum().backward()
    (sm_t * g).sum().backward()
    assert rel(z1.grad, z2.grad) <= FP32_TOL


def test_information_regions_adversarial(cb, dev):
    """Constant logits (flat information: curvature ~ 0 inside), images with 1 and 2 valid
    pixels (one region each) and a fully padded image (no region)."""
    B, H, W = 4, 6, 9
    z = torch.zeros(B, H * W, device=dev)
    mask = torch.ones(B, H, W, dtype=torch.bool, device=dev)
    mask[0] = False          # constant logits over a full image
    mask[1, 0, 0] = False    # one valid pixel
    mask[2, 0, :2] = False   # two valid pixels (symmetric: one region)
    mask = mask.reshape(B, -1)  # image 3 fully padded
    info_c, sm_c, ri_c, cnt_c = cb.information_regions(z, mask, 3)
    info_t = information_from_logits(z, mask)
    sm_t, ri_t, cnt_t = torch_regions(info_t, mask, 3)
    assert rel(info_c, info_t) <= FP32_TOL and rel(sm_c, sm_t) <= FP32_TOL
    assert_same_regions(ri_c, ri_t, sm_t, mask, max_ambiguous=H * W)
    assert cnt_c[1].item() == 1 and cnt_c[2].item() == 1 and cnt_c[3].item() == 0
    assert torch.all(ri_c[3] == -1) and torch.all(info_c[3] == 0)


def test_information_regions_large_n_uses_scratch(cb, dev):
    """N beyond the shared-memory capacity of one block (global scratch path)."""
    gen = torch.Generator().manual_seed(5)
    B, H, W = 2, 150, 140  # N = 21000: 252 KB forward / 336 KB backward > smem
    z = torch.randn(B, H * W, generator=gen).to(dev)
    mask = make_mask(B, H, W, dev, gen=gen)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    info_c, sm_c, ri_c, _ = cb.information_regions(z1, mask, 3)
    info_t = information_from_logits(z2, mask)
    sm_t, ri_t, _ = torch_regions(info_t, mask, 3)
    assert rel(sm_c, sm_t) <= FP32_TOL
    assert_same_regions(ri_c, ri_t, sm_t.detach(), mask, max_ambiguous=20)
    g = torch.randn(B, H * W, generator=gen).to(dev)
    (sm_c * g).sum().backward()
    (sm_t * g).sum().backward()
    assert rel(z1.grad, z2.grad) <= FP32_TOL


@pytest.mark.parametrize("row_breaks,taps", [(False, "paper"), (True, "paper"), (False, "code")])
def test_regions_from_information_matches_torch(cb, dev, row_breaks, taps):
    gen = torch.Generator().manual_seed(11)
    B, H, W = 5, 19, 23
    info = (torch.rand(B, H * W, generator=gen) * 0.05).to(dev)
    mask = make_mask(B, H, W, dev, gen=gen)
    info = info.masked_fill(mask, 0.0)
    i1 = info.clone().requires_grad_(True)
    i2 = info.clone().requires_grad_(True)
    sm_c, ri_c, cnt_c = cb.regions(i1, mask, 3, row_breaks, (H, W), gauss_taps=taps)
    sm_t, ri_t, cnt_t = torch_regions(i2, mask, 3, row_breaks, (H, W), gauss_taps=taps)
    assert rel(sm_c, sm_t) <= FP32_TOL
    assert_same_regions(ri_c, ri_t, sm_t.detach(), mask)
    g = torch.randn(B, H * W, generator=gen).to(dev)
    (sm_c * g).sum().backward()
    (sm_t * g).sum().backward()
    assert rel(i1.grad, i2.grad) <= FP32_TOL


# ---------------------------------------------------------------------------- clustering
def _steps(kind, B, N, gen, device, mask=None):
    """Step sequences (B, N) in original layout; 'every_pixel' alternates along each image's
    compact (valid-pixel) sequence so that every valid pixel is its own region."""
    if kind == "random":
        return (torch.rand(B, N, generator=gen) < 0.3).to(device)
    if kind == "one_region":
        return torch.zeros(B, N, dtype=torch.bool, device=device)
    if kind == "every_pixel":
        valid = torch.ones(B, N, dtype=torch.bool, device=device) if mask is None else ~mask
        return (valid.cumsum(1) % 2) == 1
    raise ValueError(kind)


CLUSTER_CASES = [
    # B, H, W, kind, padded, dims
    (4, 13, 17, "random", True, (256, 256)),
    (1, 25, 38, "random", False, (256,)),
    (16, 9, 11, "random", True, (64, 32, 256)),
    (3, 10, 14, "one_region", True, (256, 128)),
    (3, 10, 14, "every_pixel", True, (256, 64)),
    (2, 50, 76, "random", True, (256, 256)),
    (2, 7, 9, "random", True, (30, 6)),  # d not a multiple of 4: scalar path
    (2, 12, 10, "random", True, (512, 8)),  # wide rows
]


def _cluster_inputs(B, H, W, kind, padded, dims, dtype, dev, seed):
    gen = torch.Generator().manual_seed(seed)
    N = H * W
    mask = make_mask(B, H, W, dev, gen=gen, empty_image=padded and B > 2) if padded else None
    ri, counts = regions_from_steps(_steps(kind, B, N, gen, dev, mask), mask)
    sm = (torch.randn(B, N, generator=gen) * 0.5).to(dev)
    if mask is not None:
        sm = sm.masked_fill(mask, 0.0)
    xs = [torch.randn(B, N, d, generator=gen).to(dev, dtype) for d in dims]
    R = max(int(counts.max()), 1)
    return mask, ri, counts, sm, xs, R, gen


def _run_cluster(fn, xs, sm, ri, R, grads):
    xs = [x.clone().requires_grad_(True) for x in xs]
    sm = sm.clone().requires_grad_(True)
    outs = fn(tuple(xs), sm, ri, R)
    loss = sum((o.float() * g).sum() for o, g in zip(outs, grads))
    loss.backward()
    return outs, [x.grad for x in xs], sm.grad


@pytest.mark.parametrize("B,H,W,kind,padded,dims", CLUSTER_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_tensors_matches_torch(cb, dev, B, H, W, kind, padded, dims, dtype):
    mask, ri, counts, sm, xs, R, gen = _cluster_inputs(B, H, W, kind, padded, dims, dtype, dev,
                                                       seed=B * 100 + H + len(dims))
    if kind == "one_region":
        assert torch.all(counts[: B - 1 if padded and B > 2 else B] == 1)
    if kind == "every_pixel":
        valid = (~mask).sum(1) if mask is not None else torch.full((B,), H * W, device=dev)
        assert torch.equal(counts, valid)
    grads = [torch.randn(B, R, x.shape[2], generator=gen).to(dev) for x in xs]
    out_c, gx_c, gs_c = _run_cluster(cb.cluster_tensors, xs, sm, ri, R, grads)
    out_t, gx_t, gs_t = _run_cluster(torch_cluster_tensors, xs, sm, ri, R, grads)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for oc, ot, x in zip(out_c, out_t, xs):
        assert oc.dtype == x.dtype and oc.shape == ot.shape == (B, R, x.shape[2])
        assert rel(oc, ot) <= tol
        # padding clusters are exactly zero
        pad = torch.arange(R, device=dev)[None, :] >= counts[:, None]
        assert torch.all(oc[pad] == 0)
    for gc, gt in zip(gx_c, gx_t):
        assert rel(gc, gt) <= tol
    assert rel(gs_c, gs_t) <= (FP32_TOL if dtype == torch.float32 else 2 * BF16_TOL)
    if mask is not None:
        assert torch.all(gs_c[mask] == 0)
        for gc in gx_c:
            assert torch.all(gc[mask] == 0)


def test_arbitrary_padding_pattern(cb, dev):
    """Padding anywhere (top/left too, not only bottom/right): information, regions and
    clustering follow each image's valid pixels in raster order, padding rows get zero grads."""
    gen = torch.Generator().manual_seed(17)
    B, H, W = 3, 14, 15
    N = H * W
    mask = (torch.rand(B, N, generator=gen) < 0.3).to(dev)
    mask[:, :5] = True  # leading padding
    z = torch.randn(B, N, generator=gen).to(dev)
    z1 = z.clone().requires_grad_(True)
    z2 = z.clone().requires_grad_(True)
    info_c, sm_c, ri_c, cnt_c = cb.information_regions(z1, mask, 3)
    info_t = information_from_logits(z2, mask)
    sm_t, ri_t, cnt_t = torch_regions(info_t, mask, 3)
    assert rel(sm_c, sm_t) <= FP32_TOL
    assert_same_regions(ri_c, ri_t, sm_t.detach(), mask)
    g = torch.randn(B, N, generator=gen).to(dev)
    (sm_c * g).sum().backward()
    (sm_t * g).sum().backward()
    assert rel(z1.grad, z2.grad) <= FP32_TOL

    R = int(cnt_t.max())
    xs = [torch.randn(B, N, 256, generator=gen).to(dev), torch.randn(B, N, 64, generator=gen).to(dev)]
    grads = [torch.randn(B, R, x.shape[2], generator=gen).to(dev) for x in xs]
    sm = sm_t.detach()
    out_c, gx_c, gs_c = _run_cluster(cb.cluster_tensors, xs, sm, ri_t, R, grads)
    out_t, gx_t, gs_t = _run_cluster(torch_cluster_tensors, xs, sm, ri_t, R, grads)
    for a, b in zip(out_c + tuple(gx_c) + (gs_c,), out_t + tuple(gx_t) + (gs_t,)):
        assert rel(a, b) <= FP32_TOL
    assert torch.all(gx_c[0][mask] == 0) and torch.all(gs_c[mask] == 0)


def test_cluster_tensors_strided_mixed_dtypes_extra_clusters(cb, dev):
    """Non-contiguous inputs (a slice of a wider tensor), mixed dtypes (two kernel launches
    sharing the grad of `smoothed`), and num_clusters larger than any image's count."""
    gen = torch.Generator().manual_seed(21)
    B, H, W = 3, 11, 13
    N = H * W
    mask = make_mask(B, H, W, dev, gen=gen)
    ri, counts = regions_from_steps(_steps("random", B, N, gen, dev), mask)
    sm = torch.randn(B, N, generator=gen).to(dev).masked_fill(mask, 0.0)
    wide = torch.randn(B, N, 384, generator=gen).to(dev)
    xs = [wide[..., 64:320], torch.randn(B, N, 64, generator=gen).to(dev, torch.bfloat16)]
    R = int(counts.max()) + 3
    grads = [torch.randn(B, R, x.shape[2], generator=gen).to(dev) for x in xs]
    out_c, gx_c, gs_c = _run_cluster(cb.cluster_tensors, xs, sm, ri, R, grads)
    out_t, gx_t, gs_t = _run_cluster(torch_cluster_tensors, xs, sm, ri, R, grads)
    assert rel(out_c[0], out_t[0]) <= FP32_TOL and rel(out_c[1], out_t[1]) <= BF16_TOL
    assert rel(gx_c[0], gx_t[0]) <= FP32_TOL and rel(gx_c[1], gx_t[1]) <= BF16_TOL
    assert rel(gs_c, gs_t) <= BF16_TOL
    assert torch.all(out_c[0][:, -3:] == 0)


# ------------------------------------------------------------------- clustered attention
def _attn_inputs(B, h, N, R, e, dtype, dev, seed, empty_image=False, transposed=False, ev=None):
    """q (B,h,N,e), k (B,h,R,e), v (B,h,R,ev) (ev defaults to e), suffix key mask, and an
    incoming gradient (B,h,N,ev)."""
    ev = e if ev is None else ev
    gen = torch.Generator().manual_seed(seed)
    if transposed:  # q as the usual view of a (B, N, h*e) projection
        q = torch.randn(B, N, h, e, generator=gen).to(dev, dtype).transpose(1, 2)
    else:
        q = torch.randn(B, h, N, e, generator=gen).to(dev, dtype)
    k = torch.randn(B, h, R, e, generator=gen).to(dev, dtype)
    v = torch.randn(B, h, R, ev, generator=gen).to(dev, dtype)
    lengths = torch.randint(1, R + 1, (B,), generator=gen)
    lengths[0] = R
    if empty_image and B > 1:
        lengths[-1] = 0
    kpm = (torch.arange(R)[None, :] >= lengths[:, None]).to(dev)
    go = torch.randn(B, h, N, ev, generator=gen).to(dev, dtype)
    return q, k, v, kpm, go


def _run_attn(fn, q, k, v, kpm, go, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, kpm, **kw)
    (out.float() * go.float()).sum().backward()
    return out, q.grad, k.grad, v.grad


ATTN_CASES = [
    # B, h, N, R, e (q / k head dim), ev (value head dim)
    (2, 8, 950, 160, 32, 32),     # C5-like
    (1, 8, 300, 64, 32, 32),
    (16, 2, 143, 37, 64, 64),
    (3, 4, 1000, 200, 64, 64),
    (2, 8, 3800, 630, 32, 32),    # DC5-like
    (4, 2, 77, 1, 32, 32),        # a single cluster
    (2, 2, 65, 65, 64, 64),       # as many clusters as pixels
    (2, 8, 3800, 500, 64, 32),    # Anchor DETR's joint row-column attention at DC5
    (3, 4, 257, 50, 64, 32),
    (4, 2, 77, 1, 64, 32),
]


@pytest.mark.parametrize("B,h,N,R,e,ev", ATTN_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clustered_attention_matches_torch(cb, dev, B, h, N, R, e, ev, dtype):
    q, k, v, kpm, go = _attn_inputs(B, h, N, R, e, dtype, dev, seed=B + N + R + e,
                                    empty_image=B >= 3, transposed=(N % 2 == 0), ev=ev)
    out_c, dq_c, dk_c, dv_c = _run_attn(cb.clustered_attention, q, k, v, kpm, go)
    out_t, dq_t, dk_t, dv_t = _run_attn(
        lambda *a: clustered_attention_torch(*a, dropout_p=0.0, scale=None), q, k, v, kpm, go)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    # With a single key the softmax is constant: dq and dk are exactly 0 and both backends
    # return rounding noise; compare that noise against the scale of the incoming gradient.
    floor = go.float().norm().item() if R == 1 else 0.0
    assert out_c.dtype == dtype and out_c.shape == (B, h, N, ev)
    assert rel(out_c, out_t) <= tol
    assert rel(dq_c, dq_t, floor) <= tol
    assert rel(dk_c, dk_t, floor) <= tol
    assert rel(dv_c, dv_t) <= tol
    lengths = (~kpm).sum(1)
    for b in range(B):
        if lengths[b] == 0:
            assert torch.all(out_c[b] == 0) and torch.all(dq_c[b] == 0)
        assert torch.all(dk_c[b, :, lengths[b]:] == 0) and torch.all(dv_c[b, :, lengths[b]:] == 0)


@pytest.mark.parametrize("nsplit", [1, 64])
@pytest.mark.parametrize("e,ev", [(32, 32), (64, 64), (64, 32)])
def test_clustered_attention_fixed_split_backward_and_scale(cb, dev, monkeypatch, e, ev, nsplit):
    """The dk/dv kernel without query splits (direct stores) and with more splits than query
    tiles (257 queries: splits are whole multiples of 64 queries, so 5 take them and 59 of the
    64 are empty and return at once), and a custom scale."""
    monkeypatch.setattr(cb, "DKDV_NSPLIT", nsplit)
    q, k, v, kpm, go = _attn_inputs(3, 4, 257, 50, e, torch.float32, dev, seed=7, ev=ev)
    out_c, dq_c, dk_c, dv_c = _run_attn(cb.clustered_attention, q, k, v, kpm, go, scale=0.3)
    out_t, dq_t, dk_t, dv_t = _run_attn(
        lambda *a: clustered_attention_torch(*a, dropout_p=0.0, scale=0.3), q, k, v, kpm, go)
    for a, b in ((out_c, out_t), (dq_c, dq_t), (dk_c, dk_t), (dv_c, dv_t)):
        assert rel(a, b) <= FP32_TOL


def test_clustered_attention_lse(cb, dev):
    q, k, v, kpm, _ = _attn_inputs(2, 2, 100, 20, 32, torch.float32, dev, seed=9)
    _, lse = cb.clustered_attention(q, k, v, kpm, return_lse=True)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    scores = scores.masked_fill(kpm[:, None, None, :], float("-inf"))
    assert rel(lse, torch.logsumexp(scores, -1)) <= FP32_TOL


# ----------------------------------------------------------------------------- dropout
M32 = 0xFFFFFFFF


def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _keep_mask_reference(B, H, N, R, p, seed):
    """Independent (torch int64) implementation of the kernels' dropout hash."""
    row = torch.arange(B * H * N, dtype=torch.int64)
    s0, s1 = seed & M32, seed >> 32
    r0, r1 = row & M32, row >> 32
    rk = _mix32(r0 ^ _mix32(s0 ^ _mix32((r1 + 0x68E31DA4) & M32))) ^ s1
    key = torch.arange(R, dtype=torch.int64)
    u = _mix32((rk[:, None] + key[None, :] * 0x9E3779B9) & M32)
    p32 = torch.tensor(p, dtype=torch.float32).item()
    thr = min(int(p32 * 4294967296.0 + 0.5), M32)
    return (u >= thr).reshape(B, H, N, R)


def test_dropout_mask_matches_reference_hash(cb, dev):
    B, H, N, R, p, seed = 2, 3, 50, 17, 0.25, 123456789012345
    keep = cb.dropout_keep_mask(B, H, N, R, p, seed, dev)
    assert torch.equal(keep.cpu(), _keep_mask_reference(B, H, N, R, p, seed))
    frac = keep.float().mean().item()
    assert abs(frac - 0.75) < 0.03


@pytest.mark.parametrize("dtype,e,ev", [(torch.float32, 32, 32), (torch.float32, 64, 64),
                                        (torch.bfloat16, 64, 64), (torch.float32, 64, 32),
                                        (torch.bfloat16, 64, 32)])
def test_clustered_attention_dropout_matches_masked_reference(cb, dev, dtype, e, ev):
    B, h, N, R, p, seed = 3, 4, 200, 40, 0.3, 987654321
    q, k, v, kpm, go = _attn_inputs(B, h, N, R, e, dtype, dev, seed=13, ev=ev)
    keep = cb.dropout_keep_mask(B, h, N, R, p, seed, dev)

    def reference(q, k, v, kpm):
        s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(e)
        s = s.masked_fill(kpm[:, None, None, :], float("-inf"))
        a = torch.softmax(s, -1) * keep / (1 - p)
        return (a @ v.float()).to(q.dtype)

    out_c, dq_c, dk_c, dv_c = _run_attn(cb.clustered_attention, q, k, v, kpm, go,
                                        dropout_p=p, seed=seed)
    out_t, dq_t, dk_t, dv_t = _run_attn(reference, q, k, v, kpm, go)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for a, b in ((out_c, out_t), (dq_c, dq_t), (dk_c, dk_t), (dv_c, dv_t)):
        assert rel(a, b) <= tol
    again = cb.clustered_attention(q, k, v, kpm, dropout_p=p, seed=seed)
    assert torch.equal(again, out_c.detach())


def test_clustered_attention_drawn_seed_comes_from_torch_cpu_generator(cb, dev):
    # Without seed= the kernels get a draw from torch's default CPU generator: the same
    # forward and backward as passing that draw explicitly, repeatable under manual_seed.
    B, h, N, R, e, p = 2, 4, 120, 30, 32, 0.3
    q, k, v, kpm, go = _attn_inputs(B, h, N, R, e, torch.float32, dev, seed=21)
    torch.manual_seed(5)
    expected_seed = int(torch.randint(0, 2 ** 62, (), dtype=torch.int64))
    torch.manual_seed(5)
    drawn = _run_attn(cb.clustered_attention, q, k, v, kpm, go, dropout_p=p)
    given = _run_attn(cb.clustered_attention, q, k, v, kpm, go, dropout_p=p, seed=expected_seed)
    assert torch.equal(drawn[0], given[0])
    for a, b in zip(drawn[1:], given[1:]):  # dk / dv may sum over query splits atomically
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    other = _run_attn(cb.clustered_attention, q, k, v, kpm, go, dropout_p=p)  # the next draw
    assert not torch.equal(other[0], drawn[0])


# ------------------------------------------------------------------ whole ENACT attention
@pytest.mark.parametrize("nhead,d,mode,numerics,taps", [
    (8, 256, "paper_regions", "standard", "paper"),
    (4, 256, "paper_regions", "standard", "paper"),
    (8, 256, "official_fixed_chunk", "standard", "paper"),
    (8, 256, "paper_regions", "official", "paper"),
    (8, 256, "paper_regions", "standard", "code"),        # the fused path with 6 sigma - 1 taps
    (8, 256, "official_fixed_chunk", "official", "code")])  # the official code's clustering
def test_enact_attention_module_cuda_matches_torch(cb, dev, monkeypatch, nhead, d, mode,
                                                   numerics, taps):
    torch.manual_seed(0)
    B, H, W = 4, 15, 21
    m_cuda = enact_cuda.ENACTAttention(d, nhead, sigma=3, impl="cuda", mode=mode,
                                       numerics=numerics, gauss_taps=taps).to(dev)
    m_torch = enact_cuda.ENACTAttention(d, nhead, sigma=3, impl="torch", mode=mode,
                                        numerics=numerics, gauss_taps=taps).to(dev)
    kernel_calls = []
    if mode == "official_fixed_chunk":  # the chunks go through the clustering kernel
        kernel = cb.cluster_tensors
        monkeypatch.setattr(cb, "cluster_tensors", lambda *a: kernel_calls.append(1) or kernel(*a))
    m_torch.load_state_dict(m_cuda.state_dict())
    src, pos, mask, go = layer_inputs(B, H, W, d, dev, seed=1)
    outs = []
    for m in (m_cuda, m_torch):
        s = src.clone().requires_grad_(True)
        out = m(s, pos, mask, (H, W))
        (out * go).sum().backward()
        outs.append((out, s.grad, {n: p.grad.clone() for n, p in m.named_parameters()}))
    assert_results_close(*outs)
    assert torch.equal(m_cuda.last_stats["clusters_per_image"],
                       m_torch.last_stats["clusters_per_image"])
    if mode == "official_fixed_chunk":  # one clustering kernel call, some chunks front-trimmed
        assert len(kernel_calls) == 1
        _, _, counts = torch_regions(m_torch.information, mask, 3, gauss_taps=taps)
        index, _ = enact_cuda.fixed_chunks(counts, mask, H * W)
        assert (index[:, 0] == -1).any()


def test_enact_attention_module_cuda_bf16_autocast(cb, dev):
    torch.manual_seed(0)
    B, H, W, d = 2, 25, 38, 256
    m = enact_cuda.ENACTAttention(d, 8, sigma=3, impl="cuda").to(dev)
    src = torch.randn(B, H * W, d, device=dev, requires_grad=True)
    pos = torch.randn(B, H * W, d, device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = m(src, pos, None, (H, W))
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(src.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ------------------------------------------------------------- fused clustering path
FUSED_CASES = [
    # B, H, W, sigma, row_breaks, padded, key_d, tensor dims, alias, dtype
    (4, 13, 17, 3, False, True, 32, (32, 32), True, torch.float32),
    (4, 13, 17, 3, False, True, 32, (32,), False, torch.float32),          # keys not clustered
    (8, 25, 38, 3, False, True, 256, (256, 256), True, torch.float32),     # C5
    (2, 50, 76, 3, False, True, 256, (256, 256), True, torch.float32),     # DC5
    (16, 9, 11, 2, True, True, 64, (64, 64), True, torch.float32),         # B=16, empty image
    (3, 10, 14, 1, False, True, 256, (256, 256), True, torch.bfloat16),
    (2, 11, 13, 3, False, True, 128, (128,), True, torch.float16),
    (3, 12, 10, 3, True, False, 64, (64, 64, 128), False, torch.float32),  # Anchor-like
    (2, 7, 9, 1, False, True, 30, (30, 6), True, torch.float32),           # scalar path
    (1, 150, 140, 3, False, True, 64, (64, 64), True, torch.float32),      # global scratch
]


def _fused_reference(cb, keys, tensors, w, b, mask, sigma, row_breaks, hw, ri_fixed=None,
                     taps="paper"):
    """Torch backend chain on float32 logits; region_index may be fixed to the fused one
    (boundaries within rounding of a zero curvature may legitimately differ)."""
    z = torch.nn.functional.linear(keys.float(), w, b).squeeze(-1)
    info = information_from_logits(z, mask)
    sm, ri, cnt = torch_regions(info, mask, sigma, row_breaks, hw, gauss_taps=taps)
    if ri_fixed is not None:
        ri = ri_fixed
        cnt = (ri.max(1).values + 1).clamp_min(0)
    R = max(int(cnt.max()), 1)
    outs = torch_cluster_tensors(tensors, sm, ri, R)
    return info, sm, ri, cnt, outs


@pytest.mark.parametrize("B,H,W,sigma,row_breaks,padded,kd,dims,alias,dtype,taps", [
    *(case + ("paper",) for case in FUSED_CASES),
    FUSED_CASES[0] + ("code",), FUSED_CASES[3] + ("code",), FUSED_CASES[6] + ("code",)])
def test_fused_clustering_matches_torch(cb, dev, B, H, W, sigma, row_breaks, padded, kd, dims,
                                        alias, dtype, taps):
    gen = torch.Generator().manual_seed(B * 7 + H * W + kd + len(dims))
    N = H * W
    mask = make_mask(B, H, W, dev, gen=gen, empty_image=padded and B > 8) if padded else None
    keys0 = torch.randn(B, N, kd, generator=gen).to(dev, dtype)
    w0 = (torch.randn(1, kd, generator=gen) * (3.0 / math.sqrt(kd))).to(dev)
    b0 = torch.randn(1, generator=gen).to(dev)
    others = [torch.randn(B, N, dd, generator=gen).to(dev, dtype)
              for dd in (dims[1:] if alias else dims)]
    grads = [torch.randn(B, 1, dd, generator=gen) for dd in dims]  # broadcast over R below

    def run(fused, ri_fixed=None):
        keys = keys0.clone().requires_grad_(True)
        ws = w0.clone().requires_grad_(True)
        bs = b0.clone().requires_grad_(True)
        oth = [t.clone().requires_grad_(True) for t in others]
        tensors = ([keys] if alias else []) + oth
        if fused:
            assert cb.fused_supported(keys, tensors, sigma)
            st = cb.fused_begin(keys, ws, bs, mask, sigma, row_breaks, (H, W), gauss_taps=taps)
            outs, kpm = cb.fused_finish(st, keys, tensors)
            p = st.pending
            extra = (p.information, p.smoothed, p.region_index, p.counts, p.stats, kpm,
                     p.r_max())
        else:
            info, sm, ri, cnt, outs = _fused_reference(cb, keys, tensors, ws, bs, mask, sigma,
                                                       row_breaks, (H, W), ri_fixed, taps)
            extra = (info, sm, ri, cnt)
        R = outs[0].shape[1]
        loss = sum((o.float() * g.to(dev).expand(B, R, -1)).sum() for o, g in zip(outs, grads))
        gr = torch.autograd.grad(loss, [keys, ws, bs] + oth)
        return outs, extra, gr

    outs_f, (info_f, sm_f, ri_f, cnt_f, stats_f, kpm_f, rmax), gr_f = run(True)
    _, (info_t, sm_t, ri_t, cnt_t), _ = run(False)
    assert rel(info_f, info_t) <= FP32_TOL and rel(sm_f, sm_t) <= FP32_TOL
    assert_same_regions(ri_f, ri_t, sm_t.detach(), mask, max_ambiguous=4 * B)
    assert torch.equal(cnt_f, (ri_f.max(1).values + 1).clamp_min(0))
    R = max(int(cnt_f.max()), 1)
    assert rmax == R and kpm_f.shape == (B, R)
    assert torch.equal(kpm_f, torch.arange(R, device=dev)[None, :] >= cnt_f[:, None])
    valid = (~mask).sum(1).float() if mask is not None else torch.full((B,), float(N), device=dev)
    assert torch.equal(stats_f[0], cnt_f.float()) and torch.equal(stats_f[1], valid)
    assert torch.allclose(stats_f[2], valid / cnt_f.float().clamp_min(1.0))
    if mask is not None:
        assert torch.all(ri_f[mask] == -1) and torch.all(info_f[mask] == 0)

    outs_t, _, gr_t = run(False, ri_fixed=ri_f)
    tol = FP32_TOL if dtype == torch.float32 else BF16_TOL
    for of, ot in zip(outs_f, outs_t):
        assert of.dtype == dtype and of.shape == ot.shape
        assert rel(of, ot) <= tol
        assert torch.all(of[kpm_f] == 0)
    gtol = 5 * FP32_TOL if dtype == torch.float32 else 3 * BF16_TOL
    names = ["keys", "W_prob.weight", "W_prob.bias"] + [f"tensor{i}" for i in range(len(others))]
    for name, a, b_ in zip(names, gr_f, gr_t):
        # grad bias is exactly zero (a softmax is shift invariant): compare at grad W's scale
        floor = gr_t[1].norm().item() if name == "W_prob.bias" else 0.0
        assert rel(a, b_, floor) <= gtol, name
    if mask is not None:
        assert torch.all(gr_f[0][mask] == 0)


def test_fused_clustering_adversarial_and_double_backward(cb, dev):
    """Constant logits (flat information), an image with one valid pixel, a fully padded
    image; two backward passes through one graph accumulate equal gradients."""
    B, H, W, d = 4, 6, 9, 32
    N = H * W
    mask = torch.ones(B, H, W, dtype=torch.bool, device=dev)
    mask[0] = False
    mask[1, 0, 0] = False
    mask[2, 0, :3] = False
    mask = mask.reshape(B, N)  # image 3 fully padded
    keys = torch.randn(B, N, d, device=dev, requires_grad=True)
    w = torch.zeros(1, d, device=dev, requires_grad=True)  # z = 0 everywhere
    b = torch.zeros(1, device=dev, requires_grad=True)
    st = cb.fused_begin(keys, w, b, mask, 3)
    (ck, cv), kpm = cb.fused_finish(st, keys, (keys, keys * 2))
    cnt = st.pending.counts
    assert cnt[1].item() == 1 and cnt[3].item() == 0 and torch.all(st.pending.region_index[3] == -1)
    assert torch.all(ck[3] == 0) and bool(kpm[3].all()) and not bool(kpm[1, 0])
    # one valid pixel: its cluster is the pixel itself
    assert torch.allclose(ck[1, 0], keys[1, 0].detach())
    loss = ck.square().sum() + cv.sum()
    g1 = torch.autograd.grad(loss, (keys, w, b), retain_graph=True)
    g2 = torch.autograd.grad(loss, (keys, w, b))
    assert torch.equal(g1[0], g2[0])  # per-pixel: deterministic
    for a, c in zip(g1, g2):  # grad W / bias: atomics in any order
        assert torch.isfinite(a).all() and torch.allclose(a, c, rtol=1e-5, atol=1e-6)
    assert torch.all(g1[0][mask] == 0)


def test_enact_clustering_module_cuda_matches_torch(cb, dev):
    """ENACTClustering (info keys separate from the clustered tensors) on the fused path."""
    torch.manual_seed(3)
    B, H, W, d = 3, 11, 14, 64
    m_cuda = enact_cuda.ENACTClustering(d, sigma=2, impl="cuda", row_breaks=True).to(dev)
    m_torch = enact_cuda.ENACTClustering(d, sigma=2, impl="torch", row_breaks=True).to(dev)
    m_torch.load_state_dict(m_cuda.state_dict())
    gen = torch.Generator().manual_seed(4)
    mask = make_mask(B, H, W, dev, gen=gen)
    xs = [torch.randn(B, H * W, d, generator=gen).to(dev) for _ in range(4)]
    res = []
    for m in (m_cuda, m_torch):
        ins = [x.clone().requires_grad_(True) for x in xs]
        out = m(ins[0], tuple(ins[1:]), mask, (H, W))
        loss = sum((v * (i + 1)).sum() + v.square().sum() for i, v in enumerate(out.values))
        loss.backward()
        res.append((out, [x.grad for x in ins], m.W_prob.weight.grad.clone()))
    (oc, gc, wc), (ot, gt, wt) = res
    assert torch.equal(oc.region_index, ot.region_index)
    assert torch.equal(oc.key_padding_mask, ot.key_padding_mask)
    for a, b_ in zip(oc.values, ot.values):
        assert rel(a, b_) <= FP32_TOL
    for a, b_ in zip(gc, gt):
        assert rel(a, b_) <= 5 * FP32_TOL
    assert rel(wc, wt) <= 5 * FP32_TOL
    assert torch.equal(m_cuda.last_stats["clusters_per_image"], m_torch.last_stats["clusters_per_image"])
    assert torch.equal(m_cuda.last_stats["pixels_per_image"], m_torch.last_stats["pixels_per_image"])


def test_clusters_without_the_count_read_equal_exact_ones(cb, dev):
    """ENACTClustering(skip_count_read=True): N rows without autograd; in training, rows
    guessed from the last training forward's R_max (ceil(1.25 R_max) + 8); in both, the exact
    clusters first, zeros and a True mask after each image's count."""
    torch.manual_seed(5)
    B, H, W, d = 3, 12, 17, 64
    m = enact_cuda.ENACTClustering(d, sigma=3, impl="cuda", row_breaks=False).to(dev)
    gen = torch.Generator().manual_seed(6)
    mask = make_mask(B, H, W, dev, gen=gen)
    keys = torch.randn(B, H * W, d, generator=gen).to(dev)
    vals = torch.randn(B, H * W, 32, generator=gen).to(dev)
    exact = m(keys, (keys, vals), mask, (H, W))
    R = exact.key_padding_mask.shape[1]
    with torch.no_grad():
        wide = m(keys, (keys, vals), mask, (H, W), skip_count_read=True)
    guessed = m(keys, (keys, vals), mask, (H, W), skip_count_read=True)
    rows = math.ceil(R / (H * W) * 1.25 * (H * W)) + 8  # the documented formula, as computed
    assert R < rows < H * W
    assert wide.key_padding_mask.shape == (B, H * W)
    assert guessed.key_padding_mask.shape == (B, rows)
    assert not bool(m.count_overflow())
    for got in (wide, guessed):
        assert torch.equal(got.key_padding_mask[:, :R], exact.key_padding_mask)
        assert got.key_padding_mask[:, R:].all()
        for a, b_ in zip(got.values, exact.values):
            assert torch.equal(a[:, :R], b_)
            assert not a[:, R:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_enact_attention_eval_without_grad_equals_with_grad(cb, dev, dtype):
    """The no-grad forward (clusters at N rows, no wait for the GPU when the CUDA kernel
    attends) gives the same output as the autograd forward (clusters at R_max)."""
    torch.manual_seed(7)
    B, H, W, d = 3, 19, 26, 256
    m = enact_cuda.ENACTAttention(d, 8, sigma=3, impl="cuda").to(dev).eval()
    gen = torch.Generator().manual_seed(8)
    src = torch.randn(B, H * W, d, generator=gen).to(dev, dtype)
    pos = torch.randn(B, H * W, d, generator=gen).to(dev, dtype)
    mask = make_mask(B, H, W, dev, gen=gen)
    m = m.to(dtype)
    with_grad = m(src.requires_grad_(True), pos, mask, (H, W)).detach()
    with torch.no_grad():
        without = m(src, pos, mask, (H, W))
    assert enact_cuda.uses_cuda_kernel(src, d // 8, "cuda")
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert rel(without.float(), with_grad.float()) <= tol


# ------------------------------------------------------------- training without the R_max wait
# The attentions the guessed rows are checked with: (impl, bf16 autocast) of the CUDA kernel in
# fp32, and of torch's SDPA, which impl="auto" takes under bf16 autocast.
NO_WAIT_ATTENTIONS = pytest.mark.parametrize("impl,amp", [("cuda", False), ("auto", True)],
                                             ids=["kernel_fp32", "sdpa_bf16"])


@pytest.mark.parametrize("e,ev", [(32, 32), (64, 32)])
def test_attention_backward_with_a_key_count_hint_is_unchanged(cb, dev, monkeypatch, e, ev):
    """Keys allocated at N rows (the no-wait layout) with a host hint of the real key count:
    the dk/dv work split follows the hint, the gradients do not change (they are checked
    against the torch backend, and against the same call without the hint: its other split
    adds the dk / dv partial sums in another order, ~4e-7 apart on an H200)."""
    monkeypatch.setattr(cb, "DKDV_NSPLIT", 0)
    gen = torch.Generator().manual_seed(21)
    B, h, N = 2, 8, 900
    counts = torch.tensor([150, 97])
    q, k, v = (torch.randn(B, h, N, dim, generator=gen).to(dev) for dim in (e, e, ev))
    kpm = (torch.arange(N)[None, :] >= counts[:, None]).to(dev)
    go = torch.randn(B, h, N, ev, generator=gen).to(dev)
    plain = _run_attn(cb.clustered_attention, q, k, v, kpm, go)
    hinted = _run_attn(cb.clustered_attention, q, k, v, kpm, go, key_count_hint=lambda: 150)
    ref = _run_attn(clustered_attention_torch, q, k, v, kpm, go)
    for a, b_, r in zip(hinted, plain, ref):
        assert rel(a, b_) <= FP32_TOL
        assert rel(a, r) <= 5 * FP32_TOL
    assert not hinted[2][:, :, 150:].any() and not hinted[3][:, :, 150:].any()


@pytest.mark.parametrize("numerics", ["standard", "official"])
@NO_WAIT_ATTENTIONS
def test_enact_attention_training_without_waiting_equals_waiting(cb, dev, numerics, impl, amp):
    """wait_for_counts=False: the first training step reads the cluster count (no history);
    then the count is not read back and the clusters are rows guessed from the last R_max (W_k
    sees them), with the same output and gradients as the waiting layer each time; the count
    hint reaches the host once the GPU is done. Whatever attends to the clusters: the CUDA
    kernel (fp32), or torch's SDPA (impl auto under bf16 autocast)."""
    torch.manual_seed(9)
    B, H, W, d = 3, 19, 26, 256
    waiting = enact_cuda.ENACTAttention(d, 8, sigma=3, impl=impl, numerics=numerics).to(dev)
    no_wait = enact_cuda.ENACTAttention(d, 8, sigma=3, impl=impl, numerics=numerics,
                                        wait_for_counts=False).to(dev)
    no_wait.load_state_dict(waiting.state_dict())
    src, pos, mask, go = layer_inputs(B, H, W, d, dev, seed=10)
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        assert enact_cuda.uses_cuda_kernel(src, d // 8, impl) is not amp
    for step in range(2):
        results, rows = [], []
        for m in (waiting, no_wait):
            hook = m.W_k.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
            m.zero_grad(set_to_none=True)
            s = src.clone().requires_grad_(True)
            with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                out = m(s, pos, mask, (H, W))
            (out.float() * go).sum().backward()
            hook.remove()
            results.append((out.detach(), s.grad,
                            {n: p.grad.clone() for n, p in m.named_parameters()}))
        R = int(waiting.last_stats["clusters_per_image"].max())
        guess = math.ceil(R / (H * W) * 1.25 * (H * W)) + 8
        assert rows == [R, R if step == 0 else guess] and R < guess < H * W
        assert waiting.key_count_hint is None
        assert (no_wait.key_count_hint is None) == (step == 0)
        overflow = enact_cuda.cluster_overflow(no_wait)
        assert (overflow is None) == (step == 0)  # an exact count cannot fall short; a guess can
        assert overflow is None or not bool(overflow)
        torch.cuda.synchronize()
        assert step == 0 or no_wait.key_count_hint() == R
        assert_results_close(results[1], results[0], tol=BF16_TOL if amp else FP32_TOL)
        assert torch.equal(no_wait.last_stats["clusters_per_image"],
                           waiting.last_stats["clusters_per_image"])


def test_a_short_guess_is_flagged_and_exact_counts_redo_it(cb, dev):
    """Guessed rows below R_max: cluster_overflow says so (the output is then wrong), and the
    same forward under exact_cluster_counts reads the count back and equals the waiting
    layer."""
    torch.manual_seed(13)
    B, H, W, d = 2, 15, 22, 256
    waiting = enact_cuda.ENACTAttention(d, 8, sigma=3, impl="cuda").to(dev)
    no_wait = enact_cuda.ENACTAttention(d, 8, sigma=3, impl="cuda", wait_for_counts=False).to(dev)
    no_wait.load_state_dict(waiting.state_dict())
    src, pos, mask, _ = layer_inputs(B, H, W, d, dev, seed=14)
    ref = waiting(src, pos, mask, (H, W))
    R = int(waiting.last_stats["clusters_per_image"].max())
    no_wait._shares.append(0.2 * R / (H * W))  # a history that guesses 0.25 R + 8 rows
    short = no_wait(src, pos, mask, (H, W))
    assert math.ceil(0.25 * R) + 8 < R
    assert bool(enact_cuda.cluster_overflow(no_wait))
    assert rel(short, ref) > 1e-2
    with enact_cuda.exact_cluster_counts(no_wait):
        assert no_wait.wait_for_counts
        redone = no_wait(src, pos, mask, (H, W))
    assert not no_wait.wait_for_counts
    assert enact_cuda.cluster_overflow(no_wait) is None
    assert rel(redone, ref) <= FP32_TOL
    assert max(no_wait._shares) == R / (H * W)  # the short forward's R_max, then the redo's


def test_engine_step_redoes_an_overflowed_step_as_the_waiting_step(cb, dev):
    """detr_common.engine.train_step with a short guess: the step is redone with exact counts,
    and the weights after it are those of the waiting layer's step."""
    from detr_common.data.collate import ImageBatch
    from detr_common.engine import train_step

    class Net(nn.Module):  # one ENACT layer on a fixed (B, N, d) input; "images" unused
        def __init__(self, wait):
            super().__init__()
            self.attn = enact_cuda.ENACTAttention(d, 8, sigma=3, impl="cuda",
                                                  wait_for_counts=wait)

        def forward(self, batch):
            return {"out": self.attn(src, pos, mask, (H, W))}

    class Criterion(nn.Module):
        weight_dict = {"loss": 1.0}

        def forward(self, outputs, targets):
            return {"loss": (outputs["out"] * go).sum()}

    torch.manual_seed(15)
    B, H, W, d = 2, 15, 22, 256
    src, pos, mask, go = layer_inputs(B, H, W, d, dev, seed=16)
    batch = ImageBatch(torch.zeros(B, 3, 4, 4, device=dev),
                       torch.zeros(B, 4, 4, dtype=torch.bool, device=dev))
    nets = [Net(True).to(dev), Net(False).to(dev)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1].attn._shares.append(0.01)  # guesses far fewer rows than R_max
    redone = []
    for net in nets:
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        redone.append(train_step(net, Criterion(), opt, batch, [{}] * B, clip_max_norm=0.0)[2])
    assert redone == [False, True]
    for (name, a), b_ in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(a, b_, rtol=1e-4, atol=1e-6), name


@NO_WAIT_ATTENTIONS
def test_anchor_detr_layer_training_without_waiting_equals_waiting(cb, dev, impl, amp):
    """Anchor DETR's ENACT layer (ENACTClustering + the joint row-column attention, (64, 32)
    head dims) with wait_for_counts=False: the count read in the first training step, guessed
    rows in the second, the same output and gradients as the waiting layer; the attention
    through the CUDA kernel (fp32) or torch's SDPA (impl auto under bf16 autocast)."""
    from anchor_detr.layers import EncoderLayerSpatial
    from anchor_detr.rcda import grid_mask
    torch.manual_seed(11)
    B, H, W, E = 2, 17, 23, 256
    layers = [EncoderLayerSpatial(E, 8, 512, 0.0, enact=True, sigma=3, enact_impl=impl,
                                  wait_for_counts=wait).to(dev).train() for wait in (True, False)]
    layers[1].load_state_dict(layers[0].state_dict())
    gen = torch.Generator().manual_seed(12)
    src = torch.randn(B, H, W, E, generator=gen).to(dev)
    pe_row = torch.randn(B, W, E, generator=gen).to(dev)
    pe_col = torch.randn(B, H, E, generator=gen).to(dev)
    mask = make_mask(B, H, W, dev, gen=gen).reshape(B, H, W)
    grid = grid_mask(mask, mask.shape, src.dtype, dev)
    go = torch.randn(B, H, W, E, generator=gen).to(dev)
    for step in range(2):  # the count read (no history), then guessed rows
        results = []
        for layer in layers:
            layer.zero_grad(set_to_none=True)
            s = src.clone().requires_grad_(True)
            with torch.autocast("cuda", torch.bfloat16, enabled=amp):
                out = layer(s, grid, pe_row, pe_col)
            (out.float() * go).sum().backward()
            results.append((out.detach(), s.grad,
                            {n: p.grad.clone() for n, p in layer.named_parameters()}))
        assert layers[0].ENACT.key_count_hint is None
        assert (layers[1].ENACT.key_count_hint is None) == (step == 0)
        overflow = enact_cuda.cluster_overflow(layers[1])
        assert (overflow is None) == (step == 0)  # an exact count cannot fall short; a guess can
        assert overflow is None or not bool(overflow)
        tol = BF16_TOL if amp else FP32_TOL
        assert_results_close(results[1], results[0], src_tol=5 * tol,
                             rounding_zero=("ENACT.W_prob.bias",), tol=tol)
        torch.cuda.synchronize()  # R_max reaches the host: the next step guesses from it
