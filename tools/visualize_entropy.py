"""ENACT's entropy maps and regions (the paper's Figure 4) for a trained ENACT checkpoint of DETR,
Conditional DETR (ENACTAttention) or Anchor DETR (ENACTClustering).

    python tools/visualize_entropy.py --checkpoint runs/detr_enact/checkpoint.pth \\
        --input img.jpg --output entropy/ [--layer 0] [--device cpu|cuda]

Per image and ENACT encoder layer l (default: every ENACT layer; --layer picks some), PNGs of
the ORIGINAL image size:
  <stem>_enc<l>_information.png  per-pixel self-information before smoothing (min-max scaled),
  <stem>_enc<l>_smoothed.png     the Gaussian-smoothed information the regions are cut from,
  <stem>_enc<l>_regions.png      the image with every region tinted in its own colour and the
                                 region boundaries drawn in white,
  <stem>_enc<l>_panel.png        the three above next to the image, with titles (small images
                                 enlarged to --panel_height).
Anchor DETR with several feature levels adds ``_lvl<k>`` after ``enc<l>``.

The feature grid (H, W) is upsampled to the image by nearest neighbour (each token is a block,
as the backbone's mask is). A region boundary is drawn between two neighbouring pixels
(left/right or up/down) of different regions; regions run in raster order, so a region may
continue from the end of one row to the start of the next, unless the model was trained with
--enact_row_breaks. Expected problems end with "error: ..." and exit status 2.
"""
import argparse
import inspect
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from detr_common.drawing import draw_regions, heatmap, panel, resize_map  # noqa: E402
from detr_common.inference import (InferenceError, add_common_arguments,  # noqa: E402
                                   eval_transform, list_images, load_detector_from_checkpoint,
                                   prepare_image, prepare_output_dir, read_image,
                                   resolve_device, run_tool, unique_stems)

log = logging.getLogger("visualize_entropy")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_common_arguments(p, "an ENACT checkpoint.pth (not --no_enact)", "entropy",
                         "folder for the PNGs (created)")
    p.add_argument("--layer", type=int, action="append", default=None,
                   help="ENACT layer index (0 = first encoder layer); repeat for several; "
                        "default: all")
    p.add_argument("--cmap", default="inferno",
                   choices=["inferno", "viridis", "magma", "jet", "turbo"])
    p.add_argument("--alpha", type=float, default=0.4, help="opacity of the region colours")
    p.add_argument("--panel_height", type=int, default=240,
                   help="smaller images are enlarged (integer factor) to at least this height "
                        "in the panel")
    return p


def enact_modules(model):
    """The model's ENACT modules (ENACTAttention / ENACTClustering) in encoder order."""
    from enact_cuda import ENACTAttention, ENACTClustering
    return [m for m in model.modules() if isinstance(m, (ENACTAttention, ENACTClustering))]


