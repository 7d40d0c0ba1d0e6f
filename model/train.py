"""`unetpp train`: deep-supervised training with per-level validation, resumable, single or DDP.

Reads top to bottom: the stop reasons and the epoch's running loss, the distributed setup,
`evaluate` (whole padded validation images, IoU/Dice for every head L1..L4 and the ensemble),
then `Trainer`, whose `run` is the loop, and `train`. The settings are `TrainConfig`
(model/config.py); the command line and the spawning of processes are in model/launch.py.

- Epoch: `epoch_crops` random augmented crops (default: as many as it takes to cover the
  training pixels once, rounded up to whole steps); validation and checkpoints follow every
  epoch. `batch_size` is per process; under DDP the epoch's crops are shared by the processes.
- Stop (`Stop`): after `epochs`, when `time_budget` minutes are spent (keeping room for the
  final validation), after `stop_at_step` steps, or on Ctrl-C, whichever comes first; every
  stop writes a valid `last.pt`. The cosine schedule spans the run: its progress is the larger
  of step / (epochs * steps per epoch) and elapsed / time budget, so it reaches its end when
  the run does. Runs without a time budget are bitwise reproducible on CPU.
- Task: binary, or multi-class when the data names its classes (`classes.json`,
  "synthetic-classes") or `classes` does (core/task.py); IoU/Dice are then per class and their
  mean over the foreground classes.
- Outputs in `out`: `best.pt` (highest validation IoU of the deepest head, L4), `last.pt`
  (with optimizer and progress for `--resume`), `metrics.jsonl` (one line per validation).
"""

from __future__ import annotations

import enum
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
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
from unetpp.core.errors import InvalidInput
from unetpp.core.metrics import ScoreAccumulator
from unetpp.core.preprocess import Preprocessing, crop_to, network_input
from unetpp.core.task import Task, TaskScores
from unetpp.model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from unetpp.model.config import DATA_SEED, TrainConfig, check_resume
from unetpp.model.data import CropDataset
from unetpp.model.losses import deep_supervision_loss
from unetpp.model.unetpp import UNetPlusPlus, average_heads, build_model

log = logging.getLogger(__name__)

CHANNELS_LAST = torch.channels_last


class Stop(enum.Enum):
    """Why a run stopped; the value is what the log says."""

    EPOCHS = "epochs"
    TIME_BUDGET = "time budget"
    STOP_AT_STEP = "stop_at_step"
    INTERRUPTED = "interrupted"


# the stops rank 0 decides for every process, by their index here (0: go on)
BROADCAST_STOPS = (None, Stop.TIME_BUDGET, Stop.INTERRUPTED)


