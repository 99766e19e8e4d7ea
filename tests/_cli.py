"""Run a detector's main.py in a subprocess, as a user would."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A tiny configuration that trains in seconds on 2 CPU cores.
TINY = ["--device", "cpu", "--backbone", "resnet18", "--backbone_weights", "none",
        "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "1",
        "--dim_feedforward", "64", "--num_queries", "10", "--train_sizes", "64",
        "--eval_size", "64", "--max_size", "96", "--batch_size", "4", "--num_workers", "0",
        "--dropout", "0.0", "--print_freq", "1"]


def run_main(folder, *args, check=True, timeout=600, env=None):
    """``python <folder>/main.py *args``; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, str(ROOT / folder / "main.py"), *map(str, args)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def one_epoch_run(out, detector):
    """Check the output folder of a one-epoch main.py run -> (its log.txt record, checkpoint):
    one epoch logged with the 12 COCO box metrics in [0, 1] (or -1) and finite losses, and a
    checkpoint of epoch 0 of ``detector``."""
    import math

    import torch

    from detr_common.logs import read_log
    records = read_log(Path(out) / "log.txt")
    assert len(records) == 1
    record = records[0]
    assert record["epoch"] == 0 and len(record["test_coco_eval_bbox"]) == 12
    assert all(0 <= v <= 1 or v == -1 for v in record["test_coco_eval_bbox"])
    assert math.isfinite(record["train_loss_ce"]) and math.isfinite(record["test_loss_giou"])
    ckpt = torch.load(Path(out) / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert ckpt["detector"] == detector and ckpt["epoch"] == 0
    return record, ckpt


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_main(folder):
    """Import ``<folder>/main.py`` in-process. Every detector folder has an ``engine.py``, so
    the folder's own one is bound to the name ``engine`` while main.py imports it."""
    engine = _load(ROOT / folder / "engine.py", f"{folder}.engine")
    saved = sys.modules.get("engine")
    sys.modules["engine"] = engine
    try:
        return _load(ROOT / folder / "main.py", f"{folder}.main")
    finally:
        if saved is None:
            sys.modules.pop("engine", None)
        else:
            sys.modules["engine"] = saved


def without(flags, name):
    """``flags`` less the flag ``name`` and its value (e.g. --num_queries for Anchor DETR)."""
    i = flags.index(name)
    return flags[:i] + flags[i + 2:]
