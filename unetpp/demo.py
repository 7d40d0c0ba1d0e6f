"""`unetpp demo`: build the default model repository once (train on the embedded data within a
bounded time, export every graph), then serve it. Later runs reuse the cached repository."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from unetpp.cli import main as cli
from unetpp.core.datasets import cache_root
from unetpp.core.errors import ModelRepositoryError, UNetPPError
from unetpp.core.manifest import load_repository


def repository_for(data: str, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / "demo" / data / "models"


def _step(code: int, what: str) -> None:
    if code:
        raise UNetPPError(f"{what} failed (exit status {code}); see the messages above")


def build(data: str, repo: Path, minutes: float) -> None:
    """Train and export into a scratch folder, then move it in place: an interrupted build never
    leaves a half-written repository that a later run would take for a good one."""
    work = repo.parent / "build"
    shutil.rmtree(work, ignore_errors=True)
    run = work / "run"
    print(f"[1/2] training UNet++ on {data} data for up to {minutes:g} minutes -> {run}")
    _step(
        cli(["train", "--data", data, "--out", str(run), "--time-budget", str(minutes)]), "training"
    )
    print(f"[2/2] exporting L1..L4 (fp32 and int8) -> {repo}")
    _step(cli(["export", str(run / "best.pt"), "--out", str(work / "models")]), "export")
    shutil.rmtree(repo, ignore_errors=True)
    (work / "models").rename(repo)
    shutil.rmtree(work, ignore_errors=True)


def main(args: argparse.Namespace) -> int:
    repo = repository_for(args.data, args.cache_dir)
    try:
        if args.rebuild:
            raise ModelRepositoryError("rebuild requested")
        load_repository(repo)
        print(f"using the cached model repository {repo} (--rebuild to train again)")
    except ModelRepositoryError:
        build(args.data, repo, args.time_budget)
    if args.build_only:
        print(f"model repository ready: {repo}")
        return 0
    print(f"serving on http://{args.host}:{args.port}/ (the web page; API docs at /docs)")
    return cli(["serve", "--models", str(repo), "--host", args.host, "--port", str(args.port)])
