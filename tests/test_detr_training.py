"""DETR through main.py on the shapes data: training, resume, --eval, log.txt."""
import json

import pytest
import torch

from _cli import TINY, load_main, run_main
from detr_common.logs import read_log

pytestmark = pytest.mark.slow


# MKL's results depend on memory alignment unless told otherwise, and tiny differences grow
# through the Hungarian matching; one thread + MKL_CBWR makes two runs bit-identical.
DETERMINISTIC = {"OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}


def train(shapes_coco, out, *extra):
    return run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", out,
                    "--no_enact", *TINY, "--lr_drop", "2", *extra, env=DETERMINISTIC)


def test_resume_repeats_the_uninterrupted_run(shapes_coco, tmp_path):
    straight, first, resumed = tmp_path / "straight", tmp_path / "first", tmp_path / "resumed"
    train(shapes_coco, straight, "--epochs", "3")
    train(shapes_coco, first, "--epochs", "2")
    ckpt = torch.load(first / "checkpoint.pth", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["detector"] == "detr"
    assert set(ckpt["class_names"]) == {1, 3, 5, 8, 13, 21}   # the shapes category ids
    assert (first / "checkpoint0001.pth").is_file()            # lr drop after epoch index 1
    # resumed with data workers (the others load in the main process): the augmentations are
    # seeded per image, so the batches are the same
    train(shapes_coco, resumed, "--epochs", "3", "--resume", first / "checkpoint.pth",
          "--num_workers", "2")

    log_straight, log_resumed = read_log(straight / "log.txt"), read_log(resumed / "log.txt")
    assert [r["epoch"] for r in log_straight] == [0, 1, 2]
    assert [r["epoch"] for r in log_resumed] == [2]
    a, b = log_straight[2], log_resumed[0]
    assert b["train_lr"] == pytest.approx(5e-6)                  # 5e-5 dropped once at epoch 2
    # Bit-identical in practice; the tolerance only absorbs a rare oneDNN rounding difference.
    for key in ("train_lr", "train_loss", "train_loss_ce", "train_loss_bbox", "test_loss"):
        assert b[key] == pytest.approx(a[key], rel=1e-3), key
    end_a = torch.load(straight / "checkpoint.pth", weights_only=False)
    end_b = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert end_b["lr_scheduler"] == end_a["lr_scheduler"]
    for k, v in end_a["model"].items():
        assert torch.allclose(end_b["model"][k], v, atol=1e-3), k
    for key in ("train_peak_mem_gib", "train_s_per_img", "test_coco_eval_bbox", "n_parameters"):
        assert key in a
    assert len(a["test_coco_eval_bbox"]) == 12


def test_eval_reproduces_the_logged_numbers(shapes_coco, tmp_path):
    run = tmp_path / "run"
    train(shapes_coco, run, "--epochs", "1")
    logged = read_log(run / "log.txt")[-1]
    ev = run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", tmp_path / "ev",
                  "--no_enact", *TINY, "--resume", run / "checkpoint.pth", "--eval")
    assert "Average Precision" in ev.stdout or "every AP is 0" in ev.stdout
    stats = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert stats["test_loss"] == pytest.approx(logged["test_loss"], rel=1e-6)
    assert stats["test_coco_eval_bbox"] == pytest.approx(logged["test_coco_eval_bbox"], abs=1e-9)
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert len(dets) == 4 * 10                                    # 4 val images x 10 queries
    assert set(dets[0]) == {"image_id", "category_id", "bbox", "score"}
    # the model flags (and --no_enact) left out: taken from the checkpoint, the same numbers
    run_flags = ["--device", "cpu", "--eval_size", "64", "--max_size", "96", "--batch_size", "4",
                 "--num_workers", "0"]
    ev2 = run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", tmp_path / "ev2",
                   *run_flags, "--resume", run / "checkpoint.pth", "--eval")
    assert "flags from the checkpoint (not on the command line): --backbone resnet18, " \
           "--hidden_dim 32, --nheads 4, --enc_layers 1, --dec_layers 1, " \
           "--dim_feedforward 64, --num_queries 10, --num_classes" in ev2.stderr
    assert "--no_enact True" in ev2.stderr
    stats2 = json.loads((tmp_path / "ev2" / "eval.json").read_text())
    assert stats2["test_coco_eval_bbox"] == stats["test_coco_eval_bbox"]
    assert stats2["test_loss"] == stats["test_loss"]


class _Stop(Exception):
    pass


