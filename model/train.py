"""`unetpp train`: deep-supervised training with per-level validation, resumable, single or DDP.

Reads top to bottom: the frozen `TrainConfig`, the distributed setup, `evaluate` (whole padded
validation images, IoU/Dice for every head L1..L4 and the ensemble), then `Trainer`, whose
`run` is the loop.

- Epoch: `epoch_crops` random augmented crops (default: as many as it takes to cover the
  training pixels once, rounded up to whole steps); validation and checkpoints follow every
  epoch. `batch_size` is per process; under DDP the epoch's crops are shared by the processes.
- Stop: after `epochs`, when `time_budget` minutes are spent (keeping room for the final
  validation), after `stop_at_step` steps, or on Ctrl-C, whichever comes first; every stop
  writes a valid `last.pt`. The cosine schedule spans the run: its progress is the larger of
  step / (epochs * steps per epoch) and elapsed / time budget, so it reaches its end when the
  run does. Runs without a time budget are bitwise reproducible on CPU.
- Task: binary, or multi-class when the data names its classes (`classes.json`,
  "synthetic-classes") or `classes` does (core/task.py); IoU/Dice are then per class and their
  mean over the foreground classes.
- Outputs in `out`: `best.pt` (highest validation IoU of the deepest head, L4), `last.pt`
  (with optimizer and progress for `--resume`), `metrics.jsonl` (one line per validation).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from unetpp.core.datasets import Sample, data_task, load_split
from unetpp.core.errors import InvalidInput, UNetPPError
from unetpp.core.metrics import ScoreAccumulator
from unetpp.core.preprocess import MULTIPLE, Preprocessing, crop_to, pad_to_multiple
from unetpp.core.task import Task, TaskScores
from unetpp.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from unetpp.model.data import AUGMENTS, CropDataset
from unetpp.model.losses import deep_supervision_loss
from unetpp.model.unetpp import (
    WIDTHS,
    Arch,
    ModelConfig,
    UNetPlusPlus,
    average_heads,
    build_model,
    default_config,
)

log = logging.getLogger(__name__)

CHANNELS_LAST = torch.channels_last
DEFAULT_EPOCHS = 20  # when neither epochs nor a time budget is given
DATA_SEED = 0  # the data split is fixed; the training seed drives weights and augmentation
ARCHS = ("unetpp", "unet", "wide_unet")
# what `--resume` may change; anything else must match the checkpoint's run
STOPS = {0: None, 1: "time budget", 2: "interrupted"}  # stop codes broadcast by rank 0
RESUMABLE = {"out", "epochs", "time_budget", "stop_at_step", "device", "workers"}


@dataclass(frozen=True)
class TrainConfig:
    data: str  # "synthetic", "synthetic-classes", "hela" or a folder
    out: str
    classes: tuple[str, ...] | None = None  # names of labels 1..K-1 (default: the data's)
    arch: Arch = "unetpp"
    deep_supervision: bool = True
    widths: tuple[int, ...] | None = None  # None: the paper's widths for the arch
    epochs: int | None = None
    time_budget: float | None = None  # minutes
    stop_at_step: int | None = None
    crop: int = 96
    augment: str = "full"  # or "geometric": crops and symmetries only
    batch_size: int = 8
    lr: float = 3e-4
    seed: int = 0
    val_dir: str | None = None
    epoch_crops: int | None = None
    head_weights: tuple[float, ...] | None = None  # None: equal weights
    device: str = "auto"
    workers: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise InvalidInput(f"--arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.crop < MULTIPLE or self.crop % MULTIPLE:
            raise InvalidInput(f"--crop must be a positive multiple of {MULTIPLE}, got {self.crop}")
        if self.augment not in AUGMENTS:
            raise InvalidInput(
                f"--augment must be one of {', '.join(AUGMENTS)}, got {self.augment!r}"
            )
        for name in ("batch_size", "epochs", "stop_at_step", "epoch_crops"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.lr <= 0 or (self.time_budget is not None and self.time_budget <= 0):
            raise InvalidInput("--lr and --time-budget must be positive")
        if self.widths is not None and (len(self.widths) != len(WIDTHS) or min(self.widths) < 1):
            raise InvalidInput(
                f"--widths needs {len(WIDTHS)} positive channel counts, got {self.widths}"
            )
        if self.device not in ("auto", "cpu", "cuda"):
            raise InvalidInput(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.head_weights is not None and (
            len(self.head_weights) != self.model_config().depth
            or min(self.head_weights) < 0
            or sum(self.head_weights) <= 0
        ):
            raise InvalidInput(
                f"--head-weights needs {self.model_config().depth} non-negative weights "
                f"(L1..L4) with a positive sum, got {self.head_weights}"
            )

    @property
    def epoch_limit(self) -> int | None:
        return DEFAULT_EPOCHS if self.epochs is None and self.time_budget is None else self.epochs

    def model_config(self, in_channels: int = 1, num_classes: int = 1) -> ModelConfig:
        overrides: dict[str, Any] = {"in_channels": in_channels, "num_classes": num_classes}
        if self.widths is not None:
            overrides["widths"] = tuple(self.widths)
        if self.arch == "unetpp":
            overrides["deep_supervision"] = self.deep_supervision
        return default_config(self.arch, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def command_line(self) -> str:
        """The `unetpp train` command that makes this run: the settings that differ from the
        defaults, as flags."""
        words = ["unetpp", "train"]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name not in ("data", "out") and value == f.default:
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                words.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(value, tuple):
                words += [flag, ",".join(str(v) for v in value)]
            else:
                words += [flag, str(value)]
        return shlex.join(words)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("widths", "head_weights", "classes"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


# --------------------------------------------------------------------------- distributed


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup(device: str) -> Dist:
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("--device cuda: no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank, world, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def _sum_across(values: list[float], ctx: Dist) -> list[float]:
    if ctx.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _from_rank0(values: list[float], ctx: Dist) -> list[float]:
    if ctx.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, 0)
    return t.tolist()


# --------------------------------------------------------------------------- validation


def head_names(model: nn.Module) -> list[str]:
    """Names of the model's outputs in `_all_heads` order: L{j} for head_j."""
    return [f"L{key.split('_')[1]}" for key in model.heads]


