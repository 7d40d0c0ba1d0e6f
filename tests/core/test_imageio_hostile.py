"""Property-based tests of the decoder on hostile bytes: whatever arrives, `decode_image` returns a
well-formed array or raises one of the domain errors (a 4xx on the API), nothing else, quickly."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, PngImagePlugin

from unetpp.core.errors import UNetPPError
from unetpp.core.imageio import decode_image, plain_png_size
from unetpp.core.preprocess import Preprocessing

# Pillow warns about the corrupt files these tests are made of
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BOUNDED = settings(max_examples=300)  # the rest: the "unetpp" profile (tests/conftest.py)
DTYPES = {np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.float32)}


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _seeds() -> list[bytes]:
    """Valid files of every kind the decoder handles, each with an EXIF orientation."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    grey16 = Image.fromarray(rng.integers(0, 65535, (24, 32), dtype=np.uint16))
    exif = rgb.getexif()
    exif[0x0112] = 6
    exif = exif.tobytes()
    return [
        _save(rgb, "PNG", exif=exif),
        _save(rgb, "JPEG", exif=exif),
        _save(rgb, "JPEG", progressive=True),
        _save(rgb, "TIFF", exif=exif),
        _save(rgb, "TIFF", compression="tiff_lzw"),
        _save(rgb, "TIFF", compression="tiff_deflate"),
        _save(rgb.convert("P"), "PNG", transparency=0),
        _save(rgb.convert("CMYK"), "TIFF"),
        _save(grey16, "PNG"),
        _save(grey16, "TIFF"),
    ]


SEEDS = _seeds()


def check(data: bytes) -> None:
    """The property: an array the preprocessing turns into finite numbers, or a 4xx domain error."""
    try:
        image = decode_image(data, max_pixels=1 << 20, max_side=4096)
    except UNetPPError as exc:
        assert 400 <= exc.status_code < 500, exc
        assert exc.detail and "\n" not in exc.detail
        return
    assert image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (2, 3, 4))
    assert image.dtype in DTYPES and image.size > 0
    assert image.shape[0] * image.shape[1] <= 1 << 20
    assert np.isfinite(Preprocessing()(image)).all()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid file with a few bytes overwritten, inserted or deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.sampled_from(["set", "insert", "delete", "word", "truncate"]))
        if kind == "set":
            data[at : at + 1] = draw(st.binary(min_size=1, max_size=1))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif kind == "word":  # lengths, offsets and dimensions live in 2- and 4-byte words
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\0\0\0\0", b"\x7f\xff\xff\xff", b"\0\1"])
            )
        else:
            del data[at:]
    return bytes(data)


@BOUNDED
@given(mutated())
def test_mutated_files_decode_or_give_a_4xx(data: bytes) -> None:
    check(data)


@BOUNDED
@given(
    st.one_of(
        st.binary(max_size=256),
        # a real magic number followed by garbage: the parsers get past identification
        st.tuples(
            st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"II*\0", b"MM\0*"]),
            st.binary(max_size=256),
        ).map(b"".join),
    )
)
def test_arbitrary_bytes_decode_or_give_a_4xx(data: bytes) -> None:
    check(data)


@BOUNDED
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    kind=st.sampled_from(["L", "I;16", "RGB", "RGBA", "F"]),
    fmt=st.sampled_from(["PNG", "TIFF"]),
    seed=st.integers(0, 2**16),
)
def test_lossless_images_round_trip(
    height: int, width: int, kind: str, fmt: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    if kind == "F":
        if fmt == "PNG":  # PNG has no float pixels
            fmt = "TIFF"
        array = rng.normal(size=(height, width)).astype(np.float32)
    elif kind == "I;16":
        array = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    else:
        shape = (height, width) + ({"L": (), "RGB": (3,), "RGBA": (4,)}[kind])
        array = rng.integers(0, 256, shape, dtype=np.uint8)
    decoded = decode_image(_save(Image.fromarray(array), fmt))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@BOUNDED
@given(st.one_of(mutated(), st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)))
def test_a_plain_pngs_size_is_what_decoding_gives(data: bytes) -> None:
    """The server decodes a small plain PNG on its event loop, trusting this size (and that
    nothing but pixels is parsed): never an exception, and never a size decoding contradicts."""
    size = plain_png_size(data)
    if size is None:
        return
    try:
        image = decode_image(data)
    except UNetPPError:
        return
    assert image.shape[:2] == (size[1], size[0])


def test_only_pngs_of_pixels_and_few_chunks_are_plain() -> None:
    """Text, profiles, EXIF and unknown chunks (whose parsing is not bounded by the pixel count:
    about 100 ms for 256 kB of tiny chunks) and other formats are not plain."""
    grey = Image.fromarray(np.zeros((24, 32), np.uint16))
    assert plain_png_size(_save(grey, "PNG")) == (32, 24)
    assert plain_png_size(_save(grey.convert("RGB").convert("P"), "PNG", transparency=0)) == (
        32,
        24,
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("a", "b")
    assert plain_png_size(_save(grey, "PNG", pnginfo=info)) is None
    assert plain_png_size(SEEDS[0]) is None  # EXIF
    assert plain_png_size(_save(grey, "TIFF")) is None
    png = _save(grey, "PNG")
    tiny = png[8:].split(b"IDAT")[0][:-4]  # IHDR (and pHYs)
    idat_on = png[8 + len(tiny) :]
    empty = (0).to_bytes(4, "big") + b"tIME" + zlib.crc32(b"tIME").to_bytes(4, "big")
    many = png[:8] + tiny + empty * 200 + idat_on  # 200 chunks of nothing
    assert decode_image(many).shape == (24, 32)
    assert plain_png_size(many) is None
