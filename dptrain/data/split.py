"""Class filtering, label mapping and a seeded stratified train/validation split.

Rules (all deterministic):
- `select_classes`: drop classes with fewer than `min_images_per_class` images; with `max_classes` > 0 keep the N
  largest, ties broken by name. The kept names are returned sorted, and labels are their positions in that list.
- `stratified_split`: every class keeps at least one image in training. A class with n >= 2 images puts
  k = clamp(floor(val_fraction * n + 0.5), 1, n - 1) of them in validation (round half up, not Python's banker's
  rounding); val_fraction <= 0 means no validation at all. Which images go where is drawn from a generator seeded
  by (seed, class name), so adding or dropping another class never reshuffles this one.
"""
from __future__ import annotations

import math
import zlib
from collections import Counter
from collections.abc import Iterable

import numpy as np


def select_classes(class_of_image: Iterable[str], min_images_per_class: int = 1, max_classes: int = 0) -> list[str]:
    """Names of the classes to keep, sorted. `class_of_image` holds one class name per image."""
    counts = Counter(class_of_image)
    kept = [c for c, n in counts.items() if n >= max(1, min_images_per_class)]
    if max_classes > 0 and len(kept) > max_classes:
        kept = sorted(kept, key=lambda c: (-counts[c], c))[:max_classes]
    return sorted(kept)


def describe_counts(class_of_image: Iterable[str]) -> str:
    """'N classes: a with 1 image, b with 2-4, ...' for error messages when nothing survives the filter."""
    counts = Counter(class_of_image)
    bins = [(1, 1), (2, 4), (5, 9), (10, 19), (20, 49), (50, 10**12)]
    parts = []
    for lo, hi in bins:
        k = sum(lo <= n <= hi for n in counts.values())
        if k:
            rng = f"{lo}" if lo == hi else (f"{lo}+" if hi >= 10**12 else f"{lo}-{hi}")
            parts.append(f"{k} with {rng} image{'s' if hi > 1 else ''}")
    return f"{len(counts)} classes: " + ", ".join(parts) if parts else "0 classes"


def label_map(class_names: list[str]) -> dict[str, int]:
    return {c: i for i, c in enumerate(class_names)}


def num_val(n: int, val_fraction: float) -> int:
    """Validation images taken from a class of n images."""
    if n < 2 or val_fraction <= 0:
        return 0
    return min(max(math.floor(val_fraction * n + 0.5), 1), n - 1)


def stratified_split(labels: np.ndarray, class_names: list[str], val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): sorted int64 indices into `labels`, disjoint, covering every index."""
    labels = np.asarray(labels)
    val = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        k = num_val(len(members), val_fraction)
        if k:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            val.append(rng.choice(members, size=k, replace=False))
    val_idx = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx
