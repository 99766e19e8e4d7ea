"""Checkpoint saving and loading: atomic writes and one-line errors for unusable files."""
import argparse
import os

import pytest
import torch
from torch import nn

from detr_common import checkpoint as ck


def tiny_model(classes=3):
    model = nn.Module()
    model.body = nn.Linear(4, 4)
    model.class_embed = nn.Linear(4, classes)
    return model


def test_save_is_atomic_and_round_trips(tmp_path):
    model = tiny_model()
    path = tmp_path / "checkpoint.pth"
    ck.save_checkpoint({"model": model.state_dict(), "epoch": 3,
                        "args": argparse.Namespace(no_enact=True)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]   # no temp file left
    loaded = ck.load_checkpoint(path)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["model"]["body.weight"], model.body.weight)
    # The Namespace is allow-listed, so weights_only loading works too.
    assert torch.load(path, weights_only=True)["args"].no_enact is True


def test_saved_file_has_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        ck.save_checkpoint({"model": {}, "epoch": 0}, tmp_path / "checkpoint.pth")
        (tmp_path / "plain.txt").write_text("")
    finally:
        os.umask(old)
    mode = (tmp_path / "checkpoint.pth").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain.txt").stat().st_mode & 0o777 == 0o644


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth"
    ck.save_checkpoint({"model": {}, "epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        ck.save_checkpoint({"model": {}, "epoch": 2}, path)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth"]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ck.CheckpointError, match=r"nope\.pth: checkpoint file not found"):
        ck.load_checkpoint(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ck.CheckpointError, match=r"bad\.pth: not a readable PyTorch checkpoint"):
        ck.load_checkpoint(bad)
    other = tmp_path / "other.pth"
    torch.save([1, 2], other)
    with pytest.raises(ck.CheckpointError, match=r"other\.pth: not a detector checkpoint"):
        ck.load_checkpoint(other)


def test_wrong_detector_and_wrong_shape(tmp_path):
    path = tmp_path / "c.pth"
    ck.save_checkpoint({"model": tiny_model(5).state_dict(), "detector": "anchor_detr"}, path)
    ckpt = ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match="this is a 'anchor_detr' checkpoint, not 'detr'"):
        ck.check_detector(path, ckpt, "detr")
    with pytest.raises(ck.CheckpointError,
                       match=r"2 shape mismatches \(e.g. class_embed.weight: checkpoint \[5, 4\] "
                             r"vs model \[3, 4\]\)"):
        ck.load_model_state(tiny_model(3), path, ckpt, None)


def test_enact_mismatch_hint(tmp_path):
    path = tmp_path / "c.pth"
    state = tiny_model().state_dict()
    state["extra.weight"] = torch.zeros(1)
    ckpt = {"model": state, "args": argparse.Namespace(no_enact=True)}
    with pytest.raises(ck.CheckpointError, match="trained without ENACT: add --no_enact"):
        ck.load_model_state(tiny_model(), path, ckpt, argparse.Namespace(no_enact=False))


def test_model_flags_named_on_a_mismatch_and_warned_when_the_weights_fit(tmp_path, caplog):
    """A checkpoint that does not fit names the model flags it was built with that differ
    (e.g. --resume --eval without the training flags); weights that fit but were trained with
    another --nheads load with a warning naming it; equal flags give neither."""
    path = tmp_path / "c.pth"
    trained = argparse.Namespace(no_enact=True, hidden_dim=4, nheads=2, num_queries=7,
                                 lr=1e-4)
    state = {**tiny_model().state_dict(), "body.weight": torch.zeros(8, 8)}
    ckpt = {"model": state, "args": trained}
    now = argparse.Namespace(no_enact=True, hidden_dim=8, nheads=2, num_queries=5, lr=2e-4)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_model_state(tiny_model(), path, ckpt, now)
    assert str(err.value).endswith(
        "— its model was built with other flags (--hidden_dim: checkpoint 4, this run 8; "
        "--num_queries: checkpoint 7, this run 5): give the checkpoint's values")
    ck.save_checkpoint({"model": tiny_model().state_dict(), "args": trained}, path)
    other_heads = argparse.Namespace(**{**vars(trained), "nheads": 4, "lr": 1.0})
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_weights(tiny_model(), path, "detr", other_heads)
    (record,) = caplog.records
    assert "built with other flags" in record.message
    assert record.message.endswith("--nheads: checkpoint 2, this run 4")
    caplog.clear()
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_weights(tiny_model(), path, "detr", argparse.Namespace(**vars(trained)))
        ck.load_weights(tiny_model(), path, "detr", argparse.Namespace(no_enact=True))  # older
    assert not caplog.records


