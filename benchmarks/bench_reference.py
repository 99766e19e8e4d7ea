"""Reference figures of issue 6 and the evaluation of its targets, plus the detector folders
and flag parsing and chart helpers the benchmark scripts share (bench_detectors.py,
accuracy_parity.py, short_runs.py, step_timeline.py; no torch needed, so it is cheap to
unit-test).

All reference figures were measured by the issue's author on an NVIDIA H200 with torch 2.11
under the protocol in benchmarks/README.md: "upstream" = the plain upstream detectors,
"official" = the official ENACT code, "paper" = the relative changes the ENACT paper claims,
"floor" = plain upstream detectors with the encoder self-attention returning zeros (the bound
any key/value reduction can approach), "fused" = plain DETR with a fused encoder attention.
Relative figures are percentages: (ENACT / plain - 1) x 100, negative = less / faster.
"""
from __future__ import annotations

import re

FOLDERS = {"detr": "DETR-ENACT", "conditional_detr": "Conditional-DETR-ENACT",
           "anchor_detr": "Anchor-DETR-ENACT"}


def gpu_slug(gpu: str) -> str:
    """A GPU name as a result-file stem: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")


def pyplot_or_none():
    """matplotlib.pyplot on the Agg backend, or None (with a line saying so) when matplotlib is
    not installed: the benchmarks' charts are optional."""
    try:
        import matplotlib
    except ImportError:
        print("chart skipped: matplotlib is not installed (pip install matplotlib, or "
              "pip install -e \".[plots]\")")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, title: str, legend_height: float):
    """Title the figure, fit its panels above a legend band of ``legend_height`` (a fraction
    of the figure), write it to ``path`` and close it -> path."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, legend_height, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def choices(text, allowed, flag):
    """"a,b" -> ["a", "b"], each in ``allowed``; ValueError naming ``flag`` otherwise."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


REFERENCE_GPU = "NVIDIA H200"
REFERENCE_TORCH = "2.11"

DETECTOR_SHORT = {"detr": "DETR", "conditional_detr": "Conditional DETR",
                  "anchor_detr": "Anchor DETR"}
DETECTOR_LABELS = {"detr": "DETR R50", "conditional_detr": "Conditional DETR R101",
                   "anchor_detr": "Anchor DETR R50-DC5"}

# Absolute figures: train s/img, peak training GiB, batch-1 inference s/img.
UPSTREAM = {
    "detr": {"train_s_per_img": 0.0129, "peak_gib": 9.03, "infer_s_per_img": 0.0119},
    "conditional_detr": {"train_s_per_img": 0.0190, "peak_gib": 13.64, "infer_s_per_img": 0.0182},
    "anchor_detr": {"train_s_per_img": 0.0355, "peak_gib": 11.92, "infer_s_per_img": 0.0190},
}
OFFICIAL = {
    "detr": {"train_s_per_img": 0.0132, "peak_gib": 6.60, "infer_s_per_img": 0.0155},
    "conditional_detr": {"train_s_per_img": 0.0189, "peak_gib": 11.12, "infer_s_per_img": 0.0214},
    "anchor_detr": {"train_s_per_img": 0.0312, "peak_gib": 9.77, "infer_s_per_img": 0.0250},
}
# Official ENACT vs upstream plain, as the issue states them (%).
OFFICIAL_PCT = {
    "detr": {"train": 2.7, "mem": -26.9, "infer": 31.0},
    "conditional_detr": {"train": -0.4, "mem": -18.5, "infer": 17.0},
    "anchor_detr": {"train": -12.2, "mem": -18.0, "infer": 31.0},
}
PAPER_PCT = {
    "detr": {"train": -9.8, "mem": -35.6},
    "conditional_detr": {"train": -5.7, "mem": -21.2},
    "anchor_detr": {"train": -15.4, "mem": -40.4},
}
# Free encoder self-attention (zeros) vs plain, same GPU (%), with the absolute figures.
FLOOR_PCT = {
    "detr": {"train": -12.0, "mem": -35.0, "infer": -4.0},
    "conditional_detr": {"train": -10.0, "mem": -23.5, "infer": 0.0},
    "anchor_detr": {"train": -32.0, "mem": -47.0, "infer": -16.0},
}
FLOOR_ABS = {
    "detr": {"train_s_per_img": (0.0119, 0.0135), "peak_gib": (5.83, 9.03)},
    "conditional_detr": {"train_s_per_img": (0.0185, 0.0206), "peak_gib": (10.44, 13.64)},
    "anchor_detr": {"train_s_per_img": (0.0237, 0.0350), "peak_gib": (6.28, 11.92)},
}  # (free encoder attention, plain) per metric
FUSED_DETR = {"train_s_per_img": 0.0137, "peak_gib": 6.18}  # plain DETR, fused encoder attention

