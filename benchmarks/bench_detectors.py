"""Whole-detector benchmark: ENACT vs plain attention for DETR R50, Conditional DETR R101 and
Anchor DETR R50-DC5 under the protocol of issue 6 (the paper's Table 1 on our GPU).

    python benchmarks/bench_detectors.py                      # everything, one GPU (see README)
    python benchmarks/bench_detectors.py --detectors detr --variants plain_eager,enact
    python benchmarks/bench_detectors.py --tiny --device cpu  # smoke test of the script

Protocol (per row = one detector x one variant x one mode, a freshly built model):
  fp32 with torch's default TF32 settings (untouched); random-initialised backbone
  (--backbone_weights none); a batch of 8 random 3x800x1216 images (Anchor DETR: 4, i.e. each
  detector's default --batch_size) with 1-10 random boxes per image (seeded, the same batch for
  every variant); the detector's own criterion and AdamW groups (DETECTOR.param_groups;
  detr_common.trainer.build_optimizer, fused AdamW on CUDA, as main.py trains),
  gradient clipping 0.1; each step is main.py's (detr_common.engine.train_step, with its one
  host read of the losses and gradient norm per step, as the upstream loops' loss.item());
  3 warm-up steps, then 10 timed steps between torch.cuda.synchronize();
  peak = torch.cuda.max_memory_allocated() after reset_peak_memory_stats() following the
  warm-up; inference at batch 1 (the batch's first image), model.eval() + no_grad, 5 warm-up
  then 20 timed forwards. The timed parts are repeated (--repeats, 3) and the median is
  reported (all repeats are in the JSON): the steps are partly host-bound, and one 0.3-1 s
  measurement moves by several per cent with the host's state; the GC is paused while timing.
Variants: plain_eager (--no_enact --attn_impl eager: the paper's baseline, materialised
  attention weights), plain_sdpa (--no_enact --attn_impl sdpa), enact (--enact_impl auto, the
  other attentions at the default sdpa: what a user gets), enact_eager (ENACT with the other
  attentions eager, to separate ENACT from the decoder's attention implementation),
  enact_wait (enact with --enact_wait_for_counts: training reads each layer's cluster count
  back instead of guessing the rows; the targets are judged for it too, in a second table);
  not in the default run: enact_kernel (enact with --enact_impl cuda: the same as enact in
  fp32, but in bf16 the CUDA kernel attends where "auto" takes torch's SDPA, e.g.
  --variants plain_sdpa,enact,enact_kernel,enact_wait --modes bf16).
Modes: fp32 (the protocol; the targets are judged on it), bf16 (the same under
  torch.autocast bf16; criterion in fp32), mixed (fp32, a padded batch alternating 800x1216 and
  800x900 images with the padding mask; training only, since a batch-1 image has no padding).
Writes <out>/<gpu>.json, <gpu>.md (tables, the README's table, the issue's reference figures,
targets met / missed) and <gpu>.png (bar chart; needs matplotlib), rewriting JSON and markdown
after every row.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_reference as ref  # noqa: E402
import readme_table  # noqa: E402
from bench_reference import FOLDERS  # noqa: E402

for _p in [ROOT, *(ROOT / f for f in FOLDERS.values())]:
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
from detr_common.data.collate import pad_images  # noqa: E402
from detr_common.engine import autocast, move_targets  # noqa: E402
from detr_common.engine import train_step as engine_train_step  # noqa: E402
from detr_common.trainer import build_optimizer  # noqa: E402

VARIANTS = {
    "plain_eager": ["--no_enact", "--attn_impl", "eager"],
    "plain_sdpa": ["--no_enact", "--attn_impl", "sdpa"],
    "enact": ["--enact_impl", "auto", "--attn_impl", "sdpa"],
    "enact_eager": ["--enact_impl", "auto", "--attn_impl", "eager"],
    "enact_wait": ["--enact_impl", "auto", "--attn_impl", "sdpa", "--enact_wait_for_counts"],
    "enact_kernel": ["--enact_impl", "cuda", "--attn_impl", "sdpa"],
}
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v != "enact_kernel")  # it is opt-in (above)
MODES = {"fp32": "off", "bf16": "bf16", "mixed": "off"}  # mode -> --amp value
NUM_CLASSES = 91  # COCO's largest category id + 1, as on COCO
FULL_SIZE, MIXED_SMALL = (800, 1216), (800, 900)
TINY_SIZE, TINY_SMALL = (64, 96), (64, 64)


# ------------------------------------------------------------------------ detectors
def _load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MAINS = {}


def load_detector(name):
    """(get_parser, DETECTOR) of ``<folder>/main.py`` imported in-process. The three folders
    each have an ``engine.py``; the folder's own one is put under the name ``engine`` only while
    its main.py is executed (main.py does ``from engine import DETECTOR``)."""
    if name not in _MAINS:
        folder = ROOT / FOLDERS[name]
        engine = _load_module(folder / "engine.py", f"_bench_{name}_engine")
        saved = sys.modules.get("engine")
        sys.modules["engine"] = engine
        try:
            main = _load_module(folder / "main.py", f"_bench_{name}_main")
        finally:
            if saved is None:
                sys.modules.pop("engine", None)
            else:
                sys.modules["engine"] = saved
        _MAINS[name] = main
    return _MAINS[name].get_parser, _MAINS[name].DETECTOR


def detector_args(name, variant, device, tiny):
    """Parsed flags of the detector's own main.py (paper defaults) for one variant."""
    get_parser, _ = load_detector(name)
    argv = ["--backbone_weights", "none", "--device", str(device), *VARIANTS[variant]]
    if tiny:
        argv += ref.TINY_FLAGS + ref.TINY_QUERIES[name]
    args = get_parser().parse_args(argv)
    args.num_classes = NUM_CLASSES
    return args


