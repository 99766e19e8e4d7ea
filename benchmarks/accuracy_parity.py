"""Accuracy parity: each detector trained with and without ENACT on the shapes data for the same
training-time budget, COCO AP / AP50 / AP75 / APs / APm / APl side by side (issue 6).

    python benchmarks/accuracy_parity.py --minutes N                 # all three detectors
    python benchmarks/accuracy_parity.py --minutes N --detectors detr --stop_after 9
    python benchmarks/accuracy_parity.py --tiny --device cpu         # smoke test of the script

How a run is trained: the detector's own main.py (paper defaults: lr, batch size, losses, AdamW
groups), random-initialised backbone unless --backbone_weights says otherwise, in a few main.py
calls, each continuing from the run's checkpoint.pth with ``--resume checkpoint.pth --epochs
<done + k>`` (main.py reseeds every epoch from (seed, epoch) and seeds each image's
augmentation, so this trains as one uninterrupted run, with any --num_workers). The budget
counts the training loop only (log.txt: train_s_per_img x training images, data loading
included; start-up and the per-epoch evaluation excluded), the same for ENACT and plain: the
first call trains one epoch; each next call trains as many epochs as still fit at the longest
epoch time so far, and a last one while the mean epoch time still fits, so a run ends at the
budget boundary (at least one epoch is always trained). Plain runs use --attn_impl sdpa by
default (the faster plain attention, so plain gets at least as many epochs as with eager).

Runs live in --out (default outputs/accuracy_parity/<detector>_<plain|enact>/, main.py's
log.txt and checkpoint.pth); calling the script again with the same flags continues unfinished
runs (a larger --minutes trains further), so the work can be split over several commands, e.g.
one per detector, or with --stop_after (wall-clock minutes for this command). The report
(COCO AP of each run's last epoch and the mean AP of its last 3, the parity figure) goes to
--results: accuracy_parity_<gpu>.json / .md and a PNG of AP per epoch drawn by
tools/plot_logs.py (needs matplotlib).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_reference as ref  # noqa: E402
from bench_reference import FOLDERS  # noqa: E402

VARIANTS = ("plain", "enact")
# a run "learns from epoch" k (1-based): the first epoch whose COCO AP (x 100) reaches this; it
# marks where a run leaves the initial plateau, which the parity runs compare
LEARNS_AP = 1.0
COCO_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# (num_train, num_val, min_size, max_size, train_sizes, eval_size, max_img_size, workers)
DATA_DEFAULTS = {False: (1200, 200, 256, 384, "224,256,288,320", 320, 512, 4),
                 True: (4, 2, 64, 96, "64", 64, 96, 0)}


class ParityError(RuntimeError):
    """A problem that stops the script, said in one line."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--minutes", type=float, default=None,
                   help="training-time budget per run (default 5; --tiny: one epoch)")
    p.add_argument("--detectors", default=",".join(FOLDERS),
                   help="comma-separated subset of " + ",".join(FOLDERS))
    p.add_argument("--variants", default=",".join(VARIANTS), help="plain,enact or one of them")
    p.add_argument("--plain_attn", choices=["sdpa", "eager"], default="sdpa",
                   help="--attn_impl of the plain runs")
    p.add_argument("--out", default=str(ROOT / "outputs" / "accuracy_parity"),
                   help="folder of the runs (and of the generated shapes data)")
    p.add_argument("--results", default=str(HERE / "results"),
                   help="folder for accuracy_parity_<gpu>.json / .md / .png")
    p.add_argument("--name", default=None, help="report file stem (default "
                   "accuracy_parity_<gpu>, with --tiny accuracy_parity_<gpu>_tiny)")
    p.add_argument("--coco_path", default="",
                   help="dataset in COCO layout (default: shapes data generated under --out "
                        "with tools/make_shapes_coco.py if absent)")
    g = p.add_argument_group("generated shapes data and image sizes (defaults depend on --tiny)")
    g.add_argument("--num_train", type=int, default=None)
    g.add_argument("--num_val", type=int, default=None)
    g.add_argument("--min_size", type=int, default=None, help="smallest generated image side")
    g.add_argument("--max_size", type=int, default=None, help="largest generated image side")
    g.add_argument("--train_sizes", default=None, help="main.py --train_sizes")
    g.add_argument("--eval_size", type=int, default=None, help="main.py --eval_size")
    g.add_argument("--max_img_size", type=int, default=None, help="main.py --max_size")
    g.add_argument("--num_workers", type=int, default=None, help="main.py --num_workers")
    g.add_argument("--data_seed", type=int, default=0,
                   help="make_shapes_coco.py --seed of the generated data (another value: "
                        "another image set, in its own folder, e.g. to pretrain a backbone)")
    p.add_argument("--backbone_weights", default="none",
                   help="main.py --backbone_weights (none = random init; imagenet needs the "
                        "torchvision weights cached or a network)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max_epochs", type=int, default=1000, help="epochs cap per run")
    p.add_argument("--stop_after", type=float, default=None,
                   help="wall-clock minutes for this command: no epoch is started that would "
                        "end later (runs continue on the next call)")
    p.add_argument("--extra", default="",
                   help="more flags for every main.py, one string (one flag alone: "
                        "--extra=--flag)")
    p.add_argument("--enact_extra", default="",
                   help="more flags for the ENACT runs' main.py only, one string (e.g. "
                        "--enact_extra=--enact_row_breaks)")
    p.add_argument("--report_only", action="store_true",
                   help="train nothing: write the report from the runs already in --out")
    p.add_argument("--command", default=None,
                   help="the report's command field instead of this command line (e.g. with "
                        "--report_only: the steps that trained the runs, pretraining included)")
    p.add_argument("--note", default="", help="a line of context for the report")
    p.add_argument("--prepare_only", action="store_true",
                   help="only generate the shapes data under --out (if absent) and exit")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode (CPU): resnet18, hidden 64, 1 encoder / decoder layer, "
                        "4 train / 2 val images of 64-96 px, batch 2, frozen backbone, one epoch "
                        "per run")
    return p


