"""`dptrain predict`: class probabilities of a checkpoint for unlabelled images.

    dptrain predict --checkpoint runs/demo/best.npz photo.jpg more/ shots.tgz [--top-k 5] [--format table|json|csv]

Inputs, in the order given: image files (JPEG, PNG, BMP, PPM/PGM, GIF, WebP or TIFF, whatever the extension),
folders (every image below them, recursively, in sorted order; hidden files and folders are left out) and
.tgz/.tar.gz/.tar archives (every image member, in sorted order, named `archive.tgz:member/path.jpg`). Unlike
training, no class layout is needed: an image directly in a folder counts. What training's loader refuses is refused
here by the same code (data/guard.py, the checkpoint's data.max_image_pixels and data.max_file_mb): FIFOs and devices
(never opened), files and members over the byte limit (never read), images over the pixel limit (never decoded),
other formats (an EPS named .jpg is never handed to Ghostscript).

Preprocessing is training's without augmentation, by the same code: `decode.decode_entries` (Pillow, every mode
converted to RGB by `decode.to_rgb`: greyscale, palette, RGBA, CMYK, 16-bit "I;16"/"I" scaled to 8 bits; centre
crop `data.center_crop` and resize to `data.image_size` from the checkpoint's config) and `augment.make_batch`
(normalisation), then the model in eval mode (BN running statistics) `--batch-size` images at a time, softmax in
float64. Folders and loose files are decoded `DECODE_GROUP` images at a time (bounded memory); an archive is
decoded whole (a .tgz has no random access), N x S x S x 3 bytes, as training does.

A file that does not decode or is refused is named in one warning (stderr), counted and listed under `skipped` in the JSON
output; the rest are predicted. Output (stdout): `table` (aligned text), `csv` (path, class_1, prob_1, ...,
class_k, prob_k) or `json` ({checkpoint, num_images, num_skipped, top_k, predictions: [{path, top: [{class,
probability}]}], skipped: [{path, reason}]}). A tqdm bar shows progress on stderr when it is a terminal and there
are at least PROGRESS_MIN images.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.augment import make_batch
from ..data.decode import decode_entries, warn_skipped
from ..data.discover import IMAGE_EXTENSIONS, Discovered, Entry, dir_images, is_archive, tar_images
from ..data.guard import PREDICT_FORMATS, Limits
from .evaluate import load_model

log = logging.getLogger(__name__)

EXTENSIONS = IMAGE_EXTENSIONS | {".tif", ".tiff"}  # what a folder or archive is searched for
DECODE_GROUP = 2048  # folder/loose images decoded at once: 25 MB of uint8 at 64 px
PROGRESS_MIN = 200  # fewer images: no progress bar


@dataclass
class Predictions:
    checkpoint: str
    class_names: list[str]
    top_k: int
    paths: list[str] = field(default_factory=list)  # (M,) images predicted, in input order
    top_index: np.ndarray = None  # int64 (M, top_k) class indices, most probable first
    top_prob: np.ndarray = None  # float64 (M, top_k) their probabilities
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of files that did not decode

    def to_dict(self) -> dict:
        names = self.class_names
        preds = [{"path": p, "top": [{"class": names[k], "probability": float(q)} for k, q in zip(ks, qs)]}
                 for p, ks, qs in zip(self.paths, self.top_index.tolist(), self.top_prob.tolist())]
        return {"checkpoint": self.checkpoint, "num_images": len(self.paths), "num_skipped": len(self.skipped),
                "top_k": self.top_k, "predictions": preds,
                "skipped": [{"path": p, "reason": why} for p, why in self.skipped]}


def collect_inputs(paths: list[str | os.PathLike]) -> list[Discovered]:
    """The images named by `paths` as decodable sources, in input order: one per archive, one per run of files and
    folders. Raises FileNotFoundError for a path that does not exist, ValueError for an unreadable archive or when
    no image is found at all."""
    sources: list[Discovered] = []
    loose: list[Entry] = []

    def flush():
        if loose:
            sources.append(Discovered(Path("."), "dir", list(loose), "", 0))
            loose.clear()

    for raw in paths:
        p = Path(raw).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"no such file or folder: {raw}")
        if p.is_dir():
            items, _ = dir_images(p, EXTENSIONS)
            found = sorted((Entry("", os.path.join(raw, *parts), ref, size) for parts, ref, size, _ in items),
                           key=lambda e: e.name)
            if not found:
                log.warning("no image files under %s", raw)
            loose.extend(found)
        elif is_archive(p):
            try:
                items, _, unsafe = tar_images(p, EXTENSIONS)
            except (tarfile.TarError, OSError, EOFError) as e:
                raise ValueError(f"cannot read archive {raw}: {e}") from e
            if unsafe:
                log.warning("%s: ignored %d members with an absolute path or '..': %s", raw, len(unsafe),
                            ", ".join(unsafe[:5]))
            flush()
            if items:
                entries = sorted((Entry("", f"{raw}:{ref}", ref, size) for _, ref, size, _ in items),
                                 key=lambda e: e.name)
                sources.append(Discovered(p, "tar", entries, "", 0))
            else:
                log.warning("no image files in archive %s", raw)
        else:  # named explicitly: tried whatever its extension
            loose.append(Entry("", str(raw), os.path.abspath(p), p.stat().st_size))
    flush()
    if not sources:
        raise ValueError(f"no image files found in {', '.join(map(str, paths))}")
    return sources


def _groups(source: Discovered) -> Iterator[Discovered]:
    if source.kind == "tar":
        yield source
        return
    for lo in range(0, len(source.entries), DECODE_GROUP):
        yield Discovered(source.path, source.kind, source.entries[lo:lo + DECODE_GROUP], "", 0)


def softmax(logits: np.ndarray) -> np.ndarray:
    """(N, K) logits -> float64 (N, K) probabilities, each row summing to 1."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def iter_probabilities(model, cfg, sources: list[Discovered], batch_size: int, *, bar=None,
                       skipped: list | None = None, workers: int | None = None
                       ) -> Iterator[tuple[list[str], np.ndarray]]:
    """(paths, float64 (B, K) probabilities) per batch of `batch_size` decoded images, in input order. Files that
    do not decode are appended to `skipped` as (path, reason) and counted on `bar`."""
    limits = Limits.from_config(cfg.data, PREDICT_FORMATS)
    for source in sources:
        for group in _groups(source):
            decoded = decode_entries(group, cfg.data.image_size, cfg.data.center_crop, workers=workers,
                                     progress=bar is not None and not bar.disable and group.kind == "tar",
                                     limits=limits)
            if skipped is not None:
                skipped.extend(decoded.skipped)
            if bar is not None:
                bar.update(len(decoded.skipped))
            for lo in range(0, len(decoded.names), batch_size):
                idx = np.arange(lo, min(lo + batch_size, len(decoded.names)))
                logits = model.forward(make_batch(decoded.images, idx, augment=False), train=False)  # (B, K)
                if bar is not None:
                    bar.update(len(idx))
                yield decoded.names[lo:lo + len(idx)], softmax(logits)