# Targets on relative figures (%, ENACT vs a plain variant of the same run), per detector:
# (op, bound); None = reported only.
RELATIVE_TARGETS = [
    ("mem_vs_eager", "Peak training memory, ENACT vs plain-eager", "peak_gib", "plain_eager",
     {"detr": ("<=", -32.0), "conditional_detr": ("<=", -21.0), "anchor_detr": ("<=", -40.0)}),
    ("train_vs_eager", "Training time, ENACT vs plain-eager", "train_s_per_img", "plain_eager",
     {"detr": ("<=", -8.0), "conditional_detr": ("<=", -7.0), "anchor_detr": ("<=", -22.0)}),
    ("infer_vs_eager", "Batch-1 inference, ENACT vs plain-eager (faster / no slower)",
     "infer_s_per_img", "plain_eager",
     {"detr": ("<", 0.0), "conditional_detr": ("<=", 0.0), "anchor_detr": ("<", 0.0)}),
    ("mem_vs_sdpa", "Peak training memory, ENACT vs plain-sdpa (no more)", "peak_gib",
     "plain_sdpa", {"detr": ("<=", 0.0), "conditional_detr": ("<=", 0.0),
                    "anchor_detr": ("<=", 0.0)}),
    ("train_vs_sdpa", "Training time, ENACT vs plain-sdpa", "train_s_per_img", "plain_sdpa",
     {"detr": ("<=", -8.0), "conditional_detr": None, "anchor_detr": None}),
]
# Targets on absolute figures (same GPU as the reference only): (id, description, our variant,
# metric, reference table).
ABSOLUTE_TARGETS = [
    ("plain_train_vs_upstream", "Our plain-eager training time vs upstream plain",
     "plain_eager", "train_s_per_img", UPSTREAM),
    ("plain_infer_vs_upstream", "Our plain-eager inference vs upstream plain",
     "plain_eager", "infer_s_per_img", UPSTREAM),
    ("enact_train_vs_official", "Our ENACT training time vs official ENACT", "enact",
     "train_s_per_img", OFFICIAL),
    ("enact_mem_vs_official", "Our ENACT peak memory vs official ENACT", "enact", "peak_gib",
     OFFICIAL),
    ("enact_infer_vs_official", "Our ENACT inference vs official ENACT", "enact",
     "infer_s_per_img", OFFICIAL),
]
# --tiny smoke settings shared by bench_detectors.py and accuracy_parity.py (CPU-sized models;
# the backbone is frozen with --lr_backbone 0 so a step costs little on 2 CPU cores).
TINY_FLAGS = ["--backbone", "resnet18", "--hidden_dim", "64", "--nheads", "4", "--enc_layers",
              "1", "--dec_layers", "1", "--dim_feedforward", "128", "--smoothing_sigma", "1",
              "--batch_size", "2", "--dropout", "0.0", "--lr_backbone", "0"]
TINY_QUERIES = {"detr": ["--num_queries", "10"], "conditional_detr": ["--num_queries", "10"],
                "anchor_detr": ["--num_query_position", "10", "--num_query_pattern", "1"]}

PARITY_BOUND = -1.5  # ENACT AP - plain AP (COCO AP x 100) must be >= this
PARITY_MIN_AP = 5.0  # below this for both runs, the comparison says nothing (train longer)
PARITY_LAST_EPOCHS = 3  # parity compares the mean AP of each run's last this many epochs
TARGET_MODE = "fp32"  # targets are judged on the protocol's fp32 rows
UNITS = {"train_s_per_img": "s/img", "peak_gib": "GiB", "infer_s_per_img": "s/img"}


def pct(value, reference):
    """(value / reference - 1) x 100, or None when either is missing or reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return (value / reference - 1.0) * 100.0


def check(value, op, bound):
    """Judge ``value op bound`` (op one of "<=", "<", ">=", ">").

    -> {"value", "op", "bound", "met": bool, "margin"}; margin > 0 is by how much the value
    beats the bound (to spare), margin < 0 by how much it misses it (0 is a tie: met for <= / >=,
    missed for < / >).
    """
    if op not in ("<=", "<", ">=", ">"):
        raise ValueError(f"unknown comparison {op!r}")
    margin = (bound - value) if op in ("<=", "<") else (value - bound)
    met = margin > 0 or (margin == 0 and op in ("<=", ">="))
    return {"value": value, "op": op, "bound": bound, "met": met, "margin": margin}


def _fmt(x, unit, decimals=1):
    if unit == "%":
        return f"{x:+.{decimals}f} %"
    if unit == "AP":
        return f"{x:+.{decimals}f} AP"
    return f"{x:.4g} {unit}"


def describe(result, unit):
    """One line for a check() result, e.g. 'met: -35.1 % <= -32.0 % (3.1 pp to spare)'."""
    diff_unit = {"%": "pp", "AP": "AP"}.get(unit, unit)
    m = abs(result["margin"])
    decimals = 1 if m >= 0.05 or m == 0 else 3  # a near-tie is not printed as "by 0.0"
    v, b = _fmt(result["value"], unit, decimals), _fmt(result["bound"], unit, decimals)
    by = f"{m:.{decimals}f} {diff_unit}"
    if unit not in ("%", "AP"):  # absolute figures: also the relative distance
        rel = pct(result["value"], result["bound"])
        by = f"{m:.4g} {diff_unit}" + (f", {abs(rel):.1f} %" if rel is not None else "")
    if result["met"]:
        return f"met: {v} {result['op']} {b}" + (f" ({by} to spare)" if m else "")
    return f"missed by {by}: {v}, target {result['op']} {b}"


def _entry(tid, detector, description, unit, status, result=None, note=""):
    e = {"id": tid, "detector": detector, "description": description, "unit": unit,
         "status": status, "note": note}
    if result is not None and result.get("bound") is not None:
        e.update(result)
        e["text"] = describe(result, unit)
    else:
        e["text"] = note or status
    return e


def row_label(row):
    """"DETR R50" from a result row's detector and backbone (so --tiny rows say R18)."""
    backbone = (row.get("backbone") or "").replace("resnet", "R")
    return f"{DETECTOR_SHORT.get(row['detector'], row['detector'])} {backbone}".strip()


