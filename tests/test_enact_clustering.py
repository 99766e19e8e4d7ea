"""enact_cuda clustering (spec §1.6, gradients §1.10), CPU."""
import pytest
import torch

from enact_cuda import (Clusters, cluster, cluster_tensors, pack, regions, regions_from_steps,
                        self_information)


def box_mask(B, H, W, sizes):
    """Bottom/right padding: image b is valid on [0, h_b) x [0, w_b)."""
    m = torch.ones(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        m[b, :h, :w] = False
    return m.flatten(1)


def ref_cluster(tensors, smoothed, region_index, R):
    """Slow loop over images and regions: softmax of smoothed inside the region, weighted sum."""
    B, N = smoothed.shape
    outs = [torch.zeros(B, R, t.shape[-1], dtype=torch.float64) for t in tensors]
    for b in range(B):
        for r in range(R):
            members = [i for i in range(N) if int(region_index[b, i]) == r]
            if not members:
                continue
            w = torch.softmax(smoothed[b, members].double(), 0)
            for out, t in zip(outs, tensors):
                out[b, r] = (w[:, None] * t[b, members].double()).sum(0)
    return outs


def random_regions(B, N, mask, seed):
    g = torch.Generator().manual_seed(seed)
    step = torch.rand(B, N, generator=g) < 0.4
    return regions_from_steps(step, mask)


def test_cluster_tensors_match_slow_loop():
    torch.manual_seed(0)
    B, H, W = 3, 4, 6
    N = H * W
    mask = box_mask(B, H, W, [(4, 6), (2, 5), (3, 1)])
    mask[0, 7] = True  # and an interior hole
    ridx, counts = random_regions(B, N, mask, 1)
    R = int(counts.max())
    smoothed = torch.rand(B, N, dtype=torch.float64).masked_fill(mask, 0.0)
    k = torch.randn(B, N, 5, dtype=torch.float64)
    v = torch.randn(B, N, 3, dtype=torch.float64)
    ck, cv = cluster_tensors((k, v), smoothed, ridx, R)
    rk, rv = ref_cluster((k, v), smoothed, ridx, R)
    assert ck.shape == (B, R, 5) and cv.shape == (B, R, 3)
    assert torch.allclose(ck, rk, atol=1e-13)
    assert torch.allclose(cv, rv, atol=1e-13)
    pad = torch.arange(R)[None, :] >= counts[:, None]
    assert torch.all(ck[pad] == 0) and torch.all(cv[pad] == 0)


def test_cluster_tensors_are_stable_for_large_smoothed_values():
    ridx = torch.tensor([[0, 0, 1, 1, 1]])
    smoothed = torch.tensor([[1000.0, 999.0, -500.0, 800.0, 800.0]])
    x = torch.arange(5.0).reshape(1, 5, 1)
    (cx,) = cluster_tensors((x,), smoothed, ridx, 2)
    w0 = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    expected = torch.tensor([[[w0[1].item()], [3.5]]])
    assert torch.isfinite(cx).all()
    assert torch.allclose(cx, expected, atol=1e-5)


def test_cluster_end_to_end_and_tuple_values():
    torch.manual_seed(2)
    B, H, W, d = 2, 5, 6, 4
    mask = box_mask(B, H, W, [(5, 6), (3, 4)])
    keys = torch.randn(B, H * W, d, dtype=torch.float64)
    vals = torch.randn(B, H * W, 3, dtype=torch.float64)
    info = self_information(keys, torch.randn(1, d, dtype=torch.float64), None, mask)
    c = cluster(keys, vals, info, mask, 1, impl="torch")
    assert isinstance(c, Clusters)
    sm, ridx, counts = regions(info, mask, 1)
    R = int(counts.max())
    rk, rv = ref_cluster((keys, vals), sm, ridx, R)
    assert torch.equal(c.region_index, ridx)
    assert torch.equal(c.key_padding_mask, torch.arange(R)[None, :] >= counts[:, None])
    assert torch.equal(c.counts, counts)
    assert torch.allclose(c.keys, rk, atol=1e-13)
    assert torch.allclose(c.values, rv, atol=1e-13)
    c2 = cluster(keys, (vals, 2 * keys), info, mask, 1, impl="torch")
    assert isinstance(c2.values, tuple) and len(c2.values) == 2
    assert torch.allclose(c2.values[0], c.values)
    assert torch.allclose(c2.values[1], 2 * c.keys)
    # row breaks only add starts
    c3 = cluster(keys, vals, info, mask, 1, row_breaks=True, hw=(H, W), impl="torch")
    assert torch.all(c3.counts >= c.counts)


def test_pack_gives_ragged_rows_and_offsets():
    torch.manual_seed(3)
    B, N = 3, 10
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 4:] = True
    keys = torch.randn(B, N, 4)
    info = self_information(keys, torch.randn(1, 4), None, mask)
    c = cluster(keys, (keys, keys[..., :2]), info, mask, 1, impl="torch")
    p = pack(c)
    counts = c.counts
    assert torch.equal(p.offsets, torch.cat([torch.zeros(1, dtype=torch.int64),
                                             counts.cumsum(0)]))
    assert p.keys.shape == (int(counts.sum()), 4)
    for b in range(B):
        lo, hi = int(p.offsets[b]), int(p.offsets[b + 1])
        assert torch.equal(p.keys[lo:hi], c.keys[b, : hi - lo])
        assert torch.equal(p.values[1][lo:hi], c.values[1][b, : hi - lo])
    assert torch.equal(c.packed().offsets, p.offsets)


