"""Data side of the detectors: COCO dataset, joint transforms (spec §5), padding collate.

Public API: build_dataset(image_set, args), CocoDetection, DatasetError, make_transforms,
collate_fn, ImageBatch.
"""
from .collate import ImageBatch, collate_fn, pad_images
from .coco import CocoDetection, build_dataset, load_coco_json, load_image
from .errors import DatasetError
from .transforms import (DEFAULT_EVAL_SIZE, DEFAULT_MAX_SIZE, DEFAULT_TRAIN_SIZES,
                         make_transforms)

__all__ = [
    "CocoDetection", "DatasetError", "ImageBatch", "build_dataset", "collate_fn",
    "load_coco_json", "load_image", "make_transforms", "pad_images",
    "DEFAULT_EVAL_SIZE", "DEFAULT_MAX_SIZE", "DEFAULT_TRAIN_SIZES",
]
