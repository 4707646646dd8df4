"""What the image loader refuses to read, and how it opens what it reads (training, eval and predict alike).

A dataset folder or archive may hold things that are not images, whatever their names say:

- **not a regular file** (a FIFO, socket or device named `pipe.jpg`): opening a FIFO blocks until a writer comes, a
  device may never end. Such a file is never opened: `os.stat` first; then the file is opened O_NONBLOCK and checked
  again with `fstat` (it may have been swapped since), and skipped unless it is the same regular file.
- **too many bytes** (data.max_file_mb): a `.tgz` member is read whole into memory before decoding (an archive has
  no random access), so one 1.5 GB member named `big.jpg` costs 1.5 GB. The size in the member's header (or the
  file's stat) is checked first; over the limit it is skipped unread.
- **too many pixels** (data.max_image_pixels): the size is in the header, which Pillow parses without decoding; an
  image whose decode would hold more pixels is skipped. JPEGs count at the scale actually decoded (the DCT draft
  decode.py asks for), so a large camera JPEG passes while an 80-megapixel PNG (240 MB as RGB, 640 MB through the
  16-bit path) does not. Pillow's own bomb check (a warning from 89 MP, an error past 179 MP) stays in force.
- **not a supported raster format** (an EPS or PDF named `.jpg`): Pillow picks a decoder from the bytes, not the
  name, and some of its plugins hand the file to other programs (EPS runs Ghostscript). Only the formats in
  `formats` are tried (`Image.open(..., formats=...)`); anything else is refused unopened by any other plugin.

Every refusal is an exception whose message is the reason; decode.py skips the file, names it and counts it.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# Pillow format names of what a training folder or archive may hold (discover.IMAGE_EXTENSIONS; PPM covers .pgm)
TRAIN_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "GIF", "WEBP")
PREDICT_FORMATS = TRAIN_FORMATS + ("TIFF",)  # predict also reads .tif/.tiff


class Refused(ValueError):
    """A file the loader will not decode; str() is the reason."""


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 32_000_000  # data.max_image_pixels
    max_bytes: int = 64 << 20  # data.max_file_mb
    formats: tuple[str, ...] = TRAIN_FORMATS

    @classmethod
    def from_config(cls, dcfg, formats: tuple[str, ...] = TRAIN_FORMATS) -> Limits:
        return cls(int(dcfg.max_image_pixels), int(dcfg.max_file_mb * (1 << 20)), formats)

    def key(self) -> str:
        """What of the limits decides which files decode: part of the decode cache's key."""
        return f"px={self.max_pixels}|bytes={self.max_bytes}|formats={','.join(self.formats)}"


DEFAULT_LIMITS = Limits()


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def check_bytes(size: int, limits: Limits, what: str = "file") -> None:
    if size > limits.max_bytes:
        raise Refused(f"{what} of {size / 2**20:,.1f} MB is over data.max_file_mb = {limits.max_bytes / 2**20:g}; "
                      f"not read")


def open_regular(path: str | os.PathLike, limits: Limits):
    """A binary file object of the regular file `path`, after checking (stat, never opening) that it is one and
    within the byte limit. Raises Refused otherwise."""
    st = os.stat(path)  # follows a symlink: what would be opened
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{file_kind(st.st_mode)}, not a regular file; never opened")
    check_bytes(st.st_size, limits)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        now = os.fstat(fd)
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            raise Refused("replaced while being opened; not read")
        check_bytes(now.st_size, limits)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_pixels(width: int, height: int, limits: Limits, full: tuple[int, int] | None = None) -> None:
    """Refuse a decode of width x height pixels over the limit (full: the header's size, when a draft is smaller)."""
    if width * height > limits.max_pixels:
        size = f"{full[0]}x{full[1]}" if full and full != (width, height) else f"{width}x{height}"
        raise Refused(f"{size} pixels ({width * height / 1e6:.1f} MP decoded) over data.max_image_pixels = "
                      f"{limits.max_pixels:,}; not decoded")


def unsupported(formats: tuple[str, ...]) -> Refused:
    return Refused(f"not a {'/'.join(formats)} image (other formats, e.g. EPS or PDF, are never decoded)")
