"""`unetpp predict` on real files with the tiny model: here and on a real server alike, resume
after a kill, shards, bad files, usage errors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import TILE_ABOVE, TILE_OVERLAP, TILE_SIZE, settings, start, stop
from tests.helpers import synthetic as synthetic_image
from unetpp.cli import main
from unetpp.client import decode_body
from unetpp.core import tiling
from unetpp.core.imageio import encode_png
from unetpp.core.pipeline import LocalModel, Tiling
from unetpp.core.routing import Choice
from unetpp.predict import collect, shard
from unetpp.server.settings import Settings

SMALL_TILES = [
    f"--tile-size={TILE_SIZE}",
    f"--tile-overlap={TILE_OVERLAP}",
    f"--tile-above-pixels={TILE_ABOVE}",
]


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Images of several sizes (one tiled at the test tile size), in a subfolder too, and a
    three-page 16-bit TIFF."""
    root = tmp_path / "in"
    for i, (h, w) in enumerate([(100, 130), (64, 64), (90, 200)]):
        write_png(root / f"a{i}.png", synthetic_image(h, w, seed=i))
    write_png(root / "deeper" / "big.png", synthetic_image(300, 260, seed=7))
    pages = [Image.fromarray(synthetic_image(96, 112, seed=10 + k)) for k in range(3)]
    pages[0].save(root / "stack.tif", save_all=True, append_images=pages[1:])
    return root


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {
        p.relative_to(out).as_posix(): decode_body(p.read_bytes(), "image/png")
        for p in sorted(out.rglob("*.png"))
    }


def test_the_tiling_defaults_are_the_servers():
    defaults = Settings()
    assert (defaults.tile_size, defaults.tile_overlap, defaults.tile_above_pixels) == (
        tiling.TILE_SIZE,
        tiling.TILE_OVERLAP,
        tiling.TILE_ABOVE_PIXELS,
    )
    assert Tiling() == Tiling(tiling.TILE_ABOVE_PIXELS, tiling.TILE_SIZE, tiling.TILE_OVERLAP)


def test_here_and_on_a_server_give_the_same_masks(
    tiny_repository: Path, folder: Path, tmp_path: Path, capsys
):
    here, there = tmp_path / "here", tmp_path / "there"
    args = [str(folder), "--level", "3", *SMALL_TILES]
    assert main(["predict", *args, "--out", str(here), "--models", str(tiny_repository)]) == 0
    live = start(settings(tiny_repository))
    try:
        assert main(["predict", *args, "--out", str(there), "--server", live.url]) == 0
        json_args = [str(folder / "a0.png"), "--format", "json", "--level", "3"]
        assert main(["predict", *json_args, "--out", str(there), "--server", live.url]) == 0
    finally:
        stop(live)
    assert main(["predict", *json_args, "--out", str(here), "--models", str(tiny_repository)]) == 0
    masks, served = outputs(here), outputs(there)
    names = ["a0.png", "a1.png", "a2.png", "deeper/big.png"]
    assert sorted(masks) == sorted([*names, "stack_p0.png", "stack_p1.png", "stack_p2.png"])
    assert sorted(served) == sorted(masks)
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, served[name], err_msg=name)
        assert 0 < np.count_nonzero(mask) < mask.size, name
    assert masks["deeper/big.png"].shape == (300, 260)  # tiled, cropped back
    local_json, server_json = (json.loads((d / "a0.json").read_text()) for d in (here, there))
    assert local_json["mask"] == server_json["mask"]
    assert local_json["graph"] == server_json["graph"] == {**local_json["graph"], "name": "L3"}
    assert "7/7 images: 7 written" in capsys.readouterr().err


