"""The README's Table 1 (fp32 rows of bench_detectors.py) from its result files.

    python benchmarks/readme_table.py benchmarks/results/nvidia_h200.json \
        --brackets benchmarks/results/nvidia_h200_faster_host.json

One line per detector: plain eager, plain SDPA and ENACT (train s/img, peak GiB, batch-1 infer
s/img), ENACT vs plain eager (train, memory, infer; bold where the issue's target is met),
ENACT with --enact_wait_for_counts vs plain eager (train), and the official ENACT code's
figures from the issue. --brackets adds another run's ratios in brackets (e.g. a faster host).
A result file with `enact_nowait` rows predates the default's flip (commit 750c82c and
earlier): there, `enact_nowait` is today's `enact` and `enact` today's `enact_wait`.
bench_detectors.py writes the table (without brackets) into its markdown report too.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import bench_reference as ref

HEADER = ("| detector | plain eager: train s/img, GiB, infer s/img | plain SDPA | ENACT | "
          "ENACT vs eager: train, memory, infer | ENACT `--enact_wait_for_counts` vs eager: "
          "train | official ENACT vs upstream (issue 6): train, memory, infer |")
METRICS = (("train", "train_s_per_img"), ("mem", "peak_gib"), ("infer", "infer_s_per_img"))


def current_names(rows: list[dict]) -> list[dict]:
    """``rows`` with the variants under today's names (see the module docstring)."""
    if not any(r["variant"] == "enact_nowait" for r in rows):
        return rows
    rename = {"enact_nowait": "enact", "enact": "enact_wait"}
    return [{**r, "variant": rename.get(r["variant"], r["variant"])} for r in rows]


def _minus(text: str) -> str:
    return text.replace("-", "\u2212")


def _pct(value: float | None, unit: str = " %") -> str:
    return "\u2014" if value is None else _minus(f"{value:+.1f}{unit}")


def _figures(row: dict | None) -> str:
    """"train s/img, GiB, infer s/img" of a row (a dash for what it lacks)."""
    if row is None:
        return "\u2014"
    return ", ".join("\u2014" if row.get(key) is None else format(row[key], fmt)
                     for key, fmt in (("train_s_per_img", ".4f"), ("peak_gib", ".2f"),
                                      ("infer_s_per_img", ".4f")))


def _vs_eager(rows: list[dict], det: str, variant: str, metric: str) -> float | None:
    ours, plain = ref._find(rows, det, variant), ref._find(rows, det, "plain_eager")
    return ref.pct(*(None if r is None else r.get(metric) for r in (ours, plain)))


def _official(det: str) -> str:
    """The official ENACT code's ratios as the issue states them (inference in whole per cent)."""
    p = ref.OFFICIAL_PCT[det]
    return ", ".join([_pct(p["train"]), _pct(p["mem"]), _minus(f"{p['infer']:+.0f} %")])


def _ratio(rows, brackets, det, variant, metric, bold):
    """ENACT ``variant`` vs plain eager on ``metric`` (bold if ``bold``), the bracket run's
    ratio after it (not for memory, which does not depend on the host)."""
    text = _pct(_vs_eager(rows, det, variant, metric))
    if bold:
        text = f"**{text}**"
    other = None if brackets is None else _vs_eager(brackets, det, variant, metric)
    if other is not None and metric != "peak_gib":
        text += f" ({_pct(other, '')})"
    return text


def table(rows: list[dict], targets: list[dict], brackets: list[dict] | None = None) -> str:
    """The README's table (markdown) of one run's ``rows`` and ``targets`` (bench_detectors'
    JSON entries), with another run's ratios in brackets where ``brackets`` (its rows)."""
    rows = current_names(rows)
    brackets = None if brackets is None else current_names(brackets)
    met = {(t["id"], t["detector"]) for t in targets if t["status"] == "met"}
    lines = [HEADER, "|" + "---|" * 7]
    for det in ref.DETECTOR_LABELS:
        plain = ref._find(rows, det, "plain_eager")
        if plain is None:
            continue
        enact = ", ".join(_ratio(rows, brackets, det, "enact", metric,
                                 (f"{key}_vs_eager", det) in met) for key, metric in METRICS)
        cells = [ref.row_label(plain), *(_figures(ref._find(rows, det, v))
                                         for v in ("plain_eager", "plain_sdpa", "enact")),
                 enact, _ratio(rows, brackets, det, "enact_wait", "train_s_per_img", False),
                 _official(det)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load(path: Path) -> dict:
    """A bench_detectors.py result file; ValueError naming the file if it is not one."""
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it ({e})") from None
    if not isinstance(run, dict) or not {"rows", "targets"} <= run.keys():
        raise ValueError(f"{path}: not a bench_detectors.py result file (no rows / targets)")
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("result", type=Path, help="bench_detectors.py JSON (the table's figures)")
    p.add_argument("--brackets", type=Path, help="another run's JSON (ratios in brackets)")
    args = p.parse_args(argv)
    try:
        run = load(args.result)
        other = load(args.brackets)["rows"] if args.brackets else None
    except ValueError as e:
        p.error(str(e))
    print(table(run["rows"], run["targets"], other))


if __name__ == "__main__":
    main()