# ----------------------------------------------------------------------------- data
def random_batch(batch_size, sizes, seed, device):
    """ImageBatch of random N(0, 1) images (sizes: one (h, w) per image, padded to the largest)
    and targets with 1-10 random boxes each (normalised cxcywh inside the image, labels in
    1..NUM_CLASSES-1); deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(batch_size):
        h, w = sizes[i % len(sizes)]
        images.append(torch.randn(3, h, w, generator=g))
        n = int(torch.randint(1, 11, (1,), generator=g))
        centre = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
        extent = 0.05 + 0.35 * torch.rand(n, 2, generator=g)
        targets.append({"labels": torch.randint(1, NUM_CLASSES, (n,), generator=g),
                        "boxes": torch.cat([centre, extent], 1)})
    return pad_images(images).to(device), move_targets(targets, device)


# ---------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, criterion, optimizer, batch, targets, amp, clip):
    """One optimisation step exactly as main.py trains (detr_common.engine.train_step: autocast
    forward, fp32 criterion, backward, the step's one host read of the losses, gradient norm
    and ENACT's cluster-overflow flag, finiteness check, clipping, AdamW; an overflowed step
    redone) -> (loss value, whether the step was redone)."""
    loss, _, redone = engine_train_step(model, criterion, optimizer, batch, targets, amp=amp,
                                        clip_max_norm=clip)
    return loss, redone


class _NoGC:
    """Python's garbage collector paused in a timed region (as timeit does): a collection
    inside a host-bound 0.1-1 s measurement moves it by several per cent."""

    def __enter__(self):
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc):
        if self.was_enabled:
            gc.enable()


def timed_repeats(step, steps, repeats, device):
    """``repeats`` runs of ``steps`` calls of step(), each run between synchronisations with
    the GC paused -> (seconds per call of every run, step()'s last result)."""
    times, result = [], None
    for _ in range(repeats):
        with _NoGC():
            start = time.perf_counter()
            for _ in range(steps):
                result = step()
            sync(device)
            times.append((time.perf_counter() - start) / steps)
    return times, result


def measure_train(model, criterion, optimizer, batch, targets, amp, clip, device, warmup,
                  steps, repeats=1):
    """-> {train_s_per_img, peak_gib, loss, train_s_per_img_repeats, redone_steps}: ``warmup``
    steps, then ``repeats`` times ``steps`` steps timed between synchronisations;
    train_s_per_img = the median repeat; peak over all timed steps (statistics reset after the
    warm-up); redone_steps: timed steps redone for an ENACT cluster overflow (train_step).
    A non-finite loss raises detr_common.engine.NonFiniteLossError, as in training."""
    model.train()
    criterion.train()
    for _ in range(warmup):
        train_step(model, criterion, optimizer, batch, targets, amp, clip)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    redone = []

    def step():
        loss, again = train_step(model, criterion, optimizer, batch, targets, amp, clip)
        redone.append(again)
        return loss

    per_step, loss = timed_repeats(step, steps, repeats, device)
    times = [t / batch.images.shape[0] for t in per_step]
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return {"train_s_per_img": statistics.median(times), "train_s_per_img_repeats": times,
            "peak_gib": peak, "loss": loss, "redone_steps": sum(redone)}


def eval_forward(model, image, amp, device):
    """model.eval() -> a no-argument batch-1 forward under autocast (call it under no_grad)."""
    model.eval()

    def forward():
        with autocast(device, amp):
            return model(image)

    return forward


@torch.no_grad()
def measure_inference(models, image, amp, device, warmup, steps, repeats=1):
    """models: {variant: model} -> {variant: {infer_s_per_img, infer_s_per_img_repeats}}:
    batch-1 forwards in eval mode under no_grad, ``warmup`` each, then ``repeats`` rounds in
    which every model runs ``steps`` timed forwards in turn (interleaved, so a drift of the
    host's speed during the run hits every variant alike); the median round per variant."""
    forwards = {v: eval_forward(m, image, amp, device) for v, m in models.items()}
    for forward in forwards.values():
        for _ in range(warmup):
            forward()
    sync(device)
    times = {v: [] for v in forwards}
    for _ in range(repeats):
        for v, forward in forwards.items():
            times[v] += timed_repeats(forward, steps, 1, device)[0]
    return {v: {"infer_s_per_img": statistics.median(t), "infer_s_per_img_repeats": t}
            for v, t in times.items()}


def cluster_counts(model):
    """Per ENACT layer (module order = layer order): mean clusters and valid pixels per image of
    the last forward, from the modules' ``last_stats``; [] for a plain model."""
    layers = []
    for name, module in model.named_modules():
        stats = getattr(module, "last_stats", None)
        if stats:
            layers.append({"layer": name,
                           "clusters_per_img": float(stats["clusters_per_image"].float().mean()),
                           "pixels_per_img": float(stats["pixels_per_image"].float().mean())})
    return layers


def profile_calls(fn, calls, device, rows=15):
    """``calls`` calls of fn under torch.profiler -> (text tables: top kernels by GPU time and
    top host ops by self CPU time; GPU kernel milliseconds per call, None on the CPU). The
    kernel time next to the wall time shows how host-bound the work is; the host table shows
    where it waits (cudaStreamSynchronize / cudaEventSynchronize) and which ops cost host time."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        sync(device)
    averages = prof.key_averages()
    tables, gpu_ms = [], None
    if device.type == "cuda":
        tables.append(averages.table(sort_by="self_device_time_total", row_limit=rows))
        gpu_us = sum(e.self_device_time_total for e in averages
                     if str(e.device_type).endswith("CUDA"))
        gpu_ms = gpu_us / 1e3 / calls
    tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    return "\n".join(tables), gpu_ms


def profile_train(model, criterion, optimizer, batch, targets, amp, clip, device):
    """Two profiled training steps -> (tables, GPU kernel ms per step); see profile_calls."""
    model.train()
    return profile_calls(lambda: train_step(model, criterion, optimizer, batch, targets, amp,
                                            clip), 2, device)


@torch.no_grad()
def profile_infer(model, image, amp, device, calls=10):
    """Profiled batch-1 eval forwards -> (tables, GPU kernel ms per forward)."""
    return profile_calls(eval_forward(model, image, amp, device), calls, device)


def build_training(detector, args, sizes, seed, device):
    """The detector built from ``args`` (seeded) on ``device`` with its criterion and AdamW
    groups, and the protocol's random batch of ``sizes`` -> (model, criterion, optimizer,
    batch, targets)."""
    torch.manual_seed(seed)
    model, criterion, _ = detector.build(args)
    model.to(device)
    criterion.to(device)
    optimizer = build_optimizer(detector, model, args, device)
    batch, targets = random_batch(args.batch_size, sizes, seed, device)
    return model, criterion, optimizer, batch, targets


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_row(name, variant, mode, opts, device):
    """Build one detector variant and measure its training -> (row, model moved to the CPU or
    None, batch-1 image on the CPU or None). Errors (OOM included) are recorded in the row,
    never raised, and the row keeps what was measured before the error; the model is kept
    (off the GPU, so later rows' peak memory does not see it) for measure_inference_group."""
    _, detector = load_detector(name)
    amp = MODES[mode]
    row = {"detector": name, "variant": variant, "mode": mode, "amp": amp,
           "train_s_per_img": None, "peak_gib": None, "infer_s_per_img": None, "error": None}
    if device.type == "cuda":
        row["allocated_before_gib"] = torch.cuda.memory_allocated(device) / 2 ** 30
    start = time.perf_counter()
    model = criterion = optimizer = batch = targets = None
    kept = image = None
    phase = "build"
    try:
        args = detector_args(name, variant, device, opts.tiny)
        row.update(batch_size=args.batch_size, backbone=args.backbone
                   + ("-DC5" if getattr(args, "dilation", False) else ""),
                   enact_impl=None if args.no_enact else args.enact_impl,
                   attn_impl=args.attn_impl)
        full, small = (TINY_SIZE, TINY_SMALL) if opts.tiny else (FULL_SIZE, MIXED_SMALL)
        sizes = [full, small] if mode == "mixed" else [full]
        model, criterion, optimizer, batch, targets = build_training(
            detector, args, sizes, opts.seed, device)
        row["image_sizes"] = [list(s) for s in sizes]
        row["padded_shape"] = list(batch.images.shape)
        phase = "training"
        row.update(measure_train(model, criterion, optimizer, batch, targets, amp,
                                 args.clip_max_norm, device, opts.warmup, opts.steps,
                                 opts.repeats))
        row["clusters_train"] = cluster_counts(model)
        if opts.profile and mode != "mixed":
            phase = "profile"
            row["profile"], row["train_gpu_ms_per_step"] = profile_train(
                model, criterion, optimizer, batch, targets, amp, args.clip_max_norm, device)
        if mode != "mixed":
            image = pad_images([batch.images[0]]).to("cpu")  # batch 1, no padding
            kept = model.to("cpu")
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM" if phase in ("build", "training") else f"OOM ({phase})"
    except Exception as exc:  # keep going with the other rows
        row["error"] = f"{phase}: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        del model, criterion, optimizer, batch, targets
        free_memory(device)
    row["wall_s"] = time.perf_counter() - start
    return row, kept, image


def measure_inference_group(rows, kept, image, mode, opts, device):
    """rows: the training rows of one detector and mode; kept: {variant: model on the CPU}
    (measure_row's) -> fills each row's batch-1 inference fields (interleaved timing:
    measure_inference), its cluster counts and, with --profile, its inference profile; errors
    go into the rows. Empties `kept`, so no model outlives the group on the GPU (it would add
    to the next rows' peak memory)."""
    start = time.perf_counter()
    amp = MODES[mode]
    try:
        image = image.to(device)
        models = {v: m.to(device) for v, m in kept.items()}
        timed = measure_inference(models, image, amp, device, opts.infer_warmup,
                                  opts.infer_steps, opts.repeats)
        for row in rows:
            model = models[row["variant"]]
            row.update(timed[row["variant"]])
            row["clusters_infer"] = cluster_counts(model)
            if opts.profile:
                row["profile_infer"], row["infer_gpu_ms"] = profile_infer(model, image, amp,
                                                                          device)
    except torch.cuda.OutOfMemoryError:
        for row in rows:
            row["error"] = row["error"] or "OOM (inference)"
    except Exception as exc:
        for row in rows:
            row["error"] = row["error"] or f"inference: {type(exc).__name__}: {str(exc)[:300]}"
    finally:
        kept.clear()
        models = model = image = None
        free_memory(device)
    for row in rows:
        row["wall_s"] += (time.perf_counter() - start) / len(rows)


# --------------------------------------------------------------------------- reports
def add_ratios(rows):
    """Percent changes of every row against plain_eager and plain_sdpa of the same detector and
    mode: <metric>_vs_<variant>_pct = (row / plain - 1) x 100."""
    for row in rows:
        for base in ("plain_eager", "plain_sdpa"):
            plain = next((r for r in rows if r["detector"] == row["detector"]
                          and r["mode"] == row["mode"] and r["variant"] == base), None)
            for metric in ("train_s_per_img", "peak_gib", "infer_s_per_img",
                           "train_gpu_ms_per_step", "infer_gpu_ms"):
                row[f"{metric}_vs_{base}_pct"] = ref.pct(
                    row.get(metric), None if plain is None else plain.get(metric))
    return rows


def _num(x, fmt):
    return "—" if x is None else format(x, fmt)


def _pct(x):
    return "—" if x is None else f"{x:+.1f} %"


def _clusters(row, what="train"):
    layers = row.get(f"clusters_{what}") or []
    if not layers:
        return ""
    return " ".join(f"{c['clusters_per_img']:.0f}" for c in layers) + \
        f" of {layers[0]['pixels_per_img']:.0f}"


TABLE_COLUMNS = ["detector", "mode", "variant", "train s/img", "peak GiB", "infer s/img",
                 "train GPU ms/step (vs eager)", "infer GPU ms (vs eager)", "train vs eager",
                 "mem vs eager", "infer vs eager", "train vs sdpa", "mem vs sdpa", "infer vs sdpa",
                 "clusters/img per layer (train)"]


def _gpu_cell(row, metric):
    gpu = row.get(metric)
    if gpu is None:
        return "—"
    return f"{gpu:.1f} ({_pct(row.get(f'{metric}_vs_plain_eager_pct'))})"


def table_cells(row):
    if row.get("error") and row.get("train_s_per_img") is None:
        return [ref.row_label(row), row["mode"], row["variant"], row["error"]] + [""] * (len(TABLE_COLUMNS) - 4)
    return [ref.row_label(row), row["mode"], row["variant"], _num(row["train_s_per_img"], ".4f"), _num(row["peak_gib"], ".2f"),
            _num(row["infer_s_per_img"], ".4f"), _gpu_cell(row, "train_gpu_ms_per_step"),
            _gpu_cell(row, "infer_gpu_ms"),
            *(_pct(row.get(f"{m}_vs_{b}_pct")) for b in ("plain_eager", "plain_sdpa")
              for m in ("train_s_per_img", "peak_gib", "infer_s_per_img")),
            _clusters(row) + (f" [{row['error']}]" if row.get("error") else "")]


def text_table(rows):
    cells = [TABLE_COLUMNS] + [table_cells(r) for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(TABLE_COLUMNS))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in cells)


