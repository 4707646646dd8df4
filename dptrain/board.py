"""TensorBoard event files in RUN/tensorboard/, written by the process that owns the metrics (the single process or
the coordinator: never one writer per rank).

    tensorboard --logdir runs/

Per step: train/loss, train/acc, train/lr, train/grad_norm, train/images_per_s, time/step_s, time/slowest_rank (a
distributed run's slowest rank that step); per epoch: epoch/{train_loss, train_acc, val_loss, val_acc, images_per_s}
and the mean step-time split so far (time/compute_s, comm_s, reduce_s, update_s, serial_s). Written with tensorboardX
(`pip install 'dptrain[tensorboard]'`), a small, well-kept writer; without it the run goes on and says once how to get
the events. A resumed run purges the events past its checkpoint, as it trims metrics.jsonl.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

from . import install_hint, log

STEP_KEYS = {"loss": "train/loss", "acc": "train/acc", "lr": "train/lr", "grad_norm": "train/grad_norm",
             "step_s": "time/step_s"}
EPOCH_KEYS = ("train_loss", "train_acc", "val_loss", "val_acc", "images_per_s")
SPLIT_KEYS = ("compute_s", "comm_s", "reduce_s", "update_s", "serial_s")


def _writer_class():
    """tensorboardX's SummaryWriter, or None when it is not installed. tensorboardX imports all of PyTorch when it is
    installed (most of its import time), only to accept torch tensors, which we never pass (python floats):
    unless torch is loaded already, its import is made to fail for that one import (the entry is removed after, so
    torch imports normally later)."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    except ImportError:
        return None
    finally:
        if blocked and sys.modules.get("torch", 0) is None:
            del sys.modules["torch"]


def preload() -> None:
    """Import the writer ahead of time (it still takes a noticeable fraction of a second); nothing when it is not
    installed."""
    _writer_class()


class Board:
    def __init__(self, out: Path, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        SummaryWriter = _writer_class()
        if SummaryWriter is None:
            log.get().info(f"TensorBoard events are off: {install_hint('tensorboard')} (tensorboardX) to get "
                           "them (train.tensorboard = false silences this)")
            return
        self.writer = SummaryWriter(str(Path(out) / "tensorboard"), purge_step=purge_step or None)

    def record(self, r: dict) -> None:
        """A metrics.jsonl line: a step's or an epoch's scalars."""
        if self.writer is None:
            return
        if "train_loss" in r:
            for k in EPOCH_KEYS:
                if r.get(k) is not None:
                    self.writer.add_scalar(f"epoch/{k}", r[k], r["epoch"])
            return
        if "loss" not in r:
            return
        step = r["step"]
        for k, tag in STEP_KEYS.items():
            if r.get(k) is not None:
                self.writer.add_scalar(tag, r[k], step)
        if r.get("images") and r.get("step_s"):
            self.writer.add_scalar("train/images_per_s", r["images"] / r["step_s"], step)
        m = re.fullmatch(r"rank (\d+)", str(r.get("slowest", "")))
        if m:
            self.writer.add_scalar("time/slowest_rank", int(m[1]), step)

    def split(self, breakdown: dict, step: int) -> None:
        """The executor's mean step-time split so far (distributed runs)."""
        if self.writer is None:
            return
        for k in SPLIT_KEYS:
            if isinstance(breakdown.get(k), int | float):
                self.writer.add_scalar(f"time/{k}", breakdown[k], step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
