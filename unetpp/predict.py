"""`unetpp predict INPUT... --out DIR`: segment files, folders, globs and multi-page TIFFs,
locally on a model repository (core.pipeline on `--backend`, onnxruntime or OpenVINO; no torch)
or against a server (unetpp.client). docs/predict.md is the user's page.

Every image becomes one output `DIR/<relative path without suffix>[_p<k>].<ext>` (k: the page
of a multi-page TIFF, from 0). A whole slide (a BigTIFF or OME-TIFF, or a TIFF with a page above
`--max-pixels`) is never decoded whole: core/slide.py streams it here, a server's jobs API there,
into one tiled BigTIFF label image `DIR/<relative path without suffix>.tif`. An output is
written to a temporary name and renamed, so one that exists is complete: a second run skips
it, and an interrupted run resumes. `--shard i/N` keeps the files whose position in the sorted
list of relative paths is i modulo N.
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from unetpp.core.errors import BadParameter, ImageDecodeError, UNetPPError
from unetpp.core.routing import Choice

if TYPE_CHECKING:
    from unetpp.core.pipeline import LocalModel, Tiling

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# an output's extension from its media type; a run of one format writes one of them
MEDIA_SUFFIXES = {
    "image/png": ".png",
    "image/tiff": ".tif",
    "application/json": ".json",
    "application/geo+json": ".geojson",
    "application/x-npy": ".npy",
}
PART = ".part"
TIFF_SUFFIXES = (".tif", ".tiff")
SLIDE_FORMATS = ("png",)  # a whole slide's label image, written as a tiled BigTIFF
POLL_S = 0.5  # --server: how often a whole slide's job is asked for its progress


class UsageError(BadParameter):
    """A command line that cannot run (exit code 2)."""


class Unreachable(UNetPPError):
    """The server cannot be asked (exit code 2, like a usage error: nothing could run)."""

    error = "unreachable"


@dataclass(frozen=True)
class Source:
    path: Path
    key: str  # the path relative to its input, without suffix, with "/": names the output


@dataclass(frozen=True)
class Item:
    """One image: a file, one page of a multi-page TIFF, or a whole slide (every page)."""

    source: Source
    page: int | None = None
    slide: bool = False

    @property
    def name(self) -> str:
        return self.source.key if self.page is None else f"{self.source.key}_p{self.page}"

    @property
    def where(self) -> str:
        """The file (and page) for messages."""
        path = str(self.source.path)
        return path if self.page is None else f"{path} page {self.page}"

    def read(self) -> bytes:
        path = self.source.path
        return path.read_bytes() if self.page is None else tiff_page(path, self.page)


@dataclass(frozen=True)
class Output:
    content: bytes
    media_type: str


Windows = Callable[[int, int], None]  # a whole slide's (windows done, windows in all)
Stopped = Callable[[], bool]  # true once the run is interrupted: a whole slide stops


@dataclass(frozen=True)
class Runner:
    """How images run: `image(bytes)` -> its output; `slide(source, target, windows, stopped)`
    writes a whole slide's label image to `target` (complete or not at all)."""

    image: Callable[[bytes], Output]
    slide: Callable[[Path, Path, Windows, Stopped], None]


