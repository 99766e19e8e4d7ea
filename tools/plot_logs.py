"""Training curves from one or more ``log.txt`` (one JSON object per epoch, written by every
main.py): losses per epoch (train solid, test dashed) and COCO AP per epoch, one colour per run,
so ENACT and plain runs can be compared in one figure.

    python tools/plot_logs.py runs/detr_enact runs/detr_plain --labels ENACT plain \\
        --output curves.png [--fields loss loss_ce loss_bbox loss_giou AP]

A run is a log.txt or the folder holding it; its legend label is the folder name unless
--labels is given. A field is
  - AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl (mAP = AP): the entry of
    ``test_coco_eval_bbox`` (the 12 COCO statistics);
  - a log key without its prefix (e.g. loss, loss_ce, class_error, enact_cluster_ratio): both
    ``train_<field>`` and ``test_<field>`` where present;
  - a full log key (e.g. train_lr, train_s_per_img): that key only.
Needs matplotlib (``pip install matplotlib`` or ``pip install -e ".[plots]"``), which is not a
dependency of the package. Expected problems end with "error: ..." and exit status 2.
"""
import argparse
import json
import math
import sys
from pathlib import Path

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
DEFAULT_FIELDS = ("loss", "loss_ce", "loss_bbox", "loss_giou", "AP")


class PlotError(RuntimeError):
    """One-line problem with the inputs."""


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("logs", nargs="+", help="log.txt files or run folders holding one")
    p.add_argument("--labels", nargs="+", default=None, help="legend labels, one per log")
    p.add_argument("--fields", nargs="+", default=None,
                   help=f"what to plot (default: those of {' '.join(DEFAULT_FIELDS)} that the "
                        f"logs have)")
    p.add_argument("--output", default="training_curves.png",
                   help="PNG to write (a folder: training_curves.png in it)")
    p.add_argument("--title", default=None, help="figure title")
    p.add_argument("--dpi", type=int, default=100)
    return p


def resolve_log(path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / "log.txt"
    if not path.is_file():
        raise PlotError(f"{path}: no such log file")
    return path


def read_records(path: Path):
    """The epoch records of a log.txt; PlotError naming the line for bad JSON."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PlotError(f"{path}:{number}: not a JSON object per line ({e.msg})") from None
        if not isinstance(record, dict):
            raise PlotError(f"{path}:{number}: expected a JSON object, got "
                            f"{type(record).__name__}")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: empty log (no epoch finished yet?)")
    return records


def default_labels(paths):
    """Folder names; the last two path parts where folder names repeat."""
    names = [p.parent.name or str(p.parent) for p in paths]
    if len(set(names)) < len(names):
        names = [f"{p.parent.parent.name}/{p.parent.name}" for p in paths]
    return names


def series(records, field):
    """-> list of (suffix for the legend, key, xs, ys) found for ``field`` in one log."""
    field = "AP" if field == "mAP" else field
    epochs = [r.get("epoch", i) for i, r in enumerate(records)]
    if field in COCO_STATS:
        k = COCO_STATS.index(field)
        pts = [(e, r["test_coco_eval_bbox"][k]) for e, r in zip(epochs, records)
               if isinstance(r.get("test_coco_eval_bbox"), list)
               and len(r["test_coco_eval_bbox"]) > k]
        return [("", "test_coco_eval_bbox", *zip(*pts))] if pts else []
    keys = [field] if field.startswith(("train_", "test_")) else [f"train_{field}",
                                                                   f"test_{field}"]
    out = []
    for key in keys:
        pts = [(e, r[key]) for e, r in zip(epochs, records)
               if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        if pts:
            out.append((key.split("_", 1)[0], key, *zip(*pts)))
    return out


def available_fields(all_records):
    """The --fields values the logs can plot: numeric train_ / test_ keys without their prefix,
    and the COCO statistics where test_coco_eval_bbox is logged."""
    keys, coco = set(), 0
    for records in all_records:
        for r in records:
            keys.update(k.split("_", 1)[1] for k, v in r.items()
                        if k.startswith(("train_", "test_")) and isinstance(v, (int, float))
                        and not isinstance(v, bool))
            if isinstance(r.get("test_coco_eval_bbox"), list):
                coco = max(coco, len(r["test_coco_eval_bbox"]))
    return list(COCO_STATS[:coco]) + sorted(keys)


def output_path(output) -> Path:
    """--output as the file written: a folder gets training_curves.png inside it, a name
    without a suffix gets .png (matplotlib would add it without saying)."""
    output = Path(output)
    if output.is_dir():
        return output / "training_curves.png"
    return output if output.suffix else output.with_suffix(".png")


def import_pyplot():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plot_logs.py needs matplotlib, which is not installed: pip install "
                        "matplotlib  (or: pip install -e \".[plots]\")") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot(paths, labels, fields, output, title=None, dpi=100):
    plt = import_pyplot()
    all_records = [read_records(p) for p in paths]
    explicit = fields is not None
    fields = list(fields or DEFAULT_FIELDS)
    found = {f: [series(r, f) for r in all_records] for f in fields}
    missing = [f for f in fields if not any(found[f])]
    if explicit and missing:
        raise PlotError(f"field {missing[0]!r} is in none of the logs; available: "
                        f"{', '.join(available_fields(all_records))}")
    fields = [f for f in fields if f not in missing]
    if not fields:
        raise PlotError(f"none of the default fields ({', '.join(DEFAULT_FIELDS)}) is in the "
                        f"logs; choose with --fields from: "
                        f"{', '.join(available_fields(all_records))}")
    ncols = min(3, len(fields))
    nrows = math.ceil(len(fields) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows + 0.5),
                             squeeze=False)
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    kinds = set()
    for ax, field in zip(axes.flat, fields):
        for run, curves in enumerate(found[field]):
            for kind, _key, xs, ys in curves:
                kinds.add(kind)
                ax.plot(xs, ys, "--" if kind == "test" else "-",
                        color=colours[run % len(colours)],
                        marker="o" if len(xs) < 15 else None, markersize=3)
        ax.set_title(field if field not in COCO_STATS else f"{field} (val)")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(fields):]:
        ax.axis("off")
    handles = [Line2D([], [], color=colours[i % len(colours)], label=label)
               for i, label in enumerate(labels)]
    handles += [Line2D([], [], color="black", linestyle=style, label=kind)
                for kind, style in (("train", "-"), ("test", "--")) if kind in kinds]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6),
               frameon=False, bbox_to_anchor=(0.5, 0.0))
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.45 / (3.2 * nrows + 0.5), 1, 1))
    output = output_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=dpi)
    plt.close(fig)
    return output


def main(argv=None):
    args = get_parser().parse_args(argv)
    try:
        paths = [resolve_log(p) for p in args.logs]
        labels = args.labels or default_labels(paths)
        if len(labels) != len(paths):
            raise PlotError(f"--labels gives {len(labels)} label(s) for {len(paths)} log(s)")
        out = plot(paths, labels, args.fields, args.output, args.title, args.dpi)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
