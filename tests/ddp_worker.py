"""Worker for test_ddp.py: a few DETR training steps on fixed batches, one or two processes.

    python tests/ddp_worker.py OUT                                 # one process, batch 4
    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py OUT   # 2 x 2

Each process takes its share of the same global batches; rank 0 writes the epoch statistics
and the final weights to OUT. With DDP_OVERFLOW_RANK=r, rank r reports an ENACT cluster
overflow at its first step (engine.cluster_overflow replaced), as a layer whose guessed rows
fell short would; the statistics then count the redone steps.
"""
import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "DETR-ENACT")]
from _cli import TINY, load_main  # noqa: E402

from detr_common.data.collate import pad_images  # noqa: E402
from detr_common.distributed import get_rank, get_world_size, init_distributed  # noqa: E402
import detr_common.engine as engine  # noqa: E402

BOXES_PER_IMAGE = [1, 2, 2, 1]   # each rank of two gets 3 boxes: equal loss normalisers


def global_batches(steps=3, size=64):
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        images, targets = [], []
        for i, n in enumerate(BOXES_PER_IMAGE):
            images.append(torch.randn(3, size, size, generator=g))
            centre = 0.25 + 0.5 * torch.rand(n, 2, generator=g)
            wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
            targets.append({"boxes": torch.cat([centre, wh], 1),
                            "labels": torch.randint(1, 5, (n,), generator=g),
                            "image_id": torch.tensor(i), "orig_size": torch.tensor([size, size]),
                            "size": torch.tensor([size, size])})
        batches.append((images, targets))
    return batches


def main(out):
    device = init_distributed("cpu")
    rank, world = get_rank(), get_world_size()
    args = load_main("DETR-ENACT").get_parser().parse_args(
        ["--coco_path", "unused", "--no_enact", *TINY])
    args.num_classes = 5
    torch.manual_seed(0)
    import detr
    model, criterion, _ = detr.build(args)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    # SGD: its update is linear in the gradient, so weights compare tightly (Adam divides by
    # sqrt(v) and turns rounding-level gradient differences into lr-sized steps).
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    per_rank = len(BOXES_PER_IMAGE) // world
    loader = []
    for images, targets in global_batches():
        share = slice(rank * per_rank, (rank + 1) * per_rank)
        loader.append((pad_images(images[share]), tuple(targets[share])))
    stats_fn = None
    if "DDP_OVERFLOW_RANK" in os.environ:
        reports = [rank == int(os.environ["DDP_OVERFLOW_RANK"])]  # this rank's first step

        def overflow(m):  # None (nothing guessed) everywhere else: the key must still pair up
            return torch.tensor(True) if reports and reports.pop() else None

        engine.cluster_overflow = overflow
        stats_fn = lambda m: {}  # noqa: E731  (only to get enact_redone_steps)
    stats = engine.train_one_epoch(model, criterion, loader, optimizer, device, 0,
                                   clip_max_norm=0.1, stats_fn=stats_fn)
    if rank == 0:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "stats.json").write_text(json.dumps(stats))
        weights = model.module.state_dict() if world > 1 else model.state_dict()
        torch.save(weights, out / "weights.pth")


if __name__ == "__main__":
    main(sys.argv[1])
