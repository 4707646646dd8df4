"""`dptrain eval`: accuracy of a checkpoint on a folder of images.

    dptrain eval --checkpoint runs/demo/best.npz --data DIR [--batch-size 256]

The checkpoint carries everything needed to rebuild the network (its resolved config and class names), so no
config file is read. DIR has the training layout (one sub-folder per class, or a .tgz of it); images are decoded at
the checkpoint's `data.image_size` / `data.center_crop`, without augmentation, and BN uses its running statistics.

Printed (one JSON object on stdout): accuracy, mean loss, num_images, per-class {images, correct} for every class
that had images, `unknown_classes` (folders the model was not trained on: their images are left out, not counted
wrong) and `skipped` (files that did not decode). Failure modes: a missing/corrupt checkpoint raises CheckpointError
naming the file; a folder with no image of a known class raises ValueError.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..compute import evaluate_batches
from ..data.dataset import load_folder_for_eval
from ..data.guard import Limits
from .model_file import load_model


def evaluate_checkpoint(checkpoint_path: str | Path, data_path: str | Path, batch_size: int = 256, *,
                        cache_dir: str | None = None, progress: bool = False) -> dict:
    """Accuracy, loss and per-class counts of a checkpoint on `data_path` (see the module docstring).

    cache_dir: where decoded images are cached (None: the checkpoint config's data.cache_dir).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, cfg, class_names = load_model(checkpoint_path)
    ds = load_folder_for_eval(data_path, class_names, cfg.data.image_size, cfg.data.center_crop,
                              cache_dir=cfg.data.cache_dir if cache_dir is None else cache_dir, progress=progress,
                              limits=Limits.from_config(cfg.data))
    idx = ds.val_idx
    loss_total, _, pred = evaluate_batches(model, ds.images, ds.labels, idx, batch_size)
    labels = ds.labels[idx]
    hits = pred == labels
    images_per_class = np.bincount(labels, minlength=len(class_names))
    correct_per_class = np.bincount(labels, weights=hits, minlength=len(class_names)).astype(np.int64)
    per_class = {class_names[k]: {"images": int(images_per_class[k]), "correct": int(correct_per_class[k])}
                 for k in np.flatnonzero(images_per_class)}
    n = len(idx)
    return {"checkpoint": str(checkpoint_path), "data": str(data_path), "num_images": int(n),
            "accuracy": float(hits.sum() / n), "loss": loss_total / n, "correct": int(hits.sum()),
            "num_classes_model": len(class_names), "num_classes_seen": len(per_class),
            "chance": 1.0 / len(class_names), "per_class": per_class,
            "unknown_classes": list(ds.unknown_classes), "skipped": list(ds.skipped)}