def predict(checkpoint_path: str | os.PathLike, inputs: list[str | os.PathLike], *, top_k: int = 5,
            batch_size: int = 64, progress: bool = True, workers: int | None = None) -> Predictions:
    """The `top_k` most probable classes of every image of `inputs` (see the module docstring).

    workers: decode processes (None: automatic, 1: this process). Raises CheckpointError (a ValueError) for a bad
    checkpoint, FileNotFoundError / ValueError naming a bad input, ValueError for top_k or batch_size < 1.
    """
    from tqdm import tqdm

    if top_k < 1 or batch_size < 1:
        raise ValueError(f"top_k and batch_size must be >= 1, got {top_k} and {batch_size}")
    model, cfg, class_names = load_model(checkpoint_path)
    sources = collect_inputs(inputs)
    k = min(top_k, len(class_names))
    out = Predictions(str(checkpoint_path), class_names, k)
    total = sum(len(s.entries) for s in sources)
    show = progress and total >= PROGRESS_MIN and sys.stderr.isatty()
    index_parts, prob_parts = [], []
    with tqdm(total=total, desc="predict", unit="img", disable=not show, leave=False) as bar:
        for paths, probs in iter_probabilities(model, cfg, sources, batch_size, bar=bar, skipped=out.skipped,
                                               workers=workers):
            order = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # ties: the lower class index first
            out.paths.extend(paths)
            index_parts.append(order)
            prob_parts.append(np.take_along_axis(probs, order, axis=1))
    out.top_index = np.concatenate(index_parts) if index_parts else np.zeros((0, k), np.int64)
    out.top_prob = np.concatenate(prob_parts) if prob_parts else np.zeros((0, k))
    warn_skipped(out.skipped, str(inputs[0]) if len(inputs) == 1 else f"the {len(inputs)} inputs")
    return out


def format_json(pred: Predictions) -> str:
    return json.dumps(pred.to_dict())


def format_csv(pred: Predictions) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path"] + [f"{col}_{r}" for r in range(1, pred.top_k + 1) for col in ("class", "prob")])
    for path, ks, qs in zip(pred.paths, pred.top_index.tolist(), pred.top_prob.tolist()):
        w.writerow([path] + [v for kq in zip(ks, qs) for v in (pred.class_names[kq[0]], repr(kq[1]))])
    return buf.getvalue()


def format_table(pred: Predictions) -> str:
    """One line per image: its path, then `class probability` for each of the top k, in aligned columns."""
    header = ["image"] + [f"#{r}" for r in range(1, pred.top_k + 1)]
    rows = [[path] + [f"{pred.class_names[k]} {q:.3f}" for k, q in zip(ks, qs)]
            for path, ks, qs in zip(pred.paths, pred.top_index.tolist(), pred.top_prob.tolist())]
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header] + rows]
    return "\n".join(lines) + "\n"


FORMATS = {"table": format_table, "json": format_json, "csv": format_csv}