def resolve_defaults(opts):
    names = ("num_train", "num_val", "min_size", "max_size", "train_sizes", "eval_size",
             "max_img_size", "num_workers")
    for name, value in zip(names, DATA_DEFAULTS[opts.tiny]):
        if getattr(opts, name) is None:
            setattr(opts, name, value)
    # main.py and the data generator run in the repository root: paths relative to the
    # caller's directory are made absolute first
    opts.out = os.path.abspath(opts.out)
    if opts.coco_path:
        opts.coco_path = os.path.abspath(opts.coco_path)
    if opts.backbone_weights not in ("none", "imagenet"):
        opts.backbone_weights = os.path.abspath(opts.backbone_weights)
    if opts.minutes is None:
        opts.minutes = 1e-3 if opts.tiny else 5.0
    if opts.minutes <= 0:
        raise ParityError("--minutes must be > 0")
    if opts.device is None:
        import torch
        opts.device = "cuda" if torch.cuda.is_available() else "cpu"
    return opts


# ------------------------------------------------------------------------------ data
def ensure_data(opts):
    """The dataset folder: --coco_path, or shapes data generated under --out if absent (with
    --report_only it must exist)."""
    if opts.coco_path:
        coco = Path(opts.coco_path)
        if not (coco / "annotations" / "instances_train2017.json").is_file():
            raise ParityError(f"{coco}: no annotations/instances_train2017.json (COCO layout)")
        return coco
    coco = Path(opts.out) / (f"shapes_{opts.num_train}x{opts.min_size}-{opts.max_size}"
                             f"_val{opts.num_val}"
                             + (f"_seed{opts.data_seed}" if opts.data_seed else ""))
    if not (coco / "annotations" / "instances_val2017.json").is_file():
        if opts.report_only:
            raise ParityError(f"{coco}: no shapes data there, so no runs to report")
        print(f"generating shapes data in {coco}", flush=True)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shapes_coco.py"), "--out",
                        str(coco), "--num_train", str(opts.num_train), "--num_val",
                        str(opts.num_val), "--min_size", str(opts.min_size), "--max_size",
                        str(opts.max_size), "--seed", str(opts.data_seed), "--workers",
                        str(os.cpu_count() or 1)],
                       check=True, cwd=ROOT)
    return coco


