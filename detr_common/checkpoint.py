"""Checkpoints: atomic saving, resuming the full training state, loading weights only.

A checkpoint is a dict {model, optimizer, lr_scheduler, epoch, args, detector[, scaler]}
(spec §4.1; ``detector`` is ours and lets a wrong-detector checkpoint fail clearly).
"""
import argparse
import logging
import os
import tempfile
from pathlib import Path

import torch

from .cli import (enact_attention_numerics, enact_gauss_taps, enact_mode, enact_padding,
                  enact_row_breaks)

log = logging.getLogger(__name__)

# ENACT settings that change what the weights compute but not their shapes:
# name -> value for args that lack it (saved before the flag, or a detector without it).
_ENACT_SETTINGS = {
    "enact_mode": enact_mode,
    "enact_row_breaks": enact_row_breaks,
    "enact_gauss_taps": enact_gauss_taps,
    "enact_padding": enact_padding,
    "enact_attn_numerics": enact_attention_numerics,
    "smoothing_sigma": lambda a: getattr(a, "smoothing_sigma", None),
}


# Flags that build the model: weights are only meaningful in a model built with the values they
# were trained with (some change shapes, e.g. --hidden_dim; some only what the weights compute,
# e.g. --nheads, --dilation). Compared with the checkpoint's saved args on load.
MODEL_FLAGS = ("backbone", "dilation", "backbone_train_all", "hidden_dim", "nheads",
               "enc_layers", "dec_layers", "dim_feedforward", "num_queries", "num_classes",
               "pre_norm", "num_feature_levels", "num_query_position", "num_query_pattern",
               "spatial_prior")


# The flags --resume / --eval take from the checkpoint when the command line leaves them out:
# what builds the model, with or without ENACT, and ENACT's settings.
ADOPTED_FLAGS = MODEL_FLAGS + ("no_enact",) + tuple(_ENACT_SETTINGS)

# Model flags that fine-tuning from --pretrained weights may change on purpose.
_FINE_TUNING_FLAGS = ("num_classes", "backbone_train_all")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here; the message names the file and the problem."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` through a temporary file and a rename (never half-written),
    with the permissions of a plainly created file (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path, mmap=False):
    """Load a checkpoint dict from a trusted file (weights_only=False: it holds ``args``);
    mmap=True maps the tensors instead of reading them (for a look at ``args``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # pickle / zip errors come in many types
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a detector checkpoint (no 'model' entry)")
    return ckpt


def saved_args(path):
    """The argparse Namespace the checkpoint at ``path`` was trained with, or None."""
    try:
        ckpt = load_checkpoint(path, mmap=True)
    except CheckpointError:  # e.g. a legacy (non-zip) file cannot be mapped: read it whole
        ckpt = load_checkpoint(path)
    args = ckpt.get("args")
    return args if isinstance(args, argparse.Namespace) else None


def strip_ddp_prefix(state: dict) -> dict:
    """state_dict keys without DistributedDataParallel's / DataParallel's ``module.`` prefix."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _describe_mismatch(path, model_state, ckpt_state, ckpt_args, args, ignore_flags=()):
    missing = [k for k in model_state if k not in ckpt_state]
    unexpected = [k for k in ckpt_state if k not in model_state]
    shapes = [f"{k}: checkpoint {list(ckpt_state[k].shape)} vs model {list(v.shape)}"
              for k, v in model_state.items()
              if k in ckpt_state and tuple(ckpt_state[k].shape) != tuple(v.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]})")
    hint = ""
    if ckpt_args is not None and hasattr(ckpt_args, "no_enact") and hasattr(args, "no_enact") \
            and ckpt_args.no_enact != args.no_enact:
        hint = (" — it was trained " + ("without" if ckpt_args.no_enact else "with")
                + " ENACT: " + ("add" if ckpt_args.no_enact else "drop") + " --no_enact")
    changes = model_setting_changes(ckpt_args, args, ignore_flags)
    if changes:
        hint += (" — its model was built with other flags (" + "; ".join(changes)
                 + "): give the checkpoint's values")
    return f"{path}: checkpoint does not fit this model: " + "; ".join(parts) + hint


def _flag_changes(values) -> list:
    """["--flag: checkpoint X, this run Y", ...] for each (flag, X, Y) of ``values`` with
    X != Y."""
    return [f"--{name}: checkpoint {before}, this run {now}"
            for name, before, now in values if before != now]


