"""`unetpp predict INPUT... --out DIR`: segment files, folders, globs and multi-page TIFFs,
locally on a model repository (core.pipeline, onnxruntime, no torch) or against a server
(unetpp.client). docs/predict.md is the user's page.

Every image becomes one output `DIR/<relative path without suffix>[_p<k>].<ext>` (k: the page
of a multi-page TIFF, from 0). An output is written to a temporary name and renamed, so one
that exists is complete: a second run skips it, and an interrupted run resumes. `--shard i/N`
keeps the files whose position in the sorted list of relative paths is i modulo N.
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
from pathlib import Path
from typing import Any

from PIL import Image

from unetpp.core.errors import BadParameter, ImageDecodeError, UNetPPError
from unetpp.core.routing import Choice

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
    """One image: a file, or one page of a multi-page TIFF."""

    source: Source
    page: int | None = None

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


def items(sources: Iterable[Source]) -> list[Item]:
    out = []
    for source in sources:
        pages = tiff_pages(source.path)
        out.extend([Item(source)] if pages == 1 else [Item(source, k) for k in range(pages)])
    return out


def output_name(name: str, fmt: str, suffix: str) -> str:
    """`<name><suffix>` when the suffix names the format (img.png, img.json), else
    `<name>.<format><suffix>` (img.overlay.png, img.probabilities.npy)."""
    return name + suffix if suffix == f".{fmt}" else f"{name}.{fmt}{suffix}"


def done(out: Path, item: Item, fmt: str) -> bool:
    """Whether this item's output in this format exists (complete: see `write`)."""
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

    def finish(self) -> None:
        print(f"\r\x1b[K{self.line()}" if self.live else self.line(), file=self.stream)


def choice_of(args: argparse.Namespace) -> Choice:
    return Choice(args.level, args.mode, args.max_latency_ms, args.min_iou, args.precision)


def local_runner(args: argparse.Namespace) -> Callable[[bytes], Output]:
    """Decode -> the pipeline -> render, on this machine."""
    from unetpp.core.imageio import decode_image
    from unetpp.core.pipeline import LocalModel, Tiling
    from unetpp.core.render import render

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    tiles = Tiling(args.tile_above_pixels, args.tile_size, args.tile_overlap)
    model = LocalModel.open(repository(args.models, args.model), threads=threads, tiles=tiles)
    choice = choice_of(args)
    task = model.manifest.task
    if args.format not in task.formats:
        raise UsageError(f"format {args.format!r}: this model answers {', '.join(task.formats)}")

    def run(data: bytes) -> Output:
        prediction = model.predict(decode_image(data), choice)
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

    return run


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


def server_runner(args: argparse.Namespace) -> Callable[[bytes], Output]:
    """Send each image to the server's /v1 segmentation (retrying on 503)."""
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

    return run


def process(
    run: Callable[[bytes], Output], out: Path, fmt: str, item: Item
) -> tuple[str, str | None]:
    """(outcome, message) of one item; a failure is one line, never an exception."""
    from unetpp.client import APIError

    try:
        write(out, item, fmt, run(item.read()))
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
    run: Callable[[bytes], Output],
    out: Path,
    args: argparse.Namespace,
    progress: Progress,
) -> None:
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(process, run, out, args.format, item) for item in todo]
        try:
            for future in as_completed(futures):
                outcome, message = future.result()
                progress.add(outcome, message and f"unetpp predict: {message}")
        except BaseException:  # a usage error, Ctrl-C: nothing more starts
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
    todo = items(sources)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pending = [item for item in todo if not done(out, item, args.format)]
    progress = Progress(len(todo))
    progress.counts["skipped"] = len(todo) - len(pending)
    run = (local_runner if args.models is not None else server_runner)(args)
    predict(pending, run, out, args, progress)
    progress.finish()
    return 1 if progress.counts["failed"] else 0
