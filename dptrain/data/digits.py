"""scikit-learn's handwritten digits written as class folders: a small real image set (`dptrain data digits`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .. import install_hint


def make_digits(out: str | Path, image_size: int = 32) -> dict:
    """scikit-learn's handwritten digits as RGB PNG class folders OUT/digit_K/NNNN.png, resized to image_size."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(f"dptrain data digits: needs scikit-learn ({install_hint('digits')})") from None
    d = load_digits()
    out = Path(out)
    for i, (img, label) in enumerate(zip(d.images, d.target)):
        folder = out / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        u8 = np.clip(img * (255.0 / 16.0), 0, 255).astype(np.uint8)
        Image.fromarray(u8).resize((image_size, image_size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return {"out_dir": str(out), "num_images": len(d.images), "num_classes": 10, "image_size": image_size}
