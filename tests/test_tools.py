"""tools/predict.py, tools/visualize_entropy.py, tools/plot_logs.py and docker/entrypoint.sh on
tiny checkpoints: one DETR + ENACT trained for an epoch through main.py, and a plain DETR and an
Anchor DETR + ENACT built in-process (random weights, saved as main.py saves them)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from _cli import ROOT, TINY, load_main, run_main
from detr_common.checkpoint import save_checkpoint
from detr_common.data import build_dataset
from detr_common.data.collate import collate_fn
from detr_common.drawing import region_boundaries, resize_map
from detr_common.inference import guess_detector, load_detector_from_checkpoint

SHAPE_IDS = {1: "circle", 3: "square", 5: "triangle", 8: "star", 13: "ellipse", 21: "cross"}
SHAPES_NUM_CLASSES = 22  # largest shapes category id (21) + 1


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


predict = _tool("predict")
visualize = _tool("visualize_entropy")
plot_logs = _tool("plot_logs")


def _exit_error(tool, argv, capsys):
    """Run a tool's main in-process; it must exit with status 2 and one 'error: ' line."""
    with pytest.raises(SystemExit) as info:
        tool.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


def _val_images(shapes_coco):
    return sorted((shapes_coco / "val2017").iterdir())


# --------------------------------------------------------------------------- checkpoints

@pytest.fixture(scope="module")
def enact_run(shapes_coco, tmp_path_factory):
    """DETR + ENACT (torch backend), 1 epoch on shapes: the run folder (checkpoint, log.txt)."""
    out = tmp_path_factory.mktemp("detr_enact")
    run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", out, *TINY,
             "--enact_impl", "torch", "--smoothing_sigma", "1", "--epochs", "1")
    return out


def _built_checkpoint(folder, package, detector, argv, path):
    """Build ``package`` from ``folder``'s main.py flags and save it as main.py would."""
    args = load_main(folder).get_parser().parse_args(argv)
    args.num_classes = SHAPES_NUM_CLASSES
    torch.manual_seed(0)
    model = importlib.import_module(package).build(args)[0]
    save_checkpoint({"model": model.state_dict(), "args": args, "detector": detector,
                     "epoch": 0}, path)
    return path


def _without(flags, name):
    """``flags`` minus ``name`` and its value (Anchor DETR has no --num_queries)."""
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    """Plain DETR (--no_enact); its args.coco_path does not exist (no class names)."""
    path = tmp_path_factory.mktemp("plain") / "checkpoint.pth"
    return _built_checkpoint("DETR-ENACT", "detr", "detr",
                             ["--coco_path", "/nonexistent/coco", "--no_enact", *TINY], path)


@pytest.fixture(scope="module")
def anchor_ckpt(shapes_coco, tmp_path_factory):
    """Anchor DETR + ENACT (ENACTClustering), 2 spatial encoder layers, random weights."""
    path = tmp_path_factory.mktemp("anchor") / "checkpoint.pth"
    return _built_checkpoint(
        "Anchor-DETR-ENACT", "anchor_detr", "anchor_detr",
        ["--coco_path", str(shapes_coco), *_without(TINY, "--num_queries"), "--enc_layers", "2",
         "--enact_impl", "torch",
         "--smoothing_sigma", "1", "--num_query_position", "4", "--num_query_pattern", "2"],
        path)


# --------------------------------------------------------------------------- predict

