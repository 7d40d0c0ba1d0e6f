"""Real uvicorn servers on free local ports, serving the real tiny model repository."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import LiveServer, settings, start, stop, synthetic
from unetpp.core.imageio import encode_png


@pytest.fixture(scope="session")
def live(tiny_repository: Path) -> Iterator[LiveServer]:
    """The main server: generous batching wait so that concurrent requests batch reliably."""
    server = start(settings(tiny_repository))
    yield server
    stop(server)


@pytest.fixture(scope="session")
def image() -> np.ndarray:
    return synthetic(100, 130)


@pytest.fixture(scope="session")
def image_png(image: np.ndarray) -> bytes:
    return encode_png(image)