def markdown_table(rows):
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|"]
    lines += ["| " + " | ".join(str(c) for c in table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def reference_markdown(rows, detectors):
    """Our fp32 figures beside the issue's upstream / official / paper / floor figures."""
    lines = [
        f"Reference figures: {ref.REFERENCE_GPU}, torch {ref.REFERENCE_TORCH}, same protocol "
        f"(from issue 6). Percentages are vs plain (ours: vs plain-eager of this run).", "",
        "| detector | figure | train s/img | peak GiB | infer s/img | train Δ | mem Δ | "
        "infer Δ |", "|---|---|---|---|---|---|---|---|"]

    def line(det, label, vals, pcts):
        lines.append(f"| {ref.DETECTOR_LABELS[det]} | {label} | "
                     f"{_num(vals.get('train_s_per_img'), '.4f')} | "
                     f"{_num(vals.get('peak_gib'), '.2f')} | "
                     f"{_num(vals.get('infer_s_per_img'), '.4f')} | "
                     f"{_pct(pcts.get('train'))} | {_pct(pcts.get('mem'))} | "
                     f"{_pct(pcts.get('infer'))} |")

    for det in detectors:
        line(det, "upstream plain (ref.)", ref.UPSTREAM[det], {})
        line(det, "official ENACT (ref.)", ref.OFFICIAL[det], ref.OFFICIAL_PCT[det])
        line(det, "paper claim", {}, ref.PAPER_PCT[det])
        floor = {k: v[0] for k, v in ref.FLOOR_ABS[det].items()}
        plain = ref.FLOOR_ABS[det]
        line(det, f"floor: free encoder attention (ref.; vs its plain run "
                  f"{plain['train_s_per_img'][1]} s/img, {plain['peak_gib'][1]} GiB)",
             floor, ref.FLOOR_PCT[det])
        if det == "detr":
            line(det, "plain + fused encoder attention (ref.)", ref.FUSED_DETR,
                 {"mem": ref.pct(ref.FUSED_DETR["peak_gib"], ref.UPSTREAM["detr"]["peak_gib"])})
        for variant in VARIANTS:
            r = ref._find(rows, det, variant)
            if r is None:
                continue
            line(det, f"**ours: {variant}**", r,
                 {"train": r.get("train_s_per_img_vs_plain_eager_pct"),
                  "mem": r.get("peak_gib_vs_plain_eager_pct"),
                  "infer": r.get("infer_s_per_img_vs_plain_eager_pct")})
    return "\n".join(lines)


def write_markdown(path, meta, rows, targets, targets_wait=None):
    detectors = list(dict.fromkeys(r["detector"] for r in rows))
    met = sum(t["status"] == "met" for t in targets)
    missed = [t for t in targets if t["status"] == "missed"]
    parts = [
        f"# Detector benchmark: ENACT vs plain ({meta['gpu']})", "",
        f"- GPU: {meta['gpu']}; torch {meta['torch']}; CUDA {meta['cuda']}; "
        f"TF32 matmul {meta['tf32_matmul']}, cuDNN TF32 {meta['tf32_cudnn']}, float32 matmul "
        f"precision {meta['float32_matmul_precision']}",
        f"- ENACT backend (impl auto): {meta['enact_backend']}",
        f"- command: `{meta['command']}`; {meta['date']}; {meta['wall_s']:.0f} s",
        f"- protocol: {meta['protocol']}", ""]
    if meta["tiny"]:
        parts += ["**--tiny smoke run: tiny models and images; these figures are not comparable "
                  "with the reference figures or the targets.**", ""]
    parts += [
        "Columns: train s/img = timed training seconds / (steps x batch); peak GiB = "
        "max_memory_allocated over the timed steps; infer s/img = batch-1 eval forward; "
        "train GPU ms/step = kernel time of one training step from two profiled steps "
        "(--profile; when it is well below the wall time of a step, train s/img x batch, the "
        "step is host-bound and GPU savings do not show in wall time); infer GPU ms = the same "
        "for one batch-1 eval forward (from ten profiled forwards); "
        "\"vs eager\" / \"vs sdpa\" = (row / plain row of the same detector and mode - 1) x 100 "
        "(negative = less memory / faster); clusters/img per layer = ENACT clusters per image "
        "of each encoder layer in the last training step, \"of N\" = valid pixels per image.",
        "", "## Results", "", markdown_table(rows), "",
        "## The README's table (fp32 rows; `benchmarks/readme_table.py` prints it from the "
        "JSON, with another run's ratios in brackets)", "",
        readme_table.table(rows, targets), "",
        "## Against the reference figures (fp32 rows)", "", reference_markdown(rows, detectors),
        "", f"## Targets (fp32 rows): {met} met, {len(missed)} missed, "
        f"{sum(t['status'] == 'n/a' for t in targets)} n/a", "",
        ref.targets_markdown(targets), ""]
    if missed:
        parts += ["Missed: " + "; ".join(f"{t['id']} {t['detector']} ({t['text']})"
                                         for t in missed), ""]
    if targets_wait:
        met_w = sum(t["status"] == "met" for t in targets_wait)
        missed_w = sum(t["status"] == "missed" for t in targets_wait)
        parts += [f"## Targets with ENACT = enact_wait (--enact_wait_for_counts; fp32 rows): "
                  f"{met_w} met, {missed_w} missed", "", ref.targets_markdown(targets_wait), ""]
    path.write_text("\n".join(parts))


def write_chart(path, rows, meta):
    """Bar chart of the fp32 rows (else the first mode's; train s/img, peak GiB, infer s/img; ENACT bars labelled with
    their change vs plain-eager), with the upstream and official reference figures as hatched
    bars (not for --tiny). Returns the path, or None without matplotlib."""
    plt = ref.pyplot_or_none()
    if plt is None or not rows:
        return None
    mode = "fp32" if any(r["mode"] == "fp32" for r in rows) else rows[0]["mode"]
    fp32 = [r for r in rows if r["mode"] == mode]
    detectors = list(dict.fromkeys(r["detector"] for r in fp32))
    variants = list(dict.fromkeys(r["variant"] for r in fp32))
    series = [(v, {r["detector"]: r for r in fp32 if r["variant"] == v}, None)
              for v in variants]
    if not meta["tiny"] and mode == "fp32":
        series += [(f"upstream plain ({ref.REFERENCE_GPU})", ref.UPSTREAM, "//"),
                   (f"official ENACT ({ref.REFERENCE_GPU})", ref.OFFICIAL, "\\\\")]
    metrics = [("train_s_per_img", "training s/img"), ("peak_gib", "peak training GiB"),
               ("infer_s_per_img", "batch-1 inference s/img")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    width = 0.8 / len(series)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, title) in zip(axes, metrics):
        drawn = False
        for i, (label, table, hatch) in enumerate(series):
            xs, ys, notes = [], [], []
            for j, det in enumerate(detectors):
                value = (table.get(det) or {}).get(metric)
                if value is not None:
                    xs.append(j - 0.4 + width * (i + 0.5))
                    ys.append(value)
                    change = (table[det].get(f"{metric}_vs_plain_eager_pct")
                              if label.startswith("enact") else None)
                    notes.append("" if change is None else f"{change:+.0f}%")
            bars = ax.bar(xs, ys, width, label=label, hatch=hatch,
                          color="lightgrey" if hatch else colours[i % len(colours)],
                          edgecolor="black" if hatch else None)
            drawn = drawn or bool(xs)
            if any(notes):
                ax.bar_label(bars, notes, fontsize=6, rotation=90, padding=2)
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
        ax.margins(y=0.15)
        ax.set_xticks(range(len(detectors)))
        first = {r["detector"]: r for r in reversed(fp32)}
        ax.set_xticklabels([ref.row_label(first[d]).replace(" R", "\nR", 1) for d in detectors],
                           fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    return ref.save_figure(
        fig, path, f"{meta['gpu']}, torch {meta['torch']}, {mode}"
        + (" (--tiny smoke run)" if meta["tiny"] else
           f"; reference bars: {ref.REFERENCE_GPU}, torch {ref.REFERENCE_TORCH}; "
           f"labels: ENACT vs plain-eager"), 0.07)


# ------------------------------------------------------------------------------ main
def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--detectors", default=",".join(FOLDERS),
                   help="comma-separated subset of " + ",".join(FOLDERS))
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated subset of " + ",".join(VARIANTS)
                   + f" (default: {','.join(DEFAULT_VARIANTS)})")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--warmup", type=int, default=None, help="training warm-up steps (3)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (10)")
    p.add_argument("--infer_warmup", type=int, default=None, help="inference warm-ups (5)")
    p.add_argument("--infer_steps", type=int, default=None, help="timed inference forwards (20)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats of the training steps and of the inference forwards; "
                        "the median is reported, all are kept in the JSON (3; --tiny 1)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if "
                   "available)")
    p.add_argument("--out", default=str(HERE / "results"),
                   help="folder for <gpu>.json / .md / .png")
    p.add_argument("--name", default=None, help="file stem (default: the GPU name, lower case; "
                   "with --tiny <gpu>_tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_minutes", type=float, default=None,
                   help="start no row after this many minutes (the rest are recorded as "
                        "skipped); rows run fp32 first, so the protocol's rows come first")
    p.add_argument("--profile", action="store_true",
                   help="also profile 2 training steps per fp32 / bf16 row: top kernels and "
                        "host ops in <name>_profile.md")
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode (CPU): resnet18, hidden 64, 1 encoder / decoder layer, "
                        "64x96 images (mixed: with 64x64), batch 2, frozen backbone, 1 warm-up + "
                        "1 timed step")
    return p


