"""Where a training step waits: host time, GPU time and the GPU's lag per phase of one step.

    python benchmarks/step_timeline.py --detectors anchor_detr --variants plain_eager,enact
    python benchmarks/step_timeline.py --tiny --device cpu      # smoke test of the script

Builds each detector variant as bench_detectors.py does (same protocol: random-init backbone,
the detector's default batch of random 800x1216 images, main.py's train_step) and times
--steps training steps after --warmup, the Python GC paused. Markers split each step into
phases: the forward of every top-level module (the transformer's layers one by one, grouped
per layer list unless --per_layer), the criterion, the backward of every module (from the
moment its output's gradient is ready), the step's one host read (the losses) and the optimizer
step. At each marker the host's clock is read and a CUDA event recorded (no profiler, so host
times are not inflated). Per phase (mean over the steps):
  host ms   the host's time from the phase's marker to the next one;
  GPU ms    the GPU's time between the two events (kernels and idle gaps alike);
  lag ms    how far the GPU is behind the host when the phase starts (0 = the GPU has run
            everything launched so far and waits for the host).
A phase starting at lag ~0 with GPU ms ~ host ms is host-bound: the GPU runs its kernels as
fast as the host launches them, and a faster kernel there saves no wall time. The host waits
for the GPU only in the step's read (its host time there is the wait): the GPU's saving shows
on the wall clock only as a shorter wait there, or as phases no longer host-bound.
Writes <out>/<stem>.json and .md (stem: step_timeline_<gpu>) and prints the tables; with
matplotlib, <stem>.png: each variant's phases end to end on a host lane and a GPU lane.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_detectors as bench  # noqa: E402
import bench_reference as ref  # noqa: E402
import detr_common.engine as engine  # noqa: E402

HOST_BOUND_LAG_MS = 0.1  # a phase starting with the GPU less than this behind waits for the host


class Markers:
    """(label, host ns, CUDA event or None) per marker of the current step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def __call__(self, label: str):
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((label, time.perf_counter_ns(), event))


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):
        out = out.values()
    elif not isinstance(out, (list, tuple)):
        return None
    for value in out:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def _phase_modules(model: torch.nn.Module, criterion: torch.nn.Module):
    """(label, module) to mark: the model's children and its transformer's children, each layer
    list as its layers (label "<list>.<i>"), every module once (a head shared by the decoder
    layers under its first label); the criterion."""
    def expand(prefix, parent):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.ModuleList):
                yield from ((f"{prefix}{name}.{i}", layer) for i, layer in enumerate(child))
            elif name != "transformer" or prefix:
                yield f"{prefix}{name}", child
            else:
                yield from expand("", child)

    seen, out = set(), []
    for label, module in [*expand("", model), ("criterion", criterion)]:
        if id(module) not in seen:
            seen.add(id(module))
            out.append((label, module))
    return out


@contextlib.contextmanager
def marked(model, criterion, optimizer, mark):
    """Within the block, `mark` is called at every phase boundary of a training step (forward
    hooks, output-gradient hooks, the engine's read, the optimizer step); undone afterwards."""
    handles = []
    for label, module in _phase_modules(model, criterion):
        def pre(_module, _inputs, label=label):
            mark("fwd:" + label)

        def post(_module, _inputs, output, label=label):
            mark("after:" + label)
            t = _first_tensor(output)
            if t is not None and t.requires_grad:
                t.register_hook(lambda _grad: mark("bwd:" + label))
        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    reduce_dict, step = engine.reduce_dict, optimizer.step

    def reading(values):
        mark("read")
        result = reduce_dict(values)
        mark("after:read")
        return result

    def stepping(*args, **kwargs):
        mark("optimizer")
        return step(*args, **kwargs)

    own_step = "step" in vars(optimizer)  # an instance attribute already (else the class's)
    engine.reduce_dict, optimizer.step = reading, stepping
    try:
        yield
    finally:
        engine.reduce_dict = reduce_dict
        if own_step:
            optimizer.step = step
        else:
            del optimizer.step
        for h in handles:
            h.remove()


def _group(label: str, per_layer: bool) -> str:
    """'fwd:encoder_layers.3' -> 'fwd:encoder_layers' unless per_layer."""
    head, _, tail = label.rpartition(".")
    return label if per_layer or not tail.isdigit() else head


