"""The `unetpp` command. Each subcommand's implementation is imported only when it runs, so
`unetpp serve` never imports torch."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
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
