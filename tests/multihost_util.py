"""Helpers for the multi-host tests (tests/test_multihost.py): launches and agents on a netns cluster.

Every process started here runs in its own session and is killed (whole process group) by `close()`, and the
cluster context manager kills whatever is left inside the namespaces, so a failed test leaves nothing behind.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from distutil import ROOT, TINY, Proc, params, step_records, wait_until  # noqa: F401 (re-exported)


def make_data(root: Path) -> Path:
    """8 synthetic people, 20-40 images each, 32x32 (~210 images)."""
    from dptrain.data.synth import generate
    generate(root / "synth", num_classes=8, num_rich=8, image_size=32, max_images=40, min_rich=20, progress=False)
    return root / "synth"


def train_args(data: Path, out: Path, **extra) -> list[str]:
    """The tiny model on `data`, writing to `out`; `extra` keys use section__key names. Its hidden layer is wider
    than the tiny config's (200 k parameters, 3 CHUNK blocks) so that the mesh plane's slices are not empty."""
    ov = {"model.hidden": "192", "data.path": str(data), "data.cache_dir": str(data.parent / "cache"), "data.min_images_per_class": "10",
          "data.augment": "false", "train.out": str(out), "train.progress": "false", "train.patience": "0",
          "dist.blas_threads": "1", "train.tensorboard": "false"}
    ov.update({k.replace("__", "."): (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in extra.items()})
    return ["--config", str(TINY)] + [f"--{k}={v}" for k, v in ov.items()]


def launcher(args: list[str], log_path: Path, env: dict | None = None) -> Proc:
    return Proc([sys.executable, "-m", "dptrain", "launch", *args], log_path, env)


def agent(cluster, host: str, args: list[str], log_path: Path, env: dict | None = None) -> Proc:
    """`python -m dptrain agent ARGS` inside the host's namespace (no ssh), as a Slurm/mpirun task would be."""
    return Proc([sys.executable, "-m", "dptrain", "agent", *args], log_path, env, netns=cluster.namespace(host))


def summary(run: Path) -> dict:
    return json.loads((Path(run) / "summary.json").read_text())


def dptrain_pids(cluster) -> dict[str, list[str]]:
    """Every process inside the cluster's namespaces that is not the host's sshd listener: {host: [cmdline]}."""
    out = {}
    for h in cluster.hosts:
        left = []
        for pid in cluster.pids(h):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[0] == "Z" or cmd.startswith("sshd: /usr/sbin/sshd") \
                    or cmd.startswith("/usr/sbin/sshd"):
                continue
            left.append(f"{pid}: {cmd}")
        if left:
            out[h] = left
    return out


