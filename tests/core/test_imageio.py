from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetpp.core.errors import ImageDecodeError, ImageTooLarge, UnsupportedImage
from unetpp.core.imageio import decode_image, encode_png


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_8_and_16_bit_grey_png_and_tiff() -> None:
    arr16 = (np.arange(30 * 20, dtype=np.uint32).reshape(30, 20) * 100).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        out = decode_image(_save(Image.fromarray(arr16), fmt))
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, arr16)
    arr8 = (np.arange(600).reshape(30, 20) % 256).astype(np.uint8)
    np.testing.assert_array_equal(decode_image(_save(Image.fromarray(arr8), "PNG")), arr8)


def test_rgb_rgba_palette_and_jpeg() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (16, 24, 3)).astype(np.uint8)
    assert decode_image(_save(Image.fromarray(rgb), "PNG")).shape == (16, 24, 3)
    assert decode_image(_save(Image.fromarray(rgb).convert("RGBA"), "PNG")).shape == (16, 24, 4)
    pal = Image.fromarray(rgb).convert("P")
    assert decode_image(_save(pal, "PNG")).shape == (16, 24, 3)
    assert decode_image(_save(Image.fromarray(rgb), "JPEG")).shape == (16, 24, 3)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert decode_image(_save(cmyk, "TIFF")).shape == (16, 24, 3)


def test_png_round_trip(tmp_path: Path) -> None:
    mask = (np.eye(20) * 255).astype(np.uint8)
    path = tmp_path / "m.png"
    path.write_bytes(encode_png(mask))
    np.testing.assert_array_equal(decode_image(path), mask)


def test_errors_are_domain_errors(tmp_path: Path) -> None:
    png = _save(Image.new("L", (64, 64)), "PNG")
    with pytest.raises(ImageDecodeError, match="not a PNG, JPEG or TIFF"):
        decode_image(b"hello world")
    with pytest.raises(ImageDecodeError):
        decode_image(png[: len(png) // 2])
    with pytest.raises(UnsupportedImage, match="BMP"):
        decode_image(_save(Image.new("L", (8, 8)), "BMP"))
    with pytest.raises(ImageTooLarge, match="64x64 is above the limit"):
        decode_image(png, max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        decode_image(png, max_side=32)
    with pytest.raises(ImageDecodeError, match="cannot read file"):
        decode_image(tmp_path / "missing.png")
