from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import one_torch_thread


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    with one_torch_thread():
        yield
