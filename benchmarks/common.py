"""What every study shares: where results go, the machine's description, running `unetpp`
as a user would, interleaved timing, a server process on a free loopback port.

A study writes its JSON with `save(place, name, result)`, which also re-renders the report
from every JSON present (benchmarks/report.py). `--quick` runs write to runs/bench-quick/
instead, so a quick run never overwrites or mixes with the committed results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Place:
    """Where a run's results, plots and report go."""

    base: Path

    @property
    def results(self) -> Path:
        return self.base / "results"

    @property
    def plots(self) -> Path:
        return self.base / "plots"

    @property
    def report(self) -> Path:
        return self.base / "REPORT.md"

    def plot_path(self, name: str) -> Path:
        self.plots.mkdir(parents=True, exist_ok=True)
        return self.plots / name


def place(quick: bool) -> Place:
    return Place(ROOT / "runs" / "bench-quick" if quick else ROOT / "benchmarks")


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine() -> dict[str, Any]:
    """This machine and the software measured on it (torch only if already imported)."""
    import numpy
    import onnxruntime

    info: dict[str, Any] = {
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "onnxruntime": onnxruntime.__version__,
        "gpu": "none lent to this session",
        "load_average_at_start": load_average(),
    }
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_line(module: str) -> str:
    return " ".join([f".venv/bin/python -m benchmarks.{module}", *sys.argv[1:]])


class Study:
    """One run of a study: where it writes, when it started, and its result's common fields."""

    def __init__(self, name: str, quick: bool, module: str | None = None) -> None:
        """`name`: the results file's stem; `module`: the study's (default: the name)."""
        self.name, self.quick, self.where = name, quick, place(quick)
        self.module = module or name
        self.load_at_start, self.start = load_average(), time.monotonic()

    def save(self, **fields: Any) -> Path:
        return save(
            self.where,
            self.name,
            {
                "study": self.name,
                "command": command_line(self.module),
                "quick": self.quick,
                "machine": {**machine(), "load_average_at_start": self.load_at_start},
                "wall_s": round(time.monotonic() - self.start, 1),
                **fields,
            },
        )


def add_repository_arguments(parser: argparse.ArgumentParser, checkpoint_for: str = "") -> None:
    """--models (and --checkpoint): default, the paper study's UNet++ w/ DS of seed 0."""
    parser.add_argument(
        "--models", type=Path, help="a model repository (default: the paper study's UNet++ w/ DS)"
    )
    if checkpoint_for:
        parser.add_argument(
            "--checkpoint", type=Path, help=f"for {checkpoint_for} (default: REPO/../best.pt)"
        )


def repository(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """The repository (and checkpoint) that add_repository_arguments' flags name."""
    runs = ROOT / "runs" / ("bench-quick/paper" if args.quick else "paper")
    repo = (args.models or runs / "unetpp_ds-s0" / "models").resolve()
    wants_checkpoint = "checkpoint" in args
    checkpoint = (
        (args.checkpoint or repo.parent / "best.pt").resolve() if wants_checkpoint else None
    )
    if not (repo / "model.json").exists() or (checkpoint and not checkpoint.exists()):
        raise SystemExit(
            f"{repo}: no model repository{' (or no best.pt beside it)' if checkpoint else ''}; "
            f"run `python -m benchmarks.paper{' --quick' if args.quick else ''}` first or pass "
            "--models" + (" and --checkpoint" if checkpoint else "")
        )
    return repo, checkpoint


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository root when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (the `bench` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    fig.clf()
    pyplot().close(fig)


def save(where: Place, name: str, result: dict[str, Any]) -> Path:
    """Write results/NAME.json (load average at the end added) and re-render the report."""
    from benchmarks.report import render

    result.setdefault("machine", {})["load_average_at_end"] = load_average()
    where.results.mkdir(parents=True, exist_ok=True)
    path = where.results / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    render(where)
    print(f"wrote {path} and {where.report}", flush=True)
    return path


def unetpp(*args: str, capture: bool = True, env: dict[str, str] | None = None) -> str:
    """Run the `unetpp` command of this environment as a user would; its stdout."""
    exe = Path(sys.executable).parent / "unetpp"
    done = subprocess.run(
        [str(exe), *args],
        check=True,
        capture_output=capture,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    return done.stdout or ""


def interleaved_ms(
    steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1, settle_s: float = 0.0
) -> dict[str, list[float]]:
    """Milliseconds of every repeat of each step, taken round-robin (the order rotating each
    round) so that the drift of a shared CPU hits all steps alike. `settle_s`: a pause before
    each timed step (lets another runtime's spinning threads go idle)."""
    names = list(steps)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(settle_s)
            start = time.perf_counter()
            steps[name]()
            times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def summary_ms(times: list[float]) -> dict[str, float]:
    """Median (the figure reported), min and max of repeated timings, in ms."""
    return {
        "median": round(statistics.median(times), 2),
        "min": round(min(times), 2),
        "max": round(max(times), 2),
        "repeats": len(times),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process(
    argv: list[str], ready_url: str, env: dict[str, str] | None = None, timeout_s: float = 600
) -> subprocess.Popen:
    """Start a server process (its output appended to runs/logs/servers.log) and wait until
    `ready_url` answers 200."""
    import httpx

    log = ROOT / "runs" / "logs" / "servers.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            argv, env={**os.environ, **(env or {})}, cwd=ROOT, stdout=out, stderr=out
        )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(ready_url).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{argv[:3]} exited with {proc.returncode}")
        time.sleep(0.2)
    stop(proc)
    raise SystemExit(f"{ready_url} not ready after {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def full_width_repository(out: Path, int8: bool = True) -> Path:
    """A model repository of the full-width UNet++ (`ModelConfig()`'s defaults) with seeded
    random weights: L1..L4 fp32 (and int8 when `int8`), no ensemble, no cascade, no accuracy.
    Latency and memory do not depend on the weights. Made once per path (kept when its
    manifest exists)."""
    out = Path(out)
    if (out / "model.json").exists():
        return out
    import torch

    from unetpp.core.datasets import data_task, synthetic_split
    from unetpp.core.preprocess import Preprocessing
    from unetpp.export.repository import ExportOptions, export_repository
    from unetpp.model.checkpoint import Checkpoint, save_checkpoint
    from unetpp.model.unetpp import ModelConfig, build_model

    torch.manual_seed(0)
    config = ModelConfig()
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = save_checkpoint(
        out.parent / f"{out.name}.pt",
        Checkpoint(
            config,
            Preprocessing(),
            build_model(config).eval().state_dict(),
            data={"source": "untrained (seeded random weights)"},
            task=data_task("synthetic"),
        ),
    )
    export_repository(
        checkpoint,
        out,
        calibration_samples=synthetic_split("train", count=4) if int8 else (),
        options=ExportOptions(int8=int8, ensemble="never", cascade_targets=(), name="unetpp"),
    )
    return out
