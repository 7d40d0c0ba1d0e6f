"""`unetpp train` from the command line: flags to a `TrainConfig`, one process or `--nproc`
spawned DDP processes (or one rank of a torchrun job), then the best validation."""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import fields, replace
from pathlib import Path

import torch

from unetpp.core.datasets import SOURCES, data_task, load_split
from unetpp.core.errors import InvalidInput, UNetPPError
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.config import DATA_SEED, TrainConfig, check_resume
from unetpp.model.train import format_table, train


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The flags given (argparse leaves the others None) over the defaults, or, with --resume,
    over the checkpoint's run (whose --stop-at-step does not carry over)."""
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.resume:
        stored = TrainConfig.from_dict(load_checkpoint(args.resume).train_args)
        return replace(stored, **{"stop_at_step": None, **given})
    if "data" not in given:
        raise InvalidInput(
            f"--data is required ({', '.join(SOURCES)} or a folder) unless --resume is given"
        )
    return TrainConfig(**given)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, world: int, port: int, config: TrainConfig, resume: str | None) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s"
    )
    train(config, resume)


def spawn(config: TrainConfig, nproc: int, resume: str | None) -> None:
    """Train in `nproc` DDP processes on this machine; the settings and the data are checked
    here first, so that a mistake is one line, not one per process."""
    if resume:
        check_resume(load_checkpoint(resume).train_args, config, resume)
    task = data_task(config.data, config.classes)
    for split in ("train", "val"):
        load_split(config.data, split, task=task, seed=DATA_SEED, val_dir=config.val_dir)
    try:
        torch.multiprocessing.spawn(_spawned, (nproc, _free_port(), config, resume), nprocs=nproc)
    except (
        torch.multiprocessing.ProcessRaisedException,
        torch.multiprocessing.ProcessExitedException,
    ) as exc:
        raise UNetPPError(
            f"a training process failed: {str(exc).strip().splitlines()[-1]}"
        ) from exc


def summary(out: Path) -> str:
    """The best validation of the run in `out`, as the command prints it."""
    if not (out / "best.pt").is_file():  # stopped before the first validation
        return f"no validation yet; continue with --resume {out / 'last.pt'}"
    best = load_checkpoint(out / "best.pt")
    return "\n".join(
        (
            f"best validation (epoch {best.training['epoch']}, step {best.training['step']}):",
            format_table(best.metrics),
            f"wrote {out}/best.pt, last.pt, metrics.jsonl",
        )
    )


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        spawn(config, args.nproc, args.resume)
    else:
        train(config, args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary(Path(config.out)))
    return 0
