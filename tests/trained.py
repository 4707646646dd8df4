"""A small trained checkpoint for the tests of what comes after training (predict, export)."""
from __future__ import annotations

from pathlib import Path

from helpers import make_config

from dptrain.data import synth
from dptrain.train import run_local


def train_tiny(root: Path):
    """(dataset folder, checkpoint, config): 6 synthetic people, 14-24 images each, stored at 40 px and trained
    for 2 epochs at 32 px from a 36 px centre crop (so the crop and the resize are both exercised)."""
    synth.generate(root / "set", num_classes=6, seed=2, image_size=40, num_rich=6, max_images=24, min_rich=14,
                   progress=False)
    cfg = make_config({"data.path": root / "set", "data.image_size": 32, "data.center_crop": 36,
                       "data.min_images_per_class": 10, "data.cache_dir": root / "cache", "model.widths": [8, 16],
                       "model.res_width": 16, "model.hidden": 32, "train.epochs": 2, "train.batch_size": 16,
                       "train.out": root / "run", "train.progress": False})
    run_local(cfg)
    return root / "set", root / "run" / "best.npz", cfg