def count_train_images(coco):
    data = json.loads((Path(coco) / "annotations" / "instances_train2017.json").read_text())
    return len(data["images"])


# ------------------------------------------------------------------------------ runs
def run_flags(detector, variant, coco, opts):
    """main.py flags of one run, without --epochs / --resume / --output_dir."""
    flags = ["--coco_path", str(coco), "--backbone_weights", opts.backbone_weights,
             "--train_sizes", opts.train_sizes, "--eval_size", str(opts.eval_size),
             "--max_size", str(opts.max_img_size), "--num_workers", str(opts.num_workers),
             "--device", opts.device, "--seed", str(opts.seed), "--print_freq", "100",
             "--checkpoint_every", "1000000"]
    if opts.tiny:
        flags += ref.TINY_FLAGS + ref.TINY_QUERIES[detector]
    if variant == "plain":
        flags += ["--no_enact", "--attn_impl", opts.plain_attn]
    else:
        flags += ["--enact_impl", "auto"] + opts.enact_extra.split()
    return flags + opts.extra.split()


# main.py flags that may change between the calls of one run: they do not change what it trains
# (the augmentations are seeded per image, whatever the number of data workers)
LOADING_FLAGS = ("--num_workers",)


def training_flags(flags):
    """``flags`` without LOADING_FLAGS and their values: what must match to continue a run."""
    out, it = [], iter(flags)
    for flag in it:
        if flag in LOADING_FLAGS:
            next(it, None)  # its value
        elif flag.split("=", 1)[0] not in LOADING_FLAGS:
            out.append(flag)
    return out


def detector_labels(flags):
    """{detector: "Conditional DETR, resnet18"}: the backbone the runs used (a --backbone in
    the flags, else each detector's default, e.g. DETR R50); "-DC5" where it is dilated:
    Anchor DETR's unless --no_dilation, the others' with --dilation."""
    backbones = [value for flag, value in zip(flags, flags[1:]) if flag == "--backbone"]
    if not backbones:
        return dict(ref.DETECTOR_LABELS)
    labels = {d: f"{ref.DETECTOR_SHORT[d]}, {backbones[-1]}" for d in FOLDERS}  # last one wins
    for detector in labels:
        dilated = ("--no_dilation" not in flags if detector == "anchor_detr"
                   else "--dilation" in flags)
        if dilated:
            labels[detector] += "-DC5"
    return labels


def read_log(run_dir):
    path = Path(run_dir) / "log.txt"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_epochs(run_dir):
    """Epochs the run's checkpoint.pth holds (its "epoch" + 1; 0 without one). It can be one
    ahead of log.txt: main.py saves the checkpoint before the epoch's evaluation, and logs the
    epoch after it (and, when resumed, logs such an epoch first)."""
    path = Path(run_dir) / "checkpoint.pth"
    if not path.is_file():
        return 0
    import torch
    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["epoch"]) + 1


def epoch_train_seconds(record, n_train):
    """Training-loop seconds of one log.txt epoch record (s/img x images of the epoch)."""
    return record["train_s_per_img"] * n_train


