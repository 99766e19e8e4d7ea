#!/usr/bin/env python
"""Convert a checkpoint of the OFFICIAL ENACT code into one this repository loads.

    python tools/convert_official_checkpoint.py official.pth converted.pth
    python DETR-ENACT/main.py --coco_path COCO --enact_mode official_fixed_chunk \
        --enact_gauss_taps code --enact_padding ignore --resume converted.pth --eval

The detector is recognised from the keys (or given with --detector). What changes (spec §2, §4):
- DETR-ENACT / Conditional-DETR-ENACT: the official ClustAttn computes softmax(Q K^T) / d_h, we
  compute the standard softmax(Q K^T / sqrt(d_h)). Folding the difference into the weights is
  exact on the same clusters: W_q, b_q <- sqrt(d_h) W_q, b_q and W_o <- W_o / d_h (b_o kept).
  --swap_qk first exchanges W_q and W_k: DETR-ENACT code before 2024-08-12 used them the other
  way round, so a released checkpoint may need it (spec §2.5; try both on a val subset).
  --keep_numerics leaves W_q / W_o as they are, for runs with --enact_attn_numerics official
  (the official numerics kept, e.g. to fine-tune as the official code trained).
- Anchor-DETR-ENACT: the official encoder uses the in_proj slices S0 / S1 for the clustered
  row / column keys and S2 / S3 for the queries (upstream's and ours are the other way round),
  so they are swapped back (S0 <-> S2, S1 <-> S3) in every encoder layer with ENACT.
  APPROXIMATE: the official layer pools each row's and column's queries and multiplies two
  softmaxes without normalising; ours keeps per-pixel queries and one joint softmax (spec §6
  items 17-18), so expect a different AP than the official evaluation.
- Everywhere: the model state only (a `module.` prefix is dropped); the optimizer state, whose
  parameter groups differ from ours, is not carried over. `epoch` is kept.
Clusters: the printed command's --enact_mode official_fixed_chunk --enact_gauss_taps code
--enact_padding ignore gives the official code's clusters (fixed chunks of the mean region
length, one chunk size per batch, its 6σ-1 Gaussian taps, padded pixels included), so a
converted DETR or Conditional DETR computes what the official code computed. Without those
flags our defaults apply (the paper's variable-length regions, 6σ+1 taps, padding excluded),
and the APs differ from the official figures.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detr_common.checkpoint import (CheckpointError, load_checkpoint, save_checkpoint,  # noqa: E402
                                    strip_ddp_prefix)

DETECTORS = ("detr", "conditional_detr", "anchor_detr")
MAIN = {"detr": "DETR-ENACT/main.py", "conditional_detr": "Conditional-DETR-ENACT/main.py",
        "anchor_detr": "Anchor-DETR-ENACT/main.py"}
# the backbone each official model was trained with (spec §3.6), for the printed command
BACKBONE_FLAGS = {"detr": "", "conditional_detr": " --backbone resnet101",
                  "anchor_detr": " --dilation"}
_DETR_ENACT = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.W_(q|k|v|o|prob)\."
                         r"(weight|bias)$")
_ANCHOR_ENACT = re.compile(r"^transformer\.encoder_layers\.(\d+)\.ENACT\.W_prob\.weight$")


def detect_detector(state) -> str:
    """Which detector a state_dict belongs to, from its keys (spec §4.2)."""
    if any(k.startswith("transformer.encoder_layers.") for k in state):
        return "anchor_detr"
    if any(".ca_qpos_sine_proj." in k for k in state):
        return "conditional_detr"
    if any(".multihead_attn." in k for k in state):
        return "detr"
    raise CheckpointError("the keys match none of DETR, Conditional DETR or Anchor DETR "
                          "(spec §4.2); give --detector if they are renamed")


def _enact_layers(state, detector):
    """Indices of the encoder layers that carry ENACT parameters."""
    if detector == "anchor_detr":
        return sorted({int(m.group(1)) for k in state if (m := _ANCHOR_ENACT.match(k))})
    return sorted({int(m.group(1)) for k in state if (m := _DETR_ENACT.match(k))})


def convert_state(state, detector: str, nheads: int, swap_qk: bool = False,
                  keep_numerics: bool = False):
    """Official ENACT model state (keys without a ``module.`` prefix) -> ours (a new dict;
    tensors of untouched keys shared). nheads: attention heads of the encoder
    (d_h = d_model / nheads). keep_numerics: DETR / Conditional DETR weights not folded (for
    --enact_attn_numerics official)."""
    layers = _enact_layers(state, detector)
    if not layers:
        raise CheckpointError(f"no ENACT parameters (W_prob) in this {detector} checkpoint: a "
                              f"plain upstream checkpoint loads as it is, with --no_enact")
    out = dict(state)
    for n in layers:
        if detector == "anchor_detr":
            _swap_anchor_slices(out, n)
        else:
            _convert_attention(out, n, nheads, swap_qk, keep_numerics)
    return out


def _convert_attention(state, n, nheads, swap_qk, keep_numerics=False):
    """One DETR / Conditional DETR ENACT layer in place: W_q <-> W_k if swap_qk, then the
    official numerics folded into W_q / W_o unless keep_numerics."""
    p = f"transformer.encoder.layers.{n}.self_attn."
    d = state[p + "W_q.weight"].shape[0]
    if d % nheads:
        raise CheckpointError(f"encoder layer {n}: d_model {d} is not divisible by nheads {nheads}")
    d_h = d // nheads
    if swap_qk:
        for t in ("weight", "bias"):
            q, k = p + f"W_q.{t}", p + f"W_k.{t}"
            state[q], state[k] = state[k], state[q]
    if keep_numerics:
        return
    root = math.sqrt(d_h)
    state[p + "W_q.weight"] = state[p + "W_q.weight"] * root
    state[p + "W_q.bias"] = state[p + "W_q.bias"] * root
    state[p + "W_o.weight"] = state[p + "W_o.weight"] / d_h


def _swap_anchor_slices(state, n):
    p = f"transformer.encoder_layers.{n}.self_attn."
    for name in ("in_proj_weight", "in_proj_bias"):
        w = state[p + name]
        d = w.shape[0] // 5
        s = list(w.split(d))  # S0 .. S4
        state[p + name] = torch.cat((s[2], s[3], s[0], s[1], s[4]))


def refuse_our_checkpoint(path, ckpt):
    """CheckpointError for a checkpoint this tool wrote or a main.py of this repository wrote
    (converting it again would fold the numerics into W_q / W_o a second time)."""
    if "conversion" in ckpt or "converted_from" in ckpt:
        raise CheckpointError(f"{path}: already converted (from {ckpt.get('converted_from')}); "
                              f"use it as it is")
    if "detector" in ckpt:
        raise CheckpointError(f"{path}: written by this repository's main.py, not by the "
                              f"official code: nothing to convert")


def nheads_of(ckpt, default: int) -> int:
    args = ckpt.get("args")
    return int(getattr(args, "nheads", default) or default)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("official", help="checkpoint written by the official ENACT code")
    p.add_argument("output", help="where to write the converted checkpoint")
    p.add_argument("--detector", choices=DETECTORS, default=None,
                   help="default: recognised from the checkpoint's keys")
    p.add_argument("--nheads", type=int, default=8,
                   help="encoder attention heads when the checkpoint's args do not say (8)")
    p.add_argument("--swap_qk", action="store_true",
                   help="exchange W_q and W_k (DETR-ENACT before 2024-08-12; spec §2.5)")
    p.add_argument("--keep_numerics", action="store_true",
                   help="DETR / Conditional DETR: do not fold the official attention numerics "
                        "into W_q / W_o; use the result with --enact_attn_numerics official")
    return p


def main(argv=None) -> int:
    opts = get_parser().parse_args(argv)
    src, dst = Path(opts.official), Path(opts.output)
    try:
        if dst.resolve() == src.resolve():
            raise CheckpointError(f"{dst}: the output would overwrite the official checkpoint")
        if dst.is_dir():
            raise CheckpointError(f"{dst}: is a folder; give the converted checkpoint's file "
                                  f"name")
        ckpt = load_checkpoint(src)
        refuse_our_checkpoint(src, ckpt)
        state = strip_ddp_prefix(ckpt["model"])
        detector = opts.detector or detect_detector(state)
        for flag in ("swap_qk", "keep_numerics"):
            if getattr(opts, flag) and detector == "anchor_detr":
                raise CheckpointError(f"--{flag} applies to DETR / Conditional DETR checkpoints")
        nheads = nheads_of(ckpt, opts.nheads)
        model = convert_state(state, detector, nheads, opts.swap_qk, opts.keep_numerics)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layers = _enact_layers(model, detector)
    save_checkpoint({"model": model, "detector": detector, "epoch": ckpt.get("epoch"),
                     "converted_from": str(src),
                     "conversion": {"swap_qk": opts.swap_qk, "nheads": nheads,
                                    "keep_numerics": opts.keep_numerics}}, dst)
    if detector == "anchor_detr":
        what = "in_proj slices swapped back"
    elif opts.keep_numerics:
        what = "official attention numerics kept"
    else:
        d_model = model[f"transformer.encoder.layers.{layers[0]}.self_attn.W_q.weight"].shape[0]
        d_h = d_model // nheads
        what = (f"official attention numerics folded into W_q / W_o with d_h = {d_h}: {nheads} "
                f"heads, give --nheads if the model had another number")
    if opts.swap_qk:
        what += ", W_q <-> W_k"
    numerics = " --enact_attn_numerics official" if opts.keep_numerics else ""
    print(f"{detector}: {len(layers)} ENACT encoder layers converted ({what}) -> {dst}")
    print(f"evaluate: python {MAIN[detector]} --coco_path COCO{BACKBONE_FLAGS[detector]} "
          f"--enact_mode official_fixed_chunk --enact_gauss_taps code --enact_padding ignore"
          f"{numerics} --resume {dst} --eval")
    return 0


if __name__ == "__main__":
    sys.exit(main())
