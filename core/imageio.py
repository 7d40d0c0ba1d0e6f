"""Decode image files and bytes into numpy arrays: PNG, JPEG, TIFF; 8/16-bit; grey, RGB, RGBA.

Everything that reads an image (training folders, evaluation, the server) goes through
`decode_image`, so the same file gives the same array everywhere. Palette images become RGB(A),
CMYK becomes RGB, multi-page TIFFs give their first page, and the EXIF orientation (JPEG and PNG
EXIF, the TIFF Orientation tag) is applied, so the array, and a mask made from it, is the image
as viewers show it.

Bytes may be hostile: any failure of the parsers is an ImageDecodeError (never another
exception), the size limits are checked from the header before the pixels are decoded, and
Pillow's own decompression-bomb error (above 2 x Image.MAX_IMAGE_PIXELS) is an ImageTooLarge;
a JPEG of more than MAX_JPEG_SCANS scans (a "scan bomb": minutes of decoding) is refused.
Float images with NaN or infinite pixels are refused: they have no percentile normalisation.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from unetpp.core.errors import ImageDecodeError, ImageTooLarge, UnsupportedImage

FORMATS = ("PNG", "JPEG", "TIFF")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# critical chunks and the ancillary ones of fixed fields (no text, profile or EXIF to parse)
PLAIN_PNG = frozenset(b"IHDR PLTE IDAT IEND tRNS pHYs gAMA sRGB cHRM sBIT bKGD tIME".split())
PLAIN_PNG_CHUNKS = 128  # 512 kB in libpng's IDAT chunks of 8 kB (Pillow writes 64 kB ones)
DEFAULT_MAX_PIXELS = 8192 * 8192
MAX_JPEG_SCANS = 100  # encoders write at most a few dozen (progressive: about 10)
# what Pillow's parsers raise on malformed bytes (UnidentifiedImageError is an OSError)
CORRUPT = (OSError, ValueError, SyntaxError, EOFError, IndexError, struct.error)


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    before_decoding: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decode to HxW (grey) or HxWxC (C = 2, 3 or 4) with dtype uint8, uint16 or float32.

    Raises ImageDecodeError for bytes that are not a readable image, UnsupportedImage for a
    format outside FORMATS, ImageTooLarge above `max_pixels` or `max_side` (checked from the
    header, before the pixels are decoded). `before_decoding(width, height)` is called once the
    header has passed those checks, before the pixels are decoded (it may raise to refuse).
    """
    name = str(source) if isinstance(source, str | Path) else "image"
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{name}: cannot read file ({exc.strerror})") from exc
    with io.BytesIO(data) as fp:
        try:
            img = Image.open(fp)
        except UnidentifiedImageError as exc:
            raise ImageDecodeError(f"{name}: not a PNG, JPEG or TIFF image") from exc
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"{name}: {exc}") from exc
        except CORRUPT as exc:
            raise ImageDecodeError(f"{name}: unreadable header or metadata ({exc})") from exc
        if img.format not in FORMATS:
            raise UnsupportedImage(
                f"{name}: {img.format} images are not supported; use PNG, JPEG or TIFF"
            )
        width, height = img.size
        if width * height > max_pixels or (max_side is not None and max(width, height) > max_side):
            limit = f"{max_pixels} pixels" + (f", {max_side} per side" if max_side else "")
            raise ImageTooLarge(f"{name}: {width}x{height} is above the limit ({limit})")
        # a progressive JPEG decodes every pixel again for each scan, and a scan that skips all
        # blocks costs a few bytes: refuse many (the marker cannot occur inside scan data)
        if img.format == "JPEG" and (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise ImageDecodeError(
                f"{name}: a JPEG of {scans} scans (the limit is {MAX_JPEG_SCANS})"
            )
        if before_decoding is not None:
            before_decoding(width, height)
        try:
            return _to_array(ImageOps.exif_transpose(img), name)
        except CORRUPT as exc:
            raise ImageDecodeError(f"{name}: truncated or corrupt image ({exc})") from exc


def plain_png_size(data: bytes, max_chunks: int = PLAIN_PNG_CHUNKS) -> tuple[int, int] | None:
    """(width, height) of a PNG made only of chunks with nothing to parse but a few fixed
    fields (PLAIN_PNG, at most `max_chunks` of them), read from its chunk headers alone; None
    for any other bytes. Decoding such a PNG takes time bounded by its pixel count; Pillow's
    parsing of other chunks is not (about 100 ms for 256 kB of tiny text or unknown chunks in
    front of a 16x16 image, 150 ms for a TIFF directory of 20,000 tags)."""
    if not data.startswith(PNG_SIGNATURE):
        return None
    position, size = len(PNG_SIGNATURE), None
    for index in range(max_chunks):
        if position + 8 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind not in PLAIN_PNG or (kind == b"IHDR") != (index == 0):
            return None
        if kind == b"IHDR" and length >= 8:
            size = struct.unpack_from(">II", data, position + 8)
        if kind == b"IEND":
            return size
        position += 12 + length
    return None


def _to_array(img: Image.Image, name: str) -> np.ndarray:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "1":
        img = img.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    if img.mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
    elif img.mode == "I":
        arr = np.asarray(img)
        arr = (
            arr.astype(np.uint16)
            if arr.min() >= 0 and arr.max() <= 65535
            else arr.astype(np.float32)
        )
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
    elif img.mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(img)
    else:
        raise UnsupportedImage(f"{name}: pixel mode {img.mode} is not supported")
    if arr.dtype == np.float32 and not np.isfinite(arr).all():
        raise UnsupportedImage(f"{name}: NaN or infinite pixel values are not supported")
    if arr.ndim == 2 or arr.shape[-1] in (2, 3, 4):
        return np.ascontiguousarray(arr)
    raise UnsupportedImage(f"{name}: unexpected pixel layout {arr.shape}")


def encode_png(array: np.ndarray, *, labels: bool = False) -> bytes:
    """uint8 or uint16, HxW or HxWx3/4, to PNG bytes. `labels`: an HxW mask or label map (few
    values in long runs), written here with zlib level 1 and run-length matching (Z_RLE) and no
    row filters: 7x faster than Pillow's default and smaller on such images (benchmarks/REPORT.md,
    `overhead`)."""
    array = np.ascontiguousarray(array)
    if labels and array.ndim == 2 and array.dtype in (np.uint8, np.uint16):
        return _labels_png(array)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _labels_png(array: np.ndarray) -> bytes:
    """A grey PNG of an HxW uint8/uint16 array: each row behind filter byte 0 (None)."""
    height, width = array.shape
    rows = np.zeros((height, 1 + width * array.itemsize), np.uint8)
    rows[:, 1:] = array.astype(array.dtype.newbyteorder(">"), copy=False).view(np.uint8)
    deflate = zlib.compressobj(1, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
    pixels = deflate.compress(rows.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8 * array.itemsize, 0, 0, 0, 0)
    return PNG_SIGNATURE + b"".join(
        _chunk(kind, data) for kind, data in ((b"IHDR", header), (b"IDAT", pixels), (b"IEND", b""))
    )


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
