"""An LFW-like synthetic face set, written as JPEGs in the LFW layout: out/Person_0001/Person_0001_0001.jpg.

Why: LFW itself may not be at hand (and has too few images per person for most identities); a generated set with
the same shape of problem lets demos, tests and benchmarks run anywhere.

Identities: each person has fixed traits drawn from (seed, person): face proportions, skin tone, hair colour and
style, eye spacing/size/colour, eyebrows, nose, mouth, ears, and sometimes glasses, a beard, a moustache or a mole.
Images per person follow a long tail like LFW's (13233 images of 5749 people, 4069 of them with a single image, a
few with over 100): `num_rich` people get a power-law count from `max_images` down to `min_rich`, the other
`num_classes - num_rich` get 1-9 images with P(n) proportional to 1/n^2 (about two thirds have one image).

Each image varies what a photo varies: expression (smile, blinking), yaw (features shift sideways), roll rotation,
scale and position, background (a random colour gradient plus clutter shapes), lighting (brightness, contrast,
a directional gradient, a colour cast), sensor noise and JPEG quality; glasses come off now and then. Rendering is
Pillow ImageDraw at 2x and a 2x2 box reduction (antialiasing). Every image is a pure function of
(seed, person, image index), so the set is deterministic for a seed whatever the number of worker processes.
"""
from __future__ import annotations

import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SKIN_TONES = np.array([(255, 224, 196), (241, 194, 150), (224, 172, 105), (198, 134, 66), (141, 85, 36),
                       (92, 56, 32)], np.float32)
HAIR_COLOURS = np.array([(20, 16, 14), (60, 40, 25), (110, 70, 40), (200, 165, 100), (150, 60, 30),
                         (130, 130, 130), (225, 225, 220)], np.float32)
IRIS_COLOURS = np.array([(70, 45, 25), (40, 90, 160), (60, 110, 60), (120, 90, 40), (25, 20, 20)], np.float32)


def person_name(p: int) -> str:
    return f"Person_{p:04d}"


def image_counts(num_classes: int, num_rich: int, max_images: int, min_rich: int, seed: int) -> np.ndarray:
    """Images per person (index = person - 1), long-tailed and shuffled so name order is not count order."""
    rng = np.random.default_rng([seed, 0xC0])
    num_rich = min(num_rich, num_classes)
    a = math.log(max_images / min_rich) / math.log(max(num_rich, 2))
    head = np.maximum(min_rich, np.round(max_images * np.arange(1, num_rich + 1) ** -a)).astype(np.int64)
    ns = np.arange(1, 10)
    p = 1.0 / ns**2
    tail = rng.choice(ns, size=num_classes - num_rich, p=p / p.sum())
    counts = np.concatenate([head, tail]).astype(np.int64)
    return counts[rng.permutation(num_classes)]


def identity(seed: int, person: int) -> dict:
    """Fixed traits of one person: numbers in units of the face size, colours as float RGB."""
    r = np.random.default_rng([seed, person, 0xFACE])
    t = r.uniform(0, len(SKIN_TONES) - 1)
    lo = int(t)
    skin = SKIN_TONES[lo] * (1 - (t - lo)) + SKIN_TONES[min(lo + 1, len(SKIN_TONES) - 1)] * (t - lo)
    hair = HAIR_COLOURS[r.integers(len(HAIR_COLOURS))] + r.normal(0, 12, 3)
    return dict(
        skin=skin + r.normal(0, 6, 3), hair=hair, iris=IRIS_COLOURS[r.integers(len(IRIS_COLOURS))] + r.normal(0, 10, 3),
        face_w=r.uniform(0.82, 1.15), face_h=r.uniform(0.9, 1.12), jaw=r.uniform(0.55, 0.95),
        hair_style=int(r.integers(5)), hairline=r.uniform(0.15, 0.45), hair_len=r.uniform(0.2, 1.0),
        eye_y=r.uniform(-0.18, -0.02), eye_dx=r.uniform(0.3, 0.46), eye_w=r.uniform(0.13, 0.22),
        eye_h=r.uniform(0.45, 0.75), brow_dy=r.uniform(0.1, 0.2), brow_w=r.uniform(0.04, 0.1),
        brow_tilt=r.uniform(-0.08, 0.08), nose_len=r.uniform(0.18, 0.34), nose_w=r.uniform(0.1, 0.22),
        mouth_y=r.uniform(0.42, 0.6), mouth_w=r.uniform(0.28, 0.5), lip=r.uniform(0.6, 0.85),
        ear=r.uniform(0.12, 0.22), glasses=r.random() < 0.2, glasses_round=r.random() < 0.5,
        glasses_col=r.uniform(0, 120, 3), beard=r.random() < 0.15, moustache=r.random() < 0.15,
        mole=(r.uniform(-0.5, 0.5), r.uniform(-0.2, 0.5)) if r.random() < 0.3 else None,
    )