def test_cluster_tensors_gradcheck():
    torch.manual_seed(4)
    B, N = 2, 9
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[1, 6:] = True
    ridx, counts = random_regions(B, N, mask, 5)
    R = int(counts.max())
    sm = torch.rand(B, N, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, N, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, a, b: cluster_tensors((a, b), s, ridx, R),
                                    (sm, k, v))


def test_closed_form_gradients_match_autograd():
    """Spec §1.10: dL/dH~_i = w_i [<G^K_j, K_i - K'_j> + <G^V_j, V_i - V'_j>], dL/dV_i = w_i G^V_j."""
    torch.manual_seed(5)
    B, N, d = 2, 12, 4
    mask = torch.zeros(B, N, dtype=torch.bool)
    mask[0, 9:] = True
    ridx, counts = random_regions(B, N, mask, 6)
    R = int(counts.max())
    sm = (torch.rand(B, N, dtype=torch.float64) * 0.5).masked_fill(mask, 0).requires_grad_()
    k = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, N, d, dtype=torch.float64, requires_grad=True)
    ck, cv = cluster_tensors((k, v), sm, ridx, R)
    gk = torch.randn(B, R, d, dtype=torch.float64)
    gv = torch.randn(B, R, d, dtype=torch.float64)
    ((ck * gk).sum() + (cv * gv).sum()).backward()

    with torch.no_grad():
        expected_h = torch.zeros(B, N, dtype=torch.float64)
        expected_v = torch.zeros(B, N, d, dtype=torch.float64)
        for b in range(B):
            for r in range(int(counts[b])):
                idx = (ridx[b] == r).nonzero().flatten()
                w = torch.softmax(sm[b, idx], 0)
                kj = (w[:, None] * k[b, idx]).sum(0)
                vj = (w[:, None] * v[b, idx]).sum(0)
                expected_h[b, idx] = w * ((k[b, idx] - kj) @ gk[b, r] + (v[b, idx] - vj) @ gv[b, r])
                expected_v[b, idx] = w[:, None] * gv[b, r]
                # a softmax gradient sums to zero over the region
                assert torch.allclose(sm.grad[b, idx].sum(), torch.zeros((), dtype=torch.float64),
                                      atol=1e-13)
    assert torch.allclose(sm.grad, expected_h, atol=1e-13)
    assert torch.allclose(v.grad, expected_v, atol=1e-13)
    assert torch.all(sm.grad[mask] == 0) and torch.all(k.grad[mask] == 0)


@pytest.mark.parametrize("row_breaks", [False, True])
def test_clusters_are_batch_invariant(row_breaks):
    """An image alone and inside a bottom/right padded batch: same regions and clusters."""
    torch.manual_seed(7)
    d, sigma = 6, 2
    h0, w0 = 5, 7
    H, W = 8, 9
    w_prob = torch.randn(1, d)
    img_k = torch.randn(h0, w0, d)
    img_v = torch.randn(h0, w0, d)
    alone_mask = torch.zeros(1, h0 * w0, dtype=torch.bool)
    info_a = self_information(img_k.reshape(1, -1, d), w_prob, None, alone_mask)
    alone = cluster(img_k.reshape(1, -1, d), img_v.reshape(1, -1, d), info_a, alone_mask, sigma,
                    row_breaks=row_breaks, hw=(h0, w0), impl="torch")

    keys = torch.randn(3, H, W, d) * 3  # neighbours and padding hold large garbage
    vals = torch.randn(3, H, W, d) * 3
    keys[1, :h0, :w0] = img_k
    vals[1, :h0, :w0] = img_v
    mask = box_mask(3, H, W, [(H, W), (h0, w0), (3, 4)])
    keys, vals = keys.reshape(3, H * W, d), vals.reshape(3, H * W, d)
    info_b = self_information(keys, w_prob, None, mask)
    batch = cluster(keys, vals, info_b, mask, sigma, row_breaks=row_breaks, hw=(H, W),
                    impl="torch")

    R0 = int(alone.counts[0])
    assert int(batch.counts[1]) == R0
    ridx_b = batch.region_index[1].reshape(H, W)
    assert torch.equal(ridx_b[:h0, :w0].reshape(-1), alone.region_index[0])
    assert torch.all(ridx_b[h0:] == -1) and torch.all(ridx_b[:, w0:] == -1)
    assert torch.allclose(batch.keys[1, :R0], alone.keys[0, :R0], atol=1e-6)
    assert torch.allclose(batch.values[1, :R0], alone.values[0, :R0], atol=1e-6)
    assert torch.all(batch.key_padding_mask[1, R0:]) and not batch.key_padding_mask[1, :R0].any()


def test_low_precision_tensors_keep_their_dtype():
    torch.manual_seed(8)
    ridx = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 3]])
    sm = torch.rand(1, 8)
    x = torch.randn(1, 8, 16)
    (c32,) = cluster_tensors((x,), sm, ridx, 4)
    (c16,) = cluster_tensors((x.bfloat16(),), sm, ridx, 4)
    assert c16.dtype == torch.bfloat16
    assert torch.allclose(c16.float(), c32, atol=2e-2, rtol=1e-2)
