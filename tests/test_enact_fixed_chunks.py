"""The official code's fixed-chunk clusters (spec §2.1 steps 4-6, §6.4's compat mode):
`enact_cuda.fixed_chunks`, ENACT modules with mode="official_fixed_chunk", and --enact_mode in
the three detectors. CPU."""
import math

import pytest
import torch

from _cli import TINY, load_main, without
from enact_cuda import ENACTAttention, ENACTClustering, fixed_chunks, regions


@pytest.mark.parametrize("length, regions_, expected", [
    # c = round(13 / 3) = 4, M = 3, r = 1: nothing trimmed at the start, one pixel at the end
    (13, 3, [0] * 4 + [1] * 4 + [2] * 4 + [-1]),
    # 14 / 4 = 3.5 rounds half to even: c = 4, M = 3, r = 2: one pixel off each end
    (14, 4, [-1] + [0] * 4 + [1] * 4 + [2] * 4 + [-1]),
    # 10 / 4 = 2.5 -> c = 2 (even), M = 5, no trim
    (10, 4, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),
    # every pixel its own region: c = 1
    (5, 5, [0, 1, 2, 3, 4]),
    # one region: a single chunk of every pixel
    (6, 1, [0] * 6),
])
def test_fixed_chunks_hand_cases(length, regions_, expected):
    index, chunks = fixed_chunks(torch.tensor([regions_]), None, length)
    assert index.tolist() == [expected]
    assert chunks.tolist() == [max(expected) + 1]
    # Python's round, as the official code uses, gives the same chunk size
    assert length // round(length / regions_) == max(expected) + 1


def test_fixed_chunks_follow_each_images_valid_pixels():
    """With padding, an image's chunks run over its valid pixels in raster order; a fully
    padded image has none."""
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[1, [2, 3, 6, 7]] = True  # a 2 x 4 map whose valid part is 2 x 2
    mask[2] = True
    index, chunks = fixed_chunks(torch.tensor([3, 2, 0]), mask, 8)
    # image 0: c = round(8 / 3) = 3, M = 2, r = 2 -> one pixel off each end
    assert index[0].tolist() == [-1, 0, 0, 0, 1, 1, 1, -1]
    # image 1: 4 valid pixels, c = 2, M = 2: pixels 0, 1 | 4, 5
    assert index[1].tolist() == [0, 0, -1, -1, 1, 1, -1, -1]
    assert index[2].tolist() == [-1] * 8
    assert chunks.tolist() == [2, 2, 0]


def test_fixed_chunks_per_batch_take_one_size():
    """per_batch=True: c = round(mean_b N / R_b) for every image (the official code)."""
    alone, _ = fixed_chunks(torch.tensor([3, 2]), None, 8)  # c = 3 and 4
    assert alone.tolist() == [[-1, 0, 0, 0, 1, 1, 1, -1], [0, 0, 0, 0, 1, 1, 1, 1]]
    shared, chunks = fixed_chunks(torch.tensor([3, 2]), None, 8, per_batch=True)  # 3.33 -> 3
    assert shared.tolist() == [[-1, 0, 0, 0, 1, 1, 1, -1]] * 2 and chunks.tolist() == [2, 2]


