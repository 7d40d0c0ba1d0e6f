"""Whole-slide segmentation through core/slide.py: real tiled BigTIFFs (tifffile), the tiny
exported model in onnxruntime, compared with in-memory inference of the same image."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import away_from_seams, synthetic
from unetpp.core import slide
from unetpp.core.errors import Cancelled, ImageDecodeError, ImageTooLarge
from unetpp.core.imageio import decode_image
from unetpp.core.inference import create_session, run_batch
from unetpp.core.manifest import load_repository
from unetpp.core.preprocess import pad_to_multiple, to_channels
from unetpp.core.tiling import infer_tiled

TILE, OVERLAP = 128, 32


@pytest.fixture(scope="module")
def model(tiny_repository: Path):
    manifest = load_repository(tiny_repository)
    graph = manifest.graph("L4")
    session = create_session(tiny_repository / graph.file, threads=1)

    def run(batch: np.ndarray) -> np.ndarray:
        return run_batch(session, batch, graph.output)

    return manifest.preprocessing, run, manifest.task.labels


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).integers(0, 4000, (700, 900)).astype(np.uint16),
        (np.random.default_rng(1).standard_normal((300, 500)) * 3).astype(np.float32),
        np.random.default_rng(2).integers(0, 256, (301, 402, 3)).astype(np.uint8),
        np.full((64, 80), 9, np.uint16),
    ],
    ids=["uint16", "float32", "rgb8", "constant"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_streamed_percentiles_are_numpys(tmp_path, monkeypatch, image, channels):
    """Exact on every kind of pixel, with refinement forced (few values may be sorted)."""
    monkeypatch.setattr(slide, "GATHER", 500)
    monkeypatch.setattr(slide, "READ_ROWS", 64)
    tifffile.imwrite(tmp_path / "a.tif", image, bigtiff=True, tile=(64, 64))
    with slide.open_slide(tmp_path / "a.tif") as pages:
        got = slide.percentiles(pages[0], channels, (1.0, 99.8))
    expected = np.percentile(to_channels(image, channels), [1.0, 99.8])
    assert got == (expected[0], expected[1])


def test_pages_planar_channels_and_pyramids_are_read_at_full_resolution(tmp_path):
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 255, (2, 3, 100, 120)).astype(np.uint8)  # T, C, Y, X
    tifffile.imwrite(
        tmp_path / "s.tif",
        stack,
        photometric="minisblack",
        metadata={"axes": "TCYX"},
        tile=(64, 64),
    )
    with slide.open_slide(tmp_path / "s.tif") as pages:
        assert len(pages) == 2 and (pages[0].height, pages[0].width) == (100, 120)
        np.testing.assert_array_equal(pages[1].rows(10, 20), stack[1, :, 10:20].transpose(1, 2, 0))
    base = rng.integers(0, 65535, (512, 384)).astype(np.uint16)
    with tifffile.TiffWriter(tmp_path / "p.ome.tif", bigtiff=True) as tif:
        options = {"tile": (128, 128), "metadata": {"axes": "YX"}}
        tif.write(base, subifds=1, **options)
        tif.write(base[::2, ::2], subfiletype=1, **options)
    with slide.open_slide(tmp_path / "p.ome.tif") as pages:
        assert len(pages) == 1 and (pages[0].height, pages[0].width) == (512, 384)
        np.testing.assert_array_equal(pages[0].rows(500, 512), base[500:])


def test_a_file_that_is_not_a_tiff_is_a_decode_error(tmp_path):
    (tmp_path / "x.tif").write_bytes(b"not a tiff at all")
    with (
        pytest.raises(ImageDecodeError, match="not a readable TIFF"),
        slide.open_slide(tmp_path / "x.tif"),
    ):
        pass


def test_a_slide_above_the_in_memory_limit_equals_in_memory_inference(tmp_path, model):
    """Two pages of 600 x 520 (not multiples of 16): the streamed result equals the tiled
    in-memory inference everywhere, and whole-image inference inside the windows' cores."""
    preprocessing, run, decide = model
    images = np.stack([synthetic(600, 520, seed) for seed in (0, 1)])
    source, target = tmp_path / "in.tif", tmp_path / "out.tif"
    tifffile.imwrite(source, images, bigtiff=True, tile=(128, 128), compression="zlib")
    with pytest.raises(ImageTooLarge):
        decode_image(source, max_pixels=600 * 520 - 1)
    seen: list[tuple[int, int]] = []
    result = slide.segment_slide(
        source,
        target,
        run,
        preprocessing=preprocessing,
        decide=decide,
        tile=TILE,
        overlap=OVERLAP,
        batch=3,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert (result.pages, result.height, result.width) == (2, 600, 520)
    assert seen[0] == (0, result.windows) and seen[-1] == (result.windows, result.windows)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    with tifffile.TiffFile(target) as tif:
        assert tif.is_bigtiff and len(tif.pages) == 2
        assert all(p.is_tiled and p.dtype == np.uint8 for p in tif.pages)
        masks = np.stack([p.asarray() for p in tif.pages])
    assert not target.with_name("out.tif.partial").exists()

    async def run_one(window: np.ndarray) -> np.ndarray:
        return run(window[None])[0]

    for image, mask in zip(images, masks, strict=True):
        x, (h, w) = pad_to_multiple(preprocessing(image))
        tiled = asyncio.run(infer_tiled(x, run_one, tile=TILE, overlap=OVERLAP, in_flight=4))
        np.testing.assert_array_equal(mask, decide(tiled)[:h, :w])
        whole = decide(run(x[None])[0])[:h, :w]
        core = away_from_seams(x.shape[1], TILE, OVERLAP)[:h, None]
        core = core & away_from_seams(x.shape[2], TILE, OVERLAP)[None, :w]
        assert mask[core].mean() > 0.05 and (mask[core] == whole[core]).mean() >= 0.995


def test_cancel_stops_between_batches_and_leaves_no_file(tmp_path, model):
    preprocessing, run, decide = model
    tifffile.imwrite(tmp_path / "in.tif", synthetic(300, 300), bigtiff=True, tile=(128, 128))
    calls = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return run(batch)

    with pytest.raises(Cancelled):
        slide.segment_slide(
            tmp_path / "in.tif",
            tmp_path / "out.tif",
            counted,
            preprocessing=preprocessing,
            decide=decide,
            tile=TILE,
            overlap=OVERLAP,
            batch=1,
            cancelled=lambda: len(calls) >= 2,
        )
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]


