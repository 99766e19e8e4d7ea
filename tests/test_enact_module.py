"""enact_cuda.ENACTAttention and ENACTClustering (drop-in encoder self-attention), CPU."""
import math

import pytest
import torch

from detr_common.attention import EncoderSelfAttention
from enact_cuda import (Clusters, ENACTAttention, ENACTClustering, cluster, clustered_attention,
                        fixed_chunks, information_from_logits, regions, self_information)
from enact_cuda.clustering import cluster_tensors
from enact_cuda.information import regions_from_steps


def box_mask(B, H, W, sizes):
    """Bottom/right padding: image b is valid on [0, h_b) x [0, w_b)."""
    m = torch.ones(B, H, W, dtype=torch.bool)
    for b, (h, w) in enumerate(sizes):
        m[b, :h, :w] = False
    return m.flatten(1)


def reference_forward(mod, src, pos, mask, hw):
    """Per image, in plain ops: regions of the image's valid pixels, project THEN cluster
    (spec §1.6 says this equals clustering first), per-head softmax attention, W_o."""
    B, N, d = src.shape
    h, e = mod.nhead, d // mod.nhead
    out = torch.zeros(B, N, d, dtype=src.dtype)
    W = hw[1]
    for b in range(B):
        valid = ~mask[b]
        keys = (src[b] + pos[b])
        kv = keys[valid]
        z = kv @ mod.W_prob.weight[0] + mod.W_prob.bias[0]
        p = torch.softmax(z, 0) + 1e-8
        info = -p * torch.log2(p)
        width = int(valid[:W].sum())
        sm, ridx, counts = regions(info[None], None, mod.sigma, mod.row_breaks,
                                   (len(kv) // width, width) if mod.row_breaks else None)
        k_proj = mod.W_k(kv)
        v_proj = mod.W_v(src[b][valid])
        ks, vs = [], []
        for r in range(int(counts[0])):
            sel = ridx[0] == r
            w = torch.softmax(sm[0, sel], 0)
            ks.append((w[:, None] * k_proj[sel]).sum(0))
            vs.append((w[:, None] * v_proj[sel]).sum(0))
        K, V = torch.stack(ks), torch.stack(vs)            # (R_b, d)
        q = mod.W_q(keys)                                  # all N pixels query
        heads = []
        for i in range(h):
            sl = slice(i * e, (i + 1) * e)
            a = torch.softmax(q[:, sl] @ K[:, sl].T / math.sqrt(e), -1)
            heads.append(a @ V[:, sl])
        out[b] = mod.W_o(torch.cat(heads, -1))
    return out


@pytest.mark.parametrize("row_breaks", [False, True])
def test_forward_matches_per_image_reference(row_breaks):
    torch.manual_seed(0)
    B, H, W, d = 3, 5, 6, 8
    mod = ENACTAttention(d, 2, sigma=1, impl="torch", row_breaks=row_breaks).double()
    with torch.no_grad():
        mod.W_prob.weight.mul_(20)  # make the information vary
        for lin in (mod.W_q, mod.W_k, mod.W_v, mod.W_o, mod.W_prob):
            lin.bias.normal_()
    src = torch.randn(B, H * W, d, dtype=torch.float64)
    pos = torch.randn(B, H * W, d, dtype=torch.float64)
    mask = box_mask(B, H, W, [(5, 6), (3, 4), (1, 2)])
    out = mod(src, pos, mask, (H, W))
    assert out.shape == (B, H * W, d)
    assert torch.allclose(out, reference_forward(mod, src, pos, mask, (H, W)), atol=1e-10)


@pytest.mark.parametrize("row_breaks", [False, True])
def test_output_is_batch_invariant(row_breaks):
    torch.manual_seed(1)
    d, h0, w0, H, W = 16, 6, 5, 9, 8
    mod = ENACTAttention(d, 4, sigma=2, impl="torch", row_breaks=row_breaks).eval()
    with torch.no_grad():
        mod.W_prob.weight.mul_(10)
    img, img_pos = torch.randn(h0, w0, d), torch.randn(h0, w0, d)
    alone = mod(img.reshape(1, -1, d), img_pos.reshape(1, -1, d),
                torch.zeros(1, h0 * w0, dtype=torch.bool), (h0, w0))
    alone_clusters = mod.last_stats["clusters_per_image"].clone()

    src, pos = torch.randn(3, H, W, d) * 5, torch.randn(3, H, W, d) * 5
    src[2, :h0, :w0], pos[2, :h0, :w0] = img, img_pos
    mask = box_mask(3, H, W, [(H, W), (4, 7), (h0, w0)])
    batch = mod(src.reshape(3, -1, d), pos.reshape(3, -1, d), mask, (H, W))
    got = batch[2].reshape(H, W, d)[:h0, :w0].reshape(-1, d)
    assert torch.allclose(got, alone[0], atol=1e-5)
    assert torch.equal(mod.last_stats["clusters_per_image"][2], alone_clusters[0])


def test_parameters_names_and_init():
    mod = ENACTAttention(32, 4, sigma=3)
    keys = set(mod.state_dict())
    expected = {f"{n}.{p}" for n in ("W_q", "W_k", "W_v", "W_o", "W_prob")
                for p in ("weight", "bias")}
    assert keys == expected
    assert mod.W_prob.weight.shape == (1, 32) and mod.W_prob.bias.shape == (1,)
    with pytest.raises(ValueError, match="divisible"):
        ENACTAttention(30, 4, sigma=3)
    with pytest.raises(ValueError, match="sigma"):
        ENACTAttention(32, 4, sigma=2.5)
    with pytest.raises(ValueError, match="impl"):
        ENACTAttention(32, 4, sigma=3, impl="gpu")


def test_init_matches_the_plain_attention():
    """Zero biases; W_prob Xavier-uniform (the paper); W_q, W_k, W_v, W_o drawn as the plain
    encoder's torch-MultiheadAttention parameters: U(-b, b) with b = sqrt(6 / (d + 3d)) for
    the stacked input projections, b = 1 / sqrt(d) (nn.Linear's default) for W_o."""
    torch.manual_seed(0)
    d = 256
    mod = ENACTAttention(d, 8, sigma=3)
    plain = EncoderSelfAttention(d, 8)
    bounds = {"W_q": math.sqrt(6.0 / (4 * d)), "W_k": math.sqrt(6.0 / (4 * d)),
              "W_v": math.sqrt(6.0 / (4 * d)), "W_o": 1.0 / math.sqrt(d),
              "W_prob": math.sqrt(6.0 / (d + 1))}
    for name, bound in bounds.items():
        lin = getattr(mod, name)
        assert torch.all(lin.bias == 0), name
        assert 0.9 * bound < lin.weight.abs().max() <= bound, name
        if name != "W_prob":
            assert torch.allclose(lin.weight.std(), torch.tensor(bound / math.sqrt(3)),
                                  rtol=0.03), name
    assert not torch.equal(mod.W_q.weight, mod.W_k.weight)
    for ours, theirs in zip((mod.W_q, mod.W_k, mod.W_v), plain.in_proj_weight.chunk(3)):
        assert torch.allclose(ours.weight.std(), theirs.std(), rtol=0.03)
    assert torch.allclose(mod.W_o.weight.std(), plain.out_proj.weight.std(), rtol=0.03)


def test_last_stats_and_information_maps():
    torch.manual_seed(2)
    B, H, W, d = 2, 4, 5, 8
    mod = ENACTAttention(d, 2, sigma=1)
    src = torch.randn(B, H * W, d, requires_grad=True)
    pos = torch.randn(B, H * W, d)
    mask = box_mask(B, H, W, [(4, 5), (2, 3)])
    mod(src, pos, mask, (H, W)).sum().backward()
    stats = mod.last_stats
    info = self_information(src + pos, mod.W_prob.weight, mod.W_prob.bias, mask)
    sm, ridx, counts = regions(info, mask, 1)
    assert torch.equal(stats["clusters_per_image"], counts.float())
    assert torch.equal(stats["pixels_per_image"], torch.tensor([20.0, 6.0]))
    assert torch.allclose(stats["mean_region_length"], torch.tensor([20.0, 6.0]) / counts)
    assert torch.allclose(mod.information, info)
    assert torch.allclose(mod.smoothed_information, sm)
    for t in (*stats.values(), mod.information, mod.smoothed_information):
        assert not t.requires_grad
    assert mod.W_prob.weight.grad is not None and mod.W_prob.weight.grad.abs().sum() > 0
    # no mask and no pos are accepted
    out = mod(src.detach(), None, None, None)
    assert out.shape == src.shape
    assert torch.equal(mod.last_stats["pixels_per_image"], torch.tensor([20.0, 20.0]))


def test_module_gradcheck():
    torch.manual_seed(3)
    B, H, W, d = 2, 3, 3, 4
    mod = ENACTAttention(d, 2, sigma=1, impl="torch").double()
    with torch.no_grad():
        mod.W_prob.weight.mul_(10)
    mask = box_mask(B, H, W, [(3, 3), (2, 2)])
    src = torch.randn(B, H * W, d, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(B, H * W, d, dtype=torch.float64)
    names = ["W_prob.weight", "W_prob.bias", "W_k.weight", "W_v.bias"]
    params = tuple(dict(mod.named_parameters())[n].detach().clone().requires_grad_()
                   for n in names)

    def f(src, *ps):
        out = torch.func.functional_call(mod, dict(zip(names, ps)), (src, pos, mask, (H, W)))
        return out

    assert torch.autograd.gradcheck(f, (src, *params), eps=1e-6, atol=1e-7, fast_mode=True)


def test_dropout_only_in_training():
    torch.manual_seed(4)
    mod = ENACTAttention(8, 2, sigma=1, dropout=0.5)
    src, pos = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    mod.eval()
    a, b = mod(src, pos, None, (3, 4)), mod(src, pos, None, (3, 4))
    assert torch.allclose(a, b)
    mod.train()
    c = mod(src, pos, None, (3, 4))
    assert torch.isfinite(c).all() and not torch.allclose(a, c)


def test_bad_inputs_are_rejected():
    mod = ENACTAttention(8, 2, sigma=1, impl="torch")
    src = torch.randn(2, 12, 8)
    with pytest.raises(ValueError, match="hw"):
        mod(src, None, None, (3, 5))
    with pytest.raises(ValueError, match="batch-first"):
        mod(src[0], None, None, None)
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        ENACTAttention(8, 2, sigma=1, impl="cuda")(src, None, None, (3, 4))
    with pytest.raises(ValueError, match="hw"):
        ENACTAttention(8, 2, sigma=1, row_breaks=True)(src, None, None, None)


def test_clustering_entry_point_matches_functional_cluster():
    torch.manual_seed(5)
    B, H, W, d = 2, 4, 6, 8
    mod = ENACTClustering(d, sigma=2, impl="torch", row_breaks=True)
    assert set(mod.state_dict()) == {"W_prob.weight", "W_prob.bias"}
    with torch.no_grad():
        mod.W_prob.weight.mul_(10)
    row_k, col_k, val = (torch.randn(B, H * W, d) for _ in range(3))
    mask = box_mask(B, H, W, [(4, 6), (3, 2)])
    out = mod(row_k, (row_k, col_k, val), mask, (H, W))
    assert isinstance(out, Clusters) and out.keys is None
    assert isinstance(out.values, tuple) and len(out.values) == 3
    info = self_information(row_k, mod.W_prob.weight, mod.W_prob.bias, mask)
    ref = cluster(row_k, (col_k, val), info, mask, 2, row_breaks=True, hw=(H, W), impl="torch")
    assert torch.allclose(out.values[0], ref.keys)
    assert torch.allclose(out.values[1], ref.values[0])
    assert torch.allclose(out.values[2], ref.values[1])
    assert torch.equal(out.key_padding_mask, ref.key_padding_mask)
    assert torch.equal(out.region_index, ref.region_index)
    assert torch.equal(mod.last_stats["clusters_per_image"], ref.counts.float())
    assert torch.allclose(mod.information, info)


def test_autocast_bfloat16_keeps_information_in_float32():
    torch.manual_seed(6)
    mod = ENACTAttention(16, 2, sigma=1, impl="torch")
    src = torch.randn(2, 20, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mod(src, src, None, (4, 5))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert mod.information.dtype == torch.float32
    ref = mod(src, src, None, (4, 5))
    assert torch.allclose(out.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("how", ["autocast", "bf16 module"])
def test_bfloat16_logits_computed_in_float32(how):
    """W_prob's logits are computed in float32, as the fused CUDA kernel computes them: bf16
    logits (~3 significant digits) would move the entropy by ~1e-3 bits and region
    boundaries with it. Reference: float32 logits of the same keys."""
    torch.manual_seed(0)
    mod = ENACTAttention(64, 4, sigma=2, impl="torch")
    src = torch.randn(2, 120, 64)
    if how == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mod(src, None, None, (10, 12))
    else:
        src = src.bfloat16()
        mod.to(torch.bfloat16)(src, None, None, (10, 12))
    w, b = mod.W_prob.weight.float(), mod.W_prob.bias.float()
    z = torch.nn.functional.linear(src.float(), w, b).squeeze(-1)
    assert mod.information.dtype == torch.float32
    assert torch.allclose(mod.information, information_from_logits(z, None), atol=1e-6)


@pytest.mark.parametrize("mode", ["paper_regions", "official_fixed_chunk"])
def test_empty_batch_and_no_pixels(mode):
    """A batch of zero images gives an empty output (it crashed in a reshape); zero pixels per
    image is a clear ValueError."""
    mod = ENACTAttention(8, 2, sigma=1, impl="torch", mode=mode)
    assert mod(torch.randn(0, 12, 8)).shape == (0, 12, 8)
    with pytest.raises(ValueError, match="N = 0"):
        mod(torch.randn(2, 0, 8))


def test_bad_argument_errors_of_the_public_functions():
    """The torch backend checks what the CUDA binding checks: batch / head / length mismatches,
    a non-bool key mask, dropout outside [0, 1]; masks of the region functions are checked;
    sigma is limited to the CUDA kernels' 64 on every backend."""
    q, k = torch.randn(1, 2, 5, 4), torch.randn(2, 2, 3, 4)
    with pytest.raises(ValueError, match="do not fit"):
        clustered_attention(q, k, k, None, impl="torch")  # was broadcast over the batch
    q = torch.randn(2, 2, 5, 4)
    with pytest.raises(TypeError, match="must be bool"):
        clustered_attention(q, k, k, torch.zeros(2, 3, dtype=torch.uint8), impl="torch")
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\]"):
        clustered_attention(q, k, k, None, dropout_p=-0.1, impl="torch")
    step = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="padding_mask shape"):
        regions_from_steps(step, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="must be bool"):
        fixed_chunks(torch.tensor([2, 2]), torch.zeros(2, 6), 6)
    with pytest.raises(ValueError, match=r"1\.\.64"):
        ENACTAttention(8, 2, sigma=70, impl="torch")


def test_regions_beyond_num_clusters_are_left_out_not_mixed_into_the_next_image():
    """cluster_tensors with num_clusters below an image's region count leaves those regions
    out (as the CUDA kernel does); before, region 2 of image 0 landed in image 1's cluster 0.
    Hand-computed: image 1 is one region of values 6..11 with equal smoothed information, so
    its cluster is their mean 8.5."""
    info = torch.tensor([[0, .5, 0, 0, .5, 0], [0.] * 6])
    smoothed, region_index, counts = regions(info, None, 1)
    assert counts.tolist() == [3, 1]
    (out,) = cluster_tensors((torch.arange(12.).view(2, 6, 1),), smoothed, region_index, 2)
    assert torch.allclose(out[1, 0], torch.tensor([8.5]))
    (full,) = cluster_tensors((torch.arange(12.).view(2, 6, 1),), smoothed, region_index, 3)
    assert torch.allclose(out[0], full[0, :2])  # the kept regions are unchanged


def test_self_information_logits_in_float32():
    """bf16 keys with float32 weights gave a dtype error; bf16 weights gave bf16 logits.
    Reference: the float32 computation of the same numbers."""
    torch.manual_seed(3)
    keys = torch.randn(2, 50, 16).bfloat16()
    w, b = torch.randn(1, 16), torch.randn(1)
    ref = information_from_logits(torch.nn.functional.linear(keys.float(), w, b).squeeze(-1),
                                  None)
    assert torch.allclose(self_information(keys, w, b, None), ref, atol=1e-6)
    got = self_information(keys, w.bfloat16(), b.bfloat16(), None)
    ref = information_from_logits(torch.nn.functional.linear(
        keys.float(), w.bfloat16().float(), b.bfloat16().float()).squeeze(-1), None)
    assert got.dtype == torch.float32 and torch.allclose(got, ref, atol=1e-6)


def test_fixed_chunk_mode_reports_the_regions_mean_length():
    """In the official fixed-chunk mode the clusters are chunks, but mean_region_length is the
    regions' (pixels / regions, from which the chunk size is rounded), not pixels / chunks."""
    torch.manual_seed(4)
    mod = ENACTAttention(8, 2, sigma=1, impl="torch", mode="official_fixed_chunk")
    src = torch.randn(3, 23, 8)
    mod(src)
    info = self_information(src, mod.W_prob.weight, mod.W_prob.bias, None)
    _, _, region_counts = regions(info, None, 1)
    stats = mod.last_stats
    assert torch.allclose(stats["mean_region_length"], 23 / region_counts.float())
    chunks = fixed_chunks(region_counts, None, 23)[1]
    assert torch.equal(stats["clusters_per_image"], chunks.float())


class _Pending:
    """Stand-in for the fused path's pending R_max copy (cuda_backend.fused_begin)."""

    def __init__(self, r_max, counts):
        self.r_max, self.counts = r_max, torch.tensor(counts)

    def r_max_if_ready(self):
        return self.r_max


def test_guessed_rows_follow_the_largest_recent_cluster_share():
    """Rows for training without the count read (module docstring): 0 (read the count) without
    history, then min(N, ceil(max share x 1.25 x N) + 8) over the last 16 forwards' R_max / N;
    a pending count is taken into the history once it has landed (0 = not yet: skipped)."""
    m = ENACTAttention(32, 4, sigma=2, wait_for_counts=False)
    assert m._guessed_rows(1000) == 0
    m._pending, m._pending_n = _Pending(100, [100, 40]), 1000
    m._note_last_guess()
    assert m._pending is None and m.key_count_hint is None
    assert m._guessed_rows(1000) == 125 + 8
    assert m._guessed_rows(400) == 50 + 8  # the share, not the count: N changes with the batch
    assert m._guessed_rows(8) == 8  # capped at N
    m._pending, m._pending_n = _Pending(0, [1]), 10  # its count has not reached the host
    m._note_last_guess()
    assert list(m._shares) == [0.1]
    for r in [300] + [10] * 15:  # 300 / 1000 leaves the history after 16 newer forwards
        m._pending, m._pending_n = _Pending(r, [r]), 1000
        m._note_last_guess()
        assert m._guessed_rows(1000) == 375 + 8
    m._pending, m._pending_n = _Pending(10, [10]), 1000
    m._note_last_guess()
    assert m._guessed_rows(1000) == math.ceil(0.01 * 1.25 * 1000) + 8


def test_count_overflow_flags_every_short_guess_since_the_last_call():
    """count_overflow(): whether some image of a guessed forward since the last call had more
    clusters than that forward's rows; a layer run twice before the check is flagged when
    either forward fell short; N rows never are."""
    m = ENACTClustering(32, sigma=2, wait_for_counts=False)
    assert m.count_overflow() is None  # no guessed forward
    m._note_overflow(torch.tensor([3, 5]), 5, 50)
    assert not bool(m.count_overflow())
    assert m.count_overflow() is None  # each call starts a new period
    m._note_overflow(torch.tensor([3, 5]), 4, 50)  # the first forward falls short
    m._note_overflow(torch.tensor([3, 3]), 4, 50)
    assert bool(m.count_overflow())
    m._note_overflow(torch.tensor([60]), 50, 50)  # N rows hold every cluster
    assert m.count_overflow() is None


@pytest.mark.parametrize("wait", [True, False])
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("kernel", [True, False])
def test_skipping_the_count_read(wait, grad, kernel):
    """skip_count_read: with autograd, guessed rows unless wait_for_counts, whatever attends
    (a guess's few extra rows cost any attention little); without autograd, N rows, only where
    the CUDA kernel (cost following the mask) attends."""
    m = ENACTClustering(32, sigma=2, wait_for_counts=wait)
    with torch.set_grad_enabled(grad):
        assert m.skips_count_read(kernel) == ((not wait) if grad else kernel)


@pytest.mark.parametrize("wait", [True, False])
def test_enact_attention_skips_the_count_read_in_training_without_the_kernel(skip_spy, wait):
    """ENACTAttention passes skips_count_read's answer to its clustering: in training with
    wait_for_counts=False, True even where the CUDA kernel does not attend (CPU inputs here);
    in eval, False there."""
    torch.manual_seed(0)
    src, mask = torch.randn(2, 20, 32), torch.zeros(2, 20, dtype=torch.bool)
    m = ENACTAttention(32, 4, sigma=1, wait_for_counts=wait)
    m(src, None, mask, (4, 5))
    with torch.no_grad():
        m(src, None, mask, (4, 5))
    assert skip_spy == [not wait, False]
