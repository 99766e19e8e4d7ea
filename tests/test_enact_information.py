"""enact_cuda information module, Gaussian taps and regions (spec §1.2-§1.5), CPU."""
import math

import pytest
import torch

import enact_cuda
from enact_cuda import (gaussian_taps, information_from_logits, regions, regions_from_steps,
                        self_information)


# ---------------------------------------------------------------- slow, obvious references
def ref_information(z, mask):
    """Per image: softmax over the valid pixels, +1e-8, -p log2 p; 0 on padding."""
    B, N = z.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    for b in range(B):
        idx = [i for i in range(N) if mask is None or not mask[b, i]]
        if not idx:
            continue
        zs = [float(z[b, i]) for i in idx]
        m = max(zs)
        ex = [math.exp(v - m) for v in zs]
        tot = sum(ex)
        for i, e in zip(idx, ex):
            p = e / tot + 1e-8
            out[b, i] = -p * math.log(p) / math.log(2.0)
    return out


def ref_regions(info, mask, sigma, row_breaks=False, hw=None, half=None):
    """Per image, on plain python floats: compact valid pixels, smooth (taps t = -half..half,
    default 3 sigma), curvature, step, scan."""
    B, N = info.shape
    half = 3 * sigma if half is None else half
    taps = {t: math.exp(-t * t / (2.0 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
            for t in range(-half, half + 1)}
    smoothed = torch.zeros(B, N, dtype=torch.float64)
    region_index = torch.full((B, N), -1, dtype=torch.int64)
    counts = []
    for b in range(B):
        idx = [i for i in range(N) if mask is None or not mask[b, i]]
        x = [float(info[b, i]) for i in idx]
        L = len(x)
        sm = [sum(g * x[j + t] for t, g in taps.items() if 0 <= j + t < L) for j in range(L)]

        def at(j):
            return sm[j] if 0 <= j < L else 0.0

        step = [2 * sm[j] - at(j - 1) - at(j + 1) > 0 for j in range(L)]
        width = None
        if row_breaks:
            W = hw[1]
            width = max(1, sum(1 for i in range(W) if mask is None or not mask[b, i]))
        r = -1
        for j in range(L):
            if j == 0 or step[j] != step[j - 1] or (width is not None and j % width == 0):
                r += 1
            region_index[b, idx[j]] = r
            smoothed[b, idx[j]] = sm[j]
        counts.append(r + 1)
    return smoothed, region_index, torch.tensor(counts)


def box_mask(B, H, W, sizes):
    """Bottom/right padding: image b is valid on [0, h_b) x [0, w_b)."""
    m = torch.ones(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        m[b, :h, :w] = False
    return m.flatten(1)


# ---------------------------------------------------------------- Gaussian taps
def test_gaussian_taps_hand_values():
    g1 = gaussian_taps(1, dtype=torch.float64)
    half = torch.tensor([0.3989422804, 0.2419707245, 0.0539909665, 0.0044318484],
                        dtype=torch.float64)  # 1/sqrt(2 pi) * exp(-t^2/2), t = 0..3
    assert g1.shape == (7,)
    assert torch.allclose(g1[3:], half, atol=1e-10)
    assert torch.allclose(g1.flip(0), g1)
    g3 = gaussian_taps(3.0, dtype=torch.float64)
    assert g3.shape == (19,)
    assert torch.allclose(g3[9], torch.tensor(0.1329807601, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(g3[18], torch.tensor(0.0014772828, dtype=torch.float64), atol=1e-10)
    # not renormalised
    assert torch.allclose(g3.sum(), torch.tensor(0.9985340010, dtype=torch.float64), atol=1e-9)
    assert gaussian_taps(5).shape == (31,)


def test_gaussian_taps_of_the_official_code():
    """gauss_taps="code": t = -(3 sigma - 1)..3 sigma - 1, the same unnormalised values (spec
    §1.3: 17 taps summing to 0.99558 for sigma 3, 29 summing to 0.99633 for sigma 5)."""
    for sigma, n, total in ((3, 17, 0.99558), (5, 29, 0.99633)):
        code = gaussian_taps(sigma, dtype=torch.float64, gauss_taps="code")
        assert code.shape == (n,)
        assert torch.allclose(code, gaussian_taps(sigma, dtype=torch.float64)[1:-1])
        assert torch.allclose(code.sum(), torch.tensor(total, dtype=torch.float64), atol=5e-6)
    assert gaussian_taps(1, gauss_taps="code").shape == (5,)
    with pytest.raises(ValueError, match="gauss_taps must be one of paper, code"):
        gaussian_taps(3, gauss_taps="official")
    with pytest.raises(ValueError, match="gauss_taps"):
        regions(torch.rand(1, 8), None, 3, gauss_taps="6s-1")


@pytest.mark.parametrize("bad", [2.5, 0, -1, True, "3", None])
def test_sigma_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="sigma"):
        gaussian_taps(bad)
    with pytest.raises(ValueError, match="sigma"):
        regions(torch.rand(1, 8), None, bad)


# ---------------------------------------------------------------- information
def test_information_matches_reference_with_padding():
    torch.manual_seed(0)
    z = torch.randn(3, 12, dtype=torch.float64) * 3
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1, 7:] = True
    mask[2] = True  # fully padded image: zeros, no NaN
    mask[0, 3] = True  # a hole in the middle
    got = information_from_logits(z, mask)
    assert torch.allclose(got, ref_information(z, mask), atol=1e-14)
    assert torch.all(got[mask] == 0)
    assert torch.isfinite(got).all()
    # no mask = all valid
    assert torch.allclose(information_from_logits(z, None), ref_information(z, None), atol=1e-14)


def test_information_low_precision_logits_are_computed_in_float32():
    z = torch.randn(2, 10)
    got = information_from_logits(z.bfloat16(), None)
    assert got.dtype == torch.float32
    assert torch.allclose(got, information_from_logits(z.bfloat16().float(), None))


def test_self_information_is_linear_then_information():
    torch.manual_seed(1)
    keys = torch.randn(2, 9, 5, dtype=torch.float64)
    w = torch.randn(1, 5, dtype=torch.float64)
    bias = torch.randn(1, dtype=torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 6:] = True
    z = (keys * w[0]).sum(-1) + bias
    assert torch.allclose(self_information(keys, w, bias, mask), ref_information(z, mask),
                          atol=1e-14)
    # the bias cancels in the softmax
    assert torch.allclose(self_information(keys, w, None, mask), ref_information(z, mask),
                          atol=1e-14)


# ---------------------------------------------------------------- region scan on given steps
def test_regions_from_steps_image_starts_length_one_and_all_equal():
    step = torch.tensor([[0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 0],    # all equal: one region, starts at 0 again
                         [1, 0, 1, 0, 1, 0]],   # every pixel its own region
                        dtype=torch.bool)
    ridx, counts = regions_from_steps(step, None)
    assert torch.equal(ridx, torch.tensor([[0, 0, 1, 1, 1, 2],
                                           [0, 0, 0, 0, 0, 0],
                                           [0, 1, 2, 3, 4, 5]]))
    assert torch.equal(counts, torch.tensor([3, 1, 6]))


def test_regions_from_steps_skip_padding_and_fully_padded_image():
    step = torch.tensor([[0, 1, 0, 1, 0, 1],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = torch.tensor([[0, 0, 1, 0, 0, 1],
                         [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    ridx, counts = regions_from_steps(step, mask)
    # compact sequence of image 0 is [0, 1, 1, 0]: the padded pixel between does not cut
    assert torch.equal(ridx, torch.tensor([[0, 1, -1, 1, 2, -1],
                                           [-1, -1, -1, -1, -1, -1]]))
    assert torch.equal(counts, torch.tensor([3, 0]))


def test_regions_from_steps_fully_padded_rows_and_row_breaks():
    H, W = 3, 4
    mask = box_mask(2, H, W, [(2, 3), (3, 4)])  # image 0: bottom row and right column padded
    step = torch.zeros(2, H * W, dtype=torch.bool)
    ridx, counts = regions_from_steps(step, mask)
    exp0 = torch.tensor([0, 0, 0, -1, 0, 0, 0, -1, -1, -1, -1, -1])
    assert torch.equal(ridx[0], exp0)
    assert torch.equal(ridx[1], torch.zeros(12, dtype=torch.int64))
    assert torch.equal(counts, torch.tensor([1, 1]))
    ridx, counts = regions_from_steps(step, mask, row_breaks=True, hw=(H, W))
    assert torch.equal(ridx[0], torch.tensor([0, 0, 0, -1, 1, 1, 1, -1, -1, -1, -1, -1]))
    assert torch.equal(ridx[1], torch.arange(3).repeat_interleave(4))
    assert torch.equal(counts, torch.tensor([2, 3]))
    # a step change and a row start at the same pixel make one start, not two
    step[0, 4] = True
    step[0, 5] = True
    ridx, _ = regions_from_steps(step, mask, row_breaks=True, hw=(H, W))
    assert torch.equal(ridx[0], torch.tensor([0, 0, 0, -1, 1, 1, 2, -1, -1, -1, -1, -1]))


def test_row_breaks_need_matching_hw():
    info = torch.rand(1, 12)
    with pytest.raises(ValueError, match="hw"):
        regions(info, None, 1, row_breaks=True)
    with pytest.raises(ValueError, match="hw"):
        regions(info, None, 1, row_breaks=True, hw=(5, 5))


# ---------------------------------------------------------------- full regions vs reference
CASES = [
    ("no_mask", 2, 5, 7, None),
    ("bottom_right", 3, 6, 9, [(6, 9), (4, 5), (1, 3)]),
    ("single_pixel_and_empty", 3, 4, 5, [(1, 1), (0, 0), (4, 2)]),
    ("random_holes", 2, 7, 6, "random"),
]


@pytest.mark.parametrize("name,B,H,W,sizes", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("sigma", [1, 2, 3])
@pytest.mark.parametrize("row_breaks", [False, True])
def test_regions_match_reference(name, B, H, W, sizes, sigma, row_breaks):
    g = torch.Generator().manual_seed(17 * sigma + len(name) + 100 * row_breaks)
    info = torch.rand(B, H * W, generator=g, dtype=torch.float64) * 0.05
    if sizes is None:
        mask = None
    elif sizes == "random":
        mask = torch.rand(B, H * W, generator=g) < 0.3
    else:
        mask = box_mask(B, H, W, sizes)
    if mask is not None:
        info = info.masked_fill(mask, 0.0)
    sm, ridx, counts = regions(info, mask, sigma, row_breaks=row_breaks, hw=(H, W))
    rsm, rridx, rcounts = ref_regions(info, mask, sigma, row_breaks, (H, W))
    assert torch.allclose(sm, rsm, atol=1e-15)
    assert torch.equal(ridx, rridx)
    assert torch.equal(counts, rcounts)
    assert ridx.dtype == torch.int64 and counts.dtype == torch.int64


@pytest.mark.parametrize("sigma", [1, 3])
def test_regions_with_the_official_codes_taps_match_reference(sigma):
    g = torch.Generator().manual_seed(5 + sigma)
    B, H, W = 4, 9, 13
    info = torch.rand(B, H * W, generator=g, dtype=torch.float64) * 0.05
    mask = box_mask(B, H, W, [(9, 13), (5, 7), (9, 4), (2, 13)])
    info = info.masked_fill(mask, 0.0)
    sm, ridx, counts = regions(info, mask, sigma, gauss_taps="code")
    rsm, rridx, rcounts = ref_regions(info, mask, sigma, half=3 * sigma - 1)
    assert torch.allclose(sm, rsm, atol=1e-15)
    assert torch.equal(ridx, rridx) and torch.equal(counts, rcounts)
    # and the paper's taps smooth differently (the test sees the switch)
    assert not torch.allclose(regions(info, mask, sigma)[0], sm, atol=1e-6)


def test_regions_of_a_single_spike_hand_computed():
    """sigma=1 spike at 10: curvature > 0 only at 9..11 (the bump); exactly 0 far away -> step 0."""
    info = torch.zeros(1, 21)
    info[0, 10] = 1.0
    sm, ridx, counts = regions(info, None, 1)
    assert torch.allclose(sm[0, 7:14], gaussian_taps(1))
    assert torch.all(sm[0, :7] == 0) and torch.all(sm[0, 14:] == 0)
    assert torch.equal(ridx[0], torch.tensor([0] * 9 + [1] * 3 + [2] * 9))
    assert torch.equal(counts, torch.tensor([3]))
    # at the end of an image the zero padding acts the same way
    sm, ridx, counts = regions(info[:, 3:14], None, 1)
    assert torch.equal(ridx[0], torch.tensor([0] * 6 + [1] * 3 + [2] * 2))


def test_regions_ignore_information_on_padding():
    torch.manual_seed(3)
    info = torch.rand(2, 20, dtype=torch.float64)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[:, 13:] = True
    noisy = info.masked_fill(mask, 7.0)
    a = regions(info.masked_fill(mask, 0.0), mask, 2)
    b = regions(noisy, mask, 2)
    assert torch.allclose(a[0], b[0])
    assert torch.equal(a[1], b[1])


def test_smoothing_gradient_is_the_adjoint_convolution():
    torch.manual_seed(4)
    info = torch.rand(2, 11, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 2] = True
    mask[1, 8:] = True
    assert torch.autograd.gradcheck(lambda x: regions(x, mask, 1)[0], (info,))


def test_public_api_exports():
    for name in ("self_information", "cluster", "clustered_attention", "ENACTAttention",
                 "ENACTClustering", "backend_info", "Clusters", "pack"):
        assert hasattr(enact_cuda, name), name


def test_regions_under_autocast_smooth_in_float32():
    """CPU autocast would run F.conv1d in bf16: regions() smooths in float32 with autocast off,
    so smoothed is float32 and the regions equal the float32 ones; clustering then works."""
    from enact_cuda import cluster_tensors
    gen = torch.Generator().manual_seed(12)
    B, H, W = 3, 9, 11
    mask = box_mask(B, H, W, [(9, 11), (7, 10), (5, 4)])
    z = torch.randn(B, H * W, generator=gen) * 3.0
    info = information_from_logits(z, mask)
    ref_sm, ref_ri, ref_cnt = regions(info, mask, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sm, ri, cnt = regions(info, mask, 2)
        keys = torch.randn(B, H * W, 8, generator=gen).to(torch.bfloat16)
        (ck,) = cluster_tensors((keys,), sm, ri, int(cnt.max()))
    assert sm.dtype == torch.float32
    assert torch.equal(sm, ref_sm)
    assert torch.equal(ri, ref_ri) and torch.equal(cnt, ref_cnt)
    assert ck.dtype == torch.bfloat16 and torch.isfinite(ck.float()).all()
    # bf16 information (e.g. computed under autocast elsewhere) is smoothed in float32 too
    sm16, _, _ = regions(info.to(torch.bfloat16), mask, 2)
    assert sm16.dtype == torch.float32
