"""Each bad input ends main.py with one clear line naming the file and the problem."""
import json
import shutil

import pytest
import torch

from _cli import TINY, run_main


def fails_with(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def detr(coco_path, out, *extra):
    return run_main("DETR-ENACT", "--coco_path", coco_path, "--output_dir", out, "--no_enact",
                    *TINY, *extra, check=False)


@pytest.fixture()
def coco_copy(shapes_coco, tmp_path):
    dst = tmp_path / "coco"
    shutil.copytree(shapes_coco, dst)
    return dst


def test_missing_coco_path(tmp_path):
    fails_with(detr(tmp_path / "nowhere", tmp_path / "o", "--epochs", "1"), "nowhere")


def test_backbone_train_all_with_a_frozen_backbone(shapes_coco, tmp_path):
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", "--backbone_train_all",
                    "--lr_backbone", "0"), "--backbone_train_all", "--lr_backbone > 0")


def test_row_breaks_with_the_official_fixed_chunks(shapes_coco, tmp_path):
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", "--enact_mode",
                    "official_fixed_chunk", "--enact_row_breaks"),
               "--enact_row_breaks", "paper_regions only")


@pytest.mark.parametrize("flag", ["--lr_drop", "--checkpoint_every", "--print_freq"])
def test_zero_epoch_counts(shapes_coco, tmp_path, flag):
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", flag, "0"),
               flag, "at least 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu(shapes_coco, tmp_path):
    proc = run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", tmp_path / "o",
                    "--no_enact", *TINY, "--device", "cuda", "--epochs", "1", check=False)
    fails_with(proc, "--device cuda", "no CUDA GPU")


def test_fp16_on_the_cpu(shapes_coco, tmp_path):
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", "--amp", "fp16"),
               "--amp fp16 needs a CUDA device", "--amp bf16")


def test_missing_backbone_weights(shapes_coco, tmp_path):
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", "--backbone_weights",
                    tmp_path / "nope.pth"), "nope.pth", "file not found")


def test_num_classes_below_the_largest_category_id(shapes_coco, tmp_path):
    # the shapes data's largest category id is 21 (make_shapes_coco.CATEGORIES)
    fails_with(detr(shapes_coco, tmp_path / "o", "--epochs", "1", "--num_classes", "21"),
               "--num_classes 21", "largest category id is 21", "at least 22")


def test_num_classes_covers_the_training_categories(coco_copy, tmp_path):
    # a category only the training file has (id 21 taken out of val) still gets a class
    path = coco_copy / "annotations" / "instances_val2017.json"
    val = json.loads(path.read_text())
    val["categories"] = [c for c in val["categories"] if c["id"] != 21]
    val["annotations"] = [a for a in val["annotations"] if a["category_id"] != 21]
    path.write_text(json.dumps(val))
    proc = detr(coco_copy, tmp_path / "o", "--epochs", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "22 classes" in proc.stderr + proc.stdout
    # ... and its name in the checkpoint (predict.py drew "class 21" when names came from val)
    train_names = {c["id"]: c["name"] for c in json.loads(
        (coco_copy / "annotations" / "instances_train2017.json").read_text())["categories"]}
    saved = torch.load(tmp_path / "o" / "checkpoint.pth", weights_only=False)["class_names"]
    assert saved == train_names and 21 in saved


def test_missing_annotation_file(coco_copy, tmp_path):
    (coco_copy / "annotations" / "instances_val2017.json").unlink()
    fails_with(detr(coco_copy, tmp_path / "o", "--epochs", "1"), "instances_val2017.json")


def test_malformed_annotation_json(coco_copy, tmp_path):
    (coco_copy / "annotations" / "instances_train2017.json").write_text("{not json")
    fails_with(detr(coco_copy, tmp_path / "o", "--epochs", "1"), "instances_train2017.json")


def test_corrupt_image(coco_copy, tmp_path):
    images = sorted((coco_copy / "val2017").iterdir())
    images[0].write_bytes(b"garbage")
    fails_with(detr(coco_copy, tmp_path / "o", "--epochs", "1"), images[0].name)


def test_checkpoint_of_another_detector(shapes_coco, tmp_path):
    path = tmp_path / "anchor.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "detector": "anchor_detr", "epoch": 0}, path)
    fails_with(detr(shapes_coco, tmp_path / "o", "--resume", path, "--eval"),
               "anchor.pth", "'anchor_detr' checkpoint")


@pytest.mark.slow
def test_checkpoint_of_another_shape_and_resume_past_the_end(shapes_coco, tmp_path):
    run = tmp_path / "run"
    detr(shapes_coco, run, "--epochs", "1")
    ckpt = run / "checkpoint.pth"
    fails_with(detr(shapes_coco, tmp_path / "o", "--resume", ckpt, "--eval",
                    "--num_queries", "12"), "checkpoint.pth", "query_embed.weight",
               "this run 12): give the checkpoint's values")
    # fine-tuning re-initialises a class head of another size; evaluating must not
    fails_with(detr(shapes_coco, tmp_path / "o", "--pretrained", ckpt, "--eval",
                    "--num_classes", "30"), "checkpoint.pth", "class_embed.weight",
               "--num_classes: checkpoint")
    fails_with(detr(shapes_coco, tmp_path / "o", "--resume", ckpt, "--epochs", "1"),
               "checkpoint.pth", "already finished epoch 0")
    # resuming continues the checkpoint's schedule: a changed one is refused, not ignored
    fails_with(detr(shapes_coco, tmp_path / "o", "--resume", ckpt, "--epochs", "2",
                    "--lr_drop", "1"), "checkpoint.pth", "--lr_drop 1 (checkpoint: 200)",
               "--pretrained")


@pytest.mark.parametrize("sigma", ["0", "70", "2.5"])
def test_smoothing_sigma_out_of_range_is_a_usage_error(sigma, capsys):
    """--smoothing_sigma outside 1..64 (the CUDA kernels' range, kept on every backend) stops at
    the parser with exit status 2, not with a traceback from the model build."""
    from detr_common.cli import get_args_parser
    with pytest.raises(SystemExit) as info:
        get_args_parser("t").parse_args(["--smoothing_sigma", sigma])
    assert info.value.code == 2 and "--smoothing_sigma" in capsys.readouterr().err
    assert get_args_parser("t").parse_args(["--smoothing_sigma", "64"]).smoothing_sigma == 64


def test_given_flags_sees_abbreviations_equals_forms_and_store_false():
    """The flags on the command line (what --resume / --eval keep instead of the checkpoint's),
    however they are spelled; the ones left out are absent."""
    from detr_common.cli import get_args_parser, given_flags
    parser = get_args_parser("t")
    argv = ["--coco_path", "d", "--hidden", "64", "--lr=1e-4", "--no_aux_loss", "--no_enact",
            "--eval"]
    assert given_flags(parser, argv) == {"coco_path", "hidden_dim", "lr", "aux_loss",
                                         "no_enact", "eval"}
    assert given_flags(parser, []) == set()