def _all_heads(model: nn.Module, x: Tensor) -> list[Tensor]:
    return model.head_logits(x) if isinstance(model, UNetPlusPlus) else [model(x)]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    samples: list[Sample],
    preprocessing: Preprocessing,
    task: Task,
    ctx: Dist | None = None,
) -> dict[str, dict[str, Any]]:
    """IoU and Dice (the task's: micro-averaged over whole images, padded to a multiple of 16
    and cropped back; per class and their mean for a multi-class task) of every head and, with
    several heads, of their ensemble (mean probability). Under DDP each process scores a share
    of the images and the counts are summed."""
    ctx = ctx or Dist(0, 1, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    names = head_names(model)
    if len(names) > 1:
        names.append("ensemble")
    scores = {name: task.scores() for name in names}
    for sample in samples[ctx.rank :: ctx.world]:
        x, size = pad_to_multiple(preprocessing(sample.image))
        with _autocast(ctx.device):
            x = torch.from_numpy(x)[None].to(ctx.device, memory_format=CHANNELS_LAST)
            logits = [h.float() for h in _all_heads(model, x)]
        if len(logits) > 1:
            logits.append(average_heads(logits, softmax=task.multiclass))
        for name, out in zip(names, logits, strict=True):
            scores[name].update(task.labels(crop_to(out[0].cpu().numpy(), size)), sample.mask)
    model.train(was_training)
    counts = [
        float(v) for s in scores.values() for acc in s.per_class for v in asdict(acc).values()
    ]
    counts = [int(v) for v in _sum_across(counts, ctx)]
    per_class = [ScoreAccumulator(*counts[i : i + 4]) for i in range(0, len(counts), 4)]
    classes = len(task.foreground)
    result = {}
    for k, name in enumerate(names):
        total = TaskScores(task, per_class[classes * k : classes * (k + 1)])
        result[name] = {key: v for key, v in total.as_dict().items() if key != "images"}
    return result


def _autocast(device: torch.device):
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def format_table(metrics: dict[str, dict[str, Any]]) -> str:
    """IoU and Dice per output (columns); for a multi-class task, each class's IoU below."""
    names = list(metrics)
    rows = [(key, [metrics[n][key] for n in names]) for key in ("iou", "dice")]
    rows += [
        (f"iou {cls}", [metrics[n]["classes"][cls]["iou"] for n in names])
        for cls in metrics[names[0]].get("classes", {})
    ]
    width = max(len(label) for label, _ in rows) + 1
    lines = [" " * width + "".join(f"{n:>10}" for n in names)]
    lines += [f"{label:<{width}}" + "".join(f"{v:>10.4f}" for v in row) for label, row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- training


class Trainer:
    def __init__(self, config: TrainConfig, resumed: Checkpoint | None = None) -> None:
        self.ctx = _setup(config.device)
        self.config = config
        self.out = Path(config.out)
        self.task = resumed.task if resumed else data_task(config.data, config.classes)
        self.train_samples, self.val_samples = self._load_data()

        channels = (
            3 if any(s.image.ndim == 3 and s.image.shape[2] >= 3 for s in self.train_samples) else 1
        )
        model_config = (
            resumed.config if resumed else config.model_config(channels, self.task.channels)
        )
        self.preprocessing = resumed.preprocessing if resumed else Preprocessing(channels=channels)
        torch.manual_seed(config.seed)
        # channels-last: several times faster convolutions on CPU (oneDNN), and on CUDA with AMP
        self.model = build_model(model_config).to(self.ctx.device, memory_format=CHANNELS_LAST)
        if resumed is not None:
            self.model.load_state_dict(resumed.state_dict)
        self.ddp = (
            DistributedDataParallel(
                self.model,
                device_ids=[self.ctx.device.index] if self.ctx.device.type == "cuda" else None,
            )
            if self.ctx.world > 1
            else self.model
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        amp_fp16 = self.ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)

        pixels = sum(s.mask.size for s in self.train_samples)
        per_step = config.batch_size * self.ctx.world
        crops = config.epoch_crops or math.ceil(pixels / config.crop**2)
        crops = max(per_step, crops)
        self.dataset = CropDataset(
            self.train_samples, self.preprocessing, config.crop, crops, config.seed, config.augment,
            labels=self.task.multiclass,
        )  # fmt: skip
        self.sampler = DistributedSampler(
            self.dataset,
            self.ctx.world,
            self.ctx.rank,
            shuffle=True,
            seed=config.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // config.batch_size
        limit = config.epoch_limit
        self.total_steps = limit * self.steps_per_epoch if limit is not None else None

        # progress; restored from last.pt on resume
        self.epoch = self.step_in_epoch = self.step = 0
        self.elapsed = self.last_val_seconds = 0.0
        self.best_iou, self.best_epoch = -1.0, -1
        self.epoch_sums = [0.0] * (len(head_names(self.model)) + 2)  # loss, heads..., batches
        self.latest: dict[str, dict[str, float]] = {}
        if resumed is not None:
            self._restore(resumed.training)
            self.latest = resumed.metrics
        self.stop_requested = False

    # ---- setup helpers

    def _load_data(self) -> tuple[list[Sample], list[Sample]]:
        c = self.config
        if self.ctx.world > 1 and not self.ctx.main:
            dist.barrier()  # rank 0 fetches and converts (hela) first
        train = load_split(c.data, "train", task=self.task, seed=DATA_SEED, val_dir=c.val_dir)
        val = load_split(c.data, "val", task=self.task, seed=DATA_SEED, val_dir=c.val_dir)
        if self.ctx.world > 1 and self.ctx.main:
            dist.barrier()
        log.info("data %s: %d training and %d validation images", c.data, len(train), len(val))
        return train, val

    def _restore(self, state: dict[str, Any]) -> None:
        if "optimizer" not in state:
            raise InvalidInput(
                "--resume: the checkpoint holds no training state; resume from last.pt"
            )
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step_in_epoch, self.step = (
            state["epoch"],
            state["step_in_epoch"],
            state["step"],
        )
        self.elapsed, self.last_val_seconds = state["elapsed_s"], state["last_val_s"]
        self.best_iou, self.best_epoch = state["best_iou"], state["best_epoch"]
        self.epoch_sums = list(state["epoch_sums"])

    # ---- the loop

    def run(self) -> Path:
        if self.ctx.main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.step == 0:
                (self.out / "metrics.jsonl").write_text("")
            if not (self.out / "best.pt").is_file():  # e.g. resumed into a new folder
                self.best_iou = -1.0
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        self._clock = time.monotonic() - self.elapsed
        limit = self.config.epoch_limit
        reason = "epochs" if limit is not None and self.epoch >= limit else None
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not self.ctx.main,
            unit="step",
            dynamic_ncols=True,
        )
        try:
            with logging_redirect_tqdm():
                while reason is None:
                    reason = self._epoch(bar)
        finally:
            bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        log.info("training stopped (%s) after %d steps, %.0f s", reason, self.step, self.elapsed)
        return self.out

    def _epoch(self, bar: tqdm) -> str | None:
        c = self.config
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        b = c.batch_size
        indices = list(self.sampler)[self.step_in_epoch * b : self.steps_per_epoch * b]
        loader = DataLoader(
            self.dataset, batch_size=b, sampler=indices, num_workers=c.workers, drop_last=True
        )
        reason = None
        tick = time.monotonic()
        for images, masks in loader:
            progress, stop = self._sync()
            if stop:
                reason = STOPS[int(stop)]
                break
            lr = c.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.ctx.device, memory_format=CHANNELS_LAST)
            losses = self._train_step(images, masks.to(self.ctx.device))
            self.step += 1
            self.step_in_epoch += 1
            self.epoch_sums = [s + v for s, v in zip(self.epoch_sums, [*losses, 1.0], strict=True)]
            now = time.monotonic()
            speed = b * self.ctx.world / max(now - tick, 1e-9)
            tick = now
            bar.update()
            bar.set_postfix_str(self._postfix(losses[0], speed, lr), refresh=False)
            if c.stop_at_step is not None and self.step >= c.stop_at_step:
                reason = "stop_at_step"
                break
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        if reason != "interrupted":
            self._validate(partial=not epoch_done)
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums = [0.0] * len(self.epoch_sums)
            if c.epoch_limit is not None and self.epoch >= c.epoch_limit:
                reason = reason or "epochs"
        if reason is None:  # the budget may run out during the validation
            stop = self._sync()[1]
            reason = STOPS[int(stop)]
        self._save_last()
        return reason

    def _train_step(self, images: Tensor, masks: Tensor) -> list[float]:
        with _autocast(self.ctx.device):
            out = self.ddp(images)
        heads = out if isinstance(out, list) else [out]
        weights = self.config.head_weights if len(heads) > 1 else None
        loss, per_head = deep_supervision_loss(heads, masks, weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return [float(loss.detach()), *(float(h) for h in per_head)]

    def _sync(self) -> tuple[float, float]:
        """Schedule progress and the stop code (0 go, 1 time budget, 2 interrupted), from rank 0."""
        c = self.config
        self.elapsed = time.monotonic() - self._clock
        progress = self.step / self.total_steps if self.total_steps else 0.0
        stop = 2.0 if self.stop_requested else 0.0
        if c.time_budget is not None:
            spent = (self.elapsed + self.last_val_seconds) / (60 * c.time_budget)
            progress = max(progress, spent)
            stop = stop or (1.0 if spent >= 1.0 else 0.0)
        progress, stop = _from_rank0([progress, stop], self.ctx)
        return progress, stop

    def _postfix(self, loss: float, speed: float, lr: float) -> str:
        text = f"loss={loss:.4f} {speed:.1f} img/s lr={lr:.1e}"
        if self.latest:
            text += " val IoU " + " ".join(f"{k}={v['iou']:.3f}" for k, v in self.latest.items())
        return text

    def _validate(self, partial: bool) -> None:
        start = time.monotonic()
        metrics = evaluate(self.model, self.val_samples, self.preprocessing, self.task, self.ctx)
        self.last_val_seconds = time.monotonic() - start
        self.elapsed = time.monotonic() - self._clock
        self.latest = metrics
        if not self.ctx.main:
            return
        sums = self.epoch_sums
        batches = max(sums[-1], 1.0)
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "partial": partial,
            "elapsed_s": round(self.elapsed, 2),
            "val_s": round(self.last_val_seconds, 2),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": round(sums[0] / batches, 6),
            "train_loss_heads": {
                name: round(v / batches, 6)
                for name, v in zip(head_names(self.model), sums[1:-1], strict=True)
            },
            "val": metrics,
        }
        with open(self.out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log.info(
            "validation, epoch %d, step %d (%.1f s)\n%s",
            self.epoch,
            self.step,
            self.last_val_seconds,
            format_table(metrics),
        )
        deepest = head_names(self.model)[-1]
        if metrics[deepest]["iou"] > self.best_iou:
            self.best_iou, self.best_epoch = metrics[deepest]["iou"], self.epoch
            save_checkpoint(
                self.out / "best.pt", self._checkpoint({"epoch": self.epoch, "step": self.step})
            )

    def _save_last(self) -> None:
        if not self.ctx.main:
            return
        state = {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "step": self.step,
            "elapsed_s": self.elapsed,
            "last_val_s": self.last_val_seconds,
            "best_iou": self.best_iou,
            "best_epoch": self.best_epoch,
            "epoch_sums": self.epoch_sums,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(self.out / "last.pt", self._checkpoint(state))

    def _checkpoint(self, training: dict[str, Any]) -> Checkpoint:
        c = self.config
        return Checkpoint(
            config=self.model.config,
            preprocessing=self.preprocessing,
            state_dict={
                k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()
            },
            metrics=self.latest,
            train_args={
                **c.to_dict(),
                "world_size": self.ctx.world,
                "steps_per_epoch": self.steps_per_epoch,
            },
            data={
                "source": c.data,
                "val_dir": c.val_dir,
                "seed": DATA_SEED,
                "train_images": len(self.train_samples),
                "val_images": [s.name for s in self.val_samples],
            },
            training=training,
            task=self.task,
        )

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.stop_requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        log.warning("stopping after this step (Ctrl-C again to abort)")
        self.stop_requested = True


def check_resume(resumed: Checkpoint, config: TrainConfig, path: str | Path) -> None:
    """Refuse to resume with settings that would make a different run."""
    stored = TrainConfig.from_dict(resumed.train_args)
    for f in fields(TrainConfig):
        new, old = getattr(config, f.name), getattr(stored, f.name)
        if f.name not in RESUMABLE and new != old:
            raise InvalidInput(
                f"{path}: --{f.name.replace('_', '-')} {new} differs from the checkpoint's {old}; "
                f"only {', '.join(sorted(RESUMABLE))} may change on --resume"
            )


def train(config: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train in this process (or as one rank of a torchrun job); returns the output folder.
    `resume`: a last.pt to continue exactly; `config` must match its run (see RESUMABLE)."""
    resumed = None
    if resume is not None:
        resumed = load_checkpoint(resume)
        check_resume(resumed, config, resume)
    trainer = Trainer(config, resumed)
    try:
        out = trainer.run()
        if trainer.ctx.world > 1:
            # no rank tears the group down while another still uses it (gloo aborts then)
            dist.barrier()
        return out
    finally:
        if trainer.ctx.world > 1:
            dist.destroy_process_group()


# --------------------------------------------------------------------------- command line


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
            "--data is required (synthetic, hela or a folder) unless --resume is given"
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


def main(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if args.resume:
            check_resume(load_checkpoint(args.resume), config, args.resume)
        task = data_task(config.data, config.classes)
        for split in ("train", "val"):  # data errors as one line here, not in every process
            load_split(config.data, split, task=task, seed=DATA_SEED, val_dir=config.val_dir)
        try:
            torch.multiprocessing.spawn(
                _spawned, (args.nproc, _free_port(), config, args.resume), nprocs=args.nproc
            )
        except (
            torch.multiprocessing.ProcessRaisedException,
            torch.multiprocessing.ProcessExitedException,
        ) as exc:
            raise UNetPPError(
                f"a training process failed: {str(exc).strip().splitlines()[-1]}"
            ) from exc
    else:
        train(config, args.resume)
    out = Path(config.out)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if not (out / "best.pt").is_file():  # stopped before the first validation
        print(f"no validation yet; continue with --resume {out / 'last.pt'}")
        return 0
    best = load_checkpoint(out / "best.pt")
    print(f"best validation (epoch {best.training['epoch']}, step {best.training['step']}):")
    print(format_table(best.metrics))
    print(f"wrote {out}/best.pt, last.pt, metrics.jsonl")
    return 0


if __name__ == "__main__":  # torchrun --nproc_per_node N -m unetpp.model.train --data ... --out ...
    from unetpp.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
