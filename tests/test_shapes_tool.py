"""tools/make_shapes_coco.py: determinism, COCO layout, annotation sanity, CLI."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "make_shapes_coco.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_shapes_coco_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load(root, split):
    return json.loads((Path(root) / "annotations" / f"instances_{split}2017.json").read_text())


def _tree_bytes(root):
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_same_seed_gives_identical_files_and_other_seed_differs(tool, tmp_path):
    a = tool.generate(tmp_path / "a", 6, 3, 48, 96, seed=5)
    b = tool.generate(tmp_path / "b", 6, 3, 48, 96, seed=5)
    c = tool.generate(tmp_path / "c", 6, 3, 48, 96, seed=6)
    files_a, files_b = _tree_bytes(a), _tree_bytes(b)
    assert len(files_a) == 6 + 3 + 2
    assert files_a == files_b
    assert files_a["annotations/instances_train2017.json"] != \
        _tree_bytes(c)["annotations/instances_train2017.json"]


def test_image_does_not_depend_on_split_length(tool, tmp_path):
    small = tool.generate(tmp_path / "s", 2, 1, 48, 96, seed=1)
    large = tool.generate(tmp_path / "l", 4, 2, 48, 96, seed=1)
    for split, n in (("train", 2), ("val", 1)):
        first_small, first_large = _load(small, split), _load(large, split)
        assert first_small["images"] == first_large["images"][:n]
        for img in first_small["images"]:
            name = f"{split}2017/{img['file_name']}"
            assert (small / name).read_bytes() == (large / name).read_bytes()


def test_layout_ids_sizes_and_annotations(shapes_coco):
    root = Path(shapes_coco)
    all_ann_ids, all_img_ids = [], []
    for split, count in (("train", 8), ("val", 4)):
        data = _load(root, split)
        assert {"images", "annotations", "categories"} <= set(data)
        assert len(data["images"]) == count

        cat_ids = sorted(c["id"] for c in data["categories"])
        assert cat_ids == [1, 3, 5, 8, 13, 21]  # non-contiguous, as in COCO
        assert cat_ids != list(range(1, len(cat_ids) + 1))
        for cat in data["categories"]:
            assert isinstance(cat["name"], str) and cat["name"]
            assert isinstance(cat["supercategory"], str) and cat["supercategory"]

        sizes = {}
        for img in data["images"]:
            path = root / f"{split}2017" / img["file_name"]
            with Image.open(path) as im:
                assert im.size == (img["width"], img["height"])
                assert im.mode == "RGB"
            assert 64 <= img["width"] <= 128 and 64 <= img["height"] <= 128
            sizes[img["id"]] = (img["width"], img["height"])
        assert len({w / h for w, h in sizes.values()}) > 1  # varied aspect ratios

        per_image = {i: 0 for i in sizes}
        for ann in data["annotations"]:
            assert ann["category_id"] in cat_ids
            per_image[ann["image_id"]] += 1
            x, y, w, h = ann["bbox"]
            assert all(isinstance(v, float) for v in ann["bbox"])
            W, H = sizes[ann["image_id"]]
            assert w > 0 and h > 0 and x >= 0 and y >= 0
            assert x + w <= W + 1e-6 and y + h <= H + 1e-6
            assert 0 < ann["area"] <= w * h + 1e-6
            assert ann["iscrowd"] in (0, 1)
        assert min(per_image.values()) == 0  # some images have no objects
        assert max(per_image.values()) >= 2
        if split == "train":
            assert sum(a["iscrowd"] for a in data["annotations"]) >= 1
        all_ann_ids += [a["id"] for a in data["annotations"]]
        all_img_ids += list(sizes)
    assert len(set(all_ann_ids)) == len(all_ann_ids)
    assert len(set(all_img_ids)) == len(all_img_ids)


def test_variety_of_classes_sizes_and_overlaps(tool, tmp_path):
    root = tool.generate(tmp_path / "v", 60, 0, 64, 128, seed=2)
    data = _load(root, "train")
    sizes = {img["id"]: min(img["width"], img["height"]) for img in data["images"]}
    anns = [a for a in data["annotations"] if not a["iscrowd"]]
    assert {a["category_id"] for a in anns} == {1, 3, 5, 8, 13, 21}
    rel = [max(a["bbox"][2], a["bbox"][3]) / sizes[a["image_id"]] for a in anns]
    assert min(max(a["bbox"][2], a["bbox"][3]) for a in anns) < 8  # tiny objects
    assert max(rel) > 0.5  # large objects

    def overlap(a, b):
        ax, ay, aw, ah = a["bbox"]
        bx, by, bw, bh = b["bbox"]
        return min(ax + aw, bx + bw) > max(ax, bx) and min(ay + ah, by + bh) > max(ay, by)

    pairs = sum(overlap(a, b) for i, a in enumerate(anns) for b in anns[i + 1:]
                if a["image_id"] == b["image_id"])
    assert pairs >= 3
    assert max(len([a for a in anns if a["image_id"] == i]) for i in sizes) <= 4


def test_render_shape_box_matches_hand_computed_square(tool):
    # axis-aligned square of half side 10 centred at (30, 20): box [20, 10, 20, 20]
    alpha, (x0, y0), bbox = tool.render_shape("square", 30.0, 20.0, 10 * np.sqrt(2), 1.0, 0.0,
                                              64, 48)
    assert np.allclose(bbox, [20, 10, 20, 20], atol=0.3)
    assert abs(float(alpha.sum()) - 400.0) < 15.0
    # drawn coverage lies inside the box
    ys, xs = np.nonzero(alpha > 0)
    assert xs.min() + x0 >= 19 and xs.max() + x0 <= 40
    assert ys.min() + y0 >= 9 and ys.max() + y0 <= 30
    # cut by the left border: the visible part only
    _, _, cut = tool.render_shape("square", 2.0, 20.0, 10 * np.sqrt(2), 1.0, 0.0, 64, 48)
    assert np.allclose(cut, [0, 10, 12, 20], atol=0.3)
    # entirely outside: nothing
    assert tool.render_shape("circle", -30.0, 20.0, 5.0, 1.0, 0.0, 64, 48)[2] is None


def test_cli_writes_the_same_as_generate(tool, tmp_path):
    tool.generate(tmp_path / "api", 3, 2, 40, 72, seed=9)
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--out", str(tmp_path / "cli"), "--num_train", "3",
         "--num_val", "2", "--min_size", "40", "--max_size", "72", "--seed", "9"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _tree_bytes(tmp_path / "api") == _tree_bytes(tmp_path / "cli")


def test_cli_workers_write_the_same_files(tool, tmp_path):
    """Drawing in worker processes changes nothing: the same bytes, ids in the same order.
    (40 training images: more than one chunk, so the pool really starts two processes.)"""
    assert 40 > tool.POOL_CHUNK
    tool.generate(tmp_path / "one", 40, 3, 40, 72, seed=4)
    proc = subprocess.run(
        [sys.executable, str(TOOL), "--out", str(tmp_path / "pool"), "--num_train", "40",
         "--num_val", "3", "--min_size", "40", "--max_size", "72", "--seed", "4",
         "--workers", "2"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _tree_bytes(tmp_path / "one") == _tree_bytes(tmp_path / "pool")


def test_negative_workers_refused(tool, tmp_path):
    with pytest.raises(ValueError, match="workers"):
        tool.generate(tmp_path / "x", 1, 1, 40, 72, seed=0, workers=-1)


def test_negative_counts_refused(tool, tmp_path):
    with pytest.raises(ValueError, match="num_train, num_val >= 0"):
        tool.generate(tmp_path / "x", -5, 1, 40, 72, seed=0)


def test_regenerating_smaller_removes_the_earlier_images_only(tool, tmp_path):
    out = tmp_path / "d"
    tool.generate(out, 5, 3, 40, 72, seed=0)
    (out / "train2017" / "notes.txt").write_text("mine")
    tool.generate(out, 2, 1, 40, 72, seed=0)
    for split in ("train", "val"):
        listed = {im["file_name"] for im in _load(out, split)["images"]}
        on_disk = {p.name for p in (out / f"{split}2017").glob("*.jpg")}
        assert on_disk == listed and len(listed) == (2 if split == "train" else 1)
    assert (out / "train2017" / "notes.txt").read_text() == "mine"
