from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from unetpp.core.tiling import count, infer_tiled, ramp, starts


@pytest.mark.parametrize("length", [16, 128, 160, 400, 4096])
def test_windows_cover_the_axis_on_the_16_grid(length):
    origins = starts(length, 128, 32)
    size = min(128, length)
    assert origins[0] == 0 and origins[-1] + size == length
    assert all(o % 16 == 0 for o in origins)
    assert all(b - a <= 128 - 32 for a, b in itertools.pairwise(origins))
    covered = np.zeros(length, bool)
    for o in origins:
        covered[o : o + size] = True
    assert covered.all()


def test_ramp_is_one_inside_and_at_the_image_edges():
    w = ramp(128, 32, first=True, last=False)
    assert (w[:96] == 1).all() and (np.diff(w[96:]) < 0).all() and w[-1] > 0
    assert (ramp(128, 32, first=True, last=True) == 1).all()


def test_blending_reproduces_a_pointwise_function_exactly():
    """A `run` that depends on each pixel alone must come out unchanged by the blending."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 400, 272)).astype(np.float32)
    calls = []

    async def run(window: np.ndarray) -> np.ndarray:
        calls.append(window.shape)
        return (window * 3.0 + 1.0)[:1]

    out = asyncio.run(infer_tiled(x, run, tile=128, overlap=32, in_flight=5))
    assert out.shape == (1, 400, 272)
    np.testing.assert_allclose(out[0], x[0] * 3.0 + 1.0, rtol=1e-5, atol=1e-5)
    assert len(calls) == count(400, 272, 128, 32) and set(calls) == {(2, 128, 128)}