def test_predict_folder_matches_evaluation_pipeline(enact_run, shapes_coco, tmp_path):
    """As a user runs it (subprocess): drawn images of the input sizes and a detections JSON
    whose scores/boxes equal the model run through the training code's val dataset + collate
    + post-processor (an independent path to the same numbers)."""
    out = tmp_path / "pred"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "predict.py"), "--checkpoint",
         str(enact_run / "checkpoint.pth"), "--input", str(shapes_coco / "val2017"),
         "--output", str(out), "--threshold", "0", "--device", "cpu", "--coco_path",
         str(shapes_coco)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "detections.json").read_text())
    assert data["detector"] == "detr" and data["threshold"] == 0
    images = _val_images(shapes_coco)
    assert [r["file"] for r in data["images"]] == [str(p) for p in images]
    for record, path in zip(data["images"], images):
        with Image.open(path) as im:
            size = im.size
        assert (record["width"], record["height"]) == size
        with Image.open(out / f"{path.stem}_pred{path.suffix}") as drawn:
            assert drawn.size == size
        dets = record["detections"]
        assert len(dets) == 10                       # --num_queries 10, threshold 0 keeps all
        for d in dets:
            assert set(d) == {"label", "name", "score", "box_xyxy"}
            assert d["name"] == SHAPE_IDS.get(d["label"], f"class {d['label']}")
            x1, y1, x2, y2 = d["box_xyxy"]
            assert 0 <= x1 <= x2 <= size[0] and 0 <= y1 <= y2 <= size[1]
        scores = [d["score"] for d in dets]
        assert scores == sorted(scores, reverse=True) and 0 <= scores[-1] <= scores[0] <= 1

    # Reference: the val dataset + collate of the training code (one image per batch: the
    # backbone is not padding-invariant at the image border).
    model, post, args, _ = load_detector_from_checkpoint(enact_run / "checkpoint.pth", "cpu")
    dataset = build_dataset("val", args)
    for i, record in enumerate(data["images"]):
        batch, (target,) = collate_fn([dataset[i]])
        with torch.no_grad():
            result = post(model(batch), target["orig_size"][None])[0]
        h, w = target["orig_size"].tolist()
        assert (record["width"], record["height"]) == (w, h)
        order = result["scores"].argsort(descending=True)
        ref_scores = result["scores"][order]
        ref_boxes = result["boxes"][order]
        ref_boxes[:, 0::2] = ref_boxes[:, 0::2].clamp(0, w)
        ref_boxes[:, 1::2] = ref_boxes[:, 1::2].clamp(0, h)
        got_scores = torch.tensor([d["score"] for d in record["detections"]])
        got_boxes = torch.tensor([d["box_xyxy"] for d in record["detections"]])
        assert torch.allclose(got_scores, ref_scores, atol=2e-4)
        assert torch.allclose(got_boxes, ref_boxes, atol=0.02)
        assert [d["label"] for d in record["detections"]] == result["labels"][order].tolist()


def test_predict_threshold_and_class_name_fallback(plain_ckpt, shapes_coco, tmp_path):
    """--threshold keeps exactly the scores >= it; without annotations the names are
    'class <id>' (the checkpoint's own coco_path does not exist)."""
    image = _val_images(shapes_coco)[0]
    everything = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", str(plain_ckpt), "--input", str(image), "--output",
         str(tmp_path / "all"), "--threshold", "0", "--device", "cpu", "--no_images"]))
    dets = everything["images"][0]["detections"]
    assert all(d["name"] == f"class {d['label']}" for d in dets)
    assert not list((tmp_path / "all").glob("*_pred*"))
    scores = sorted((d["score"] for d in dets), reverse=True)
    t = (scores[2] + scores[3]) / 2 if scores[2] > scores[3] else scores[2]
    kept = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", str(plain_ckpt), "--input", str(image), "--output",
         str(tmp_path / "some"), "--threshold", str(t), "--device", "cpu"]))
    assert [d["score"] for d in kept["images"][0]["detections"]] == [s for s in scores if s >= t]


