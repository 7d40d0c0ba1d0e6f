"""The benchmark report renderer and the load generator (benchmarks/ is not run in CI; these
pieces are cheap to check)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks import loadgen
from benchmarks.common import Place
from benchmarks.report import render


def test_stats_percentiles_and_rate():
    s = loadgen.stats([float(v) for v in range(1, 101)], wall_s=4.0)
    assert s["requests"] == 100
    assert s["requests_per_s"] == 25.0
    assert (s["p50_ms"], s["p95_ms"], s["p99_ms"]) == (50.5, 95.0, 99.0)
    assert s["max_ms"] == 100.0
    assert loadgen.stats([], 1.0) == {"requests": 0, "requests_per_s": 0.0}


class _Slow(BaseHTTPRequestHandler):
    delay_s = 0.0

    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"]))
        time.sleep(self.delay_s)
        status = 200 if self.path.startswith("/ok") else 503
        self.send_response(status)
        self.send_header("x-graph", "L2")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_closed_loop_stops_at_the_request_count(http_server):
    cell = loadgen.run(
        f"{http_server}/ok", content=b"x", content_type="image/png", concurrency=4,
        max_requests=10, max_seconds=30, count_header="x-graph",
    )  # fmt: skip
    assert cell["requests"] == 10 and cell["statuses"] == {"200": 10}
    assert cell["served_by"] == {"L2": 10}


def test_closed_loop_stops_at_the_time_bound_and_counts_errors(http_server):
    _Slow.delay_s = 0.2
    try:
        cell = loadgen.run(
            f"{http_server}/busy", content=b"x", content_type="image/png", concurrency=2,
            max_requests=1000, max_seconds=0.5,
        )  # fmt: skip
    finally:
        _Slow.delay_s = 0.0
    # closed loop: each client has at most one request in flight; none started after 0.5 s
    assert 2 <= sum(cell["statuses"].values()) <= 6
    assert cell["requests"] == 0 and set(cell["statuses"]) == {"503"}
    assert cell["wall_s"] < 1.5


def test_only_loopback_is_loaded():
    with pytest.raises(ValueError, match="loopback"):
        loadgen.run(
            "http://example.com/", content=b"", content_type="image/png", concurrency=1,
            max_requests=1, max_seconds=1,
        )  # fmt: skip


def test_report_lists_every_results_file_and_says_there_was_no_gpu(tmp_path):
    where = Place(tmp_path / "bench-quick")
    where.results.mkdir(parents=True)
    scores = {k: {"iou": 0.9, "dice": 0.95} for k in ("L1", "L2", "L3", "L4", "ensemble")}
    (where.results / "training_hela_x.json").write_text(
        json.dumps(
            {
                "checkpoint": "runs/x/best.pt",
                "command": "unetpp train --data hela --out runs/x --crop 128",
                "wall_s": 90.0,
                "steps": 7,
                "test": scores,
                "synthetic_test": {**scores, "L4": {"iou": 0.6, "dice": 0.75}},
            }
        )
    )
    (where.results / "future_study.json").write_text(json.dumps({"anything": 1}))
    text = render(where)
    assert where.report.read_text() == text
    assert "### `results/training_hela_x.json`" in text
    assert (
        "| HeLa test | `unetpp train --data hela --out runs/x --crop 128` | 7 | 1.5 | 0.9000 / 0.9500 |"
        in text
    )
    assert "| synthetic test | (the same HeLa model) |  |  | 0.9000 / 0.9500 |" in text
    assert "0.6000 / 0.7500 | 0.9000 / 0.9500 |" in text  # its L4, then its ensemble
    assert "- [`results/future_study.json`](results/future_study.json)" in text  # no section
    assert "## 5. GPU" in text and "can_start_another=false" in text