def _c(rgb) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(rgb, 0, 255))


def _face_layer(tr: dict, r: np.random.Generator, R: int) -> Image.Image:
    """The head on a transparent R x R canvas, centred, frontal apart from yaw; units scale with R."""
    im = Image.new("RGBA", (R, R), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    cx, cy = R / 2, R * 0.53
    fw, fh = R * 0.25 * tr["face_w"], R * 0.33 * tr["face_h"]
    yaw = r.uniform(-0.14, 0.14)  # features slide sideways, the face narrows a little
    fx = cx + yaw * fw
    skin, hair = _c(tr["skin"]), _c(tr["hair"] * r.uniform(0.92, 1.08))
    dark_skin = _c(tr["skin"] * 0.72)
    lw = max(1, round(R / 96))  # line width for strokes
    style = tr["hair_style"]
    if style in (3, 4):  # long hair behind the head
        d.ellipse((cx - fw * 1.25, cy - fh * 1.2, cx + fw * 1.25, cy + fh * (0.2 + tr["hair_len"])), fill=hair)
    for s in (-1, 1):  # ears
        ex = cx + s * fw * (1 - 0.5 * yaw * s)
        d.ellipse((ex - fw * tr["ear"], cy - fh * 0.15, ex + fw * tr["ear"], cy + fh * 0.2), fill=dark_skin)
    w = fw * (1 - abs(yaw) * 0.4)
    d.ellipse((cx - w, cy - fh, cx + w, cy + fh * 0.6), fill=skin)  # cranium and cheeks
    jw = w * tr["jaw"]
    d.ellipse((cx - jw, cy - fh * 0.2, cx + jw, cy + fh), fill=skin)  # jaw and chin
    d.polygon([(cx - w, cy), (cx + w, cy), (cx + jw, cy + fh * 0.55), (cx - jw, cy + fh * 0.55)], fill=skin)
    if style != 0:  # hair cap down to the hairline
        top = cy - fh * 1.08
        d.chord((cx - w * 1.06, top, cx + w * 1.06, cy - fh + 2 * fh * (0.25 + tr["hairline"])), 180, 360,
                fill=hair)
        if style in (2, 4):  # fringe
            d.polygon([(cx - w * 0.9, cy - fh * 0.7), (cx + w * 0.6, cy - fh * 0.95), (cx + w * 0.2, cy - fh * 0.45)],
                      fill=hair)
    if tr["beard"]:
        d.chord((cx - jw * 1.02, cy - fh * 0.1, cx + jw * 1.02, cy + fh * 1.04), 0, 180, fill=hair)
    ey = cy + tr["eye_y"] * fh * 2
    ew, eh = fw * tr["eye_w"], fw * tr["eye_w"] * tr["eye_h"]
    openness = 0.1 if r.random() < 0.05 else r.uniform(0.6, 1.0)
    gaze = r.uniform(-0.3, 0.3) * ew
    brow_col = _c(tr["hair"] * 0.8)
    for s in (-1, 1):
        ex = fx + s * fw * tr["eye_dx"]
        d.ellipse((ex - ew, ey - eh, ex + ew, ey + eh), fill=(240, 240, 236))
        ir = eh * 0.95
        d.ellipse((ex + gaze - ir, ey - ir, ex + gaze + ir, ey + ir), fill=_c(tr["iris"]))
        d.ellipse((ex + gaze - ir * 0.45, ey - ir * 0.45, ex + gaze + ir * 0.45, ey + ir * 0.45), fill=(10, 10, 10))
        lid = ey - eh + 2 * eh * (1 - openness)  # upper eyelid covers the eye down to here
        d.rectangle((ex - ew - 1, ey - eh - 1, ex + ew + 1, lid), fill=skin)
        by = ey - fh * tr["brow_dy"] - eh
        t = tr["brow_tilt"] * fh * s
        d.line([(ex - ew * 1.2 * s, by + t), (ex + ew * 1.2 * s, by - t)], fill=brow_col,
               width=max(1, round(fh * tr["brow_w"])))
        if tr["glasses"] and r.random() > 0.1:
            gr = ew * 1.45
            box = (ex - gr, ey - gr * 0.8, ex + gr, ey + gr * 0.8)
            col = _c(tr["glasses_col"])
            (d.ellipse if tr["glasses_round"] else d.rectangle)(box, outline=col, width=lw * 2)
            if s == 1:
                d.line([(fx - fw * tr["eye_dx"] + gr, ey), (ex - gr, ey)], fill=col, width=lw * 2)
    nl, nw = fh * tr["nose_len"], fw * tr["nose_w"]
    ny = ey + eh
    d.line([(fx, ny), (fx + nw * 0.4, ny + nl), (fx - nw * 0.3, ny + nl)], fill=dark_skin, width=lw * 2)
    for s in (-1, 1):
        d.ellipse((fx + s * nw * 0.5 - nw * 0.2, ny + nl - nw * 0.15, fx + s * nw * 0.5 + nw * 0.2,
                   ny + nl + nw * 0.15), fill=dark_skin)
    my, mw = cy + tr["mouth_y"] * fh, fw * tr["mouth_w"]
    smile = r.uniform(-0.2, 1.0)
    lip = _c(tr["skin"] * np.array([tr["lip"] + 0.1, tr["lip"] * 0.75, tr["lip"] * 0.75]))
    if tr["moustache"]:
        d.chord((fx - mw * 1.1, my - fh * 0.16, fx + mw * 1.1, my + fh * 0.02), 180, 360, fill=hair)
    if smile > 0.6:  # open smile
        d.chord((fx - mw, my - mw * 0.25, fx + mw, my + mw * 0.6 * smile), 0, 180, fill=lip)
        d.chord((fx - mw * 0.8, my - mw * 0.1, fx + mw * 0.8, my + mw * 0.3 * smile), 0, 180, fill=(235, 235, 230))
    else:
        h = mw * 0.4 * abs(smile) + 1
        if smile >= 0:
            d.arc((fx - mw, my - h, fx + mw, my + h), 10, 170, fill=lip, width=lw * 3)
        else:
            d.arc((fx - mw, my, fx + mw, my + 2 * h), 190, 350, fill=lip, width=lw * 3)
    if tr["mole"] is not None:
        mx, myy = fx + tr["mole"][0] * fw, cy + tr["mole"][1] * fh
        d.ellipse((mx - lw * 2, myy - lw * 2, mx + lw * 2, myy + lw * 2), fill=_c(tr["skin"] * 0.45))
    return im


def _background(r: np.random.Generator, R: int) -> Image.Image:
    """A bilinear gradient between four random corner colours, plus a few clutter shapes."""
    corners = r.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    bg = Image.fromarray(corners, "RGB").resize((R, R), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(bg)
    for _ in range(r.integers(0, 6)):
        x0, y0 = r.uniform(-0.2, 1.0, 2) * R
        x1, y1 = x0 + r.uniform(0.1, 0.6) * R, y0 + r.uniform(0.1, 0.6) * R
        col = tuple(int(v) for v in r.integers(0, 256, 3))
        kind = r.integers(3)
        if kind == 0:
            d.rectangle((x0, y0, x1, y1), fill=col)
        elif kind == 1:
            d.ellipse((x0, y0, x1, y1), fill=col)
        else:
            d.line((x0, y0, x1, y1), fill=col, width=int(r.integers(1, max(2, R // 24))))
    return bg


def render(seed: int, person: int, index: int, image_size: int = 96, tr: dict | None = None) -> Image.Image:
    """Image `index` of `person`: a pure function of its arguments."""
    r = np.random.default_rng([seed, person, index])
    tr = tr or identity(seed, person)
    R = 2 * image_size
    face = _face_layer(tr, r, R)
    angle = math.radians(r.uniform(-14, 14))
    scale = r.uniform(0.82, 1.18)
    tx, ty = r.uniform(-0.08, 0.08, 2) * R
    # AFFINE maps each output pixel to its input: x_in = A^-1 (x_out - c - t) / scale + c
    ca, sa = math.cos(angle) / scale, math.sin(angle) / scale
    c = R / 2
    ox, oy = c + tx, c + ty
    coeffs = (ca, sa, c - ca * ox - sa * oy, -sa, ca, c + sa * ox - ca * oy)
    face = face.transform((R, R), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR)
    img = _background(r, R)
    img.paste(face, (0, 0), face)
    img = img.reduce(2)
    x = np.asarray(img, np.float32)  # (S, S, 3)
    gain = r.uniform(0.6, 1.35) * r.uniform(0.9, 1.1, 3)  # exposure and colour cast
    contrast = r.uniform(0.7, 1.3)
    theta = r.uniform(0, 2 * math.pi)
    g = np.linspace(-1, 1, image_size, dtype=np.float32)
    light = 1 + r.uniform(0, 0.4) * (math.cos(theta) * g[None, :] + math.sin(theta) * g[:, None])  # (S, S)
    x = ((x - 128) * contrast + 128) * gain * light[:, :, None]
    x += r.normal(0, r.uniform(0, 8), x.shape).astype(np.float32)
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


def _write_person(args) -> int:
    out_dir, seed, person, count, image_size = args
    name = person_name(person)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    tr = identity(seed, person)
    for i in range(1, count + 1):
        img = render(seed, person, i, image_size, tr)
        q = int(np.random.default_rng([seed, person, i, 0x1BE6]).integers(50, 96))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=q)
        (folder / f"{name}_{i:04d}.jpg").write_bytes(buf.getvalue())
    return count


def generate(out_dir: str | os.PathLike, num_classes: int = 400, seed: int = 0, image_size: int = 96, *,
             num_rich: int = 80, max_images: int = 150, min_rich: int = 10, workers: int = 1,
             progress: bool = True) -> dict:
    """Write the set under out_dir (plus summary.json and README.txt) and return the summary.

    num_classes people; the `num_rich` largest have min_rich..max_images images, the rest 1-9. workers > 1 renders
    people in parallel processes; the files are the same either way.
    """
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = image_counts(num_classes, num_rich, max_images, min_rich, seed)
    jobs = [(str(out), seed, p + 1, int(n), image_size) for p, n in enumerate(counts)]
    t0 = time.perf_counter()
    bar = tqdm(total=int(counts.sum()), desc="synth", unit="img", disable=not progress, leave=False)
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for n in pool.map(_write_person, jobs, chunksize=4):
                bar.update(n)
    else:
        for job in jobs:
            bar.update(_write_person(job))
    bar.close()
    seconds = time.perf_counter() - t0
    summary = dict(
        out_dir=str(out), seed=seed, image_size=image_size, num_classes=int(num_classes),
        num_images=int(counts.sum()), classes_with_1=int((counts == 1).sum()),
        classes_with_ge2=int((counts >= 2).sum()), classes_with_ge10=int((counts >= 10).sum()),
        classes_with_ge20=int((counts >= 20).sum()), max_images_per_class=int(counts.max()),
        seconds=round(seconds, 3), images_per_s=round(float(counts.sum()) / max(seconds, 1e-9), 1),
        counts={person_name(p + 1): int(n) for p, n in enumerate(counts)},
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "README.txt").write_text(
        "Synthetic LFW-like faces generated by dptrain.data.synth (one folder per identity).\n"
        f"seed={seed} image_size={image_size} identities={num_classes} images={summary['num_images']}\n"
        f"identities with >=2 images: {summary['classes_with_ge2']}, >=10: {summary['classes_with_ge10']}, "
        f"max per identity: {summary['max_images_per_class']}\n"
        "Every image is a pure function of (seed, person, image index); regenerate with the same arguments.\n")
    return summary


if __name__ == "__main__":  # python -m dptrain.data.synth OUT [--classes N] [--size S] [--seed K] [--workers W]
    import argparse

    ap = argparse.ArgumentParser(description="write an LFW-like synthetic face set")
    ap.add_argument("out")
    ap.add_argument("--classes", type=int, default=400)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args()
    s = generate(a.out, a.classes, a.seed, a.size, workers=a.workers)
    print(json.dumps({k: v for k, v in s.items() if k != "counts"}))
