from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unetpp.core.errors import InvalidInput
from unetpp.core.preprocess import (
    Preprocessing,
    crop_to,
    pad_to_multiple,
    percentiles,
    to_channels,
)


def test_pad_then_crop_is_identity_and_reaches_a_multiple() -> None:
    arr = np.arange(2 * 3 * 37 * 50, dtype=np.float32).reshape(2, 3, 37, 50)
    padded, size = pad_to_multiple(arr)
    assert padded.shape == (2, 3, 48, 64) and size == (37, 50)
    np.testing.assert_array_equal(crop_to(padded, size), arr)
    same, _ = pad_to_multiple(arr[..., :32, :48])
    assert same.shape[-2:] == (32, 48)


def test_tiny_images_pad_too() -> None:
    padded, _ = pad_to_multiple(np.ones((1, 3, 5), np.float32))
    assert padded.shape == (1, 16, 16) and np.all(padded == 1)


def test_normalisation_is_bit_depth_independent() -> None:
    rng = np.random.default_rng(0)
    img8 = rng.integers(0, 256, (40, 40)).astype(np.uint8)
    img16 = img8.astype(np.uint16) * 257
    prep = Preprocessing()
    a, b = prep(img8), prep(img16)
    assert a.shape == (1, 40, 40) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert np.percentile(a, 1) == pytest.approx(0, abs=1e-6)
    assert np.percentile(a, 99.8) == pytest.approx(1, abs=1e-6)


PERCENT = st.one_of(
    st.sampled_from([0.0, 0.5, 1.0, 50.0, 99.8, 100.0]),
    st.floats(0, 100, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(
    shape=st.tuples(st.sampled_from([1, 3]), st.integers(1, 40), st.integers(1, 40)),
    top=st.sampled_from([1, 3, 255, 4095, 65535]),
    offset=st.sampled_from([0.0, 0.0, 0.5, -1.0]),  # not 16-bit integers: numpy's own way
    q=st.tuples(PERCENT, PERCENT),
    seed=st.integers(0, 2**32 - 1),
)
def test_percentiles_are_numpys_to_the_bit(
    shape: tuple[int, int, int], top: int, offset: float, q: tuple[float, float], seed: int
) -> None:
    """8/16-bit images take the histogram's way, other values np.percentile's: the same
    float64 numbers either way (ties, the first and last value, a single pixel included)."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, top + 1, shape).astype(np.float32) + np.float32(offset)
    if seed % 3 == 0:  # long runs of equal values
        values = np.round(values / max(top // 3, 1)).astype(np.float32)
    assert percentiles(values, q) == np.percentile(values, q).tolist()


def test_constant_image_does_not_divide_by_zero() -> None:
    out = Preprocessing()(np.full((16, 16), 7, np.uint8))
    assert np.all(np.isfinite(out)) and np.all(out == 0)


def test_channel_conversions() -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 100
    rgba[..., 3] = 255
    grey = to_channels(rgba, 1)
    assert grey.shape == (1, 4, 5)
    np.testing.assert_allclose(grey, 29.9, rtol=1e-5)
    assert to_channels(np.ones((4, 5)), 3).shape == (3, 4, 5)
    assert to_channels(np.ones((4, 5, 2)), 1).shape == (1, 4, 5)  # grey + alpha
    with pytest.raises(InvalidInput, match="HxW or HxWxC"):
        to_channels(np.ones((2, 4, 5, 3)), 1)


def test_recipe_round_trips_and_validates() -> None:
    prep = Preprocessing(channels=3, p_low=0.5, p_high=99.5)
    assert Preprocessing.from_dict(prep.to_dict()) == prep
    with pytest.raises(InvalidInput):
        Preprocessing(channels=2)
    with pytest.raises(InvalidInput):
        Preprocessing(p_low=50, p_high=10)
    with pytest.raises(InvalidInput, match="unknown preprocessing kind"):
        Preprocessing.from_dict({"kind": "zscore"})


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from([np.uint8, np.uint16]),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
)
def test_integer_images_normalize_to_the_bit_as_their_float_copies(
    dtype: type, channels: int, seed: int
) -> None:
    """A grey 8/16-bit image's percentiles come from its integers: the network input is the
    one its float32 copy gives, bit for bit."""
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(1, 40, 2))
    image = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
    recipe = Preprocessing(channels=channels)
    np.testing.assert_array_equal(recipe(image), recipe(image.astype(np.float32)))