def model_setting_changes(ckpt_args, args, ignore_flags=()) -> list:
    """_flag_changes for the MODEL_FLAGS (but ``ignore_flags``) that both ``args`` and the
    checkpoint's saved args have; [] without saved args."""
    if ckpt_args is None or args is None:
        return []
    return _flag_changes((name, getattr(ckpt_args, name), getattr(args, name))
                         for name in MODEL_FLAGS
                         if name not in ignore_flags and hasattr(ckpt_args, name)
                         and hasattr(args, name))


def check_detector(path, ckpt, detector):
    found = ckpt.get("detector")
    if found is not None and found != detector:
        raise CheckpointError(f"{path}: this is a '{found}' checkpoint, not '{detector}'")


def load_model_state(model, path, ckpt, args, ignore_flags=()):
    """Load ``ckpt['model']`` strictly, or raise a one-line CheckpointError saying why not
    (naming the model flags, but ``ignore_flags``, that differ from the checkpoint's)."""
    state = ckpt["model"]
    model_state = model.state_dict()
    ckpt_args = ckpt.get("args")
    if set(state) != set(model_state) or any(
            tuple(state[k].shape) != tuple(v.shape) for k, v in model_state.items()):
        raise CheckpointError(_describe_mismatch(path, model_state, state, ckpt_args, args,
                                                 ignore_flags))
    model.load_state_dict(state, strict=True)


def enact_setting_changes(ckpt_args, args) -> list:
    """_flag_changes for the ENACT settings (clusters, Gaussian, padding, attention numerics,
    sigma) known on both sides; [] when either has no ENACT or the checkpoint has no args."""
    if (ckpt_args is None or getattr(ckpt_args, "no_enact", True)
            or getattr(args, "no_enact", True)):
        return []
    values = ((name, value(ckpt_args), value(args)) for name, value in _ENACT_SETTINGS.items())
    return _flag_changes((name, before, now) for name, before, now in values
                         if before is not None and now is not None)


def load_weights(model, path, detector, args):
    """Load a checkpoint of ``detector`` whose weights fit ``model`` exactly; returns the
    checkpoint dict (for the optimizer / scheduler state of a resume). Warns when the run's
    ENACT settings differ from those the weights were trained with (the weights still fit)."""
    ckpt = load_checkpoint(path)
    check_detector(path, ckpt, detector)
    load_model_state(model, path, ckpt, args)
    _warn_setting_changes(path, ckpt, args)
    return ckpt


def _warn_setting_changes(path, ckpt, args, ignore_flags=()):
    """Warnings for weights that fit but were trained in another model: other model flags
    (e.g. --nheads; but ``ignore_flags``), other ENACT settings."""
    changes = model_setting_changes(ckpt.get("args"), args, ignore_flags)
    if changes:
        log.warning("%s was trained in a model built with other flags (the weights fit, the "
                    "results will not): %s", path, "; ".join(changes))
    changes = enact_setting_changes(ckpt.get("args"), args)
    if changes:
        log.warning("%s was trained with other ENACT settings (the weights fit, the results "
                    "may not): %s", path, "; ".join(changes))


def load_pretrained(model, path, detector, args=None,
                    class_head_prefixes=("class_embed",)):
    """Weights only (fine-tuning). A class head whose shape differs is left re-initialised.
    With the run's ``args``: the --no_enact and model-flag hints on a mismatch, and warnings
    when the model flags or ENACT settings differ from the checkpoint's (as load_weights);
    a new --num_classes or --backbone_train_all is what fine-tuning may change, so neither is
    named."""
    ckpt = load_checkpoint(path)
    check_detector(path, ckpt, detector)
    state = dict(ckpt["model"])
    model_state = model.state_dict()
    skipped = []
    for k in list(state):
        head = any(p in k for p in class_head_prefixes)
        if head and k in model_state and state[k].shape != model_state[k].shape:
            skipped.append(k)
            del state[k]
    if skipped:
        log.info("%s: class head re-initialised (the number of classes differs): %s",
                 path, ", ".join(skipped))
    for k in skipped:
        state[k] = model_state[k]
    load_model_state(model, path, {**ckpt, "model": state}, args, _FINE_TUNING_FLAGS)
    _warn_setting_changes(path, ckpt, args, _FINE_TUNING_FLAGS)


# torch.load(weights_only=True) refuses argparse.Namespace; allow it for anyone who loads
# our checkpoints that way (spec §6 item 26).
torch.serialization.add_safe_globals([argparse.Namespace])