def official_forward(mod, src, pos):
    """Spec §2.1 on a batch, literally (no padding mask: every pixel counts): per image
    information, smoothing with the official code's 6σ-1 unnormalised Gaussian taps ("same",
    zero padded), [-1, 2, -1] curvature, step > 0, R_b = 1 + number of step changes; one
    c = Python round(mean_b N / R_b) for the batch; per image trim floor(r/2) in front and the
    rest at the end, reshape the kept sequence into M = N // c chunks, softmax of the smoothed
    information in each chunk, weighted sums of keys (src + pos) and values (src), then
    standard per-head attention of all N queries."""
    B, N, d = src.shape
    h, e, s = mod.nhead, d // mod.nhead, mod.sigma
    t = torch.arange(-(3 * s - 1), 3 * s, dtype=src.dtype)
    gauss = torch.exp(-t * t / (2 * s * s)) / (s * math.sqrt(2 * math.pi))
    laplace = torch.tensor([-1.0, 2.0, -1.0], dtype=src.dtype).view(1, 1, 3)
    smoothed, lengths = [], []
    for b in range(B):
        p = torch.softmax((src[b] + pos[b]) @ mod.W_prob.weight[0] + mod.W_prob.bias[0], 0) + 1e-8
        info = -p * torch.log2(p)
        sm = torch.nn.functional.conv1d(info.view(1, 1, N), gauss.view(1, 1, -1),
                                        padding=3 * s - 1).view(N)
        step = torch.nn.functional.conv1d(sm.view(1, 1, N), laplace, padding=1).view(N) > 0
        smoothed.append(sm)
        lengths.append(N / (1 + int((step[1:] != step[:-1]).sum())))
    c = round(sum(lengths) / B)
    M, r = N // c, N % c
    kept = slice(r // 2, r // 2 + M * c)
    out = torch.zeros_like(src)
    for b in range(B):
        keys = src[b] + pos[b]
        w = torch.softmax(smoothed[b][kept].reshape(M, c), 1)
        K = (w[..., None] * keys[kept].reshape(M, c, d)).sum(1)
        V = (w[..., None] * src[b][kept].reshape(M, c, d)).sum(1)
        q, k, v = mod.W_q(keys), mod.W_k(K), mod.W_v(V)
        heads = [torch.softmax(q[:, i * e:(i + 1) * e] @ k[:, i * e:(i + 1) * e].T / math.sqrt(e),
                               -1) @ v[:, i * e:(i + 1) * e] for i in range(h)]
        out[b] = mod.W_o(torch.cat(heads, -1))
    return out


def _official_like_module(sigma, **kwargs):
    mod = ENACTAttention(8, 2, sigma=sigma, impl="torch", mode="official_fixed_chunk",
                         gauss_taps="code", **kwargs).double()
    with torch.no_grad():
        mod.W_prob.weight.mul_(20)  # information that varies, so region counts differ
        for lin in (mod.W_q, mod.W_k, mod.W_v, mod.W_o, mod.W_prob):
            lin.bias.normal_()
    return mod


@pytest.mark.parametrize("sigma", [1, 3])
def test_attention_matches_the_official_algorithm_per_image(sigma):
    """mode="official_fixed_chunk" with gauss_taps="code" is the official clustering (with the
    standard numerics) for an image alone; the paper's taps are not."""
    torch.manual_seed(0)
    B, H, W = 3, 5, 7
    mod = _official_like_module(sigma)
    src = torch.randn(B, H * W, 8, dtype=torch.float64)
    pos = torch.randn(B, H * W, 8, dtype=torch.float64)
    out = mod(src, pos, None, (H, W))
    official = torch.cat([official_forward(mod, src[b:b + 1], pos[b:b + 1]) for b in range(B)])
    assert torch.allclose(out, official, atol=1e-10)
    # the statistics report the chunks: M_b = N // c_b clusters per image
    _, _, counts = regions(mod.information, None, mod.sigma, gauss_taps="code")
    sizes = [round(H * W / int(r)) for r in counts]
    assert mod.last_stats["clusters_per_image"].tolist() == [H * W // c for c in sizes]
    assert len(set(sizes)) > 1  # so one batch-wide size would differ (next test)
    mod.gauss_taps = "paper"
    assert not torch.allclose(mod(src, pos, None, (H, W)), official, atol=1e-6)


@pytest.mark.parametrize("sigma", [1, 3])
def test_ignored_padding_matches_the_official_algorithm_on_a_padded_batch(sigma):
    """honour_mask=False: the mask is ignored and the batch shares one chunk size, as in the
    official code; with the mask honoured (default) the padded batch gives other outputs.
    (Seed 0: the images' own chunk sizes differ, see the test above.)"""
    torch.manual_seed(0)
    B, H, W = 3, 5, 7
    mod = _official_like_module(sigma, honour_mask=False)
    src = torch.randn(B, H * W, 8, dtype=torch.float64)
    pos = torch.randn(B, H * W, 8, dtype=torch.float64)
    mask = torch.zeros(B, H, W, dtype=torch.bool)
    mask[1, 3:], mask[2, :, 4:] = True, True
    mask = mask.flatten(1)
    official = official_forward(mod, src, pos)
    assert torch.allclose(mod(src, pos, mask, (H, W)), official, atol=1e-10)
    assert torch.equal(mod.last_stats["pixels_per_image"], torch.full((B,), float(H * W)))
    mod.honour_mask = True
    assert not torch.allclose(mod(src, pos, mask, (H, W)), official, atol=1e-6)
    assert not torch.allclose(mod(src, pos, None, (H, W)), official, atol=1e-6)  # per image c


def test_fixed_chunks_are_batch_invariant_and_differentiable():
    """An image's output does not depend on the padded batch it is in (per-image chunk size,
    padding excluded; the official code's batch-wide size does), and gradients reach W_prob
    through the chunk weights."""
    torch.manual_seed(1)
    d, h0, w0, H, W = 16, 5, 6, 8, 9
    mod = ENACTAttention(d, 4, sigma=2, impl="torch", mode="official_fixed_chunk").eval()
    with torch.no_grad():
        mod.W_prob.weight.mul_(10)
    img, img_pos = torch.randn(h0 * w0, d), torch.randn(h0 * w0, d)
    alone = mod(img[None], img_pos[None], None, (h0, w0))[0]
    src, pos = torch.randn(2, H, W, d) * 5, torch.randn(2, H, W, d) * 5
    src[1, :h0, :w0], pos[1, :h0, :w0] = img.view(h0, w0, d), img_pos.view(h0, w0, d)
    mask = torch.ones(2, H, W, dtype=torch.bool)
    mask[0], mask[1, :h0, :w0] = False, False
    batch = mod(src.flatten(1, 2), pos.flatten(1, 2), mask.flatten(1), (H, W))
    assert torch.allclose(batch[1].view(H, W, d)[:h0, :w0].reshape(-1, d), alone, atol=1e-5)

    mod.train()
    mod(src.flatten(1, 2), pos.flatten(1, 2), mask.flatten(1), (H, W)).square().sum().backward()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert mod.W_prob.weight.grad.abs().sum() > 0


def test_clustering_entry_point_uses_one_set_of_chunks():
    torch.manual_seed(2)
    mod = ENACTClustering(8, sigma=1, impl="torch", mode="official_fixed_chunk")
    keys, a, b = torch.randn(2, 20, 8), torch.randn(2, 20, 8), torch.randn(2, 20, 3)
    clusters = mod(keys, (a, b), None, (4, 5))
    index = clusters.region_index
    assert index.max(1).values.tolist() == (clusters.counts - 1).tolist()
    for r in range(int(clusters.counts[0])):  # each chunk: consecutive pixels
        where = (index[0] == r).nonzero().flatten()
        assert torch.equal(where, torch.arange(int(where[0]), int(where[-1]) + 1))
    assert clusters.values[0].shape[:2] == clusters.values[1].shape[:2]


def test_mode_is_checked():
    with pytest.raises(ValueError, match="mode must be one of"):
        ENACTAttention(8, 2, sigma=1, mode="chunks")
    with pytest.raises(ValueError, match="row_breaks does not apply"):
        ENACTClustering(8, sigma=1, row_breaks=True, mode="official_fixed_chunk")


FOLDERS = ["DETR-ENACT", "Conditional-DETR-ENACT", "Anchor-DETR-ENACT"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_enact_mode_reaches_each_detector(folder):
    """--enact_mode builds the detector's ENACT modules in that mode (default: the paper's
    regions), and a training forward with the official chunks runs."""
    main = load_main(folder)
    base = without(TINY, "--num_queries") if folder == "Anchor-DETR-ENACT" else TINY
    modes = {}
    for flags in ((), ("--enact_mode", "official_fixed_chunk")):
        args = main.get_parser().parse_args([*base, "--num_classes", "5", *flags])
        torch.manual_seed(0)
        model = main.DETECTOR.build(args)[0]
        modules = [m for m in model.modules() if isinstance(m, (ENACTAttention, ENACTClustering))]
        assert modules
        modes[flags] = {m.mode for m in modules}
    assert modes == {(): {"paper_regions"},
                     ("--enact_mode", "official_fixed_chunk"): {"official_fixed_chunk"}}
    from detr_common.data.collate import pad_images
    images = pad_images([torch.randn(3, 64, 64), torch.randn(3, 48, 64)])
    out = model.train()(images)
    assert torch.isfinite(out["pred_boxes"]).all()


@pytest.mark.parametrize("folder", FOLDERS)
def test_enact_gauss_taps_and_padding_reach_each_detector(folder):
    """--enact_gauss_taps code / --enact_padding ignore build every ENACT module of the
    detector with the official code's Gaussian / padding handling (default: ours)."""
    main = load_main(folder)
    base = without(TINY, "--num_queries") if folder == "Anchor-DETR-ENACT" else TINY
    built = {}
    for flags in ((), ("--enact_gauss_taps", "code", "--enact_padding", "ignore")):
        args = main.get_parser().parse_args([*base, "--num_classes", "5", *flags])
        model = main.DETECTOR.build(args)[0]
        built[flags] = {(m.gauss_taps, m.honour_mask) for m in model.modules()
                        if isinstance(m, (ENACTAttention, ENACTClustering))}
    assert list(built.values()) == [{("paper", True)}, {("code", False)}]
