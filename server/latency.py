"""Latency predictor: milliseconds per image for each graph, learnt from served traffic.

Per graph it keeps one running average per pixel count (the padded network input's H*W):
calibration at start-up seeds it, every batch the server runs updates it (the batch's time
divided by its images, so predictions follow throughput under load). A pixel count never seen
is predicted from the two nearest known ones along a line (latency grows about linearly with
pixels), through the nearer one, with a non-negative slope. Used from the event loop only.
"""

from __future__ import annotations

import bisect

ALPHA = 0.2  # weight of a new observation in the running average


class LatencyPredictor:
    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self._points: dict[str, dict[int, float]] = {}
        self._counts: dict[str, int] = {}

    def seed(self, graph: str, pixels: int, ms: float) -> None:
        """Set a measured figure (calibration), replacing what was known at that pixel count."""
        self._points.setdefault(graph, {})[pixels] = ms

    def observe(self, graph: str, pixels: int, ms: float) -> None:
        points = self._points.setdefault(graph, {})
        old = points.get(pixels)
        points[pixels] = ms if old is None else (1 - self.alpha) * old + self.alpha * ms
        self._counts[graph] = self._counts.get(graph, 0) + 1

    def observations(self, graph: str) -> int:
        return self._counts.get(graph, 0)

    def known(self, graph: str) -> dict[int, float]:
        return dict(sorted(self._points.get(graph, {}).items()))

    def predict(self, graph: str, pixels: int) -> float:
        points = self._points.get(graph)
        if not points:
            raise KeyError(f"no latency known for graph {graph}")
        if pixels in points:
            return points[pixels]
        keys = sorted(points)
        if len(keys) == 1:
            return points[keys[0]] * pixels / keys[0]
        i = min(max(bisect.bisect_left(keys, pixels), 1), len(keys) - 1)
        p1, p2 = keys[i - 1], keys[i]
        v1, v2 = points[p1], points[p2]
        slope = max((v2 - v1) / (p2 - p1), 0.0)
        anchor = p1 if abs(pixels - p1) <= abs(pixels - p2) else p2
        return max(points[anchor] + slope * (pixels - anchor), 1e-3)