def test_blending_over_bands_reproduces_a_pointwise_network_exactly(tmp_path):
    """A `run` that depends on each pixel alone comes out unchanged by the band-wise blending:
    a 3-class argmax over odd-sized pages (the padding, the carried rows, the last window
    aligned to the end) equals the argmax of the whole normalised image."""
    from unetpp.core.preprocess import Preprocessing
    from unetpp.core.task import Task

    rng = np.random.default_rng(4)
    image = rng.integers(0, 1000, (2, 333, 250)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", image, bigtiff=True, tile=(64, 64))
    centres = np.array([0.2, 0.5, 0.8], np.float32)[None, :, None, None]

    def run(batch: np.ndarray) -> np.ndarray:  # class k: closeness to centres[k]
        return -np.abs(batch - centres)

    task = Task.from_names(["low", "high"])
    prep = Preprocessing()
    slide.segment_slide(
        tmp_path / "in.tif",
        tmp_path / "out.tif",
        run,
        preprocessing=prep,
        decide=task.labels,
        tile=96,
        overlap=32,
        batch=5,
    )
    got = tifffile.imread(tmp_path / "out.tif")
    expected = np.stack([task.labels(run(prep(page)[None])[0]) for page in image])
    assert set(np.unique(expected)) == {0, 1, 2}
    np.testing.assert_array_equal(got, expected)