def timeline(step, marks: Markers, steps: int, per_layer: bool, sync):
    """Run step() `steps` times with markers -> (phases [{phase, host_ms, gpu_ms, lag_ms}] in
    order of first appearance, mean over steps (host / GPU summed over a group's layers, lag at
    its first layer's start); wall ms per step)."""
    totals, order, walls = {}, [], []
    with bench._NoGC():
        for _ in range(steps):
            sync()
            marks.marks.clear()
            start = time.perf_counter_ns()
            marks("step")
            step()
            marks("end")
            sync()
            walls.append((time.perf_counter_ns() - start) / 1e6)
            (_, h0, e0), seen = marks.marks[0], set()
            for (label, h, e), (_, h2, e2) in zip(marks.marks, marks.marks[1:]):
                phase = _group(label, per_layer)
                if phase not in totals:
                    totals[phase] = [0.0, 0.0 if e else None, 0.0 if e else None]
                    order.append(phase)
                t = totals[phase]
                t[0] += (h2 - h) / 1e6
                if e is not None:
                    t[1] += e.elapsed_time(e2)
                    if phase not in seen:  # lag at the group's first marker of this step
                        t[2] += e0.elapsed_time(e) - (h - h0) / 1e6
                seen.add(phase)
    rows = []
    for phase in order:
        host, gpu, lag = totals[phase]
        rows.append({"phase": phase, "host_ms": host / steps,
                     "gpu_ms": None if gpu is None else gpu / steps,
                     "lag_ms": None if lag is None else lag / steps})
    return rows, sum(walls) / steps


def summarise(rows, wall_ms):
    """{wall_ms, host_ms (sum), host_bound_ms: host time of the phases starting at lag <=
    HOST_BOUND_LAG_MS, read_wait_ms: host time of the step's read, where the host waits for
    the GPU to finish what was launched before it} (the last two None on the CPU)."""
    out = {"wall_ms": wall_ms, "host_ms": sum(r["host_ms"] for r in rows),
           "host_bound_ms": None, "read_wait_ms": None}
    if not rows or rows[0]["lag_ms"] is None:
        return out
    out["host_bound_ms"] = sum(r["host_ms"] for r in rows if r["lag_ms"] <= HOST_BOUND_LAG_MS)
    out["read_wait_ms"] = sum(r["host_ms"] for r in rows if r["phase"] == "read")
    return out


def measure(name, variant, opts, device):
    """-> {detector, variant, phases, summary} (or error) for one detector variant."""
    _, detector = bench.load_detector(name)
    row = {"detector": name, "variant": variant, "error": None}
    model = criterion = optimizer = None
    try:
        args = bench.detector_args(name, variant, device, opts.tiny)
        size = bench.TINY_SIZE if opts.tiny else bench.FULL_SIZE
        model, criterion, optimizer, batch, targets = bench.build_training(
            detector, args, [size], opts.seed, device)
        model.train()
        criterion.train()

        def step():
            bench.train_step(model, criterion, optimizer, batch, targets, "off",
                             args.clip_max_norm)

        for _ in range(opts.warmup):
            step()
        marks = Markers(device)
        with marked(model, criterion, optimizer, marks):
            phases, wall = timeline(step, marks, opts.steps, opts.per_layer,
                                    lambda: bench.sync(device))
        row.update(batch_size=args.batch_size, phases=phases, summary=summarise(phases, wall))
    except Exception as exc:  # keep going with the other rows
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        del model, criterion, optimizer
        bench.free_memory(device)
    return row


def _cell(x):
    return "—" if x is None else f"{x:.2f}"


def row_markdown(row) -> str:
    """One detector variant's section: its summary line and phase table."""
    parts = [f"## {row['detector']} {row['variant']}", ""]
    if row["error"]:
        return "\n".join(parts + [f"error: {row['error']}", ""])
    s = row["summary"]
    parts.append(f"wall {s['wall_ms']:.1f} ms/step; host {s['host_ms']:.1f} ms, of which "
                 f"{_cell(s['host_bound_ms'])} ms in phases that start with the GPU waiting "
                 f"and {_cell(s['read_wait_ms'])} ms waiting for the GPU in the step's read")
    parts += ["", "| phase | host ms | GPU ms | lag ms |", "|---|---|---|---|"]
    parts += [f"| {p['phase']} | {_cell(p['host_ms'])} | {_cell(p['gpu_ms'])} | "
              f"{_cell(p['lag_ms'])} |" for p in row["phases"]]
    return "\n".join(parts + [""])


def markdown(meta, rows) -> str:
    header = [f"# Training-step timeline ({meta['gpu']})", "",
              f"- GPU: {meta['gpu']}; torch {meta['torch']}; command: `{meta['command']}`; "
              f"{meta['date']}",
              f"- {meta['protocol']}", "",
              "host ms = the host's time in the phase; GPU ms = the GPU's time between the "
              "phase's markers (kernels and idle alike); lag ms = how far the GPU is behind the "
              "host at the phase's start (about 0: it waits for the host, the phase is "
              "host-bound). Means per step; a layer list's row sums its layers.", ""]
    return "\n".join(header + [row_markdown(r) for r in rows])


