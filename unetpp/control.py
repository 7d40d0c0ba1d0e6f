"""`unetpp models list|load NAME|unload NAME|reload [NAME] --server URL`: a server's models and
their control (unetpp.client; docs/models.md). Exit codes as `predict`'s: 0 done, 1 the server
refused (its error on one line), 2 the server could not be asked."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

from unetpp.client import APIError, Client
from unetpp.predict import Unreachable


def show(listing: dict[str, Any]) -> list[str]:
    """One line per model: name (* for the default), state, version and graphs, or why not."""
    rows = []
    for m in listing.get("models", []):
        name = m["name"] + (" *" if m["name"] == listing.get("default") else "")
        model = m.get("model") or {}
        graphs = ",".join(g["name"] for g in m.get("graphs", []))
        what = f"version {model['version']}  graphs {graphs}" if model else m.get("error") or ""
        rows.append((name, m["state"], what))
    if not rows:
        return ["no models"]
    width = [max(len(r[i]) for r in rows) for i in range(2)]
    return [f"{n:<{width[0]}}  {s:<{width[1]}}  {w}".rstrip() for n, s, w in rows]


def _state(answer: dict[str, Any]) -> list[str]:
    version = f" (version {answer['version']})" if answer.get("version") else ""
    return [f"{answer['name']}: {answer['state']}{version}"]


def _reloaded(answer: dict[str, Any]) -> list[str]:
    return [line for name, m in answer["models"].items() for line in _state({**m, "name": name})]


def action(args: argparse.Namespace, client: Client) -> Callable[[], list[str]]:
    if args.action == "list":
        return lambda: show(client.models())
    if args.action == "load" or (args.action == "reload" and args.name):
        return lambda: _state(client.load(args.name))
    if args.action == "unload":
        return lambda: _state(client.unload(args.name))
    return lambda: _reloaded(client.reload())


def main(args: argparse.Namespace) -> int:
    key = args.api_key or os.environ.get("UNETPP_API_KEY")
    with Client(args.server, api_key=key) as client:
        try:
            lines = action(args, client)()
        except APIError as exc:
            if not exc.status:
                raise Unreachable(f"{args.server}: {exc.detail}") from exc
            print(f"unetpp models {args.action}: error: {exc}", file=sys.stderr)
            return 1
    print("\n".join(lines))
    return 0
