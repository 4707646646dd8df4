"""The trainer's one entry point to data: load_dataset(DataConfig, seed) -> Dataset.

discover (folder or archive) -> decode (cached on disk, see cache.py) -> drop files that did not decode -> keep
classes with >= min_images_per_class images (and the max_classes largest) -> labels in sorted name order ->
stratified train/val split (see split.py). `load_folder_for_eval` decodes another folder with a checkpoint's class
names, for `dptrain eval`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..config import DataConfig
from .cache import decode_cached
from .discover import discover
from .guard import DEFAULT_LIMITS, Limits
from .split import describe_counts, label_map, select_classes, stratified_split

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    images: np.ndarray  # uint8 (N, S, S, 3), only images of kept classes
    labels: np.ndarray  # int64 (N,), index into class_names
    class_names: list[str]  # sorted
    train_idx: np.ndarray  # int64 indices into images
    val_idx: np.ndarray  # int64 indices into images
    skipped: list[str]  # relative names of files that could not be decoded
    fingerprint: str  # of the source files (see discover.py)
    names: list[str] = field(default_factory=list)  # (N,) relative file names of images
    unknown_classes: list[str] = field(default_factory=list)  # eval only: folders not in the checkpoint's classes
    from_cache: bool = False  # decoded images came from the on-disk cache

    @property
    def counts(self) -> dict:
        return dict(num_classes=len(self.class_names), num_images=int(len(self.images)),
                    num_train=int(len(self.train_idx)), num_val=int(len(self.val_idx)),
                    num_skipped=len(self.skipped))

    def summary(self) -> str:
        c = self.counts
        return (f"dataset: {c['num_images']} images of {c['num_classes']} classes at "
                f"{self.images.shape[1]}x{self.images.shape[2]}, {c['num_train']} train / {c['num_val']} val, "
                f"{c['num_skipped']} skipped, fingerprint {self.fingerprint[:12]}"
                f"{' (from cache)' if self.from_cache else ''}")


def _decode(path, image_size: int, center_crop: int, cache_dir: str, progress: bool, workers: int | None,
            limits: Limits):
    found = discover(path)
    decoded = decode_cached(found, image_size, center_crop, cache_dir, workers=workers, progress=progress,
                            limits=limits)
    if not decoded.names:
        raise ValueError(f"none of the {len(found.entries)} image files under {found.path} could be decoded "
                         f"(first: {decoded.skipped[0][0]}: {decoded.skipped[0][1]})")
    classes = [nm.split("/", 1)[0] for nm in decoded.names]
    return found, decoded, classes


def load_dataset(dcfg: DataConfig, seed: int, *, progress: bool = True, workers: int | None = None) -> Dataset:
    """Load, filter and split the dataset described by dcfg. workers: decode processes (None: automatic)."""
    found, decoded, classes = _decode(dcfg.path, dcfg.image_size, dcfg.center_crop, dcfg.cache_dir, progress,
                                      workers, Limits.from_config(dcfg))
    class_names = select_classes(classes, dcfg.min_images_per_class, dcfg.max_classes)
    if not class_names:
        raise ValueError(f"no class of {found.path} has >= {dcfg.min_images_per_class} decodable images "
                         f"(data.min_images_per_class); found {describe_counts(classes)}")
    to_label = label_map(class_names)
    labels_all = np.array([to_label.get(c, -1) for c in classes], np.int64)
    keep = np.flatnonzero(labels_all >= 0)
    images = decoded.images if len(keep) == len(labels_all) else decoded.images[keep]
    labels = labels_all[keep]
    train_idx, val_idx = stratified_split(labels, class_names, dcfg.val_fraction, seed)
    ds = Dataset(np.ascontiguousarray(images), labels, class_names, train_idx, val_idx,
                 [nm for nm, _ in decoded.skipped], found.fingerprint, [decoded.names[i] for i in keep],
                 from_cache=decoded.from_cache)
    log.info("%s", ds.summary())
    return ds


def load_folder_for_eval(path: str | os.PathLike, class_names: list[str], image_size: int, center_crop: int = 0,
                         *, cache_dir: str = "", progress: bool = True, workers: int | None = None,
                         limits: Limits = DEFAULT_LIMITS) -> Dataset:
    """Every decodable image of `path` whose class is in class_names (a checkpoint's), labelled accordingly.

    All of them land in val_idx (train_idx is empty). Classes unknown to the checkpoint are reported in one
    warning and in `unknown_classes`, and their images left out.
    """
    found, decoded, classes = _decode(path, image_size, center_crop, cache_dir, progress, workers, limits)
    to_label = label_map(list(class_names))
    labels_all = np.array([to_label.get(c, -1) for c in classes], np.int64)
    unknown = sorted({c for c in classes if c not in to_label})
    if unknown:
        log.warning("%d class folder(s) of %s are not among the model's %d classes and are skipped: %s%s",
                    len(unknown), found.path, len(class_names), ", ".join(unknown[:10]),
                    " ..." if len(unknown) > 10 else "")
    keep = np.flatnonzero(labels_all >= 0)
    if not len(keep):
        raise ValueError(f"no image of {found.path} belongs to one of the model's {len(class_names)} classes "
                         f"(found classes: {', '.join(sorted(set(classes))[:10])})")
    ds = Dataset(np.ascontiguousarray(decoded.images[keep]), labels_all[keep], list(class_names),
                 np.zeros(0, np.int64), np.arange(len(keep), dtype=np.int64), [nm for nm, _ in decoded.skipped],
                 found.fingerprint, [decoded.names[i] for i in keep], unknown, decoded.from_cache)
    log.info("eval %s", ds.summary())
    return ds
