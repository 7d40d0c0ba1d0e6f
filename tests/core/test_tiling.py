from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from unetpp.core.tiling import (
    RATE_SLACK,
    TileRun,
    choose_tile,
    count,
    infer_tiled,
    infer_tiled_sync,
    ramp,
    starts,
)


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


# L4 fp32 on this project's CPU (benchmarks/REPORT.md, levels): ms per batch
L4_RUNS = [
    TileRun(256, 1, 141.3),
    TileRun(256, 8, 3716.0),
    TileRun(512, 1, 1288.8),
    TileRun(512, 4, 4774.0),
    TileRun(1024, 1, 9800.0),
]


def test_the_tile_minimises_ms_per_new_output_pixel_given_the_overlap():
    # per new pixel with overlap 64: 256/1 3.83 us, 256/8 12.6, 512/1 6.42, 512/4 5.95, 1024/1 10.6
    assert choose_tile(L4_RUNS, overlap=64, bytes_per_pixel=2750, room=4 << 30) == L4_RUNS[0]
    # without overlap 256 is still the fastest per pixel; with 192 px of overlap it cannot be
    # (a side must be over twice the overlap): 512 at batch 4 is the fastest that can (11.7 us),
    # and 512 at batch 1 (12.6 us, within the slack) holds a quarter of its activations
    assert choose_tile(L4_RUNS, overlap=0, bytes_per_pixel=2750, room=4 << 30) == L4_RUNS[0]
    assert choose_tile(L4_RUNS, overlap=192, bytes_per_pixel=2750, room=4 << 30) == L4_RUNS[2]
    assert choose_tile(L4_RUNS[3:], overlap=192, bytes_per_pixel=2750, room=4 << 30) == L4_RUNS[3]


def test_a_tile_whose_activations_pass_the_room_is_not_chosen():
    runs = [TileRun(256, 1, 100.0), TileRun(1024, 1, 800.0)]  # 1024 is the faster per pixel
    assert choose_tile(runs, overlap=64, bytes_per_pixel=1000, room=1024 * 1024 * 1000) == runs[1]
    assert choose_tile(runs, overlap=64, bytes_per_pixel=1000, room=1024 * 1024 * 999) == runs[0]
    assert choose_tile(runs, overlap=64, bytes_per_pixel=1000, room=256 * 256 * 999) is None
    assert choose_tile([], overlap=64, bytes_per_pixel=1000, room=1 << 40) is None


def test_a_runs_own_measured_bytes_decide_whether_it_fits():
    """A batch run measured to hold less than the graph's largest bytes per pixel suggests
    (that figure is the maximum over every run) still qualifies, and one measured to hold
    more does not."""
    batched = TileRun(512, 3, 300.0, bytes=600 << 20)  # 763 bytes per pixel measured
    alone = TileRun(512, 1, 200.0)
    room = 1 << 30  # at the graph's 1500 bytes per pixel, 3 x 512 x 512 would need 1.1 GiB
    assert choose_tile([batched, alone], overlap=64, bytes_per_pixel=1500, room=room) == batched
    heavy = TileRun(512, 3, 300.0, bytes=(1 << 30) + 1)
    assert choose_tile([heavy, alone], overlap=64, bytes_per_pixel=1, room=room) == alone


def test_within_the_slack_of_the_best_rate_the_smallest_footprint_wins():
    best = TileRun(512, 8, 8 * 400.0)
    near = TileRun(512, 1, 400.0 * (RATE_SLACK - 0.01))  # as fast within the slack, 1/8 the bytes
    far = TileRun(512, 1, 400.0 * (RATE_SLACK + 0.01))
    assert choose_tile([best, near], overlap=64, bytes_per_pixel=1, room=1 << 40) == near
    assert choose_tile([best, far], overlap=64, bytes_per_pixel=1, room=1 << 40) == best


runs_strategy = st.lists(
    st.builds(
        TileRun,
        st.sampled_from([128, 256, 384, 512, 768, 1024]),
        st.integers(1, 8),
        st.floats(0.1, 1e5, allow_nan=False),
        st.integers(0, 1 << 34),
    ),
    max_size=12,
)


@given(runs_strategy, st.sampled_from([0, 32, 64]), st.integers(1, 4000), st.integers(1, 1 << 34))
def test_the_choice_is_a_pure_function_of_its_measurements(runs, overlap, per_pixel, room):
    """Deterministic and independent of the order the runs were measured in; what it picks
    fits the room and is within the slack of every run that fits."""
    chosen = choose_tile(runs, overlap=overlap, bytes_per_pixel=per_pixel, room=room)
    assert chosen == choose_tile(runs[::-1], overlap=overlap, bytes_per_pixel=per_pixel, room=room)
    fits = [r for r in runs if r.side > 2 * overlap and r.activations(per_pixel) <= room]
    assert (chosen is None) == (not fits)
    if chosen is not None:
        assert chosen in fits
        best = min(r.ms_per_pixel(overlap) for r in fits)
        assert chosen.ms_per_pixel(overlap) <= RATE_SLACK * best