def test_the_pipeline_routes_with_the_manifests_figures(tiny_repository: Path):
    model = LocalModel.open(tiny_repository, threads=1)
    image = synthetic_image(80, 96)
    graphs = {g.name: g for g in model.manifest.graphs}
    accurate = model.predict(image, Choice(mode="accurate"))
    best = max(graphs.values(), key=lambda g: g.accuracy.iou)
    assert accurate.graph.name == best.name and accurate.logits.shape[-2:] == image.shape
    fast = model.predict(image, Choice(mode="fast"))
    assert fast.graph.latency_ms["256"] <= accurate.graph.latency_ms["256"]
    floor = model.predict(image, Choice(min_iou=2.0))  # unreachable: the most accurate
    assert floor.route.missed and floor.graph.name == best.name


def test_resume_after_a_kill(tiny_repository: Path, tmp_path: Path):
    """Killed mid-run, then run again: what was written is kept, the rest is written."""
    root = tmp_path / "in"
    for i in range(40):
        write_png(root / f"img{i:02d}.png", synthetic_image(512, 512, seed=i))
    out = tmp_path / "out"
    argv = [
        sys.executable, "-m", "unetpp", "predict", str(root), "--out", str(out),
        "--models", str(tiny_repository), "--level", "4", "--jobs", "1", "--threads", "1",
    ]  # fmt: skip
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.png"))) < 3:
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert first.returncode == -signal.SIGKILL
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 3 <= len(kept) < 40
    for name in kept:  # each complete: it decodes
        assert decode_body((out / name).read_bytes(), "image/png").shape == (512, 512)
    (out / "img39.png.part").write_bytes(b"half an image")  # as a kill during a write leaves
    second = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"40/40 images: {40 - len(kept)} written, {len(kept)} skipped, 0 failed" in second.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png") if p.name in kept} == kept
    assert len(list(out.glob("*.png"))) == 40 and not list(out.glob("*.part"))


def test_shards_cover_every_file_exactly_once(tiny_repository: Path, folder: Path, tmp_path: Path):
    for i in range(10):
        write_png(folder / "more" / f"m{i}.png", synthetic_image(48, 48, seed=20 + i))
    sources = collect([str(folder)])
    parts = [shard(sources, k, 3) for k in range(3)]
    keys = [s.key for part in parts for s in part]
    assert sorted(keys) == [s.key for s in sources] and len(set(keys)) == len(keys)
    out = tmp_path / "out"
    written = []
    for k in range(3):
        before = set(outputs(out)) if out.exists() else set()
        code = main(["predict", str(folder), "--out", str(out), "--shard", f"{k}/3",
                     "--models", str(tiny_repository), "--level", "1"])  # fmt: skip
        assert code == 0
        written.append(set(outputs(out)) - before)
    assert sum(len(w) for w in written) == len(set().union(*written)) == 4 + 10 + 3
    everything = tmp_path / "all"
    main(["predict", str(folder), "--out", str(everything), "--models", str(tiny_repository),
          "--level", "1"])  # fmt: skip
    assert set().union(*written) == set(outputs(everything))


