from __future__ import annotations

import pytest

from unetpp.server.latency import LatencyPredictor


def test_predicts_between_and_beyond_known_pixel_counts():
    p = LatencyPredictor()
    p.seed("L1", 100, 2.0)
    p.seed("L1", 300, 6.0)
    assert p.predict("L1", 100) == 2.0
    assert p.predict("L1", 200) == pytest.approx(4.0)
    assert p.predict("L1", 500) == pytest.approx(10.0)
    assert p.predict("L1", 50) == pytest.approx(1.0)
    with pytest.raises(KeyError):
        p.predict("L2", 100)


def test_one_point_scales_with_pixels_and_a_negative_slope_is_flattened():
    p = LatencyPredictor()
    p.seed("L1", 100, 2.0)
    assert p.predict("L1", 400) == pytest.approx(8.0)
    p.seed("L1", 200, 1.0)  # noisy: bigger but faster
    assert p.predict("L1", 400) == pytest.approx(1.0)


def test_learns_from_served_traffic_per_graph_and_pixel_count():
    p = LatencyPredictor(alpha=0.5)
    p.seed("L1", 100, 2.0)
    p.observe("L1", 100, 4.0)
    assert p.predict("L1", 100) == pytest.approx(3.0)
    p.observe("L1", 900, 9.0)  # a new pixel count becomes a known point
    assert p.predict("L1", 900) == 9.0
    assert p.predict("L1", 500) == pytest.approx(6.0)
    assert p.observations("L1") == 2 and p.observations("L2") == 0
    assert list(p.known("L1")) == [100, 900]
