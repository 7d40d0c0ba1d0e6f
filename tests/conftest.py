from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    TINY_WIDTHS,
    LiveServer,
    build_models_folder,
    one_torch_thread,
    settings,
    start,
    stop,
    tiny_samples,
    wait_loaded,
)


def pytest_configure(config: pytest.Config) -> None:
    """Property-based tests (hypothesis, schemathesis) are bounded and reproducible: the same
    examples on every run, no example database written, no wall-clock deadline per example (a
    shared 2-core machine); each test sets its own max_examples."""
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "unetpp",
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
            HealthCheck.filter_too_much,
            HealthCheck.data_too_large,
        ],
    )
    settings.load_profile("unetpp")


# Blocks `import torch` (and anything under it) in a child interpreter.
_NO_TORCH = textwrap.dedent(
    """
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, _Block())
    """
)


@pytest.fixture
def run_without_torch(tmp_path: Path):
    """Run Python code in a child interpreter where torch cannot be imported."""
    site = tmp_path / "no_torch_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_TORCH)

    def run(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(site)}
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


def _tiny_checkpoint(out: Path, source: str, loss) -> Path:
    """A 1-channel UNet++ with widths 4..64 and deep supervision (heads 1-4) for `source`'s
    task, trained for 30 steps with `loss(head outputs, target)` so its outputs mean something."""
    import numpy as np
    import torch

    from unetpp.core.datasets import data_task
    from unetpp.core.preprocess import Preprocessing
    from unetpp.model.checkpoint import Checkpoint, save_checkpoint
    from unetpp.model.unetpp import ModelConfig, build_model

    torch.manual_seed(0)
    task = data_task(source)
    prep, cfg = Preprocessing(), ModelConfig(num_classes=task.channels, widths=TINY_WIDTHS)
    model = build_model(cfg).train()
    train = tiny_samples("train", classes=task.multiclass)
    x = torch.from_numpy(np.stack([prep(s.image[:64, :96]) for s in train]))
    y = torch.from_numpy(np.stack([s.mask[None, :64, :96] for s in train])).float()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with one_torch_thread():
        for _ in range(30):
            total = loss(model(x), y)
            opt.zero_grad()
            total.backward()
            opt.step()
    ckpt = Checkpoint(cfg, prep, model.state_dict(), data={"source": source}, task=task)
    return save_checkpoint(out / "tiny.pt", ckpt)


def _tiny_repository(checkpoint: Path, out: Path, source: str, name: str) -> Path:
    """The checkpoint's model repository: model.json, L1..L4.onnx (fp32; L4.onnx also carries
    the "ensemble" output), accuracy measured on 4 val images of `source`; no int8, no bf16."""
    from unetpp.export.repository import ExportOptions, export_repository

    with one_torch_thread():
        export_repository(
            checkpoint,
            out,
            val_samples=tiny_samples("val", classes=source == "synthetic-classes"),
            val_data=f"{source}:val",
            options=ExportOptions(int8=False, bf16=False, ensemble="always", name=name),
        )
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binary tiny model, trained on synthetic nuclei with BCE on every head."""
    from torch.nn.functional import binary_cross_entropy_with_logits as bce

    def loss(heads, y):
        return sum(bce(h, y) for h in heads)

    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny"), "synthetic", loss)


@pytest.fixture(scope="session")
def tiny_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_repository") / "models"
    return _tiny_repository(tiny_checkpoint, out, "synthetic", "unetpp")


@pytest.fixture(scope="session")
def tiny_bf16_repository(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The binary tiny model exported with bf16 variants (OpenVINO runs L1..L4.onnx in bf16,
    each measured like an int8 variant), no int8, no ensemble, no cascade."""
    pytest.importorskip("openvino")
    from unetpp.export.repository import ExportOptions, export_repository

    out = tmp_path_factory.mktemp("tiny_bf16_repository") / "models"
    options = ExportOptions(int8=False, bf16=True, ensemble="never", cascade_targets=())
    with one_torch_thread():
        export_repository(
            tiny_checkpoint,
            out,
            val_samples=tiny_samples("val"),
            val_data="synthetic:val",
            options=options,
        )
    return out


@pytest.fixture(scope="session")
def tiny_classes_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The multi-class tiny model (background, round, elongated), trained on
    "synthetic-classes" with the training's own loss (cross-entropy + Dice on every head)."""
    from unetpp.model.losses import deep_supervision_loss

    def loss(heads, y):
        return deep_supervision_loss(heads, y)[0]

    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny_classes"), "synthetic-classes", loss)


@pytest.fixture(scope="session")
def tiny_classes_repository(
    tiny_classes_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("tiny_classes_repository") / "models"
    return _tiny_repository(tiny_classes_checkpoint, out, "synthetic-classes", "cells")


@pytest.fixture(scope="module")
def models_folder(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of three models: nuclei (every graph), cells (L1 and L2), broken (a corrupt L2)."""
    return build_models_folder(tiny_repository, tmp_path_factory.mktemp("repository"))


@pytest.fixture(scope="module")
def several_models(models_folder: Path) -> Iterator[LiveServer]:
    """A real server of `models_folder`, admin open, once every model is loaded or failed."""
    server = start(settings(models_folder, admin_open=True), ready=False)
    wait_loaded(server)
    yield server
    stop(server)