class Capture:
    """Forward pre-hooks that keep each ENACT module's key_padding_mask and hw."""

    def __init__(self, modules):
        self.calls = {}
        self.handles = [m.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, m in enumerate(modules)]

    def _hook(self, index):
        def hook(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            self.calls[index] = (bound.arguments.get("key_padding_mask"),
                                 bound.arguments.get("hw"))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def layer_maps(module, key_padding_mask, hw):
    """After a forward: per batch row b, dict(information, smoothed (H, W) float numpy,
    regions (H, W) int64 (-1 = padding, or a pixel the official fixed chunks leave out),
    valid (H, W) bool, count int); the module's clusters: regions, or fixed chunks in
    mode "official_fixed_chunk"."""
    from enact_cuda import fixed_chunks, regions
    info, smoothed = module.information, module.smoothed_information
    if info is None or smoothed is None:
        raise InferenceError("an ENACT layer kept no information maps after the forward pass")
    if hw is None:
        raise InferenceError("an ENACT layer was called without hw=(H, W): cannot lay its "
                             "sequence out as a grid")
    H, W = int(hw[0]), int(hw[1])
    region_index = getattr(module, "region_index", None)
    if region_index is None or tuple(region_index.shape) != tuple(info.shape):
        # The module keeps the unsmoothed information: the same regions as in its forward.
        _, region_index, counts = regions(info, key_padding_mask, module.sigma,
                                          module.row_breaks, (H, W), module.gauss_taps)
        if module.mode == "official_fixed_chunk":
            region_index, _ = fixed_chunks(counts, key_padding_mask, H * W)
    mask = (torch.zeros_like(info, dtype=torch.bool) if key_padding_mask is None
            else key_padding_mask.bool())
    out = []
    for b in range(info.shape[0]):
        rid = region_index[b].reshape(H, W).cpu().numpy()
        out.append({"information": info[b].reshape(H, W).float().cpu().numpy(),
                    "smoothed": smoothed[b].reshape(H, W).float().cpu().numpy(),
                    "regions": rid, "valid": ~mask[b].reshape(H, W).cpu().numpy(),
                    "count": int(rid.max()) + 1 if (rid >= 0).any() else 0})
    return out


def _enlarge(picture, min_height):
    """Integer nearest-neighbour upscaling so small images stay legible in the panel."""
    factor = max(1, -(-min_height // picture.height))
    if factor == 1:
        return picture
    return picture.resize((picture.width * factor, picture.height * factor), Image.NEAREST)


def visualize_image(model, modules, layers, image, batch, out_dir, stem, cmap, alpha,
                    panel_height=240):
    """Forward one image; write the PNGs of the chosen layers; returns the written paths."""
    capture = Capture(modules)
    try:
        with torch.no_grad():
            model(batch)
    finally:
        capture.remove()
    size = (image.height, image.width)
    written = []
    for layer in layers:
        mask, hw = capture.calls.get(layer, (None, None))
        rows = layer_maps(modules[layer], mask, hw)
        for level, maps in enumerate(rows):
            tag = f"{stem}_enc{layer}" + (f"_lvl{level}" if len(rows) > 1 else "")
            valid = resize_map(maps["valid"], size)
            info = heatmap(resize_map(maps["information"], size), valid, cmap)
            smooth = heatmap(resize_map(maps["smoothed"], size), valid, cmap)
            reg = draw_regions(image, resize_map(maps["regions"], size), alpha=alpha)
            n_tokens = int(maps["valid"].sum())
            pictures = {"information": info, "smoothed": smooth, "regions": reg}
            for name, picture in pictures.items():
                path = out_dir / f"{tag}_{name}.png"
                picture.save(path)
                written.append(path)
            titles = ["image", "information", "smoothed",
                      f"{maps['count']} regions / {n_tokens} tokens"]
            path = out_dir / f"{tag}_panel.png"
            panel([_enlarge(im, panel_height) for im in (image, info, smooth, reg)],
                  titles).save(path)
            written.append(path)
    return written


def run(args):
    images = list_images(args.input)[:args.max_images]
    device = resolve_device(args.device)
    model, _post, margs, _names = load_detector_from_checkpoint(
        args.checkpoint, device, detector=args.detector, enact_impl=args.enact_impl)
    modules = enact_modules(model)
    if not modules:
        raise InferenceError(f"{args.checkpoint}: this {margs.detector} checkpoint has no ENACT "
                             f"layers (trained with --no_enact): there are no entropy maps to "
                             f"show; use an ENACT checkpoint")
    layers = args.layer if args.layer is not None else list(range(len(modules)))
    bad = [l for l in layers if not 0 <= l < len(modules)]
    if bad:
        raise InferenceError(f"--layer {bad[0]}: the model has {len(modules)} ENACT layer(s), "
                             f"indices 0..{len(modules) - 1}")
    transform = eval_transform(margs, args.eval_size, args.max_size)
    out_dir = prepare_output_dir(args.output)
    progress = zip(images, unique_stems(images))
    if len(images) > 1:
        from tqdm import tqdm
        progress = tqdm(progress, total=len(images), desc="entropy", unit="img",
                        dynamic_ncols=True)
    written = []
    for path, stem in progress:
        image = read_image(path)
        batch = prepare_image(image, transform, device)
        written += visualize_image(model, modules, layers, image, batch, out_dir, stem,
                                   args.cmap, args.alpha, args.panel_height)
    print(f"{len(images)} image(s), ENACT layer(s) {','.join(map(str, layers))}: "
          f"{len(written)} PNG(s) -> {out_dir}/")
    return written


def main(argv=None):
    return run_tool(get_parser(), run, argv)


if __name__ == "__main__":
    main()