def _glob_base(pattern: str) -> Path:
    """The folder part of a glob before its first wildcard (what keys are relative to)."""
    parts = Path(pattern).parts
    fixed = [p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return Path(*fixed) if fixed else Path(".")


def _key(path: Path, base: Path) -> str:
    return path.relative_to(base).with_suffix("").as_posix()


def collect(inputs: Sequence[str]) -> list[Source]:
    """Files, folders (recursively, image suffixes) and globs -> sources sorted by key."""
    found: dict[str, Source] = {}
    for text in inputs:
        path = Path(text)
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
            pairs = [(p, _key(p, path)) for p in files if p.is_file()]
        elif path.is_file():
            pairs = [(path, path.stem)]
        elif glob.has_magic(text):
            base = _glob_base(text)
            pairs = [(p, _key(p, base)) for p in map(Path, glob.glob(text, recursive=True))]
            pairs = [(p, k) for p, k in pairs if p.is_file()]
        else:
            raise UsageError(f"{text}: no such file or folder")
        for p, key in pairs:
            other = found.setdefault(key, Source(p, key))
            if other.path != p:
                raise UsageError(f"{other.path} and {p} would both write the output {key!r}")
    if not found:
        raise UsageError(f"no image files in {' '.join(inputs)} (suffixes {IMAGE_SUFFIXES})")
    return [found[k] for k in sorted(found)]


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected i/N, got {text!r}") from exc
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard {text}: i must be in 0..N-1")
    return index, count


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def shard(sources: Sequence[Source], index: int, count: int) -> list[Source]:
    """The sources of shard `index` of `count` (by position in the sorted list of keys)."""
    return list(sources[index::count])


def tiff_pages(path: Path) -> int:
    """Items of a file: 1 for a single page (or a file that does not open: its decoding reports
    it), else its pages, plus one for a corrupt page after them (reported when it is read)."""
    if path.suffix.lower() not in (".tif", ".tiff"):
        return 1
    try:
        img = Image.open(path)
    except Exception:  # Pillow raises many types on a corrupt file; decoding reports it
        return 1
    with img:
        pages = 1
        try:
            while True:
                img.seek(pages)
                pages += 1
        except EOFError:
            return pages
        except Exception:  # as above: the page that fails to open is an item that fails
            return pages + 1


def tiff_page(path: Path, page: int) -> bytes:
    """One page of a multi-page TIFF as a single-page TIFF (lossless, same pixel mode); only
    that page's part of the file is read."""
    try:
        with Image.open(path) as img:
            img.seek(page)
            buf = io.BytesIO()
            img.save(buf, format="TIFF")
            return buf.getvalue()
    except Exception as exc:  # as above
        raise ImageDecodeError(f"unreadable page ({type(exc).__name__}: {exc})") from exc


def whole_slide(path: Path, max_pixels: int) -> bool:
    """A BigTIFF or OME-TIFF, or a TIFF with a page of more than `max_pixels` pixels (False for
    what tifffile cannot read: decoding it reports why)."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return False
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if tif.is_bigtiff or tif.is_ome:
                return True
            if not tif.series:
                return False
            level = tif.series[0].levels[0]
            height, width = (level.shape[level.axes.index(axis)] for axis in "YX")
            return height * width > max_pixels
    except (OSError, ValueError, tifffile.TiffFileError):
        return False


def items(sources: Iterable[Source], max_pixels: int) -> list[Item]:
    out: list[Item] = []
    for source in sources:
        if whole_slide(source.path, max_pixels):
            out.append(Item(source, slide=True))
            continue
        pages = tiff_pages(source.path)
        out.extend([Item(source)] if pages == 1 else [Item(source, k) for k in range(pages)])
    return out


def output_name(name: str, fmt: str, suffix: str) -> str:
    """`<name><suffix>` when the suffix names the format (img.png, img.json), else
    `<name>.<format><suffix>` (img.overlay.png, img.probabilities.npy)."""
    return name + suffix if suffix == f".{fmt}" else f"{name}.{fmt}{suffix}"


def slide_output(out: Path, item: Item) -> Path:
    return out / f"{item.name}.tif"


def done(out: Path, item: Item, fmt: str) -> bool:
    """Whether this item's output in this format exists (complete: see `write`; a whole
    slide's `.partial` is not its output)."""
    if item.slide:
        return slide_output(out, item).is_file()
    suffixes = set(MEDIA_SUFFIXES.values())
    return any((out / output_name(item.name, fmt, s)).is_file() for s in suffixes)


def write(out: Path, item: Item, fmt: str, output: Output) -> Path:
    """Write atomically: a temporary name, then a rename."""
    suffix = MEDIA_SUFFIXES.get(output.media_type, ".bin")
    target = out / output_name(item.name, fmt, suffix)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART)
    part.write_bytes(output.content)
    os.replace(part, target)
    return target


