"""`unetpp predict` on whole slides: a TIFF above the in-memory limit streams through
core/slide.py here and through the jobs API of a real server, into a tiled BigTIFF that equals
in-memory inference; resume, the formats a slide refuses, the memory limit."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from tests.helpers import (
    check_slide_result,
    settings,
    start,
    stop,
    synthetic,
    write_slide,
)
from unetpp.cli import main
from unetpp.client import APIError, Client
from unetpp.core.pipeline import LocalModel
from unetpp.predict import bounded, whole_slide
from unetpp.server import memory

TILE, OVERLAP = 128, 32
HEIGHT, WIDTH = 600, 520
TILES = [f"--tile-size={TILE}", f"--tile-overlap={OVERLAP}"]
BELOW = f"--max-pixels={HEIGHT * WIDTH - 1}"  # the in-memory limit, just below a page


@pytest.fixture(scope="module")
def pages() -> list[np.ndarray]:
    return [synthetic(HEIGHT, WIDTH, seed) for seed in (0, 1)]


@pytest.fixture
def slides(tmp_path: Path, pages) -> Path:
    """A classic tiled two-page TIFF (a whole slide only above the limit), and a PNG."""
    root = tmp_path / "in"
    (root / "plate").mkdir(parents=True)
    write_slide(root / "plate" / "scan.tif", *pages, bigtiff=False)
    from unetpp.core.imageio import encode_png

    (root / "small.png").write_bytes(encode_png(pages[0][:100, :120]))
    return root


def test_a_tiff_above_the_in_memory_limit_streams_into_a_bigtiff(
    tiny_repository: Path, slides: Path, tmp_path: Path, pages, capsys
):
    out = tmp_path / "out"
    argv = ["predict", str(slides), "--out", str(out), "--models", str(tiny_repository)]
    assert main([*argv, "--level", "3", *TILES, BELOW, "--batch", "3"]) == 0
    err = capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "plate",
        "plate/scan.tif",
        "small.png",
    ]
    check_slide_result(tiny_repository, "L3", pages, out / "plate" / "scan.tif", TILE, OVERLAP)
    assert "scan.tif: 0/" in err and "2/2 images: 2 written" in err

    # resumed: the slide is skipped; a leftover .partial is not taken as done
    assert main([*argv, "--level", "3", *TILES, BELOW]) == 0
    assert "2/2 images: 0 written, 2 skipped" in capsys.readouterr().err
    (out / "plate" / "scan.tif").rename(out / "plate" / "scan.tif.partial")
    assert main([*argv, "--level", "3", *TILES, BELOW]) == 0
    assert "2/2 images: 1 written, 1 skipped" in capsys.readouterr().err
    assert not (out / "plate" / "scan.tif.partial").exists()

    # below the limit, the same file is two pages decoded whole
    whole = tmp_path / "whole"
    assert main([*argv[:3], str(whole), *argv[4:], "--level", "3", *TILES]) == 0
    assert sorted(p.name for p in (whole / "plate").iterdir()) == ["scan_p0.png", "scan_p1.png"]


def test_here_and_through_a_servers_jobs_give_the_same_labels(
    tiny_repository: Path, slides: Path, tmp_path: Path, monkeypatch, capsys
):
    here, there = tmp_path / "here", tmp_path / "there"
    scan = str(slides / "plate" / "scan.tif")
    bigtiff = write_slide(tmp_path / "big.tif", synthetic(200, 240, 5))  # a slide at any size
    # one graph on both sides: a mode routes here on the manifest's export-time latencies and
    # on the server on its own measurements, which may pick another graph (L1 or L1.int8)
    args = [scan, str(bigtiff), "--level", "1", *TILES, BELOW]
    assert main(["predict", *args, "--out", str(here), "--models", str(tiny_repository)]) == 0
    monkeypatch.setenv("UNETPP_JOBS_DIR", str(tmp_path / "jobs"))
    monkeypatch.setenv("UNETPP_JOBS_TILE_SIZE", str(TILE))
    monkeypatch.setenv("UNETPP_JOBS_TILE_OVERLAP", str(OVERLAP))
    monkeypatch.setenv("UNETPP_JOBS_POLL_S", "0.1")
    live = start(settings(tiny_repository))
    try:
        assert main(["predict", *args, "--out", str(there), "--server", live.url]) == 0
        jobs = [p for p in (tmp_path / "jobs").iterdir() if not p.name.startswith(".")]
        with Client(live.url) as client:  # stopped by its caller: the job is cancelled
            large = write_slide(tmp_path / "large.tif", synthetic(2048, 2048))
            seen: list[int] = []
            with pytest.raises(APIError, match="cancelled by the caller"):
                client.run_job(
                    large,
                    tmp_path / "large-labels.tif",
                    poll_s=0.1,
                    progress=lambda done, total: seen.append(done),
                    cancelled=lambda: bool(seen),
                    level=4,
                )
            (job_id,) = {p.name for p in (tmp_path / "jobs").glob("[!.]*")} - {j.name for j in jobs}
            job = client.job(job_id)
            deadline = time.monotonic() + 60
            while job["state"] != "cancelled":
                assert time.monotonic() < deadline, job
                time.sleep(0.1)
                job = client.job(job["id"])
        assert job["progress"]["done"] < job["progress"]["total"]
        assert not list(tmp_path.glob("large-labels.tif*"))
    finally:
        stop(live)
    assert "2/2 images: 2 written" in capsys.readouterr().err
    assert len(jobs) == 2
    for name in ("scan.tif", "big.tif"):
        np.testing.assert_array_equal(
            tifffile.imread(here / name), tifffile.imread(there / name), err_msg=name
        )


def test_a_slide_in_another_format_is_one_line_naming_the_one_that_works(
    tiny_repository: Path, slides: Path, tmp_path: Path, capsys
):
    argv = ["predict", str(slides), "--out", str(tmp_path / "out"), "--format", "geojson"]
    assert main([*argv, "--models", str(tiny_repository), *TILES, BELOW]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == (
        f"unetpp predict: {slides / 'plate' / 'scan.tif'}: a whole slide is written only as a "
        "tiled BigTIFF label image (--format png, the default), not as --format geojson"
    )
    assert err[-1].startswith("2/2 images: 1 written, 0 skipped, 1 failed")


def test_a_memory_limit_tiles_and_bounds_the_slides_batch(
    tiny_repository: Path, slides: Path, tmp_path: Path, monkeypatch, capsys
):
    model = LocalModel.open(tiny_repository, threads=1)
    monkeypatch.setattr(memory, "resident", lambda: 0)
    monkeypatch.setattr("unetpp.predict.bytes_per_pixel", lambda model: 100)

    def limits(limit: int | None, jobs: int = 1):
        args = argparse.Namespace(
            tile_above_pixels=1 << 20,
            tile_size=512,
            tile_overlap=64,
            batch=4,
            memory_limit=limit,
            jobs=jobs,
        )
        tiles, batch = bounded(model, args)
        return tiles.above_pixels, tiles.size, batch

    monkeypatch.setattr(memory, "cgroup_limit", lambda: None)
    assert limits(None) == (1 << 20, 512, 4)  # no limit anywhere: as asked
    window = 100 * 512 * 512  # bytes of one 512 x 512 window
    assert limits(int(10 * window / 0.8)) == (1 << 20, 512, 4)
    assert limits(int(2.5 * window / 0.8)) == (int(2.5 * 512 * 512), 512, 2)
    assert limits(int(5 * window / 0.8), jobs=2) == (int(2.5 * 512 * 512), 512, 2)
    assert limits(int(0.5 * window / 0.8)) == (int(0.5 * 512 * 512), 256, 2)
    monkeypatch.setattr(memory, "cgroup_limit", lambda: int(2.5 * window / 0.8))
    assert limits(None) == (int(2.5 * 512 * 512), 512, 2)  # the cgroup's limit by default

    monkeypatch.undo()  # measured for real: a limit far below the process is one line
    argv = ["predict", str(slides), "--out", str(tmp_path / "out"), "--memory-limit", "1000"]
    assert main([*argv, "--models", str(tiny_repository)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raise --memory-limit or lower --jobs" in err[0], err


def test_an_interrupted_run_stops_its_slide_and_leaves_nothing(tiny_repository: Path, tmp_path):
    """Ctrl-C during a whole slide: the run stops at the slide's next batch (not at its end),
    exits 130, and leaves neither the output nor a .partial."""
    write_slide(tmp_path / "large.tif", synthetic(3072, 3072))
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "unetpp", "predict", str(tmp_path / "large.tif"), "--out", str(out),
        "--models", str(tiny_repository), "--level", "4", "--threads", "1", *TILES,
    ]  # fmt: skip
    run = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert run.stderr is not None
    first = run.stderr.readline()  # "<file>: 0/<windows> windows" once the slide started
    assert first.endswith(" windows\n") and " 0/" in first, first
    total = int(first.rsplit("/", 1)[1].split()[0])
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=60) == 130, run.stderr.read()
    err = run.stderr.read()
    assert "interrupted" in err and f"{total}/{total} windows" not in err
    assert not list(out.rglob("*.tif*"))


def test_which_files_are_whole_slides(tmp_path: Path):
    image = synthetic(64, 80)
    write_slide(tmp_path / "classic.tif", image, bigtiff=False)
    write_slide(tmp_path / "big.tif", image)
    tifffile.imwrite(tmp_path / "ome.ome.tif", image, ome=True)
    tifffile.imwrite(tmp_path / "png.png", image)  # a TIFF by content, not by name
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 not really")
    slides = {p.name for p in tmp_path.iterdir() if whole_slide(p, 64 * 80)}
    assert slides == {"big.tif", "ome.ome.tif"}
    assert whole_slide(tmp_path / "classic.tif", 64 * 80 - 1)