def test_resumed_epoch_starts_from_the_saved_state(shapes_coco, tmp_path, monkeypatch):
    """In-process: the first resumed epoch sees exactly the checkpoint's optimizer, lr and
    scheduler state, and the model's weights."""
    from detr_common import trainer
    main = load_main("DETR-ENACT")

    first = tmp_path / "first"
    train(shapes_coco, first, "--epochs", "2")
    saved = torch.load(first / "checkpoint.pth", weights_only=False)
    seen = {}

    def record(model, criterion, loader, optimizer, device, epoch, **kw):
        seen.update(epoch=epoch, optimizer=optimizer.state_dict(), model=model.state_dict(),
                    lr=[g["lr"] for g in optimizer.param_groups])
        raise _Stop

    monkeypatch.setattr(trainer, "train_one_epoch", record)
    args = main.get_parser().parse_args(["--coco_path", str(shapes_coco), "--no_enact", *TINY,
                                    "--lr_drop", "2", "--epochs", "3",
                                    "--resume", str(first / "checkpoint.pth")])
    with pytest.raises(_Stop):
        trainer.run(args, main.DETECTOR)
    assert seen["epoch"] == 2
    assert seen["lr"] == pytest.approx([5e-6, 1e-6])       # both groups dropped once
    opt, ref = seen["optimizer"], saved["optimizer"]
    assert opt["param_groups"] == ref["param_groups"]
    assert opt["state"].keys() == ref["state"].keys()
    for i, state in ref["state"].items():
        for name, value in state.items():
            assert torch.equal(opt["state"][i][name], value), (i, name)
    for k, v in saved["model"].items():
        assert torch.equal(seen["model"][k], v), k


def test_enact_one_epoch_train_and_eval(shapes_coco, tmp_path):
    """ENACT (the default) trains and evaluates through main.py and logs its cluster counts."""
    out = tmp_path / "enact"
    run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", out, *TINY,
             "--enact_impl", "torch", "--epochs", "1")
    record = read_log(out / "log.txt")[0]
    assert len(record["test_coco_eval_bbox"]) == 12
    assert 1 <= record["train_enact_clusters_per_img"]
    assert 0 < record["train_enact_cluster_ratio"] < 1
    assert 0 < record["test_enact_cluster_ratio"] < 1
    assert record["train_enact_redone_steps"] == 0  # logged; 0: the torch backend never guesses
    state = torch.load(out / "checkpoint.pth", weights_only=False)["model"]
    assert "transformer.encoder.layers.0.self_attn.W_prob.weight" in state


def test_other_flags_run(shapes_coco, tmp_path):
    """bf16 autocast, eager attention, DC5, --start_epoch and --pretrained in one short run."""
    first = tmp_path / "first"
    train(shapes_coco, first, "--epochs", "1")
    out = tmp_path / "flags"
    train(shapes_coco, out, "--amp", "bf16", "--attn_impl", "eager", "--dilation",
          "--start_epoch", "1", "--epochs", "2", "--pretrained", first / "checkpoint.pth",
          "--checkpoint_every", "1")
    record = read_log(out / "log.txt")[0]
    assert record["epoch"] == 1
    assert (out / "checkpoint0001.pth").is_file()
    assert torch.load(out / "checkpoint.pth", weights_only=False)["args"].amp == "bf16"


def test_backbone_train_all_trains_the_stem_and_batch_norm(shapes_coco, tmp_path):
    """--backbone_train_all: ordinary BatchNorm whose weights and running statistics move, a
    trained stem; the logged gradient norm is positive."""
    out = tmp_path / "scratch"
    train(shapes_coco, out, "--epochs", "1", "--backbone_train_all", "--lr_backbone", "1e-3")
    state = torch.load(out / "checkpoint.pth", weights_only=False)["model"]
    assert state["backbone.0.body.bn1.num_batches_tracked"] > 0
    assert not torch.equal(state["backbone.0.body.bn1.weight"], torch.ones(64))
    assert not torch.equal(state["backbone.0.body.bn1.running_var"], torch.ones(64))
    assert read_log(out / "log.txt")[0]["train_grad_norm"] > 0