class Progress:
    """One stderr line, redrawn in place on a terminal; a summary line at the end."""

    def __init__(self, total: int, stream: Any = None) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.counts = {"written": 0, "skipped": 0, "failed": 0}
        self.start = time.monotonic()
        self.live = self.stream.isatty()
        self._lock = threading.Lock()
        self._tenths: dict[str, int] = {}  # a whole slide's progress last printed (off a tty)

    def line(self) -> str:
        seen = sum(self.counts.values())
        rate = self.counts["written"] / max(time.monotonic() - self.start, 1e-9)
        parts = ", ".join(f"{v} {k}" for k, v in self.counts.items())
        return f"{seen}/{self.total} images: {parts} ({rate:.2f} images/s)"

    def add(self, outcome: str, message: str | None = None) -> None:
        with self._lock:
            self.counts[outcome] += 1
            clear = "\r\x1b[K" if self.live else ""
            if message:
                print(f"{clear}{message}", file=self.stream, flush=True)
            if self.live:
                print(f"\r{self.line()}", end="", file=self.stream, flush=True)

    def windows(self, item: Item, done: int, total: int) -> None:
        """A whole slide's windows: on a terminal in the redrawn line, elsewhere a line at each
        tenth."""
        with self._lock:
            if self.live:
                slide = f" | {item.where}: {done}/{total} windows"
                print(f"\r\x1b[K{self.line()}{slide}", end="", file=self.stream, flush=True)
                return
            tenth = 10 * done // max(total, 1)
            if tenth > self._tenths.get(item.name, -1):
                self._tenths[item.name] = tenth
                print(f"{item.where}: {done}/{total} windows", file=self.stream, flush=True)

    def finish(self) -> None:
        print(f"\r\x1b[K{self.line()}" if self.live else self.line(), file=self.stream)


def choice_of(args: argparse.Namespace) -> Choice:
    return Choice(args.level, args.mode, args.max_latency_ms, args.min_iou, args.precision)


def local_runner(args: argparse.Namespace) -> Runner:
    """Decode -> the pipeline -> render, on this machine; whole slides through core/slide.py;
    each image's activations within its share of the memory limit (`bounded`)."""
    from unetpp.core.backends import unavailable
    from unetpp.core.imageio import decode_image
    from unetpp.core.pipeline import LocalModel
    from unetpp.core.render import render

    problem = unavailable(args.backend)
    if problem:
        raise UsageError(f"--backend {args.backend}: {problem}")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    model = LocalModel.open(
        repository(args.models, args.model), backend_name=args.backend, threads=threads
    )
    task = model.manifest.task
    if args.format not in task.formats:
        raise UsageError(f"format {args.format!r}: this model answers {', '.join(task.formats)}")
    model.tiles, batch = bounded(model, args)
    choice = choice_of(args)

    def run(data: bytes) -> Output:
        prediction = model.predict(decode_image(data, max_pixels=args.max_pixels), choice)
        rendered = render(
            task, prediction.logits, prediction.image, args.format, encoding=args.encoding
        )
        if isinstance(rendered.content, dict):
            body = {
                "width": int(prediction.image.shape[1]),
                "height": int(prediction.image.shape[0]),
                "graph": {
                    "name": prediction.graph.name,
                    "level": prediction.graph.level,
                    "precision": prediction.graph.precision,
                    "output": prediction.graph.output,
                },
                "route": {
                    "rule": prediction.route.rule,
                    "reason": prediction.route.reason,
                    "missed": prediction.route.missed,
                },
                "threshold": model.manifest.threshold,
                "mask": rendered.content,
                "timings": {"inference_ms": round(prediction.inference_ms, 3)},
            }
            return Output(json.dumps(body).encode(), rendered.media_type)
        return Output(rendered.content, rendered.media_type)

    return Runner(run, local_slides(model, choice, batch))


