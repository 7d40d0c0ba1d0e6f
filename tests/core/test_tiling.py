from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from unetpp.core.tiling import count, infer_tiled, infer_tiled_sync, ramp, starts


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


def test_the_synchronous_twin_blends_the_same_windows_the_same_way():
    """`infer_tiled_sync` (unetpp predict) gives the async path's logits bit for bit."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 320, 208)).astype(np.float32)
    shift = rng.standard_normal((320, 208)).astype(np.float32)
    offsets = {}

    def local(window: np.ndarray) -> np.ndarray:
        # depends on where the window is, so that a misplaced window would show
        key = window.__array_interface__["data"][0]
        offsets.setdefault(key, float(len(offsets)))
        return np.stack([window[0] ** 2, window[0] + offsets[key]])

    async def run(window: np.ndarray) -> np.ndarray:
        return local(window)

    sync = infer_tiled_sync(x + shift, local, tile=128, overlap=32)
    offsets.clear()
    tiled = asyncio.run(infer_tiled(x + shift, run, tile=128, overlap=32, in_flight=1))
    assert sync.shape == (2, 320, 208)
    np.testing.assert_array_equal(sync, tiled)