def test_non_finite_step_is_saved_for_reproduction(shapes_coco, tmp_path, monkeypatch, capsys):
    """A NonFiniteLossError in training ends main.py with status 2 and one error line naming
    nonfinite_step.pth, which holds the weights and the batch of the failing step."""
    from detr_common import trainer
    from detr_common.data.collate import ImageBatch
    from detr_common.engine import NonFiniteLossError
    main = load_main("DETR-ENACT")
    batch = ImageBatch(torch.rand(2, 3, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([3, 5])}]
    seen = {}

    def fail(model, *args, **kw):
        seen["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        raise NonFiniteLossError("gradient norm is nan at epoch 0, step 7", batch, targets, 0, 7)

    monkeypatch.setattr(trainer, "train_one_epoch", fail)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        trainer.main(main.get_parser(), main.DETECTOR,
                     ["--coco_path", str(shapes_coco), "--no_enact", *TINY, "--epochs", "1",
                      "--output_dir", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: gradient norm is nan at epoch 0, step 7 The failing step")
    assert str(out / "nonfinite_step.pth") in err[-1]
    saved = torch.load(out / "nonfinite_step.pth", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (0, 7)
    assert torch.equal(saved["images"], batch.images) and torch.equal(saved["mask"], batch.mask)
    assert torch.equal(saved["targets"][1]["labels"], torch.tensor([3, 5]))
    for k, v in seen["model"].items():
        assert torch.equal(saved["model"][k], v), k
    assert saved["args"].epochs == 1 and saved["detector"] == "detr"


def test_output_dir_of_a_run_and_an_evaluation_cut_short(shapes_coco, tmp_path):
    """Training afresh into the folder of an earlier run is refused (it overwrote the
    checkpoint and mixed two runs in log.txt); a run stopped during an epoch's evaluation
    (checkpoint saved, log.txt record not yet written) gets that record back on --resume:
    the train figures from the checkpoint, the evaluation redone (the same numbers)."""
    run = tmp_path / "run"
    train(shapes_coco, run, "--epochs", "1")
    (record,) = read_log(run / "log.txt")
    again = run_main("DETR-ENACT", "--coco_path", shapes_coco, "--output_dir", run,
                     "--no_enact", *TINY, "--lr_drop", "2", "--epochs", "1", check=False)
    assert again.returncode == 2
    assert f"--output_dir {run} already holds a run (checkpoint.pth, log.txt)" in again.stderr
    (run / "log.txt").write_text("")  # as if stopped during epoch 0's evaluation
    train(shapes_coco, run, "--epochs", "2", "--resume", run / "checkpoint.pth")
    log = read_log(run / "log.txt")
    assert [r["epoch"] for r in log] == [0, 1]
    for key in ("train_loss", "train_lr", "train_s_per_img", "test_loss"):
        assert log[0][key] == pytest.approx(record[key], rel=1e-3), key
    assert log[0]["test_coco_eval_bbox"] == pytest.approx(record["test_coco_eval_bbox"],
                                                          abs=1e-3)


def test_sigterm_while_saving_a_checkpoint_leaves_no_temporary_file(tmp_path, monkeypatch,
                                                                     capsys):
    """SIGTERM (a job scheduler's stop) arriving while checkpoint.pth is written: the write is
    abandoned cleanly (no stray .tmp, the previous checkpoint intact), and the run ends with
    one line saying how to continue, exit status 130. Before, SIGTERM killed the process
    outright, leaving the temporary file."""
    import os
    import signal

    from detr_common import checkpoint as ckpt_io
    from detr_common import trainer
    main = load_main("DETR-ENACT")
    out = tmp_path / "run"
    ckpt_io.save_checkpoint({"epoch": 0}, out / "checkpoint.pth")
    real_save = torch.save

    def save_then_signal(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        os.kill(os.getpid(), signal.SIGTERM)  # mid-write: before the rename

    def fake_run(args, detector, given=None):
        monkeypatch.setattr(torch, "save", save_then_signal)
        ckpt_io.save_checkpoint({"epoch": 1}, out / "checkpoint.pth")

    monkeypatch.setattr(trainer, "run", fake_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        trainer.main(main.get_parser(), main.DETECTOR,
                     ["--coco_path", "x", "--output_dir", str(out)])
    assert info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"interrupted; continue with --resume {out / 'checkpoint.pth'} (it holds "
                   f"the last finished epoch)"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pth"]
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 0
    assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller


def test_first_epoch_evaluation_cut_short_is_logged_on_resume(shapes_coco, tmp_path):
    """Stopped during epoch 0's evaluation, the run has a checkpoint but no log.txt at all;
    resumed in its own folder, epoch 0's record is written first."""
    run = tmp_path / "run"
    train(shapes_coco, run, "--epochs", "1")
    (run / "log.txt").unlink()
    train(shapes_coco, run, "--epochs", "2", "--resume", run / "checkpoint.pth")
    assert [r["epoch"] for r in read_log(run / "log.txt")] == [0, 1]


def test_resume_and_eval_need_no_backbone_weights(shapes_coco, tmp_path):
    """The checkpoint holds every weight: --resume and --eval neither download nor read the
    backbone's ImageNet weights (a missing --backbone_weights file stopped them before)."""
    run = tmp_path / "run"
    train(shapes_coco, run, "--epochs", "1")
    missing = ["--backbone_weights", tmp_path / "nope.pth"]
    train(shapes_coco, run, "--epochs", "2", "--resume", run / "checkpoint.pth", *missing)
    assert [r["epoch"] for r in read_log(run / "log.txt")] == [0, 1]
    assert torch.load(run / "checkpoint.pth", weights_only=False)["args"].backbone_weights \
        == str(tmp_path / "nope.pth")  # the flag as given is what the run records
    train(shapes_coco, tmp_path / "ev", "--resume", run / "checkpoint.pth", "--eval", *missing)