@pytest.mark.parametrize("where", ["here", "server"])
def test_a_bad_file_is_one_line_and_exit_code_1(
    tiny_repository: Path, folder: Path, tmp_path: Path, capsys, where
):
    (folder / "text.png").write_text("not an image")
    good = (folder / "a0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    argv = ["predict", str(folder), "--out", str(out)]
    if where == "here":
        code = main([*argv, "--models", str(tiny_repository)])
    else:
        live = start(settings(tiny_repository))
        try:
            code = main([*argv, "--server", live.url])
        finally:
            stop(live)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    failures = [line for line in err if line.startswith("unetpp predict: ")]
    assert len(failures) == 2 and "Traceback" not in "\n".join(err)
    assert any(str(folder / "text.png") in line for line in failures)
    assert any(str(folder / "truncated.png") in line for line in failures)
    assert err[-1].startswith("9/9 images: 7 written, 0 skipped, 2 failed")
    assert len(outputs(out)) == 7


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing-folder"], "no such file or folder"),
        (["{folder}", "--level", "1", "--mode", "fast"], "at most one of"),
        (["{folder}", "--format", "nonsense"], "format 'nonsense'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_code_2(
    tiny_repository: Path, folder: Path, tmp_path: Path, capsys, argv, message
):
    argv = [a.replace("{folder}", str(folder)) for a in argv]
    out = tmp_path / "out"
    code = main(["predict", *argv, "--out", str(out), "--models", str(tiny_repository)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() or not any(out.rglob("*.png"))


def test_globs_name_outputs_relative_to_their_folder(folder: Path, monkeypatch):
    monkeypatch.chdir(folder.parent)
    keys = [s.key for s in collect(["in/**/*.png", "in/stack.tif"])]
    assert keys == ["a0", "a1", "a2", "deeper/big", "stack"]


def test_one_model_of_several_here_and_on_a_server(
    tiny_repository: Path, folder: Path, tmp_path: Path, capsys
):
    root = tmp_path / "models"
    for name in ("nuclei", "cells"):
        shutil.copytree(tiny_repository, root / name)
    image = str(folder / "a2.png")
    here, there = tmp_path / "here", tmp_path / "there"
    assert main(["predict", image, "--out", str(here), "--models", str(root)]) == 2
    assert "several models (cells, nuclei): choose one with --model" in capsys.readouterr().err
    formats = ["png", "instances"]  # a format added after predict was written: no code for it
    for fmt in formats:
        argv = [image, "--model", "cells", "--level", "2", "--format", fmt]
        assert main(["predict", *argv, "--out", str(here), "--models", str(root)]) == 0
    live = start(settings(root))
    try:
        for fmt in formats:
            argv = [image, "--model", "cells", "--level", "2", "--format", fmt]
            assert main(["predict", *argv, "--out", str(there), "--server", live.url]) == 0
        missing = [image, "--model", "nope", "--out", str(tmp_path / "none"), "--server", live.url]
        assert main(["predict", *missing]) == 2
    finally:
        stop(live)
    assert "has no model 'nope'; it serves cells, nuclei" in capsys.readouterr().err
    masks, served = outputs(here), outputs(there)
    assert sorted(masks) == sorted(served) == ["a2.instances.png", "a2.png"]
    for name in masks:
        np.testing.assert_array_equal(masks[name], served[name], err_msg=name)
    assert masks["a2.instances.png"].max() > 1  # separate objects, numbered


def test_the_api_key_comes_from_the_environment(
    tiny_repository: Path, folder: Path, tmp_path: Path, capsys, monkeypatch
):
    image, out = str(folder / "a0.png"), tmp_path / "out"
    live = start(settings(tiny_repository, api_key="k3y"))
    try:
        monkeypatch.delenv("UNETPP_API_KEY", raising=False)
        assert main(["predict", image, "--out", str(out), "--server", live.url]) == 2
        assert "401 unauthorized" in capsys.readouterr().err
        monkeypatch.setenv("UNETPP_API_KEY", "k3y")
        assert main(["predict", image, "--out", str(out), "--server", live.url]) == 0
    finally:
        stop(live)
    assert list(outputs(out)) == ["a0.png"]


def test_a_truncated_stack_writes_its_whole_pages_and_reports_the_rest(
    tiny_repository: Path, tmp_path: Path, capsys
):
    root, out = tmp_path / "in", tmp_path / "out"
    root.mkdir()
    pages = [Image.fromarray(synthetic_image(96, 96, seed=k)) for k in range(3)]
    pages[0].save(root / "s.tif", save_all=True, append_images=pages[1:])
    data = (root / "s.tif").read_bytes()
    (root / "s.tif").write_bytes(data[: int(len(data) * 0.6)])  # page 0 whole, 1 cut, 2 gone
    assert main(["predict", str(root), "--out", str(out), "--models", str(tiny_repository)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert list(outputs(out)) == ["s_p0.png"]
    # in the order the pages finish (they run concurrently), each once
    assert sorted(line.split(": ")[1] for line in err[:-1]) == [
        f"{root / 's.tif'} page 1",
        f"{root / 's.tif'} page 2",
    ]
    assert err[-1].startswith("3/3 images: 1 written, 0 skipped, 2 failed")