@dataclass(frozen=True)
class RunningLoss:
    """The epoch's sums of the training loss and of each head's loss, and the batches summed.

    In `last.pt` it is the list `epoch_sums`: [loss, head L1, ..., head Lk, batches]."""

    loss: float
    heads: tuple[float, ...]
    batches: int = 0

    @classmethod
    def zero(cls, heads: int) -> RunningLoss:
        return cls(0.0, (0.0,) * heads)

    def add(self, loss: float, heads: list[float]) -> RunningLoss:
        sums = tuple(s + h for s, h in zip(self.heads, heads, strict=True))
        return RunningLoss(self.loss + loss, sums, self.batches + 1)

    def means(self, names: list[str]) -> tuple[float, dict[str, float]]:
        """The mean loss and each named head's mean loss, rounded as metrics.jsonl records them."""
        batches = max(self.batches, 1)
        per_head = {n: round(s / batches, 6) for n, s in zip(names, self.heads, strict=True)}
        return round(self.loss / batches, 6), per_head

    def to_list(self) -> list[float]:
        return [self.loss, *self.heads, float(self.batches)]

    @classmethod
    def from_list(cls, sums: list[float]) -> RunningLoss:
        return cls(sums[0], tuple(sums[1:-1]), int(sums[-1]))


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
        x, size = network_input(sample.image, preprocessing)
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
        self._build_model(resumed)
        self._build_data()

        # progress; restored from last.pt on resume
        self.epoch = self.step_in_epoch = self.step = 0
        self.elapsed = self.last_val_seconds = 0.0
        self.best_iou, self.best_epoch = -1.0, -1
        self.epoch_sums = RunningLoss.zero(len(head_names(self.model)))
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

    def _build_model(self, resumed: Checkpoint | None) -> None:
        """The model (seeded), its DDP wrapper, the optimizer and the grad scaler."""
        config, ctx = self.config, self.ctx
        channels = (
            3 if any(s.image.ndim == 3 and s.image.shape[2] >= 3 for s in self.train_samples) else 1
        )
        model_config = (
            resumed.config if resumed else config.model_config(channels, self.task.channels)
        )
        self.preprocessing = resumed.preprocessing if resumed else Preprocessing(channels=channels)
        torch.manual_seed(config.seed)
        # channels-last: several times faster convolutions on CPU (oneDNN), and on CUDA with AMP
        self.model = build_model(model_config).to(ctx.device, memory_format=CHANNELS_LAST)
        if resumed is not None:
            self.model.load_state_dict(resumed.state_dict)
        self.ddp = (
            DistributedDataParallel(
                self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None
            )
            if ctx.world > 1
            else self.model
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        amp_fp16 = ctx.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=amp_fp16)

    def _build_data(self) -> None:
        """The epoch's crops, their sampler over the processes, and the run's length in steps."""
        config = self.config
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
        self.epoch_sums = RunningLoss.from_list(state["epoch_sums"])

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
        reason = Stop.EPOCHS if limit is not None and self.epoch >= limit else None
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
        log.info(
            "training stopped (%s) after %d steps, %.0f s", reason.value, self.step, self.elapsed
        )
        return self.out

    def _epoch(self, bar: tqdm) -> Stop | None:
        """The rest of this epoch, its validation and last.pt; why the run stops, if it does."""
        reason = self._steps(bar)
        epoch_done = self.step_in_epoch >= self.steps_per_epoch
        if reason is not Stop.INTERRUPTED:
            self._validate(partial=not epoch_done)
        if epoch_done:
            self.epoch += 1
            self.step_in_epoch = 0
            self.epoch_sums = RunningLoss.zero(len(self.epoch_sums.heads))
            limit = self.config.epoch_limit
            if limit is not None and self.epoch >= limit:
                reason = reason or Stop.EPOCHS
        if reason is None:  # the budget may run out during the validation
            reason = self._sync()[1]
        self._save_last()
        return reason

    def _steps(self, bar: tqdm) -> Stop | None:
        """The epoch's remaining steps; why they stopped before its end, if they did."""
        c = self.config
        self.sampler.set_epoch(self.epoch)
        self.dataset.set_epoch(self.epoch)
        b = c.batch_size
        indices = list(self.sampler)[self.step_in_epoch * b : self.steps_per_epoch * b]
        loader = DataLoader(
            self.dataset, batch_size=b, sampler=indices, num_workers=c.workers, drop_last=True
        )
        tick = time.monotonic()
        for images, masks in loader:
            progress, stop = self._sync()
            if stop is not None:
                return stop
            lr = c.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            images = images.to(self.ctx.device, memory_format=CHANNELS_LAST)
            loss, per_head = self._train_step(images, masks.to(self.ctx.device))
            self.step += 1
            self.step_in_epoch += 1
            self.epoch_sums = self.epoch_sums.add(loss, per_head)
            now = time.monotonic()
            speed = b * self.ctx.world / max(now - tick, 1e-9)
            tick = now
            bar.update()
            bar.set_postfix_str(self._postfix(loss, speed, lr), refresh=False)
            if c.stop_at_step is not None and self.step >= c.stop_at_step:
                return Stop.STOP_AT_STEP
        return None

    def _train_step(self, images: Tensor, masks: Tensor) -> tuple[float, list[float]]:
        """One optimizer step; the loss and each head's."""
        with _autocast(self.ctx.device):
            out = self.ddp(images)
        heads = out if isinstance(out, list) else [out]
        weights = self.config.head_weights if len(heads) > 1 else None
        loss, per_head = deep_supervision_loss(heads, masks, weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach()), [float(h) for h in per_head]

    def _sync(self) -> tuple[float, Stop | None]:
        """Schedule progress and whether to stop (time budget, interrupted), from rank 0."""
        c = self.config
        self.elapsed = time.monotonic() - self._clock
        progress = self.step / self.total_steps if self.total_steps else 0.0
        stop = Stop.INTERRUPTED if self.stop_requested else None
        if c.time_budget is not None:
            spent = (self.elapsed + self.last_val_seconds) / (60 * c.time_budget)
            progress = max(progress, spent)
            stop = stop or (Stop.TIME_BUDGET if spent >= 1.0 else None)
        progress, code = _from_rank0([progress, float(BROADCAST_STOPS.index(stop))], self.ctx)
        return progress, BROADCAST_STOPS[int(code)]

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
        train_loss, per_head = self.epoch_sums.means(head_names(self.model))
        record = {
            "epoch": self.epoch,
            "step": self.step,
            "partial": partial,
            "elapsed_s": round(self.elapsed, 2),
            "val_s": round(self.last_val_seconds, 2),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_loss_heads": per_head,
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
            "epoch_sums": self.epoch_sums.to_list(),
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


def train(config: TrainConfig, resume: str | Path | None = None) -> Path:
    """Train in this process (or as one rank of a torchrun job); returns the output folder.
    `resume`: a last.pt to continue exactly; `config` must match its run (config.RESUMABLE)."""
    resumed = None
    if resume is not None:
        resumed = load_checkpoint(resume)
        check_resume(resumed.train_args, config, resume)
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


if __name__ == "__main__":  # torchrun --nproc_per_node N -m unetpp.model.train --data ... --out ...
    from unetpp.cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
