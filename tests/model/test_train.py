from __future__ import annotations

import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import MISSING, fields, replace
from pathlib import Path

import pytest
import torch

from unetpp.cli import build_parser
from unetpp.cli import main as cli_main
from unetpp.core.datasets import load_split
from unetpp.core.errors import InvalidInput
from unetpp.core.preprocess import Preprocessing
from unetpp.model.checkpoint import load_checkpoint
from unetpp.model.config import DEFAULT_EPOCHS, TrainConfig
from unetpp.model.launch import config_from_args
from unetpp.model.train import RunningLoss, Stop, evaluate, train
from unetpp.model.unetpp import WIDTHS

TINY = (4, 8, 16, 32, 64)
LEVELS = ["L1", "L2", "L3", "L4", "ensemble"]


def tiny_config(out: Path, **overrides) -> TrainConfig:
    # 24 crops per epoch, 3 steps of 8
    base = dict(data="synthetic", out=str(out), widths=TINY, crop=32, batch_size=8, epoch_crops=24)
    return TrainConfig(**{**base, "epochs": 2, "lr": 3e-3, **overrides})


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a).state_dict, load_checkpoint(b).state_dict
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tests share 2 cores with other work: one thread per process avoids oversubscription.
    Module-scoped, so that it is in place before `straight` (reproducibility is per thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """Two epochs of 3 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("straight")
    train(tiny_config(out))
    return out


def test_tiny_run_lowers_the_loss_and_writes_a_self_describing_checkpoint(tmp_path):
    out = train(tiny_config(tmp_path, epochs=5, epoch_crops=64, crop=48))
    lines = records(out)
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3, 4]
    assert lines[-1]["train_loss"] < 0.9 * lines[0]["train_loss"]
    assert set(lines[-1]["train_loss_heads"]) == {"L1", "L2", "L3", "L4"}
    best = load_checkpoint(out / "best.pt")
    assert list(best.metrics) == LEVELS
    assert best.metrics["L4"]["iou"] == max(r["val"]["L4"]["iou"] for r in lines)
    assert best.metrics["L4"]["iou"] > 0.5  # it learned to find nuclei
    for scores in best.metrics.values():
        assert 0 < scores["iou"] <= scores["dice"] <= 1
    assert best.preprocessing == Preprocessing(channels=1)
    assert best.config.widths == TINY and best.config.deep_supervision
    assert best.train_args["crop"] == 48 and best.train_args["lr"] == 3e-3
    assert best.data["source"] == "synthetic" and len(best.data["val_images"]) == 4
    # the recorded metrics are what the saved weights score on the validation images
    rescored = evaluate(best.build(), load_split("synthetic", "val"), best.preprocessing, best.task)
    for level in LEVELS:
        assert rescored[level]["iou"] == pytest.approx(best.metrics[level]["iou"], abs=1e-3)
    last = load_checkpoint(out / "last.pt")
    assert last.training["step"] == 5 * 8 and last.training["epoch"] == 5


def test_seeded_runs_are_reproducible(straight, tmp_path):
    train(tiny_config(tmp_path / "again"))
    assert_same_weights(straight / "last.pt", tmp_path / "again" / "last.pt")
    train(tiny_config(tmp_path / "seed1", seed=1))
    a = load_checkpoint(straight / "last.pt").state_dict
    b = load_checkpoint(tmp_path / "seed1" / "last.pt").state_dict
    assert not torch.equal(a["heads.head_4.weight"], b["heads.head_4.weight"])


def test_resume_mid_epoch_continues_exactly(straight, tmp_path):
    config = tiny_config(tmp_path)
    train(replace(config, stop_at_step=4))  # stops one step into the second epoch
    paused = load_checkpoint(tmp_path / "last.pt").training
    assert (paused["epoch"], paused["step_in_epoch"], paused["step"]) == (1, 1, 4)
    train(config, resume=tmp_path / "last.pt")
    assert_same_weights(straight / "last.pt", tmp_path / "last.pt")
    full = records(straight)
    resumed = [r for r in records(tmp_path) if not r["partial"]]
    timing = ("elapsed_s", "val_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == [
        {k: v for k, v in r.items() if k not in timing} for r in full
    ]


def test_last_pt_keeps_the_epoch_sums_list(tmp_path):
    """The running loss is stored as it always was ([loss, L1..L4, batches], so older last.pt
    files resume) and gives the means that metrics.jsonl records."""
    train(tiny_config(tmp_path, stop_at_step=2))
    stored = load_checkpoint(tmp_path / "last.pt").training["epoch_sums"]
    assert len(stored) == 6 and stored[-1] == 2.0 and stored[0] > 0
    assert RunningLoss.from_list(stored).to_list() == stored
    (line,) = records(tmp_path)  # the partial validation at step 2: means over its 2 batches
    assert line["train_loss"] == round(stored[0] / 2, 6)
    assert list(line["train_loss_heads"].values()) == [round(v / 2, 6) for v in stored[1:5]]


def test_resume_refuses_a_different_run(straight):
    with pytest.raises(InvalidInput, match="--crop"):
        train(replace(tiny_config(straight), crop=64), resume=straight / "last.pt")
    with pytest.raises(InvalidInput, match="no training state"):
        train(tiny_config(straight), resume=straight / "best.pt")


def test_time_budget_stops_cleanly_with_a_valid_checkpoint(tmp_path, caplog):
    # an epoch of 10,000 steps: the 1.8 s budget ends it midway however fast this machine is
    caplog.set_level(logging.INFO, logger="unetpp.model.train")
    train(tiny_config(tmp_path, epochs=None, time_budget=0.03, epoch_crops=80_000))
    assert f"training stopped ({Stop.TIME_BUDGET.value}) after" in caplog.text
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.training["epoch"] == 0 and 0 < last.training["step"] < 10_000
    (line,) = records(tmp_path)
    assert line["partial"] and line["step"] == last.training["step"]
    assert list(last.metrics) == LEVELS
    assert line["elapsed_s"] < 0.03 * 60 + 5


def test_unet_baseline_trains_its_single_head(tmp_path):
    train(tiny_config(tmp_path, arch="unet", epochs=1))
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.config.arch == "unet" and list(best.metrics) == ["L4"]


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`unetpp train ARGS`, in this process."""
    code = cli_main(["train", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/no/such/folder"], "/no/such/folder: no such data folder"),
        (["--data", "synthetic", "--crop", "50"], "--crop must be a positive multiple of 16"),
        (["--epochs", "1"], "--data is required"),
        (["--data", "synthetic", "--resume", "/no/last.pt"], "/no/last.pt: no such checkpoint"),
        (["--data", "synthetic", "--widths", "4,8"], "--widths needs 5"),
        (["--data", "synthetic", "--head-weights", "1,1"], "--head-weights needs 4"),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, args, message):
    code, _, err = cli(capsys, "--out", str(tmp_path / "run"), *args)
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("unetpp train: error: ") and message in line


@pytest.mark.parametrize("launcher", ["torchrun", "nproc"])
def test_ddp_two_cpu_processes(capsys, tmp_path, launcher):
    args = ["--data", "synthetic", "--out", str(tmp_path), "--widths", "4,8,16,32,64"]
    args += ["--crop", "32", "--batch-size", "4", "--epochs", "1", "--epoch-crops", "16"]
    if launcher == "torchrun":
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(
            [*cmd, "-m", "unetpp.model.train", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "best validation" in result.stdout
    else:
        code, out, _ = cli(capsys, *args, "--nproc", "2", "--device", "cpu")
        assert code == 0 and "best validation" in out
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.train_args["world_size"] == 2
    assert last.training["step"] == 2  # 16 crops / (2 processes x 4) per step
    assert list(last.metrics) == LEVELS
    assert last.build()(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert len(records(tmp_path)) == 1  # only rank 0 writes


def test_cli_resume_continues_a_paused_run(capsys, tmp_path):
    common = ["--out", str(tmp_path), "--widths", "4,8,16,32,64", "--crop", "32"]
    code, _, _ = cli(
        capsys,
        "--data",
        "synthetic",
        *common,
        "--epochs",
        "1",
        "--epoch-crops",
        "16",
        "--stop-at-step",
        "1",
    )
    assert code == 0
    code, out, _ = cli(capsys, "--resume", str(tmp_path / "last.pt"), "--out", str(tmp_path))
    assert code == 0 and "best validation" in out
    last = load_checkpoint(tmp_path / "last.pt")
    assert last.training["step"] == 2 and last.training["epoch"] == 1
    assert [r["partial"] for r in records(tmp_path)] == [True, False]


def test_resume_into_a_new_folder_extends_a_finished_run(straight, tmp_path):
    train(tiny_config(tmp_path, epochs=3), resume=straight / "last.pt")
    (line,) = records(tmp_path)
    assert (line["epoch"], line["step"], line["partial"]) == (2, 9, False)
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.training["step"] == 9 and best.metrics == line["val"]


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig("hela", "runs/x"),
        TrainConfig("hela", "runs/x", time_budget=27.0, crop=128, augment="geometric"),
        TrainConfig(
            "a folder/with space",
            "o",
            arch="unetpp",
            deep_supervision=False,
            widths=(8, 16, 32, 64, 128),
            head_weights=(1.0, 1.0, 1.0, 2.0),
            lr=1e-3,
            val_dir="v",
        ),
    ],
)
def test_command_line_makes_the_same_run(config):
    words = shlex.split(config.command_line())
    assert words[:2] == ["unetpp", "train"]
    assert config_from_args(build_parser().parse_args(words[1:])) == config


def help_entries(capsys, monkeypatch) -> dict[str, str]:
    """`unetpp train --help`: each flag's help, on one line."""
    monkeypatch.setenv("COLUMNS", "400")  # argparse wraps at hyphens too
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    options = capsys.readouterr().out.split("options:", 1)[1]
    entries = [" ".join(e.split()) for e in re.split(r"\n  (?=-)", options) if e.strip()]
    return {e.split()[0].rstrip(","): e for e in entries}


def test_help_shows_the_training_config_defaults(capsys, monkeypatch):
    entries = help_entries(capsys, monkeypatch)
    for f in fields(TrainConfig):
        flag = "--" + ("no-" if f.default is True else "") + f.name.replace("_", "-")
        assert flag in entries, flag
        if f.default in (MISSING, None) or isinstance(f.default, bool):
            continue
        (shown,) = re.findall(r"default ([^;)]+)\)", entries[flag])
        assert type(f.default)(shown) == f.default, (flag, shown)
    assert f"default: {DEFAULT_EPOCHS} when there is no --time-budget" in entries["--epochs"]
    assert ",".join(map(str, WIDTHS)) in entries["--widths"]
    # argparse holds no second copy: every flag left out is None, then TrainConfig's default
    args = build_parser().parse_args(["train", "--out", "o"])
    assert all(getattr(args, f.name) is None for f in fields(TrainConfig) if f.name != "out")
    assert config_from_args(build_parser().parse_args(["train", "--data", "x", "--out", "o"])) == (
        TrainConfig("x", "o")
    )
