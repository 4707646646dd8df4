"""A run's metrics files and its progress display.

metrics.jsonl: one JSON line per step (`step`, `loss`, ...), per epoch (`train_loss`, `val_acc`, ...) and per restart;
metrics.csv: the same lines as spreadsheet rows (`kind` first, the union of their columns). Appends never stop a run:
a full disk loses lines, said once per epoch. `Progress`: a tqdm bar on a terminal, a log line now and then elsewhere.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from . import log
from .fsutil import atomic_write

METRICS_CSV = ["kind", "restart", "epoch", "step", "loss", "acc", "lr", "grad_norm", "images", "step_s", "slowest",
               "train_loss", "train_acc", "val_loss", "val_acc", "images_per_s"]
PROGRESS_EVERY_S = 30.0  # without a terminal: a progress line this often


def csv_row(r: dict) -> dict:
    """A metrics.jsonl line as a metrics.csv row: its kind, then its fields."""
    return {"kind": "epoch" if "train_loss" in r else "restart" if "restart" in r else "step", **r}


class MetricsFiles:
    """metrics.jsonl and metrics.csv of the run folder `out`."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.jsonl, self.csv = self.out / "metrics.jsonl", self.out / "metrics.csv"
        self.lost_epoch = -1  # the epoch whose lost lines were last reported

    def trim(self, epoch: int, step: int) -> None:
        """Drop the metrics.jsonl lines past a restored position (epoch, step). A process killed after its last
        checkpoint wrote lines for steps (maybe an epoch, maybe half a line) that the resumed run redoes; kept, they
        would appear twice."""
        if not self.jsonl.exists():
            return
        lines = self.jsonl.read_text().splitlines()
        keep = []
        for line in lines:
            try:
                r = json.loads(line)
            except ValueError:  # torn last line
                continue
            if r["epoch"] <= epoch if "train_loss" in r else r["step"] < step:  # epoch lines are 1-based
                keep.append(line)
        if len(keep) != len(lines):
            log.get().warning(f"{self.jsonl}: dropped {len(lines) - len(keep)} line(s) written after the checkpoint")
            atomic_write(self.jsonl, lambda f: f.write("".join(s + "\n" for s in keep).encode()))

    def write_csv(self) -> None:
        """metrics.csv, whole, from metrics.jsonl, when a run starts (a resumed run's trimmed lines, or an earlier
        run's, never linger in it); `append` then adds a row per line."""
        rows = []
        for line in self.jsonl.read_text().splitlines() if self.jsonl.exists() else []:
            try:
                rows.append(csv_row(json.loads(line)))
            except ValueError:
                continue
        try:
            def write(f):
                text = io.TextIOWrapper(f, newline="", encoding="utf-8")
                w = csv.DictWriter(text, fieldnames=METRICS_CSV, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
                text.flush()
                text.detach()
            atomic_write(self.csv, write)
        except OSError as e:
            log.get().error(f"{self.csv}: cannot write it ({e.strerror})")

    def append(self, record: dict, epoch: int) -> None:
        try:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.csv.exists():  # written whole by write_csv when fit() starts
                with open(self.csv, "a", newline="") as f:
                    csv.DictWriter(f, fieldnames=METRICS_CSV, extrasaction="ignore").writerow(csv_row(record))
        except OSError as e:  # a full disk: the line is lost, not the run (said once per epoch)
            if self.lost_epoch != epoch:
                self.lost_epoch = epoch
                log.get().error(f"{self.jsonl}: cannot append ({e.strerror}); lines are lost until it can")


class Progress:
    """A tqdm bar on a terminal; elsewhere (a batch job's log file, CI) one log line every PROGRESS_EVERY_S, so logs
    stay readable: `epoch 2/8: step 120/400 (30 %), loss 1.23 acc 0.45 lr 0.05 160 img/s`."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.total, self.n, self.desc = total, initial, desc
        self.tty = enabled and sys.stderr.isatty()
        self.lines = enabled and not self.tty
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.tty, leave=False, dynamic_ncols=True)
        self.last = time.monotonic()

    def step(self, postfix: str) -> None:
        self.n += 1
        self.bar.update(1)
        self.bar.set_postfix_str(postfix)
        if self.lines and (time.monotonic() - self.last >= PROGRESS_EVERY_S):
            self.last = time.monotonic()
            log.get().info(f"{self.desc}: step {self.n}/{self.total} ({100 * self.n // max(self.total, 1)} %), "
                           f"{postfix}")

    def close(self) -> None:
        self.bar.close()