def test_pretrained_does_not_name_what_fine_tuning_changes(tmp_path, caplog):
    """Fine-tuning may change --num_classes and --backbone_train_all without a word; another
    --dilation is still named."""
    path = tmp_path / "c.pth"
    trained = argparse.Namespace(no_enact=True, num_classes=7, backbone_train_all=False,
                                 dilation=False)
    ck.save_checkpoint({"model": tiny_model(7).state_dict(), "args": trained,
                        "detector": "detr"}, path)
    tuned = argparse.Namespace(no_enact=True, num_classes=3, backbone_train_all=True,
                               dilation=False)
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_pretrained(tiny_model(3), path, "detr", tuned)
    assert not caplog.records
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_pretrained(tiny_model(3), path, "detr",
                           argparse.Namespace(**{**vars(tuned), "dilation": True}))
    (record,) = caplog.records
    assert record.message.endswith("--dilation: checkpoint False, this run True")


def test_pretrained_warns_and_hints_as_resume(tmp_path, caplog):
    """--pretrained (fine-tuning) gives the ENACT-settings warning and the --no_enact hint
    that --resume gives."""
    path = tmp_path / "c.pth"
    trained = argparse.Namespace(no_enact=False, enact_row_breaks=False, smoothing_sigma=1)
    ck.save_checkpoint({"model": tiny_model().state_dict(), "args": trained,
                        "detector": "detr"}, path)
    now = argparse.Namespace(no_enact=False, enact_row_breaks=True, smoothing_sigma=2)
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_pretrained(tiny_model(), path, "detr", now)
    (record,) = caplog.records
    assert record.message.endswith("--enact_row_breaks: checkpoint False, this run True; "
                                   "--smoothing_sigma: checkpoint 1, this run 2")
    plain = {"model": {**tiny_model().state_dict(), "extra.weight": torch.zeros(1)},
             "args": argparse.Namespace(no_enact=True), "detector": "detr"}
    ck.save_checkpoint(plain, path)
    with pytest.raises(ck.CheckpointError, match="trained without ENACT: add --no_enact"):
        ck.load_pretrained(tiny_model(), path, "detr", now)


def test_other_enact_settings_warn_on_load(tmp_path, caplog):
    """Settings that change what ENACT computes but not the weights' shapes: the weights load,
    with one warning naming each difference; none for equal settings or plain detectors."""
    path = tmp_path / "c.pth"
    trained = argparse.Namespace(no_enact=False, enact_mode="official_fixed_chunk",
                                 enact_row_breaks=False, smoothing_sigma=3)  # saved before
    ck.save_checkpoint({"model": tiny_model().state_dict(), "args": trained}, path)  # numerics
    now = argparse.Namespace(no_enact=False, enact_mode="paper_regions", enact_row_breaks=True,
                             smoothing_sigma=3, enact_attn_numerics="official",
                             enact_gauss_taps="code", enact_padding="ignore")
    with caplog.at_level("WARNING", logger=ck.log.name):
        ck.load_weights(tiny_model(), path, "detr", now)
    (record,) = caplog.records
    assert str(path) in record.message and record.message.endswith(
        "--enact_mode: checkpoint official_fixed_chunk, this run paper_regions; "
        "--enact_row_breaks: checkpoint False, this run True; "
        "--enact_gauss_taps: checkpoint paper, this run code; "
        "--enact_padding: checkpoint honour, this run ignore; "
        "--enact_attn_numerics: checkpoint standard, this run official")
    caplog.clear()
    same = argparse.Namespace(**vars(trained), enact_attn_numerics="standard")
    plain = argparse.Namespace(**{**vars(now), "no_enact": True})
    with caplog.at_level("WARNING", logger=ck.log.name):
        for args in (same, plain):
            ck.load_weights(tiny_model(), path, "detr", args)
    assert not caplog.records
    assert ck.enact_setting_changes(trained, argparse.Namespace(**{**vars(same),
                                                                   "smoothing_sigma": 5})) == \
        ["--smoothing_sigma: checkpoint 3, this run 5"]


def test_pretrained_reinitialises_a_different_class_head(tmp_path):
    source = tiny_model(7)
    path = tmp_path / "c.pth"
    ck.save_checkpoint({"model": source.state_dict(), "detector": "detr"}, path)
    target = tiny_model(3)
    head_before = target.class_embed.weight.clone()
    ck.load_pretrained(target, path, "detr")
    assert torch.equal(target.body.weight, source.body.weight)
    assert torch.equal(target.class_embed.weight, head_before)
