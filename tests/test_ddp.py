"""DDP: two gloo processes on the CPU match one process on the same global batches, also when
one rank alone has to redo a step (an ENACT cluster overflow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE", "PYTHONUNBUFFERED": "1"}


def run(cmd, **env):
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**ENV, **env}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    run([sys.executable, str(WORKER), str(tmp_path / "single")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path / "ddp")])
    single = json.loads((tmp_path / "single" / "stats.json").read_text())
    ddp = json.loads((tmp_path / "ddp" / "stats.json").read_text())
    losses = [k for k in single if k.startswith("loss")]
    assert {"loss", "loss_ce", "loss_bbox", "loss_giou"} <= set(losses)
    for key in losses:
        assert ddp[key] == pytest.approx(single[key], rel=1e-5), key
    w_single = torch.load(tmp_path / "single" / "weights.pth")
    w_ddp = torch.load(tmp_path / "ddp" / "weights.pth")
    for k, v in w_single.items():
        assert torch.allclose(w_ddp[k], v, atol=1e-5, rtol=1e-4), k


@pytest.mark.slow
def test_an_overflow_on_one_rank_is_redone_by_both(tmp_path):
    """Rank 1 alone reports a cluster overflow at its first step, rank 0 has nothing guessed
    (None): the flag travels in the step's all-reduce, so rank 0 redoes the step too
    (otherwise their backward all-reduces would no longer pair up), and the weights equal the
    single process's without a redo."""
    run([sys.executable, str(WORKER), str(tmp_path / "single")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), str(tmp_path / "ddp")], DDP_OVERFLOW_RANK="1")
    stats = json.loads((tmp_path / "ddp" / "stats.json").read_text())
    assert stats["enact_redone_steps"] == 1  # written by rank 0, which reported none
    w_single = torch.load(tmp_path / "single" / "weights.pth")
    w_ddp = torch.load(tmp_path / "ddp" / "weights.pth")
    for k, v in w_single.items():
        assert torch.allclose(w_ddp[k], v, atol=1e-5, rtol=1e-4), k
