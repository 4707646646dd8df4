"""Session fixtures shared by the distributed tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """8 synthetic people, 20-40 images each, 32x32 (≈ 210 images, 169 train / 42 val): generated once."""
    from dptrain.data.synth import generate
    root = tmp_path_factory.mktemp("tinydata")
    generate(root / "synth", num_classes=8, num_rich=8, image_size=32, max_images=40, min_rich=20, progress=False)
    return root / "synth"