def test_predict_anchor_detr(anchor_ckpt, shapes_coco, tmp_path):
    """An Anchor DETR checkpoint: names from --annotations, top-100 sigmoid detections."""
    out = tmp_path / "pred"
    image = _val_images(shapes_coco)[1]
    result = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", str(anchor_ckpt), "--input", str(image), "--output", str(out),
         "--threshold", "0", "--device", "cpu", "--annotations",
         str(shapes_coco / "annotations" / "instances_val2017.json")]))
    assert result["detector"] == "anchor_detr"
    dets = result["images"][0]["detections"]
    assert len(dets) == 100
    assert all(0 <= d["label"] < SHAPES_NUM_CLASSES for d in dets)
    assert all(d["name"] == SHAPE_IDS.get(d["label"], f"class {d['label']}") for d in dets)
    with Image.open(image) as im, Image.open(out / f"{image.stem}_pred{image.suffix}") as dr:
        assert dr.size == im.size


def test_predict_errors(enact_run, shapes_coco, tmp_path, capsys):
    ckpt = str(enact_run / "checkpoint.pth")
    msg = _exit_error(predict, ["--checkpoint", str(tmp_path / "missing.pth"), "--input",
                                str(shapes_coco / "val2017")], capsys)
    assert "missing.pth" in msg and "not found" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(empty)], capsys)
    assert str(empty) in msg and "no images" in msg
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(bad), "--output",
                                str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert "broken.jpg" in msg and "cannot read image" in msg
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(tmp_path / "nope")], capsys)
    assert "no such file or folder" in msg
    # With --skip_unreadable the bad file is reported and the good one predicted.
    good = _val_images(shapes_coco)[0]
    result = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", ckpt, "--input", str(bad), str(good), "--output", str(tmp_path / "s"),
         "--device", "cpu", "--skip_unreadable", "--no_images"]))
    assert result["skipped"] == [str(bad)] and len(result["images"]) == 1
    # a --detector that contradicts the checkpoint's own entry; --enact_impl cuda without a
    # CUDA device; an --output that is a file; counts below 1
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(good), "--detector",
                                "anchor_detr", "--device", "cpu"], capsys)
    assert "this is a 'detr' checkpoint, not 'anchor_detr'" in msg
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(good), "--device", "cpu",
                                "--enact_impl", "cuda"], capsys)
    assert "--enact_impl cuda needs --device cuda" in msg
    msg = _exit_error(predict, ["--checkpoint", ckpt, "--input", str(good), "--device", "cpu",
                                "--output", str(empty / "notes.txt")], capsys)
    assert "notes.txt: is a file, not a folder" in msg
    for flag in ("--max_images", "--top_k"):
        with pytest.raises(SystemExit) as info:
            predict.get_parser().parse_args(["--checkpoint", ckpt, "--input", str(good), flag,
                                             "0"])
        assert info.value.code == 2 and "integer >= 1" in capsys.readouterr().err


def test_predict_output_names_never_clash_and_exif_upright(enact_run, shapes_coco, tmp_path):
    """x.jpg, x_2.jpg and another folder's x.jpg give three drawn images (the renamed one may
    not take x_2's name), each named in detections.json; an image stored sideways with EXIF
    orientation 6 is predicted upright, as viewers show it."""
    src = Image.open(_val_images(shapes_coco)[0])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for name in ("a/x.jpg", "a/x_2.jpg", "b/x.jpg"):
        src.save(tmp_path / name)
    sideways = src.transpose(Image.Transpose.ROTATE_90)  # stored rotated ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... and tagged "rotate 90 degrees clockwise to view"
    sideways.save(tmp_path / "b" / "turned.jpg", exif=exif)
    out = tmp_path / "pred"
    result = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", str(enact_run / "checkpoint.pth"), "--input", str(tmp_path / "a"),
         str(tmp_path / "b"), "--output", str(out), "--device", "cpu", "--threshold", "0"]))
    names = [r["output"] for r in result["images"]]
    assert len(set(names)) == 4 and sorted(p.name for p in out.glob("*_pred.jpg")) == sorted(names)
    turned = next(r for r in result["images"] if r["file"].endswith("turned.jpg"))
    assert (turned["width"], turned["height"]) == src.size  # upright, not the stored raster
    with Image.open(out / turned["output"]) as drawn:
        assert drawn.size == src.size


