"""On a GPU: each detector with ENACT gives the same outputs and gradients with the CUDA
kernels as with the torch backend (a padded batch of two images, and the accuracy-parity
configuration). Hidden size 256 with 8 heads, as in the papers, so the clustered attention
runs the CUDA kernel (head dim 32; Anchor DETR's joint row-column attention: q / k 64,
values 32)."""
import copy

import pytest
import torch

from _cli import TINY, load_main, without
from detr_common.data.collate import pad_images

pytestmark = pytest.mark.cuda

FOLDERS = {"DETR-ENACT": [], "Conditional-DETR-ENACT": [],
           "Anchor-DETR-ENACT": ["--num_query_position", "6", "--num_query_pattern", "2"]}


def build(folder, extra=("--smoothing_sigma", "1")):
    main = load_main(folder)
    flags = without(TINY, "--device")
    if folder == "Anchor-DETR-ENACT":
        flags = without(flags, "--num_queries")
    args = main.get_parser().parse_args(["--coco_path", "unused", "--enact_impl", "torch",
                                         *flags, "--hidden_dim", "256", "--nheads", "8",
                                         *FOLDERS[folder], *extra])
    args.num_classes = 7
    torch.manual_seed(0)
    model, criterion, _ = main.DETECTOR.build(args)
    return model.cuda().train(), criterion.cuda()


def use_cuda_kernels(model):
    for module in model.modules():
        for attr in ("impl", "enact_impl"):
            if getattr(module, attr, None) == "torch":
                setattr(module, attr, "cuda")


def loss_and_grads(model, criterion, batch, targets):
    out = model(batch)
    losses = criterion(out, targets)
    loss = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def torch_and_cuda_models(folder, seed, extra=("--smoothing_sigma", "1"),
                          sizes=((96, 128), (128, 96))):
    """(model on the torch backend, its copy on the CUDA kernels, criterion, padded batch of
    random images of `sizes` (h, w)), TF32 off."""
    model_torch, criterion = build(folder, extra)
    model_cuda = copy.deepcopy(model_torch)
    use_cuda_kernels(model_cuda)
    g = torch.Generator().manual_seed(seed)
    batch = pad_images([torch.randn(3, h, w, generator=g) for h, w in sizes]).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return model_torch, model_cuda, criterion, batch


def spy(monkeypatch, name, entry, calls):
    """Wrap enact_cuda.cuda_backend.<name>: each call appends entry(*args, **kwargs) to `calls`
    (None: nothing), then runs the real function. -> calls."""
    import enact_cuda.cuda_backend as cb
    real = getattr(cb, name)

    def wrapper(*args, **kwargs):
        recorded = entry(*args, **kwargs)
        if recorded is not None:
            calls.append(recorded)
        return real(*args, **kwargs)

    monkeypatch.setattr(cb, name, wrapper)
    return calls


def count_kernel_calls(monkeypatch):
    """-> list that records the head dims (q, v) of each CUDA attention kernel call."""
    import enact_cuda.cuda_backend as cb
    return spy(monkeypatch, "clustered_attention",
               lambda q, k, v, *a, **kw: None if cb._unsupported(q, k, v)
               else (q.shape[-1], v.shape[-1]), [])


def record_clustering_paths(monkeypatch):
    """-> list that records each ENACT clustering call: ("fused", read_rmax) for the fused
    path, ("unfused", None) for the unfused CUDA one (which blocks on R_max in every mode)."""
    paths = []
    spy(monkeypatch, "fused_begin", lambda *a, **kw: ("fused", kw.get("read_rmax", True)),
        paths)
    spy(monkeypatch, "information_regions", lambda *a, **kw: ("unfused", None), paths)
    return paths


def assert_outputs_close(out_c, out_t):
    """The CUDA model's logits and boxes equal the torch backend's."""
    assert torch.allclose(out_c["pred_logits"], out_t["pred_logits"], rtol=1e-4, atol=1e-4)
    assert torch.allclose(out_c["pred_boxes"], out_t["pred_boxes"], rtol=1e-4, atol=1e-4)


def assert_grads_close(grads_c, grads_t):
    """Every parameter gradient equal. Some are zero in exact arithmetic (e.g. the key bias,
    which shifts every logit of a query equally) and only rounding noise in both backends:
    compare on the scale of the largest gradient of the model."""
    floor = 1e-4 * max(g.abs().max() for g in grads_t.values())
    for name, grad in grads_t.items():
        assert torch.allclose(grads_c[name], grad, rtol=1e-3, atol=floor), name


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_cuda_kernels_match_torch_backend(folder, monkeypatch):
    model_torch, model_cuda, criterion, batch = torch_and_cuda_models(folder, 0)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4]], device="cuda"),
                "labels": torch.tensor([3], device="cuda")} for _ in range(2)]
    out_t, grads_t = loss_and_grads(model_torch, criterion, batch, targets)
    calls = count_kernel_calls(monkeypatch)
    paths = record_clustering_paths(monkeypatch)
    out_c, grads_c = loss_and_grads(model_cuda, criterion, batch, targets)
    assert calls == [(64, 32) if folder == "Anchor-DETR-ENACT" else (32, 32)]  # one encoder layer
    # the encoder's first layer sees the flattened feature map (a transposed view): it must
    # still take the fused path (one R_max read, after the query projection is launched)
    assert paths == [("fused", True)]
    assert_outputs_close(out_c, out_t)
    assert_grads_close(grads_c, grads_t)


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_cuda_eval_forward_matches_torch_backend(folder, monkeypatch):
    """model.eval() under no_grad: the CUDA path clusters at N rows without waiting for the GPU
    (ENACT's upper-bound mode); the outputs equal the torch backend's on a padded batch."""
    model_torch, model_cuda, _, batch = torch_and_cuda_models(folder, 1)
    with torch.no_grad():
        out_t = model_torch.eval()(batch)
        paths = record_clustering_paths(monkeypatch)
        out_c = model_cuda.eval()(batch)
    assert paths == [("fused", False)]  # no R_max read: nothing waits for the GPU
    assert_outputs_close(out_c, out_t)


# The accuracy-parity configuration: each detector's own sigma (3 / 3 / 5), row breaks, two
# encoder layers, a padded batch of six images of 224-320 px (feature maps of 7-10 cells a
# side at stride 32, 14-20 for Anchor DETR's DC5), where Conditional DETR + ENACT stays on its
# plateau while plain leaves it: the CUDA path must equal the torch backend there too.
PARITY_SIZES = ((224, 320), (320, 256), (288, 288), (256, 224), (320, 320), (232, 296))
PARITY_FLAGS = ("--enact_row_breaks", "--enc_layers", "2")


@pytest.mark.parametrize("folder", list(FOLDERS))
def test_cuda_kernels_match_torch_backend_in_the_parity_configuration(folder):
    model_torch, model_cuda, criterion, batch = torch_and_cuda_models(
        folder, 2, PARITY_FLAGS, PARITY_SIZES)
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.3, 0.4], [0.2, 0.3, 0.1, 0.2]],
                                      device="cuda"),
                "labels": torch.tensor([3, 1], device="cuda")} for _ in PARITY_SIZES]
    out_t, grads_t = loss_and_grads(model_torch, criterion, batch, targets)
    out_c, grads_c = loss_and_grads(model_cuda, criterion, batch, targets)
    assert_outputs_close(out_c, out_t)
    assert_grads_close(grads_c, grads_t)
    with torch.no_grad():
        assert_outputs_close(model_cuda.eval()(batch), model_torch.eval()(batch))