def local_slides(
    model: LocalModel, choice: Choice, batch: int
) -> Callable[[Path, Path, Windows, Stopped], None]:
    """A whole slide through core/slide.py on the graph `choice` routes its first page's plan
    to (as the server's jobs do), `batch` windows per run."""
    from unetpp.core import slide

    tiles = model.tiles
    preprocessing = model.manifest.preprocessing

    def run(source: Path, target: Path, windows: Windows, stopped: Stopped) -> None:
        with slide.open_slide(source) as pages:
            page = pages[0]
        how = slide.plan(page.height, page.width, preprocessing, tiles.size, tiles.overlap)
        graph = model.graphs[model.route(choice, how).graph]
        slide.segment_slide(
            source,
            target,
            lambda x: model.sessions[graph.name].run(x, graph.output),
            preprocessing=preprocessing,
            decide=model.manifest.task.labels,
            tile=tiles.size,
            overlap=tiles.overlap,
            batch=batch,
            progress=windows,
            cancelled=stopped,
        )

    return run


def bounded(model: LocalModel, args: argparse.Namespace) -> tuple[Tiling, int]:
    """The tiling, and a whole slide's windows per run, that keep each image in flight within
    its share of --memory-limit (default: the cgroup's limit; without either, the options as
    given): the limit less the server's headroom and what the process holds with the model open, split over
    --jobs. Images whose activations would pass it are tiled, and the tile halved until one
    window fits (UsageError when none does)."""
    from unetpp.core.pipeline import Tiling
    from unetpp.core.preprocess import MULTIPLE
    from unetpp.server import memory

    asked = Tiling(args.tile_above_pixels, args.tile_size, args.tile_overlap)
    limit = args.memory_limit or memory.cgroup_limit()
    if limit is None:
        return asked, args.batch
    budget = memory.activation_room(limit) // args.jobs
    per_pixel = bytes_per_pixel(model)
    pixels = max(budget, 0) // per_pixel
    tile = args.tile_size
    while tile * tile > pixels:
        tile = tile // 2 // MULTIPLE * MULTIPLE
        if tile <= 2 * args.tile_overlap:
            raise UsageError(
                f"a memory limit of {limit} bytes leaves {budget} per image in flight: not "
                f"enough for a window ({per_pixel} bytes per pixel); raise --memory-limit or "
                "lower --jobs"
            )
    tiles = Tiling(min(args.tile_above_pixels, pixels), tile, args.tile_overlap)
    return tiles, max(1, min(args.batch, pixels // (tile * tile)))


def bytes_per_pixel(model: LocalModel) -> int:
    """The most activation bytes per input pixel any graph takes, measured like the server's
    probe (one run at the manifest's reference size, the rise of resident memory, a margin for
    the arena's growth in chunks)."""
    from unetpp.server import memory

    size = model.manifest.reference_size
    x = np.zeros((model.manifest.in_channels, size, size), np.float32)
    peaks = [memory.peak_during(lambda g=g: model.run(g, x)) for g in model.graphs.values()]
    return memory.per_pixel(max(p or 0 for p in peaks), size**2)


def repository(models: str, name: str | None) -> Path:
    """The model folder: DIR itself (model.json at its root), DIR/NAME, or DIR's only model."""
    root = Path(models)
    if name is not None:
        return root / name
    if (root / "model.json").is_file():
        return root
    names = sorted(p.parent.name for p in root.glob("*/model.json"))
    if len(names) == 1:
        return root / names[0]
    if not names:
        raise UsageError(f"{root}: no model.json here or in its subfolders")
    raise UsageError(f"{root} holds several models ({', '.join(names)}): choose one with --model")


def server_runner(args: argparse.Namespace) -> Runner:
    """Send each image to the server's /v1 segmentation (retrying on 503), and each whole slide
    to its jobs API (submit, poll, fetch the result)."""
    from unetpp.client import APIError, Client

    client = Client(args.server, api_key=args.api_key or os.environ.get("UNETPP_API_KEY"))
    try:
        listing = client.models()
    except APIError as exc:
        raise Unreachable(f"{args.server}: {exc}") from exc
    names = [m["name"] for m in listing.get("models", [])]
    if args.model is not None and args.model not in names:
        raise UsageError(f"{args.server} has no model {args.model!r}; it serves {', '.join(names)}")
    options = {
        "model": args.model,
        "level": args.level,
        "mode": args.mode,
        "max_latency_ms": args.max_latency_ms,
        "min_iou": args.min_iou,
        "precision": args.precision,
        "deadline_ms": args.deadline_ms,
        "format": args.format,
        "encoding": args.encoding,
    }

    def run(data: bytes) -> Output:
        result = client.segment(data, **options)  # type: ignore[arg-type]
        return Output(result.content, result.media_type)

    routing = ("model", "level", "mode", "max_latency_ms", "min_iou", "precision")
    job = {k: options[k] for k in routing}  # no deadline: a job has a time to live instead

    def slide(source: Path, target: Path, windows: Windows, stopped: Stopped) -> None:
        client.run_job(source, target, poll_s=POLL_S, progress=windows, cancelled=stopped, **job)  # type: ignore[arg-type]

    return Runner(run, slide)


def process(
    runner: Runner, out: Path, fmt: str, item: Item, progress: Progress, stopped: Stopped
) -> tuple[str, str | None]:
    """(outcome, message) of one item; a failure is one line, never an exception."""
    from unetpp.client import APIError

    if item.slide and fmt not in SLIDE_FORMATS:
        return "failed", (
            f"{item.where}: a whole slide is written only as a tiled BigTIFF label image "
            f"(--format png, the default), not as --format {fmt}"
        )
    try:
        if item.slide:
            target = slide_output(out, item)
            target.parent.mkdir(parents=True, exist_ok=True)
            runner.slide(item.source.path, target, partial(progress.windows, item), stopped)
        else:
            write(out, item, fmt, runner.image(item.read()))
    except BadParameter:
        raise  # the same for every image: the run stops
    except APIError as exc:
        if exc.error == "invalid_parameter":
            raise UsageError(exc.detail) from exc
        return "failed", f"{item.where}: {exc.detail}"
    except UNetPPError as exc:
        return "failed", f"{item.where}: {exc.detail}"
    except OSError as exc:
        return "failed", f"{item.where}: {exc.strerror or exc}"
    except Exception as exc:  # a decoder's unforeseen error on one file: the run goes on
        return "failed", f"{item.where}: {type(exc).__name__}: {exc}"
    return "written", None


def predict(
    todo: Sequence[Item],
    runner: Runner,
    out: Path,
    args: argparse.Namespace,
    progress: Progress,
) -> None:
    stop = threading.Event()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [
            pool.submit(process, runner, out, args.format, item, progress, stop.is_set)
            for item in todo
        ]
        try:
            for future in as_completed(futures):
                outcome, message = future.result()
                progress.add(outcome, message and f"unetpp predict: {message}")
        except BaseException:  # a usage error, Ctrl-C: nothing more starts
            stop.set()  # a whole slide in progress stops at its next batch (or poll)
            pool.shutdown(cancel_futures=True)
            raise


def main(args: argparse.Namespace) -> int:
    # Pillow warns about corrupt metadata on stderr; a bad file is reported on one line instead
    warnings.filterwarnings("ignore", module="PIL")
    if (args.models is None) == (args.server is None):
        raise UsageError("give one of --models DIR (run here) or --server URL")
    routes = [args.level, args.mode, args.max_latency_ms, args.min_iou]
    if sum(v is not None for v in routes) > 1:
        raise UsageError("give at most one of --level, --mode, --max-latency-ms, --min-iou")
    sources = shard(collect(args.inputs), *args.shard)
    todo = items(sources, args.max_pixels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [item for item in todo if not done(out, item, args.format)]
    progress = Progress(len(todo))
    progress.counts["skipped"] = len(todo) - len(pending)
    runner = (local_runner if args.models is not None else server_runner)(args)
    predict(pending, runner, out, args, progress)
    progress.finish()
    return 1 if progress.counts["failed"] else 0
