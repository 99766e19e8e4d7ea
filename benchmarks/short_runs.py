"""Short training runs of each detector with and without ENACT on the shapes data at 800 px.

    python benchmarks/short_runs.py --out outputs/short_runs [--detectors detr,conditional_detr]

Generates shapes images of 800-1216 px (unless --coco_path is given), runs every detector's
main.py for --epochs with ENACT and with --no_enact, and prints a table of peak GPU memory,
seconds per image and (for ENACT) clusters per image, read from each run's log.txt; the table
is also written as JSON next to the runs. Random-initialised backbones (no download).
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import FOLDERS, choices  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/short_runs")
    p.add_argument("--coco_path", default="", help="default: generate shapes data under --out")
    p.add_argument("--detectors", default=",".join(FOLDERS))
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--num_train", type=int, default=64)
    p.add_argument("--num_val", type=int, default=16)
    p.add_argument("--enact_impl", default="auto")
    p.add_argument("--extra", default="", help="more flags for every main.py, one string")
    return p.parse_args()


def run_one(name, enact, coco, out, args):
    tag = f"{name}_{'enact' if enact else 'plain'}"
    cmd = [sys.executable, str(ROOT / FOLDERS[name] / "main.py"), "--coco_path", str(coco),
           "--output_dir", str(out / tag), "--backbone_weights", "none", "--epochs",
           str(args.epochs), "--train_sizes", "800", "--eval_size", "800", "--max_size", "1333",
           "--enact_impl", args.enact_impl, "--num_workers", "4", "--print_freq", "50",
           *args.extra.split()]
    if not enact:
        cmd.append("--no_enact")
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{tag} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return {"run": tag, "failed": True}
    record = [json.loads(line) for line in (out / tag / "log.txt").read_text().splitlines()][-1]
    return {"run": tag, "peak_mem_gib": record["train_peak_mem_gib"],
            "s_per_img": record["train_s_per_img"], "AP": record["test_coco_eval_bbox"][0],
            "clusters_per_img": record.get("train_enact_clusters_per_img"),
            "cluster_ratio": record.get("train_enact_cluster_ratio"),
            "wall_s": round(time.time() - start, 1)}


def main():
    args = parse()
    try:
        detectors = choices(args.detectors, FOLDERS, "--detectors")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    out = Path(args.out)
    coco = Path(args.coco_path) if args.coco_path else out / "shapes800"
    if not args.coco_path and not (coco / "annotations").is_dir():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_shapes_coco.py"), "--out",
                        str(coco), "--num_train", str(args.num_train), "--num_val",
                        str(args.num_val), "--min_size", "800", "--max_size", "1216",
                        "--seed", "0"], check=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"GPU {gpu}, torch {torch.__version__}, images 800-1216 px (shorter side 800)")
    rows = [run_one(name, enact, coco, out, args)
            for name in detectors for enact in (False, True)]
    print(f"{'run':<24}{'peak GiB':>10}{'s/img':>9}{'AP':>7}{'clusters/img':>14}{'ratio':>8}")
    for r in rows:
        if r.get("failed"):
            print(f"{r['run']:<24}  failed")
            continue
        c = "" if r["clusters_per_img"] is None else f"{r['clusters_per_img']:.0f}"
        q = "" if r["cluster_ratio"] is None else f"{r['cluster_ratio']:.3f}"
        print(f"{r['run']:<24}{r['peak_mem_gib']:>10.2f}{r['s_per_img']:>9.4f}{r['AP']:>7.3f}"
              f"{c:>14}{q:>8}")
    (out / "short_runs.json").write_text(json.dumps({"gpu": gpu, "torch": torch.__version__,
                                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