def _module_of(phase: str) -> str:
    """'bwd:encoder_layers' -> 'encoder_layers'; 'after:read' -> 'read'."""
    return phase.split(":", 1)[-1]


def write_chart(path, meta, rows):
    """One panel per detector variant: the step's phases laid end to end on a host lane and a
    GPU lane (one colour per module; backward hatched, the code after a module's forward pale);
    where a phase sits further right on the GPU lane, the GPU lags the host. Returns the path,
    or None without matplotlib."""
    plt = ref.pyplot_or_none()
    rows = [r for r in rows if not r["error"]]
    if plt is None or not rows:
        return None
    modules = list(dict.fromkeys(_module_of(p["phase"]) for r in rows for p in r["phases"]))
    palette = plt.get_cmap("tab20").colors
    colour = {m: palette[i % len(palette)] for i, m in enumerate(modules)}
    fig, axes = plt.subplots(len(rows), 1, figsize=(15, 1.2 + 1.5 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows):
        lanes = [("host", "host_ms")] + ([("GPU", "gpu_ms")] if row["phases"][0]["gpu_ms"]
                                         is not None else [])
        wall = row["summary"]["wall_ms"]
        for y, (lane, key) in enumerate(lanes):
            start = 0.0
            for p in row["phases"]:
                width = p[key]
                module = _module_of(p["phase"])
                ax.barh(y, width, left=start, height=0.7, color=colour[module],
                        hatch="//" if p["phase"].startswith("bwd:") else None,
                        alpha=0.45 if p["phase"].startswith("after:") else 1.0,
                        edgecolor="white", linewidth=0.3)
                if width > 0.05 * wall:
                    ax.text(start + width / 2, y, p["phase"], ha="center", va="center",
                            fontsize=6, clip_on=True)
                start += width
        ax.set_yticks(range(len(lanes)))
        ax.set_yticklabels([lane for lane, _ in lanes])
        ax.invert_yaxis()
        ax.set_xlim(0, wall)
        ax.set_title(f"{row['detector']} {row['variant']}: {wall:.1f} ms per step", fontsize=9)
        ax.set_xlabel("ms from the step's start", fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour[m]) for m in modules]
    fig.legend(handles, modules, loc="lower center", ncol=min(len(modules), 8), fontsize=7,
               frameon=False)
    return ref.save_figure(fig, path, f"{meta['gpu']}, torch {meta['torch']}: a training "
                           f"step's phases on the host and on the GPU (backward hatched; "
                           f"after a module's forward pale)", 0.08)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--detectors", default="anchor_detr",
                   help="comma-separated subset of " + ",".join(bench.FOLDERS))
    p.add_argument("--variants", default="plain_eager,enact",
                   help="comma-separated subset of " + ",".join(bench.VARIANTS))
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (5)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (10)")
    p.add_argument("--per_layer", action="store_true",
                   help="one row per layer instead of one per layer list")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if "
                   "available)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for <stem>.json / .md")
    p.add_argument("--name", default=None,
                   help="file stem (default step_timeline_<gpu>, with --tiny ..._tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true",
                   help="smoke mode (CPU): bench_detectors.py's tiny models and images")
    return p


def main(argv=None):
    opts = get_parser().parse_args(argv)
    try:
        detectors = ref.choices(opts.detectors, bench.FOLDERS, "--detectors")
        variants = ref.choices(opts.variants, bench.VARIANTS, "--variants")
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if opts.steps < 1 or opts.warmup < 0:
        raise SystemExit("error: --steps must be >= 1 and --warmup >= 0")
    device, gpu = bench.open_device(opts.device)
    meta = {"gpu": gpu, "torch": torch.__version__, "device": str(device),
            "command": " ".join(["python", "benchmarks/step_timeline.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "protocol": (f"{'TINY smoke settings, ' if opts.tiny else ''}bench_detectors.py's "
                         f"fp32 protocol: random-init backbone, detector's default batch of "
                         f"{bench.TINY_SIZE if opts.tiny else bench.FULL_SIZE} images, "
                         f"{opts.warmup} warm-up + {opts.steps} timed steps, GC paused, seed "
                         f"{opts.seed}")}
    print(f"GPU: {gpu}  torch {torch.__version__}", flush=True)
    rows = []
    for name in detectors:
        for variant in variants:
            rows.append(measure(name, variant, opts, device))
            print(row_markdown(rows[-1]), flush=True)
    stem = opts.name or "step_timeline_" + ref.gpu_slug(gpu) + ("_tiny" if opts.tiny else "")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, rows))
    chart = write_chart(out / f"{stem}.png", meta, rows)
    print(f"wrote {out / stem}.json / .md" + (" / .png" if chart else ""), flush=True)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