def test_unique_stems_case_and_renamed_clash():
    from detr_common.inference import unique_stems
    paths = [Path(p) for p in ("a/x.jpg", "b/x.png", "a/x_2.jpg", "c/X.jpg", "d/y.jpg")]
    assert unique_stems(paths) == ["x", "x_2", "x_2_2", "X_3", "y"]


# --------------------------------------------------------------------------- visualize_entropy

@pytest.fixture(scope="module")
def conditional_ckpt(shapes_coco, tmp_path_factory):
    """Conditional DETR + ENACT (ENACTAttention), random weights."""
    path = tmp_path_factory.mktemp("conditional") / "checkpoint.pth"
    return _built_checkpoint(
        "Conditional-DETR-ENACT", "conditional_detr", "conditional_detr",
        ["--coco_path", str(shapes_coco), *TINY, "--enact_impl", "torch",
         "--smoothing_sigma", "1"], path)


def test_conditional_detr_predict_and_entropy(conditional_ckpt, shapes_coco, tmp_path):
    image = _val_images(shapes_coco)[3]
    result = predict.run(predict.get_parser().parse_args(
        ["--checkpoint", str(conditional_ckpt), "--input", str(image), "--output",
         str(tmp_path / "pred"), "--threshold", "0", "--top_k", "7", "--device", "cpu"]))
    assert result["detector"] == "conditional_detr"
    dets = result["images"][0]["detections"]
    assert len(dets) == 7 and all(d["name"] == SHAPE_IDS.get(d["label"], f"class {d['label']}")
                                  for d in dets)   # names via the checkpoint's own coco_path
    visualize.main(["--checkpoint", str(conditional_ckpt), "--input", str(image), "--output",
                    str(tmp_path / "ent"), "--device", "cpu"])
    with Image.open(image) as im:
        _check_pngs(tmp_path / "ent", image.stem, [0], im.size)


def _check_pngs(out, stem, layers, size, levels=None):
    names = ("information", "smoothed", "regions")
    for layer in layers:
        tags = [f"{stem}_enc{layer}"] if levels is None else \
            [f"{stem}_enc{layer}_lvl{k}" for k in range(levels)]
        for tag in tags:
            for name in names:
                with Image.open(out / f"{tag}_{name}.png") as im:
                    assert im.size == size, (tag, name)
            assert (out / f"{tag}_panel.png").is_file()


def test_visualize_entropy_detr(enact_run, shapes_coco, tmp_path):
    """PNGs of the image size; the regions drawn are the forward pass's own (same count as
    the module's last_stats), and the information map is the module's information."""
    image_path = _val_images(shapes_coco)[2]
    out = tmp_path / "ent"
    visualize.main(["--checkpoint", str(enact_run / "checkpoint.pth"), "--input",
                    str(image_path), "--output", str(out), "--device", "cpu",
                    "--eval_size", "160", "--max_size", "256"])
    with Image.open(image_path) as im:
        image = im.convert("RGB")
    _check_pngs(out, image_path.stem, [0], image.size)

    model, _, args, _ = load_detector_from_checkpoint(enact_run / "checkpoint.pth", "cpu")
    modules = visualize.enact_modules(model)
    assert len(modules) == 1                                  # TINY: one encoder layer
    from detr_common.inference import eval_transform, prepare_image
    batch = prepare_image(image, eval_transform(args, 160, 256), "cpu")
    capture = visualize.Capture(modules)
    with torch.no_grad():
        model(batch)
    capture.remove()
    mask, hw = capture.calls[0]
    assert hw == (batch.images.shape[-2] // 32 + (batch.images.shape[-2] % 32 > 0),
                  batch.images.shape[-1] // 32 + (batch.images.shape[-1] % 32 > 0))
    maps = visualize.layer_maps(modules[0], mask, hw)[0]
    assert maps["count"] == int(modules[0].last_stats["clusters_per_image"][0])
    assert maps["count"] > 1
    info = modules[0].information[0].reshape(hw)                  # raster order: i = y*W + x
    assert np.allclose(maps["information"], info.numpy())
    # The information PNG: the token of largest / smallest information is the top / bottom
    # colour of the colour map at that token's block in the image.
    import cv2
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_INFERNO)
    png = np.asarray(Image.open(out / f"{image_path.stem}_enc0_information.png"))
    rows = (np.arange(image.height) * hw[0]) // image.height
    cols = (np.arange(image.width) * hw[1]) // image.width
    for flat, level in [(int(info.argmax()), 255), (int(info.argmin()), 0)]:
        y, x = divmod(flat, hw[1])
        ys, xs = np.nonzero(rows == y)[0], np.nonzero(cols == x)[0]
        block = png[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1].reshape(-1, 3)
        assert (block == lut[level, 0, ::-1]).all(), (flat, level)
    # The regions PNG: boundary pixels (white) exactly where the upsampled labels change.
    labels = resize_map(maps["regions"], (image.height, image.width))
    drawn = np.asarray(Image.open(out / f"{image_path.stem}_enc0_regions.png"))
    edge = region_boundaries(labels)
    assert (drawn[edge] == 255).all()
    assert edge.any()