def _find(rows, detector, variant, mode=TARGET_MODE):
    for r in rows:
        if r["detector"] == detector and r["variant"] == variant and r["mode"] == mode:
            return r
    return None


def same_gpu_as_reference(gpu):
    return REFERENCE_GPU.lower().replace("nvidia ", "") in (gpu or "").lower()


def evaluate_targets(rows, gpu, detectors=None, enact_variant="enact"):
    """The issue's speed / memory targets judged on benchmark rows (ENACT = the rows of
    ``enact_variant``).

    rows: dicts with detector, variant, mode, train_s_per_img, peak_gib, infer_s_per_img (None
    where not measured) and optionally error. Returns one entry per (target, detector) with
    status "met", "missed", "reported" (no bound) or "n/a" (not measured / other GPU).
    """
    detectors = detectors or list(DETECTOR_LABELS)
    out = []
    for tid, description, metric, ref_variant, bounds in RELATIVE_TARGETS:
        for det in detectors:
            ours, ref = _find(rows, det, enact_variant), _find(rows, det, ref_variant)
            value = pct(*(None if r is None or r.get(metric) is None else r[metric]
                          for r in (ours, ref)))
            bound = bounds.get(det)
            if value is None:
                out.append(_entry(tid, det, description, "%", "n/a",
                                  note="not measured (variant missing, failed or no GPU)"))
            elif bound is None:
                out.append(_entry(tid, det, description, "%", "reported",
                                  note=f"{value:+.1f} % (no target; reported)"))
                out[-1].update(value=value, op=None, bound=None, met=None, margin=None)
            else:
                res = check(value, *bound)
                out.append(_entry(tid, det, description, "%", "met" if res["met"] else "missed",
                                  res))
    same_gpu = same_gpu_as_reference(gpu)
    for tid, description, variant, metric, table in ABSOLUTE_TARGETS:
        for det in detectors:
            row = _find(rows, det, enact_variant if variant == "enact" else variant)
            value = None if row is None else row.get(metric)
            if not same_gpu:
                out.append(_entry(tid, det, description, UNITS[metric], "n/a",
                                  note=f"reference figures are from an {REFERENCE_GPU}; this "
                                       f"run is on {gpu}"))
            elif value is None:
                out.append(_entry(tid, det, description, UNITS[metric], "n/a",
                                  note="not measured"))
            else:
                res = check(value, "<=", table[det][metric])
                out.append(_entry(tid, det, description, UNITS[metric],
                                  "met" if res["met"] else "missed", res))
    return out


def evaluate_parity(ap_by_detector):
    """Accuracy parity: {detector: {"plain": AP, "enact": AP}} (COCO AP x 100; the runs' mean
    over their last PARITY_LAST_EPOCHS epochs) -> one entry
    per detector, ENACT AP - plain AP >= PARITY_BOUND; "inconclusive" when both APs are below
    PARITY_MIN_AP (the runs learnt too little for the difference to mean anything)."""
    out = []
    for det, aps in ap_by_detector.items():
        desc = f"Accuracy parity on shapes: ENACT within {-PARITY_BOUND:g} AP of plain"
        if aps.get("plain") is None or aps.get("enact") is None:
            out.append(_entry("ap_parity", det, desc, "AP", "n/a", note="a run is missing"))
            continue
        res = check(aps["enact"] - aps["plain"], ">=", PARITY_BOUND)
        entry = _entry("ap_parity", det, desc, "AP", "met" if res["met"] else "missed", res)
        if max(aps["plain"], aps["enact"]) < PARITY_MIN_AP:
            entry["status"] = "inconclusive"
            entry["text"] = (f"inconclusive: plain {aps['plain']:.1f} AP, ENACT "
                             f"{aps['enact']:.1f} AP, both below {PARITY_MIN_AP:g} AP (train "
                             f"longer: --minutes); {entry['text']}")
        out.append(entry)
    return out


def targets_markdown(entries, labels=None):
    """Markdown table of target entries; labels: {detector: name shown} (default
    DETECTOR_LABELS, the paper's backbones)."""
    labels = labels or DETECTOR_LABELS
    lines = ["| target | detector | status | ours vs bound |", "|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e['description']} | {labels.get(e['detector'], e['detector'])}"
                     f" | {e['status']} | {e['text']} |")
    return "\n".join(lines)
