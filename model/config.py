"""`TrainConfig`: the settings of one training run, their defaults and their checks.

The defaults stated here are the only ones: `unetpp train --help` shows them (`shown_default`),
the checkpoint records the whole config, and `--resume` compares against it (`check_resume`).
"""

from __future__ import annotations

import shlex
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from unetpp.core.errors import InvalidInput
from unetpp.core.preprocess import MULTIPLE
from unetpp.model.data import AUGMENTS
from unetpp.model.unetpp import ARCHS, WIDTHS, Arch, ModelConfig, default_config

DEFAULT_EPOCHS = 20  # when neither epochs nor a time budget is given
DATA_SEED = 0  # the data split is fixed; the training seed drives weights and augmentation
DEVICES = ("auto", "cpu", "cuda")
# what `--resume` may change; anything else must match the checkpoint's run
RESUMABLE = {"out", "epochs", "time_budget", "stop_at_step", "device", "workers"}
# the accepted values of the fields that take one of a few
CHOICES: dict[str, tuple[str, ...]] = {"arch": ARCHS, "augment": AUGMENTS, "device": DEVICES}
# what a field left at None means (shown by `unetpp train --help`)
UNSET = {
    "classes": "the data's classes.json, else binary",
    "widths": "the paper's for the arch, " + ",".join(map(str, WIDTHS)) + " for unetpp",
    "epochs": f"{DEFAULT_EPOCHS} when there is no --time-budget either",
    "epoch_crops": "enough to cover the training pixels once",
    "head_weights": "equal",
}


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
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise InvalidInput(
                    f"{_flag(name)} must be one of {', '.join(allowed)}, "
                    f"got {getattr(self, name)!r}"
                )
        if self.crop < MULTIPLE or self.crop % MULTIPLE:
            raise InvalidInput(f"--crop must be a positive multiple of {MULTIPLE}, got {self.crop}")
        for name in ("batch_size", "epochs", "stop_at_step", "epoch_crops"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InvalidInput(f"{_flag(name)} must be at least 1, got {value}")
        if self.lr <= 0 or (self.time_budget is not None and self.time_budget <= 0):
            raise InvalidInput("--lr and --time-budget must be positive")
        if self.widths is not None and (len(self.widths) != len(WIDTHS) or min(self.widths) < 1):
            raise InvalidInput(
                f"--widths needs {len(WIDTHS)} positive channel counts, got {self.widths}"
            )
        self._check_head_weights()

    def _check_head_weights(self) -> None:
        weights, depth = self.head_weights, self.model_config().depth
        if weights is not None and (len(weights) != depth or min(weights) < 0 or sum(weights) <= 0):
            raise InvalidInput(
                f"--head-weights needs {depth} non-negative weights "
                f"(L1..L4) with a positive sum, got {weights}"
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
            if isinstance(value, bool):
                words.append(_flag(f.name) if value else f"--no-{_flag(f.name)[2:]}")
            else:
                words += [_flag(f.name), _shown(value)]
        return shlex.join(words)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        for key in ("widths", "head_weights", "classes"):
            if data.get(key) is not None:
                data[key] = tuple(data[key])
        return cls(**data)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    """A value as a flag takes it: tuples comma-separated."""
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def shown_default(name: str) -> str | None:
    """A field's default as `unetpp train --help` shows it (with its choices, if it takes one
    of a few); None for a required field, a flag (bool) and a field whose None means none."""
    field = next((f for f in fields(TrainConfig) if f.name == name), None)
    if field is None or field.default is MISSING or isinstance(field.default, bool):
        return None
    if field.default is None:
        return f"default: {UNSET[name]}" if name in UNSET else None
    shown = f"default {_shown(field.default)}"
    return f"one of {', '.join(CHOICES[name])}; {shown}" if name in CHOICES else shown


def check_resume(train_args: dict[str, Any], config: TrainConfig, path: str | Path) -> None:
    """Refuse to resume from a checkpoint (its `train_args`) with settings that would make a
    different run."""
    stored = TrainConfig.from_dict(train_args)
    for f in fields(TrainConfig):
        new, old = getattr(config, f.name), getattr(stored, f.name)
        if f.name not in RESUMABLE and new != old:
            raise InvalidInput(
                f"{path}: {_flag(f.name)} {new} differs from the checkpoint's {old}; "
                f"only {', '.join(sorted(RESUMABLE))} may change on --resume"
            )
