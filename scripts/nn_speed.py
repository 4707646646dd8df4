"""Deprecated: use `dptrain bench` (same measurement, plus the SGD update, per-layer-type breakdown and --json).

    python scripts/nn_speed.py [--threads 1] [--batch 64] [--size 64] [--classes 62] [--warmup 2] [--steps 5]
    == dptrain bench --compare torch --threads 1 --batch-size 64 --image-size 64 --classes 62 --warmup 2 --steps 5
"""
from __future__ import annotations

import argparse
import sys

from dptrain.cli import main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=62)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args()
    sys.exit(main(["bench", "--threads", str(a.threads), "--batch-size", str(a.batch), "--image-size", str(a.size),
                   "--classes", str(a.classes), "--warmup", str(a.warmup), "--steps", str(a.steps)]
                  + ([] if a.no_torch else ["--compare", "torch"])))