def epochs_to_run(epoch_seconds, budget_s, max_epochs):
    """How many epochs the next main.py call trains: 1 to start; then as many as still fit in
    the budget at the longest epoch time so far; at least 1 more while the mean epoch still
    fits; 0 = the run is done. Capped by ``max_epochs`` in all."""
    done = len(epoch_seconds)
    left = max_epochs - done
    if left <= 0:
        return 0
    if done == 0:
        return 1
    spent = sum(epoch_seconds)
    k = int((budget_s - spent) // max(epoch_seconds))
    if k < 1 and spent + spent / done <= budget_s:
        k = 1
    return max(0, min(k, left))


def train_within_budget(detector, variant, coco, n_train, opts, deadline, machine):
    """Train one run until the budget (or --max_epochs / the deadline) stops it, each main.py
    call continuing from the last checkpoint. machine: {"gpu", "torch"} of this process,
    recorded with each call. Returns the run's summary; failures are recorded in it, not
    raised."""
    run_dir = Path(opts.out) / f"{detector}_{variant}"
    run_dir.mkdir(parents=True, exist_ok=True)
    flags = run_flags(detector, variant, coco, opts)
    side_path = run_dir / "parity_run.json"
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    if not (read_log(run_dir) or (run_dir / "checkpoint.pth").is_file()):
        side = {}  # never trained (e.g. main.py failed at once): start afresh
    if side and training_flags(side.get("flags", [])) != training_flags(flags):
        raise ParityError(f"{run_dir} was trained with other flags; use another --out or delete "
                          f"it (was: {' '.join(side.get('flags', []))})")
    if side.get("minutes", 0) > opts.minutes:
        raise ParityError(f"{run_dir} was trained for a budget of {side['minutes']:g} min: a "
                          f"smaller --minutes ({opts.minutes:g}) would misreport it")
    side.setdefault("flags", flags)
    side.setdefault("calls", [])  # per main.py call: epochs trained, wall seconds
    side["minutes"] = opts.minutes
    budget_s = opts.minutes * 60
    stop, error = None, None
    while True:
        records = read_log(run_dir)
        done = len(records)
        held = max(done, checkpoint_epochs(run_dir))  # epochs main.py continues from
        if held > done:
            print(f"  {detector} {variant}: log.txt lacks {held - done} epoch(s) that "
                  f"checkpoint.pth holds (an evaluation cut short); continuing from it "
                  f"(main.py evaluates and logs the checkpoint's epoch again)", flush=True)
        recovered = min(held - done, 1)  # main.py logs the checkpoint's own epoch first
        k = min(epochs_to_run([epoch_train_seconds(r, n_train) for r in records], budget_s,
                              opts.max_epochs), opts.max_epochs - held)
        if k <= 0:
            stop = "max_epochs" if held >= opts.max_epochs else "budget"
            break
        if deadline is not None:
            left = deadline - time.time()
            if side["calls"]:
                per_epoch = max(c["wall_s"] / max(c["epochs"], 1) for c in side["calls"])
                k = min(k, int(left // per_epoch))
            elif left <= 0:  # no epoch time known yet: start only before the deadline
                k = 0
            if k < 1:
                stop = "stop_after (run the same command again to continue)"
                break
        if done and not (run_dir / "checkpoint.pth").is_file():
            error = f"{run_dir}: log.txt has {done} epochs but checkpoint.pth is missing"
            break
        cmd = [sys.executable, str(ROOT / FOLDERS[detector] / "main.py"), *flags,
               "--output_dir", str(run_dir), "--epochs", str(held + k)]
        if held:
            cmd += ["--resume", str(run_dir / "checkpoint.pth")]
        start = time.time()
        with (run_dir / "main_output.txt").open("a") as out:
            out.write(f"\n$ {' '.join(cmd)}\n")
            out.flush()
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        trained = len(read_log(run_dir)) - done
        side["calls"].append({"epochs": trained, "wall_s": time.time() - start, **machine})
        side_path.write_text(json.dumps(side, indent=1))
        if proc.returncode != 0:
            tail = (run_dir / "main_output.txt").read_text().strip().splitlines()[-3:]
            error = f"main.py exited with {proc.returncode}: {' | '.join(tail)[-400:]}"
            break
        if trained not in (k, k + recovered):  # k: a checkpoint older than its train_stats
            error = (f"main.py finished but {run_dir / 'log.txt'} has {trained} new epochs, "
                     f"not {k + recovered}")
            break
        spent = sum(epoch_train_seconds(r, n_train) for r in read_log(run_dir))
        print(f"  {detector} {variant}: epochs {held}..{held + k - 1} done; {spent:.1f} s of "
              f"{budget_s:.0f} s training budget spent ({side['calls'][-1]['wall_s']:.1f} s wall)",
              flush=True)
    side["stopped_by"] = stop
    side_path.write_text(json.dumps(side, indent=1))
    return summarise(detector, variant, run_dir, n_train, budget_s, stop, error, side["calls"])


def report_row(detector, variant, coco, n_train, opts):
    """The summary of a run as it stands in --out, training nothing (--report_only). A run
    trained with other flags or another budget than this command's is reported with an error,
    so the report's header never describes runs it does not hold."""
    run_dir = Path(opts.out) / f"{detector}_{variant}"
    side_path = run_dir / "parity_run.json"
    side = json.loads(side_path.read_text()) if side_path.is_file() else {}
    error = None if read_log(run_dir) else f"{run_dir}: no trained epoch (no log.txt)"
    flags = training_flags(run_flags(detector, variant, coco, opts))
    if error is None and side and training_flags(side.get("flags", [])) != flags:
        error = (f"{run_dir}: trained with other flags than this report's "
                 f"({' '.join(side.get('flags', []))})")
    elif error is None and side.get("minutes", opts.minutes) != opts.minutes:
        error = f"{run_dir}: trained for a budget of {side['minutes']:g} min, not {opts.minutes:g}"
    return summarise(detector, variant, run_dir, n_train, opts.minutes * 60,
                     side.get("stopped_by") or "interrupted", error, side.get("calls", []))


def summarise(detector, variant, run_dir, n_train, budget_s, stop, error, calls):
    """The report row of a run; calls: its main.py calls ({"epochs", "wall_s"} and, where
    recorded, the "gpu" / "torch" they ran on: the row keeps the last call's)."""
    records = read_log(run_dir)
    row = {"detector": detector, "variant": variant, "run_dir": str(run_dir),
           "epochs": len(records), "budget_s": budget_s,
           "train_s": sum(epoch_train_seconds(r, n_train) for r in records),
           "wall_s": sum(c["wall_s"] for c in calls), "stopped_by": stop, "error": error}
    recorded = [c for c in calls if "gpu" in c]
    if recorded:
        row.update(gpu=recorded[-1]["gpu"], torch=recorded[-1]["torch"])
    if records:
        last = records[-1]
        stats = last.get("test_coco_eval_bbox") or [None] * 6
        row.update({k: (None if v is None or v < 0 else 100 * v)
                    for k, v in zip(COCO_NAMES, stats[:6])})
        aps = [r["test_coco_eval_bbox"][0] for r in records if r.get("test_coco_eval_bbox")]
        row["best_AP"] = 100 * max(aps) if aps else None
        row["ap_per_epoch"] = [100 * a for a in aps]
        tail = row["ap_per_epoch"][-ref.PARITY_LAST_EPOCHS:]
        row["AP_last"] = sum(tail) / len(tail) if tail else None
        row["learns_from_epoch"] = next((i + 1 for i, ap in enumerate(row["ap_per_epoch"])
                                         if ap >= LEARNS_AP), None)
        row["train_s_per_img"] = sum(r["train_s_per_img"] for r in records) / len(records)
        row["peak_mem_gib"] = max(r.get("train_peak_mem_gib", 0.0) for r in records)
        row["clusters_per_img"] = last.get("train_enact_clusters_per_img")
        row["final_loss"] = last.get("train_loss")
        row["epochs_after_lr_drop"] = epochs_after_lr_drop(records)
    else:
        row.update({k: None for k in (*COCO_NAMES, "AP_last", "learns_from_epoch")})
    return row


def this_machine(device):
    """{"gpu", "torch"} of this process, recorded with each call. A --report_only of CUDA runs
    may run where there is no GPU (the report then names the runs' own machine)."""
    import torch  # only for the device's name
    gpu = "cpu"
    if device.startswith("cuda"):
        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return {"gpu": gpu, "torch": torch.__version__}


def runs_machine(rows, here):
    """{"gpu", "torch"} the runs trained on (a --report_only written elsewhere keeps theirs);
    ``here`` (this process's) when they recorded none or disagree."""
    recorded = {(r["gpu"], r["torch"]) for r in rows if "gpu" in r}
    if len(recorded) != 1:
        return here
    gpu, version = recorded.pop()
    return {"gpu": gpu, "torch": version}


def epochs_after_lr_drop(records):
    """How many epochs trained at a learning rate below the first epoch's (after main.py's
    --lr_drop step); None when log.txt has no train_lr."""
    lrs = [r.get("train_lr") for r in records]
    if not lrs or None in lrs:
        return None
    return sum(lr < lrs[0] for lr in lrs)


# --------------------------------------------------------------------------- reports
def _num(x, fmt=".1f"):
    return "—" if x is None else format(x, fmt)


COLUMNS = ["detector", "variant", "epochs", "after lr drop", f"AP>={LEARNS_AP:g} from epoch",
           "train min", "s/img", *COCO_NAMES,
           f"AP, last {ref.PARITY_LAST_EPOCHS} ep.", "ENACT - plain", "stopped by"]


def row_cells(row, rows):
    delta = ""
    if row["variant"] == "enact":
        plain = next((r for r in rows if r["detector"] == row["detector"]
                      and r["variant"] == "plain"), None)
        if plain and plain.get("AP_last") is not None and row.get("AP_last") is not None:
            delta = f"{row['AP_last'] - plain['AP_last']:+.2f}"
    return [ref.DETECTOR_SHORT.get(row["detector"], row["detector"]), row["variant"],
            str(row["epochs"]), _num(row.get("epochs_after_lr_drop"), "d"),
            _num(row.get("learns_from_epoch"), "d"),
            f"{row['train_s'] / 60:.2f}",
            _num(row.get("train_s_per_img"), ".4f"), *(_num(row.get(k)) for k in COCO_NAMES),
            _num(row.get("AP_last")), delta, row["error"] or row["stopped_by"] or ""]


def text_table(rows):
    cells = [COLUMNS] + [row_cells(r, rows) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells)


def markdown(meta, rows, targets, chart):
    lines = [f"# Accuracy parity on shapes: ENACT vs plain ({meta['gpu']})", "",
             f"- GPU: {meta['gpu']}; torch {meta['torch']}; command: `{meta['command']}`; "
             f"{meta['date']}" + ("; **--tiny smoke run (tiny models, a few images): the "
                                  "figures mean nothing**" if meta["tiny"] else ""),
             f"- data: {meta['data']} ({meta['n_train']} training images); budget "
             f"{meta['minutes']:g} min of training loop per run; plain attention "
             f"{meta['plain_attn']}; backbone weights {meta['backbone_weights']}",
             f"- every run's main.py flags beyond the detector's defaults: train sizes "
             f"{meta['train_sizes']}, eval size {meta['eval_size']}, max size "
             f"{meta['max_img_size']}" + (f", `{meta['extra']}`" if meta["extra"] else "")
             + (f"; ENACT runs also `{meta['enact_extra']}`" if meta.get("enact_extra") else ""),
             *([f"- note: {meta['note']}"] if meta.get("note") else []),
             "",
             "Columns: epochs trained within the budget; after lr drop = those of them at "
             "the dropped learning rate (main.py --lr_drop; until then AP is still climbing "
             "steeply and a gap mostly measures how fast each variant climbs); train min = "
             "training-loop time (log.txt s/img x images); AP.. = COCO box metrics x 100 of "
             "the LAST epoch (— = undefined: COCO gives -1 when there is no object or no "
             f"detection of that size); AP, last {ref.PARITY_LAST_EPOCHS} ep. = mean AP of the "
             f"run's last {ref.PARITY_LAST_EPOCHS} epochs (single epochs of these steep curves "
             "swing by several AP); ENACT - plain = the parity figure, of those means.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(row_cells(r, rows)) + " |" for r in rows]
    lines += ["", "## Target", "", ref.targets_markdown(targets, meta["labels"]), ""]
    if chart:
        lines += [f"![AP per epoch]({Path(chart).name})", ""]
    return "\n".join(lines)


def draw_curves(rows, path, title):
    """AP / AP50 / loss per epoch of every run, drawn by tools/plot_logs.py. -> path or None."""
    spec = importlib.util.spec_from_file_location("plot_logs", ROOT / "tools" / "plot_logs.py")
    plot_logs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot_logs)
    runs = [r for r in rows if r["epochs"]]
    if not runs:
        return None
    try:
        return plot_logs.plot([Path(r["run_dir"]) / "log.txt" for r in runs],
                              [f"{r['detector']} {r['variant']}" for r in runs],
                              ["AP", "AP50", "loss"], path, title=title)
    except plot_logs.PlotError as e:
        print(f"chart skipped: {e}")
        return None


def main(argv=None):
    opts = get_parser().parse_args(argv)
    try:
        return run(opts, argv)
    except ParityError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(opts, argv):
    try:
        detectors = ref.choices(opts.detectors, FOLDERS, "--detectors")
        variants = ref.choices(opts.variants, VARIANTS, "--variants")
    except ValueError as exc:
        raise ParityError(str(exc)) from None
    resolve_defaults(opts)
    start = time.time()
    deadline = start + 60 * opts.stop_after if opts.stop_after else None
    here = this_machine(opts.device)
    coco = ensure_data(opts)
    if opts.prepare_only:
        print(f"data ready: {coco}")
        return 0
    n_train = count_train_images(coco)
    print(f"GPU: {here['gpu']}  torch {here['torch']}  data {coco} ({n_train} train images)  "
          f"budget {opts.minutes:g} min of training per run", flush=True)
    rows = []
    for det in detectors:
        for variant in variants:
            print(f"{det} {variant}:", flush=True)
            rows.append(report_row(det, variant, coco, n_train, opts) if opts.report_only else
                        train_within_budget(det, variant, coco, n_train, opts, deadline,
                                            here))
    machine = runs_machine(rows, here) if opts.report_only else here
    gpu = machine["gpu"]
    aps = {d: {r["variant"]: r.get("AP_last") for r in rows if r["detector"] == d}
           for d in detectors}
    targets = ref.evaluate_parity(aps)
    stem = opts.name or ("accuracy_parity_" + ref.gpu_slug(gpu) + ("_tiny" if opts.tiny else ""))
    results = Path(opts.results)
    results.mkdir(parents=True, exist_ok=True)
    chart = draw_curves(rows, results / f"{stem}.png",
                        f"shapes, {opts.minutes:g} min per run, {gpu}")
    meta = {"gpu": gpu, "torch": machine["torch"],
            "device": "cpu" if gpu == "cpu" else "cuda",
            "command": opts.command or shlex.join(["python", "benchmarks/accuracy_parity.py",
                                                   *(argv if argv is not None
                                                     else sys.argv[1:])]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "data": str(coco), "n_train": n_train, "minutes": opts.minutes,
            "plain_attn": opts.plain_attn, "backbone_weights": opts.backbone_weights,
            "train_sizes": opts.train_sizes, "eval_size": opts.eval_size,
            "max_img_size": opts.max_img_size, "extra": opts.extra,
            "enact_extra": opts.enact_extra,
            "labels": detector_labels(run_flags(detectors[0], "enact", coco, opts)),
            "tiny": opts.tiny, "wall_s": time.time() - start}
    if opts.note:
        meta["note"] = opts.note
    (results / f"{stem}.json").write_text(json.dumps(
        {**meta, "rows": rows, "targets": targets, "chart": str(chart) if chart else None},
        indent=1))
    (results / f"{stem}.md").write_text(markdown(meta, rows, targets, chart))
    print()
    print(text_table(rows))
    for t in targets:
        print(f"[{t['status']:>6}] {t['detector']:<17} {t['text']}")
    print(f"\nwrote {results / stem}.json, .md" + (", .png" if chart else "")
          + f" in {time.time() - start:.0f} s")
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
