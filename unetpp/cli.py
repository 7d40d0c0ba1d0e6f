"""The `unetpp` command. Each subcommand's implementation is imported only when it runs, so
`unetpp serve` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import typing
from collections.abc import Callable, Sequence

from unetpp import __version__
from unetpp.core.errors import UNetPPError

# subcommand -> (module:function, help, function adding its arguments)
COMMANDS: dict[str, tuple[str, str, Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, target: str, help: str):
    def register(add_arguments: Callable[[argparse.ArgumentParser], None]):
        COMMANDS[name] = (target, help, add_arguments)
        return add_arguments

    return register


@command("summary", "unetpp.model.summary:main", "parameters and GFLOPs of each level and baseline")
def _summary(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--size", type=int, default=256, help="square input size for GFLOPs (default 256)"
    )
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--classes", type=int, default=1)


@command("serve", "unetpp.server.main:main", "serve a model repository over HTTP (no torch)")
def _serve(p: argparse.ArgumentParser) -> None:
    # Left out, each falls back to its UNETPP_* environment variable, then the default.
    p.add_argument("--models", metavar="DIR", help="model repository (env UNETPP_MODELS)")
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8000)")


def _data_arguments(p: argparse.ArgumentParser, flag: str, required: bool) -> None:
    from unetpp.core.datasets import SOURCES

    p.add_argument(
        flag,
        required=required,
        metavar="SOURCE",
        help=f"{', '.join(SOURCES)} or a folder with images/ and masks/ "
        "(and classes.json for label maps)",
    )
    p.add_argument("--val-dir", help="a folder source's separate validation folder")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"a fraction in [0, 1) (0.01 is one point), got {text}")
    return value


def _numbers(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers, got {text!r}"
            ) from exc

    return parse


def _defaults_from(shown_default: str) -> type[argparse.HelpFormatter]:
    """A help formatter that shows each flag's default as `shown_default` ("module:function",
    the flag's dest -> the text or None) states it. The module is imported only when the help
    is printed, so that building the parser imports no torch."""

    class Defaults(argparse.HelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str | None:
            module, function = shown_default.split(":")
            shown = getattr(importlib.import_module(module), function)(action.dest)
            return action.help if shown is None else f"{action.help} ({shown.replace('%', '%%')})"

    return Defaults


@command(
    "train",
    "unetpp.model.launch:main",
    "train UNet++ (or a U-Net baseline) with deep supervision and per-level validation",
)
def _train(p: argparse.ArgumentParser) -> None:
    # The defaults are TrainConfig's (the help shows them); flags left out stay None so that
    # --resume can tell them from the checkpoint's own settings. TrainConfig checks the values.
    p.formatter_class = _defaults_from("unetpp.model.config:shown_default")
    _data_arguments(p, "--data", required=False)
    p.add_argument(
        "--out", required=True, metavar="DIR", help="writes best.pt, last.pt, metrics.jsonl"
    )
    p.add_argument(
        "--classes",
        type=lambda text: tuple(text.split(",")),
        metavar="A,B,...",
        help="names of mask labels 1..K-1: several make a multi-class model",
    )
    p.add_argument("--arch", help="the network")
    p.add_argument(
        "--no-deep-supervision",
        dest="deep_supervision",
        action="store_const",
        const=False,
        help="train only the deepest head (UNet++)",
    )
    p.add_argument("--widths", type=_numbers(int), help="five channel counts, i = 0..4")
    p.add_argument("--epochs", type=int, help="epochs to run")
    p.add_argument("--time-budget", type=float, metavar="MINUTES", help="stop when spent")
    p.add_argument("--stop-at-step", type=int, help="pause after this step; continue with --resume")
    p.add_argument("--crop", type=int, help="training crop side, a multiple of 16")
    p.add_argument(
        "--augment",
        help="full: zoom, intensity and noise jitter too; geometric: crops, flips, turns",
    )
    p.add_argument("--batch-size", type=int, help="crops per step and process")
    p.add_argument("--lr", type=float, help="Adam learning rate, cosine-annealed")
    p.add_argument("--seed", type=int, help="weights and augmentation")
    p.add_argument("--epoch-crops", type=int, help="crops per epoch")
    p.add_argument("--head-weights", type=_numbers(float), help="loss weights of L1..L4")
    p.add_argument("--device", help="where to train")
    p.add_argument("--workers", type=int, help="data loader processes")
    p.add_argument("--resume", metavar="CKPT", help="a last.pt to continue exactly")
    p.add_argument(
        "--nproc", type=int, default=1, help="DDP processes on this machine (default %(default)s)"
    )


@command(
    "export",
    "unetpp.export.repository:main",
    "checkpoint -> model repository: L1..L4 ONNX graphs (+ int8), verified, with model.json",
)
def _export(p: argparse.ArgumentParser) -> None:
    # The defaults are ExportOptions' (the help shows them); a flag left out stays None.
    p.formatter_class = _defaults_from("unetpp.export.repository:shown_default")
    p.add_argument("checkpoint", help="a checkpoint written by unetpp train")
    p.add_argument("--out", required=True, help="the repository folder (replaced if it exists)")
    _data_arguments(p, "--val-data", required=False)
    p.add_argument("--val-split", default="val", help="split measured for the manifest (val)")
    p.add_argument("--no-int8", dest="int8", action="store_false", help="skip int8 variants")
    p.add_argument(
        "--int8-margin",
        type=_fraction,
        metavar="IOU",
        help="leave out an int8 or bf16 variant losing more IoU than this, as a fraction: 0.01 is "
        "one point",
    )
    p.add_argument("--calib-images", type=int, default=8, help="training images for int8 (8)")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        help="bf16 variants, run by OpenVINO (default: when OpenVINO computes in bf16 here)",
    )
    p.add_argument("--fp16", action="store_true", help="also write fp16 variants (for GPUs)")
    p.add_argument("--opset", type=int, help="ONNX opset, at least 18")
    p.add_argument(
        "--ensemble",
        choices=("auto", "always", "never"),
        help="offer the heads' average as L4's second output; auto: when it measures better",
    )
    p.add_argument("--threshold", type=float, help="mask probability threshold")
    p.add_argument(
        "--latency-size",
        type=int,
        action="append",
        help="square size to time each graph at, repeatable",
    )
    p.add_argument("--name", help="model name in the manifest")
    p.add_argument("--model-version", help="model version (default: checkpoint hash prefix)")


@command(
    "evaluate",
    "unetpp.export.evaluate:main",
    "IoU, Dice and ms/image of every graph of a model repository (onnxruntime, no torch)",
)
def _evaluate(p: argparse.ArgumentParser) -> None:
    from unetpp.core.datasets import SPLITS

    p.add_argument("directory", help="a model repository written by unetpp export")
    _data_arguments(p, "--data", required=True)
    p.add_argument("--split", default="test", choices=SPLITS, help="(default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    p.add_argument("--json", action="store_true", help="machine-readable output")


@command(
    "predict",
    "unetpp.predict:main",
    "segment files, folders, globs and multi-page TIFFs, here or on a server",
)
def _predict(p: argparse.ArgumentParser) -> None:
    from unetpp.core.imageio import DEFAULT_MAX_PIXELS
    from unetpp.core.manifest import BACKENDS, DEFAULT_BACKEND, LEVELS
    from unetpp.core.routing import Mode, Precision
    from unetpp.core.tiling import TILE_ABOVE_PIXELS, TILE_OVERLAP, TILE_SIZE
    from unetpp.predict import parse_shard, positive

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="where the outputs are written")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--models", metavar="DIR", help="run here on this model repository")
    where.add_argument("--server", metavar="URL", help="send each image to this unetpp server")
    p.add_argument("--model", help="a model of a repository of several (default: the only one)")
    p.add_argument("--api-key", help="the server's key (default: env UNETPP_API_KEY)")
    route = p.add_argument_group("routing (at most one of level, mode, max latency, min IoU)")
    route.add_argument("--level", type=int, choices=LEVELS, help="pruning depth L1..L4")
    route.add_argument("--mode", choices=typing.get_args(Mode), help="(default balanced)")
    route.add_argument("--max-latency-ms", type=float, help="latency budget per image")
    route.add_argument("--min-iou", type=float, help="accuracy floor")
    route.add_argument("--precision", choices=typing.get_args(Precision), default="auto")
    route.add_argument("--deadline-ms", type=float, help="--server only: give up after this long")
    p.add_argument("--format", default="png", help="png, json, overlay, probabilities, ...")
    p.add_argument("--encoding", default="png16", help="format=probabilities: png16 or npy")
    p.add_argument("--jobs", type=positive, default=2, help="images in flight at once (default 2)")
    p.add_argument(
        "--shard", type=parse_shard, default=(0, 1), metavar="i/N", help="this part of N"
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=DEFAULT_BACKEND,
        help="here: the runtime, as UNETPP_BACKEND (default %(default)s)",
    )
    p.add_argument(
        "--threads", type=int, default=0, help="here: threads per session (0: CPUs / jobs)"
    )
    p.add_argument("--tile-size", type=int, default=TILE_SIZE, help=f"(default {TILE_SIZE})")
    p.add_argument(
        "--tile-overlap", type=int, default=TILE_OVERLAP, help=f"(default {TILE_OVERLAP})"
    )
    p.add_argument(
        "--tile-above-pixels",
        type=int,
        default=TILE_ABOVE_PIXELS,
        help=f"tile images larger than this (default {TILE_ABOVE_PIXELS})",
    )
    p.add_argument(
        "--max-pixels",
        type=positive,
        default=DEFAULT_MAX_PIXELS,
        help="decode images up to this whole; a TIFF with a larger page (and any BigTIFF or "
        f"OME-TIFF) is a whole slide, streamed (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--batch", type=positive, default=4, help="a whole slide's windows per run (default 4)"
    )
    p.add_argument(
        "--memory-limit",
        type=positive,
        metavar="BYTES",
        help="here: keep activations under this (default: the cgroup's limit, else none)",
    )


@command("models", "unetpp.control:main", "list, load, unload and reload a server's models")
def _models(p: argparse.ArgumentParser) -> None:
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--server", required=True, metavar="URL", help="the unetpp server")
    server.add_argument("--api-key", help="the server's key (default: env UNETPP_API_KEY)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", parents=[server], help="every model: state, version, graphs")
    for name, help_text in (("load", "load (or reload) one model"), ("unload", "stop serving one")):
        actions.add_parser(name, parents=[server], help=help_text).add_argument("name")
    reload = actions.add_parser(
        "reload", parents=[server], help="reload one model, or every model (as SIGHUP does)"
    )
    reload.add_argument("name", nargs="?")


@command("demo", "unetpp.demo:main", "build the default model once (train + export), then serve it")
def _demo(p: argparse.ArgumentParser) -> None:
    from unetpp.core.datasets import SOURCES

    p.add_argument(
        "--data",
        choices=SOURCES,
        default="synthetic",
        help="(default synthetic)",
    )
    p.add_argument(
        "--time-budget", type=float, default=4.0, metavar="MINUTES", help="training (default 4)"
    )
    p.add_argument("--cache-dir", help="where the repository is kept (default $UNETPP_CACHE)")
    p.add_argument("--rebuild", action="store_true", help="train and export again")
    p.add_argument("--build-only", action="store_true", help="build the repository, do not serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unetpp", description=__doc__)
    parser.add_argument("--version", action="version", version=f"unetpp {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (target, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(target=target)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    module_name, func_name = args.target.split(":")
    try:
        run: Callable[[argparse.Namespace], int | None] = getattr(
            importlib.import_module(module_name), func_name
        )
        return run(args) or 0
    except UNetPPError as exc:
        print(f"unetpp {args.command}: error: {exc.detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"unetpp {args.command}: interrupted", file=sys.stderr)
        return 130
