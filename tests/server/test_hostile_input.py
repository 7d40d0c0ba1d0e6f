"""Hostile input over HTTP: a corpus of malformed and unusual images, malformed multipart and
JSON bodies, lying byte counts, and property-based query parameters. Every case is a 4xx with a
JSON {"error", "detail"} body, or a 200 where the image is legitimately decodable; never a 5xx,
never a hang, and the server serves normally afterwards."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from tests.helpers import first_response, synthetic
from unetpp.core.imageio import encode_png

# Pillow warns about the corrupt files these tests are made of
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BOUNDED = settings(max_examples=40)  # the rest: the "unetpp" profile (tests/conftest.py)


def assert_error(response, status: int, error: str | None = None) -> None:
    """A client error with the API's JSON body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    if error is not None:
        assert body["error"] == error, body


def mask_shape(response) -> tuple[int, ...]:
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(response.content))).shape


# ---- the corpus -------------------------------------------------------------------------------


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_raw(width: int, height: int, depth: int, colour: int, rows: bytes, *extra: bytes) -> bytes:
    """A PNG written by hand: any header, any (possibly absent or wrong) pixel data."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", header),
            *extra,
            png_chunk(b"IDAT", zlib.compress(rows)),
            png_chunk(b"IEND", b""),
        ]
    )


def png16_rgb(array: np.ndarray) -> bytes:
    """16-bit RGB, which Pillow reads but cannot write."""
    h, w, _ = array.shape
    rows = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))
    return png_raw(w, h, 16, 2, rows)


def with_png_chunk(png: bytes, kind: bytes, data: bytes) -> bytes:
    """`png` with a chunk inserted right after IHDR (8-byte signature + 25-byte IHDR)."""
    return png[:33] + png_chunk(kind, data) + png[33:]


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian 8-bit grey TIFF whose header claims width x height but holds 16 bytes."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1)]
    tags += [(273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    tags = [(t, k, data_at if t == 273 else v) for t, k, v in tags]
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:  # kind 3: SHORT (padded to 4 bytes), 4: LONG
        field = struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, kind, 1) + field
    return b"II*\0" + struct.pack("<I", ifd_at) + ifd + b"\0\0\0\0" + bytes(16)


def jpeg_with_size(jpeg: bytes, width: int, height: int) -> bytes:
    """A valid JPEG whose SOF0 header claims another size."""
    at = jpeg.index(b"\xff\xc0") + 5  # marker, length (2), precision (1)
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def jpeg_scan_bomb(width: int, height: int, scans: int) -> bytes:
    """A valid progressive grey JPEG: one DC scan, then `scans` AC scans that each skip every
    block with a few end-of-band runs (32767 blocks per 15 bits), so each costs ~30 bytes to send
    and a pass over every block to decode. Huffman tables of one symbol each: DC category 0 and
    EOB14 (0xE0), both coded "0"."""

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload

    def entropy(bits: str) -> bytes:
        bits += "1" * (-len(bits) % 8)
        out = bytearray()
        for k in range(0, len(bits), 8):
            out.append(int(bits[k : k + 8], 2))
            if out[-1] == 0xFF:
                out.append(0)  # byte stuffing
        return bytes(out)

    blocks = -(-width // 8) * -(-height // 8)
    one_symbol = bytes([1] + [0] * 15)
    header = b"".join(
        [
            b"\xff\xd8",
            segment(0xDB, bytes([0]) + bytes([1] * 64)),  # quantisation table 0
            segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])),
            segment(
                0xC4,
                bytes([0x00])
                + one_symbol
                + bytes([0x00])  # DC table 0
                + bytes([0x11])
                + one_symbol
                + bytes([0xE0]),
            ),  # AC table 1
            segment(0xDA, bytes([1, 1, 0x01, 0, 0, 0])) + entropy("0" * blocks),  # DC scan
        ]
    )
    ac_scan = segment(0xDA, bytes([1, 1, 0x01, 1, 63, 0])) + entropy(
        ("0" + "1" * 14) * -(-blocks // 32767)
    )
    return header + ac_scan * scans + b"\xff\xd9"


def oriented(fmt: str, orientation: int, array: np.ndarray) -> bytes:
    img = Image.fromarray(array)
    exif = img.getexif()
    exif[0x0112] = orientation
    return save(img, fmt, exif=exif.tobytes())


def multipage_tiff() -> bytes:
    pages = [Image.fromarray(synthetic(40, 50, seed=1)), Image.fromarray(synthetic(60, 70))]
    return save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
PNG = encode_png(RGB)
JPEG = save(Image.fromarray(RGB), "JPEG")
BOMB = zlib.compress(bytes(50_000_000), 9)  # 50 MB of zeros in about 50 kB

# name: (bytes, expected status, the error code for a 4xx or the mask's shape for a 200)
CORPUS: dict[str, tuple[bytes, int, str | tuple[int, ...]]] = {
    "empty": (b"", 400, "undecodable_image"),
    "truncated png": (PNG[: len(PNG) // 2], 400, "undecodable_image"),
    "truncated jpeg": (JPEG[: len(JPEG) // 2], 400, "undecodable_image"),
    "truncated tiff": (save(Image.fromarray(RGB), "TIFF")[:200], 400, "undecodable_image"),
    "wrong magic": (b"\x89PNX" + PNG[4:], 400, "undecodable_image"),
    "png magic, then garbage": (PNG[:8] + bytes(range(256)), 400, "undecodable_image"),
    "png without pixel data": (PNG[:33] + png_chunk(b"IEND", b""), 400, "undecodable_image"),
    "png with a bad crc": (
        PNG[:33] + b"\0\0\0\4tEXtk\0vv\0\0\0\0" + PNG[33:],
        400,
        "undecodable_image",
    ),
    "png of width 0": (png_raw(0, 10, 8, 0, b""), 400, "undecodable_image"),
    "png bit depth 7": (png_raw(10, 10, 7, 0, b""), 400, "undecodable_image"),
    "tiff header only": (b"II*\0\x08\0\0\0", 400, "undecodable_image"),
    "tiff ifd pointing at itself": (b"II*\0\x08\0\0\0\0\0\x08\0\0\0", 400, "undecodable_image"),
    "svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 400, "undecodable_image"),
    # decompression bombs: refused from the header, before any pixel is decoded
    "png claiming 100000x100000": (png_raw(100_000, 100_000, 8, 0, b""), 413, "image_too_large"),
    "png claiming 6400x6400, no data": (png_raw(6400, 6400, 8, 0, b""), 413, "image_too_large"),
    "jpeg claiming 65000x65000": (jpeg_with_size(JPEG, 65000, 65000), 413, "image_too_large"),
    "jpeg claiming 60000x100": (jpeg_with_size(JPEG, 60000, 100), 413, "image_too_large"),
    "tiff claiming 1x20000": (tiff_header(1, 20000), 413, "image_too_large"),
    "tiff claiming 3000x3000, 16 bytes": (tiff_header(3000, 3000), 400, "undecodable_image"),
    "png zTXt bomb": (with_png_chunk(PNG, b"zTXt", b"k\0\0" + BOMB), 400, "undecodable_image"),
    # 60 kB that would take a second to decode here; 64 MB of them, an hour
    "jpeg scan bomb (2000 scans)": (jpeg_scan_bomb(4000, 4000, 2000), 400, "undecodable_image"),
    "png iCCP bomb": (with_png_chunk(PNG, b"iCCP", b"p\0\0" + BOMB), 400, "undecodable_image"),
    # legitimately decodable: a mask of the displayed image's size
    "png with 5 MB of text": (
        with_png_chunk(PNG, b"tEXt", b"k\0" + b"a" * 5_000_000),
        200,
        (20, 30),
    ),
    "png with 20000 text chunks": (
        PNG[:33] + b"".join(png_chunk(b"tEXt", b"k%d\0v" % i) for i in range(20000)) + PNG[33:],
        200,
        (20, 30),
    ),
    "jpeg with 100 APP1 segments of 64 kB": (
        JPEG[:2] + b"".join(b"\xff\xe1\xff\xfe" + b"X" * 65532 for _ in range(100)) + JPEG[2:],
        200,
        (20, 30),
    ),
    "16-bit grey png": (encode_png(synthetic(20, 30)), 200, (20, 30)),
    "16-bit rgb png": (png16_rgb(RGB.astype(np.uint16) * 257), 200, (20, 30)),
    "palette png": (save(Image.fromarray(RGB).convert("P"), "PNG"), 200, (20, 30)),
    "palette png with transparency": (
        save(Image.fromarray(RGB).convert("P"), "PNG", transparency=0),
        200,
        (20, 30),
    ),
    "grey+alpha png": (save(Image.fromarray(RGB).convert("LA"), "PNG"), 200, (20, 30)),
    "1-bit png": (save(Image.fromarray(RGB[..., 0] > 128), "PNG"), 200, (20, 30)),
    "cmyk jpeg": (save(Image.fromarray(RGB).convert("CMYK"), "JPEG"), 200, (20, 30)),
    "cmyk tiff": (save(Image.fromarray(RGB).convert("CMYK"), "TIFF"), 200, (20, 30)),
    "progressive jpeg": (save(Image.fromarray(RGB), "JPEG", progressive=True), 200, (20, 30)),
    "progressive jpeg of 40 scans": (jpeg_scan_bomb(300, 200, 40), 200, (200, 300)),
    "float tiff": (
        save(Image.fromarray(np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30)), "TIFF"),
        200,
        (20, 30),
    ),
    "multi-page tiff (first page)": (multipage_tiff(), 200, (40, 50)),
    # EXIF orientation 6 (rotate 90°) is applied in every format: the mask is 30 x 20
    "jpeg, exif rotated": (oriented("JPEG", 6, RGB), 200, (30, 20)),
    "png, exif rotated": (oriented("PNG", 6, RGB), 200, (30, 20)),
    "tiff, orientation tag": (oriented("TIFF", 6, RGB), 200, (30, 20)),
    "jpeg, exif orientation 9 (invalid)": (oriented("JPEG", 9, RGB), 200, (20, 30)),
    "jpeg, garbage exif": (
        JPEG[:2] + b"\xff\xe1\x00\x20Exif\0\0MM\0*\0\0\0\x08\xff\xff" + bytes(16) + JPEG[2:],
        200,
        (20, 30),
    ),
    # well-formed, but not something this service reads
    "float tiff with NaN": (
        save(Image.fromarray(np.full((8, 8), np.nan, np.float32)), "TIFF"),
        415,
        "unsupported_media_type",
    ),
    "gif": (save(Image.fromarray(RGB).convert("P"), "GIF"), 415, "unsupported_media_type"),
    "bmp": (save(Image.fromarray(RGB), "BMP"), 415, "unsupported_media_type"),
    "webp": (save(Image.fromarray(RGB), "WEBP"), 415, "unsupported_media_type"),
    "eps (never handed to ghostscript)": (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
        415,
        "unsupported_media_type",
    ),
}


@pytest.mark.parametrize("name", list(CORPUS))
def test_image_corpus(live, name):
    data, status, expected = CORPUS[name]
    r = live.segment(data, "application/octet-stream", level=1)
    if status == 200:
        assert mask_shape(r) == expected
    else:
        assert_error(r, status, expected)


def test_the_server_is_alive_after_the_corpus(live, image_png):
    for data, _, _ in CORPUS.values():
        live.segment(data, "image/png")
    assert live.client.get("/healthz").json()["model"] == "ready"
    assert live.segment(image_png).status_code == 200


# ---- multipart, JSON and byte counts ----------------------------------------------------------

B = "b0undary"


def part(name: str, data: bytes, filename: str | None = "a.png", headers: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    head = (
        f"--{B}\r\nContent-Disposition: {disposition}\r\nContent-Type: image/png\r\n{headers}\r\n"
    )
    return head.encode() + data + b"\r\n"


END = f"--{B}--\r\n".encode()


def post_multipart(live, body: bytes, content_type: str = f"multipart/form-data; boundary={B}"):
    return live.client.post("/v1/segment", content=body, headers={"content-type": content_type})


def test_malformed_multipart(live, image_png):
    malformed = (400, "malformed_body")
    cases = {
        "no boundary": (part("image", image_png) + END, "multipart/form-data", malformed),
        "another boundary": (
            part("image", image_png) + END,
            "multipart/form-data; boundary=x",
            malformed,
        ),
        "garbage": (b"\0\xff" * 1000, None, malformed),
        "two images": (part("image", image_png) * 2 + END, None, malformed),
        "too many fields": (
            b"".join(part(f"f{i}", b"x", None) for i in range(40)) + END,
            None,
            malformed,
        ),
        "a 100 kB part header": (
            part("image", image_png, headers=f"X-Big: {'a' * 100_000}\r\n") + END,
            None,
            malformed,
        ),
        "unterminated": (part("image", image_png), None, (422, "invalid_parameter")),
        "image as a text field": (
            part("image", b"hello", None) + END,
            None,
            (422, "invalid_parameter"),
        ),
        "no image field": (part("picture", image_png) + END, None, (422, "invalid_parameter")),
        "an empty image": (part("image", b"") + END, None, (400, "undecodable_image")),
        "not an image": (
            part("image", b"GIF89a" + bytes(20)) + END,
            None,
            (400, "undecodable_image"),
        ),
    }
    for name, (body, content_type, (status, error)) in cases.items():
        r = post_multipart(live, body, *([content_type] if content_type else []))
        assert (r.status_code, r.json()["error"]) == (status, error), (name, r.text)
        assert set(r.json()) == {"error", "detail"}, name
    # a file name is only a label: nothing is written or read under it
    r = post_multipart(live, part("image", image_png, filename="../../../etc/passwd") + END)
    assert r.status_code == 200


def test_json_and_other_bodies(live, image_png):
    assert_error(
        live.client.post("/v1/segment", json={"image": "aGVsbG8="}), 415, "unsupported_media_type"
    )
    assert_error(
        live.client.post("/v1/segment", content=b"{", headers={"content-type": "application/json"}),
        415,
    )
    assert_error(
        live.client.post("/v1/segment", content=image_png, headers={"content-type": ""}), 415
    )
    r = live.client.post(
        "/v1/segment", content=image_png, headers={"content-type": "IMAGE/PNG; x=y"}
    )
    assert r.status_code == 200  # media types are case-insensitive, parameters ignored


def test_byte_counts_that_lie(live, image_png):
    def head(query: str = "") -> str:
        return f"POST /v1/segment{query} HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"

    # shorter than the body: the image is cut short
    status, body = first_response(
        live.url, f"{head()}Content-Length: {len(image_png) - 50}\r\n\r\n".encode() + image_png
    )
    assert status == 400 and json.loads(body)["error"] == "undecodable_image"
    # longer than the body: the request waits for the rest while it keeps the minimum rate,
    # no longer (and holds no queue slot meanwhile: it is admitted once its body is in)
    status, body = first_response(
        live.url,
        f"{head()}Content-Length: {len(image_png) + 50}\r\n\r\n".encode() + image_png,
    )
    assert status == 408 and json.loads(body)["error"] == "body_timeout"
    # a length that is not a number; chunked bodies whose sizes are wrong: refused by the
    # HTTP parser itself (plain-text 400, before the application sees the request)
    for request in (
        f"{head()}Content-Length: abc\r\n\r\n".encode() + image_png,
        f"{head()}Content-Length: 10\r\nContent-Length: 20\r\n\r\n".encode() + image_png,
        f"{head()}Transfer-Encoding: chunked\r\n\r\nzz\r\n".encode() + image_png,
    ):
        status, _ = first_response(live.url, request)
        assert status in (0, 400), request[:120]
    assert live.segment(image_png).status_code == 200


# ---- every query parameter, property-based ---------------------------------------------------

VALID = {
    "level": ["1", "2", "3", "4"],
    "mode": ["fast", "balanced", "accurate"],
    "max_latency_ms": ["0.5", "50", "1e6"],
    "min_iou": ["0", "0.5", "1"],
    "precision": ["fp32", "auto"],
    "format": ["png", "json", "overlay", "probabilities"],
    "encoding": ["png16", "npy"],
    "deadline_ms": ["30000", "1e9"],
}
INVALID = {
    "level": ["0", "5", "-1", "one", "1.5", ""],
    "mode": ["fastest", "FAST", ""],
    "max_latency_ms": ["0", "-3", "nan", "ms"],
    "min_iou": ["-0.1", "1.5", "nan"],
    "precision": ["int8", "fp64", ""],  # the tiny repository has no int8 graphs
    "format": ["jpeg", ""],
    "encoding": ["png8", ""],
    "deadline_ms": ["0", "-1", "nan"],
}
ROUTING = ("level", "mode", "max_latency_ms", "min_iou")
MEDIA = {"png": "image/png", "json": "application/json", "overlay": "image/png"}


@st.composite
def queries(draw: st.DrawFn) -> tuple[dict[str, str], str]:
    """Query parameters and what the answer must be: "ok", "invalid", or "any" (arbitrary text)."""
    names = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=4))
    params, verdicts = {}, []
    for name in names:
        kind = draw(st.sampled_from(["valid", "valid", "invalid", "text"]))
        if kind == "text":
            params[name] = draw(st.text(max_size=12))
            verdicts.append("any")
        else:
            params[name] = draw(st.sampled_from((VALID if kind == "valid" else INVALID)[name]))
            verdicts.append("ok" if kind == "valid" else "invalid")
    if draw(st.booleans()) and draw(st.booleans()):
        params[draw(st.sampled_from(["colour", "Level", "level ", "__proto__"]))] = "1"
        verdicts.append("invalid")
    if "invalid" in verdicts or sum(name in params for name in ROUTING) > 1:
        return params, "invalid"
    return params, "any" if "any" in verdicts else "ok"


@BOUNDED
@given(queries())
def test_query_parameters(live, image_png, query):
    params, verdict = query
    r = live.segment(image_png, **params)
    if verdict == "invalid":
        assert_error(r, 422, "invalid_parameter")
    elif verdict == "ok":
        assert r.status_code == 200, (params, r.text)
    else:  # arbitrary text: accepted, refused as a parameter, or a deadline too short to meet
        assert r.status_code in (200, 422, 504), (params, r.text)
        if r.status_code != 200:
            assert set(r.json()) == {"error", "detail"}
    if r.status_code == 200:
        fmt = params.get("format", "png")
        expected = MEDIA.get(fmt) or (
            "application/x-npy" if params.get("encoding") == "npy" else "image/png"
        )
        assert r.headers["content-type"] == expected


@BOUNDED
@given(
    boundary=st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20),
    parts=st.lists(
        st.tuples(
            st.sampled_from(["image", "other", ""]),
            st.one_of(st.none(), st.text(max_size=20)),
            st.one_of(st.binary(max_size=64), st.just(b"PNG")),
        ),
        max_size=3,
    ),
    tail=st.sampled_from([b"--\r\n", b"", b"--", b"\r\n"]),
)
def test_multipart_bodies(live, image_png, boundary, parts, tail):
    body = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            "" if filename is None else f'; filename="{filename}"'
        )
        content = image_png if data == b"PNG" else data
        body += (
            f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
            + content
            + b"\r\n"
        )
    body += f"--{boundary}".encode() + tail
    r = live.client.post(
        "/v1/segment",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert r.status_code in (200, 400, 413, 415, 422), r.text
    if r.status_code != 200:
        assert set(r.json()) == {"error", "detail"}