def open_device(name):
    """--device (None: cuda if available) -> (torch.device, GPU name or "cpu"); a CUDA device
    becomes the current one. SystemExit for cuda without a GPU."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        return device, "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    if device.index is not None:
        torch.cuda.set_device(device)
    return device, torch.cuda.get_device_name(device)


def main(argv=None):
    opts = get_parser().parse_args(argv)
    try:
        detectors = ref.choices(opts.detectors, FOLDERS, "--detectors")
        variants = ref.choices(opts.variants, VARIANTS, "--variants")
        modes = ref.choices(opts.modes, MODES, "--modes")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    defaults = (1, 1, 1, 1, 1) if opts.tiny else (3, 10, 5, 20, 3)
    for key, value in zip(("warmup", "steps", "infer_warmup", "infer_steps", "repeats"),
                          defaults):
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    if opts.steps < 1 or opts.infer_steps < 1 or opts.repeats < 1:
        raise SystemExit("error: --steps, --infer_steps and --repeats must be >= 1")
    device, gpu = open_device(opts.device)
    if device.type == "cpu" and not opts.tiny:
        print("warning: the full protocol on the CPU takes very long; use --tiny for a smoke "
              "run", file=sys.stderr)

    run_start = time.perf_counter()
    backend = "torch (CPU inputs)"
    if device.type == "cuda" and any(v.startswith("enact") for v in variants):
        import enact_cuda
        t0 = time.perf_counter()
        info = enact_cuda.backend_info()  # may JIT-build the extension (cached afterwards)
        backend = f"{info['auto']} ({info['reason']}; checked in {time.perf_counter() - t0:.0f} s)"
    meta = {
        "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "device": str(device),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "enact_backend": backend, "tiny": opts.tiny,
        "command": " ".join(["python", "benchmarks/bench_detectors.py", *(argv if argv is not
                                                                          None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "protocol": (f"{'TINY smoke settings, ' if opts.tiny else ''}random-init backbone, "
                     f"batch = detector default, images {TINY_SIZE if opts.tiny else FULL_SIZE} "
                     f"(mixed: with {TINY_SMALL if opts.tiny else MIXED_SMALL}), 1-10 boxes, "
                     f"{opts.warmup} warm-up + {opts.steps} timed steps, inference batch 1 "
                     f"{opts.infer_warmup} + {opts.infer_steps}, clip 0.1, seed {opts.seed}; "
                     f"timed parts repeated {opts.repeats}x, median reported, Python GC "
                     f"paused while timing"),
        "settings": {k: getattr(opts, k) for k in ("warmup", "steps", "infer_warmup",
                                                   "infer_steps", "repeats", "seed")},
    }
    print(f"GPU: {gpu}  torch {torch.__version__}  CUDA {torch.version.cuda}  TF32 matmul "
          f"{meta['tf32_matmul']} cuDNN {meta['tf32_cudnn']}  ENACT backend: {backend}",
          flush=True)
    print(f"protocol: {meta['protocol']}", flush=True)

    stem = opts.name or (ref.gpu_slug(gpu) + ("_tiny" if opts.tiny else ""))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = (out / f"{stem}.{e}" for e in ("json", "md", "png"))
    print(f"{len(modes) * len(detectors) * len(variants)} rows -> {json_path}", flush=True)

    rows = []

    def write():
        meta["wall_s"] = time.perf_counter() - run_start
        add_ratios(rows)
        targets = ref.evaluate_targets(rows, gpu, detectors)
        targets_wait = (ref.evaluate_targets(rows, gpu, detectors, "enact_wait")
                        if any(r["variant"] == "enact_wait" for r in rows) else None)
        json_path.write_text(json.dumps({**meta, "rows": [{k: v for k, v in r.items()
                                                           if not k.startswith("profile")}
                                                  for r in rows],
                                         "targets": targets,
                                         "targets_enact_wait": targets_wait,
                                         "reference": {"gpu": ref.REFERENCE_GPU,
                                                       "torch": ref.REFERENCE_TORCH,
                                                       "upstream": ref.UPSTREAM,
                                                       "official": ref.OFFICIAL,
                                                       "official_pct": ref.OFFICIAL_PCT,
                                                       "paper_pct": ref.PAPER_PCT,
                                                       "floor_pct": ref.FLOOR_PCT}},
                                        indent=1))
        write_markdown(md_path, meta, rows, targets, targets_wait)
        return targets

    def show(row, what):
        layers = row.get(f"clusters_{what}") or []
        value = (f"train {_num(row['train_s_per_img'], '.4f')} s/img  peak "
                 f"{_num(row['peak_gib'], '.2f')} GiB" if what == "train" else
                 f"infer {_num(row['infer_s_per_img'], '.4f')} s/img")
        print(f"{row['detector']:<17} {row['mode']:<5} {row['variant']:<12} {value}"
              + (f"  clusters/img per layer: {_clusters(row, what)}" if layers else "")
              + (f"  ERROR {row['error']}" if row["error"] else "")
              + (f"  ({row['redone_steps']} steps redone)" if row.get("redone_steps") else "")
              + (f"  ({row['wall_s']:.1f} s)" if what == "train" else ""), flush=True)

    for mode in modes:
        for det in detectors:
            group, kept, image = [], {}, None
            for variant in variants:
                if (opts.max_minutes is not None
                        and time.perf_counter() - run_start > 60 * opts.max_minutes):
                    rows.append({"detector": det, "variant": variant, "mode": mode,
                                 "train_s_per_img": None, "peak_gib": None,
                                 "infer_s_per_img": None,
                                 "error": f"skipped (--max_minutes {opts.max_minutes:g})"})
                    continue
                row, model, row_image = measure_row(det, variant, mode, opts, device)
                rows.append(row)
                show(row, "train")
                if model is not None:
                    group.append(row)
                    kept[variant] = model
                    image = row_image
                del model
                write()
            if kept:  # batch-1 inference of the variants, interleaved
                measure_inference_group(group, kept, image, mode, opts, device)
                for row in group:
                    show(row, "infer")
                write()

    targets = write()
    chart = write_chart(png_path, rows, meta)
    if opts.profile:
        prof = [f"# Top kernels and host ops per row: 2 training steps, then 10 batch-1 eval "
                f"forwards ({gpu})", ""]
        for r in rows:
            if r.get("profile"):
                prof.append(f"## {r['detector']} {r['mode']} {r['variant']}: training\n\n"
                            f"```\n{r['profile']}\n```\n")
            if r.get("profile_infer"):
                prof.append(f"## {r['detector']} {r['mode']} {r['variant']}: batch-1 inference"
                            f"\n\n```\n{r['profile_infer']}\n```\n")
        (out / f"{stem}_profile.md").write_text("\n".join(prof))
    print()
    print(text_table(rows))
    print()
    for t in targets:
        print(f"[{t['status']:>8}] {t['id']:<24} {t['detector']:<17} {t['text']}")
    print(f"\nwrote {json_path}, {md_path}" + (f", {chart}" if chart else "")
          + f" in {time.perf_counter() - run_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