def test_visualize_entropy_anchor_layers(anchor_ckpt, shapes_coco, tmp_path):
    out = tmp_path / "ent"
    images = _val_images(shapes_coco)[:2]
    visualize.main(["--checkpoint", str(anchor_ckpt), "--input", *map(str, images),
                    "--output", str(out), "--device", "cpu", "--layer", "1"])
    for path in images:
        with Image.open(path) as im:
            _check_pngs(out, path.stem, [1], im.size)
    assert not list(out.glob("*_enc0_*"))


def test_visualize_entropy_errors(plain_ckpt, enact_run, shapes_coco, tmp_path, capsys):
    image = str(_val_images(shapes_coco)[0])
    msg = _exit_error(visualize, ["--checkpoint", str(plain_ckpt), "--input", image,
                                  "--output", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert "no ENACT layers" in msg and "--no_enact" in msg
    msg = _exit_error(visualize, ["--checkpoint", str(enact_run / "checkpoint.pth"), "--input",
                                  image, "--layer", "3", "--device", "cpu"], capsys)
    assert "--layer 3" in msg and "1 ENACT layer" in msg
    msg = _exit_error(visualize, ["--checkpoint", str(tmp_path / "none.pth"), "--input", image],
                      capsys)
    assert "none.pth" in msg and "not found" in msg


# --------------------------------------------------------------------------- helpers

def test_resize_map_matches_torch_nearest_and_boundaries():
    grid = torch.arange(12).reshape(3, 4)
    for size in [(7, 9), (30, 41), (3, 4), (96, 130)]:
        ref = F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0].long()
        assert np.array_equal(resize_map(grid.numpy(), size), ref.numpy()), size
    labels = np.array([[0, 0, 1],
                       [0, 2, 2]])
    expected = np.array([[False, True, True],
                         [True, False, False]])
    assert np.array_equal(region_boundaries(labels), expected)


def test_guess_detector_from_keys(plain_ckpt, anchor_ckpt):
    for path, name in [(plain_ckpt, "detr"), (anchor_ckpt, "anchor_detr")]:
        state = torch.load(path, weights_only=False)["model"]
        assert guess_detector(state) == name
    assert guess_detector({"backbone.0.body.conv1.weight": torch.zeros(1)}) is None


# --------------------------------------------------------------------------- plot_logs

def test_plot_logs(enact_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plain = tmp_path / "plain"
    plain.mkdir()
    with (plain / "log.txt").open("w") as f:
        for epoch in range(3):
            f.write(json.dumps({"epoch": epoch, "train_loss": 9 - epoch, "test_loss": 10 - epoch,
                                "test_coco_eval_bbox": [0.1 * epoch] * 12}) + "\n")
    out = tmp_path / "figs" / "curves.png"
    plot_logs.main([str(enact_run), str(plain / "log.txt"), "--labels", "ENACT", "plain",
                    "--fields", "loss", "AP", "enact_cluster_ratio", "--output", str(out)])
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 200
    capsys.readouterr()
    msg = _exit_error(plot_logs, [str(plain), "--fields", "nonsense", "--output",
                                  str(tmp_path / "x.png")], capsys)
    assert msg.endswith("available: AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, "
                        "ARl, loss"), msg  # what --fields takes: no 'epoch', no 'train_loss'
    # a folder gets training_curves.png inside it; a name without a suffix gets .png
    plot_logs.main([str(plain), "--output", str(tmp_path / "figs")])
    plot_logs.main([str(plain), "--output", str(tmp_path / "bare")])
    assert capsys.readouterr().out.split() == [
        "wrote", str(tmp_path / "figs" / "training_curves.png"),
        "wrote", str(tmp_path / "bare.png")]
    assert (tmp_path / "figs" / "training_curves.png").is_file() and not (tmp_path / "bare").exists()
    msg = _exit_error(plot_logs, [str(tmp_path / "missing")], capsys)
    assert "no such log file" in msg
    msg = _exit_error(plot_logs, [str(plain), "--labels", "a", "b"], capsys)
    assert "1 log" in msg


def test_plot_logs_without_matplotlib(enact_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    msg = _exit_error(plot_logs, [str(enact_run), "--output", str(tmp_path / "c.png")], capsys)
    assert "pip install matplotlib" in msg
    assert not (tmp_path / "c.png").exists()


# --------------------------------------------------------------------------- docker entrypoint

def _entrypoint(*args, **env):
    full = {**os.environ, "ENACT_REPO": str(ROOT), "PYTHON": sys.executable, **env}
    return subprocess.run(["bash", str(ROOT / "docker" / "entrypoint.sh"), *args],
                          capture_output=True, text=True, timeout=120, env=full)


def test_entrypoint_dispatch(tmp_path):
    assert subprocess.run(["bash", "-n", str(ROOT / "docker" / "entrypoint.sh")]).returncode == 0
    proc = _entrypoint("train", "yolo", COCO_DIR=str(tmp_path))
    assert proc.returncode == 2 and "unknown detector 'yolo'" in proc.stderr
    proc = _entrypoint("train", "detr", COCO_DIR=str(tmp_path / "absent"))
    assert proc.returncode == 2 and "no COCO at" in proc.stderr
    proc = _entrypoint("echo", "passthrough")
    assert proc.returncode == 0 and proc.stdout.strip() == "passthrough"


def test_visualize_entropy_draws_the_official_fixed_chunks():
    """A module in mode "official_fixed_chunk": the drawn clusters are its chunks (their count
    is the forward's, each a run of consecutive pixels), not the paper regions."""
    from enact_cuda import ENACTAttention, fixed_chunks, regions
    torch.manual_seed(0)
    hw = (5, 6)
    mod = ENACTAttention(16, 4, sigma=1, impl="torch", mode="official_fixed_chunk").eval()
    with torch.no_grad():
        mod.W_prob.weight.mul_(10)
        mod(torch.randn(1, 30, 16), torch.randn(1, 30, 16), None, hw)
    maps = visualize.layer_maps(mod, None, hw)[0]
    assert maps["count"] == int(mod.last_stats["clusters_per_image"][0])
    _, paper_index, counts = regions(mod.information, None, mod.sigma)
    chunk_index, _ = fixed_chunks(counts, None, 30)
    assert np.array_equal(maps["regions"].reshape(-1), chunk_index[0].numpy())
    assert not np.array_equal(maps["regions"].reshape(-1), paper_index[0].numpy())
