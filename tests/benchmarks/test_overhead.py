"""benchmarks/overhead.py's arithmetic (pure logic) and its report section."""

from __future__ import annotations

import json

import pytest

from benchmarks.common import Place
from benchmarks.overhead import rest_of_total, server_timing, summary
from benchmarks.report import overhead_section


def sample(e2e: float, inference: float, spans: dict[str, float] | None = None) -> dict:
    return {
        "e2e_ms": e2e,
        "inference_ms": inference,
        "added_ms": e2e - inference,
        "graph": "L1",
        "spans": spans or {},
        "load_1min": 1.5,
    }


def test_server_timing_is_read_by_name():
    header = "decode;dur=1.20, queue;dur=0.05, infer;dur=30.10, render;dur=0.30, total;dur=32.00"
    spans = server_timing(header)
    assert spans == {"decode": 1.2, "queue": 0.05, "infer": 30.1, "render": 0.3, "total": 32.0}
    assert rest_of_total(spans) == pytest.approx(0.35)
    assert server_timing("") == {}


def test_summary_takes_medians_of_each_request_and_its_spans():
    spans = [
        {"decode": 1.0, "queue": 0.1, "infer": 30.0, "render": 0.3, "total": 31.9},
        {"decode": 1.2, "queue": 0.1, "infer": 50.0, "render": 0.4, "total": 52.2},
        {"decode": 1.1, "queue": 0.3, "infer": 40.0, "render": 0.2, "total": 42.0},
    ]
    runs = [
        sample(34.0, 30.0, spans[0]),
        sample(55.0, 50.0, spans[1]),
        sample(43.0, 40.0, spans[2]),
    ]
    row = summary("after", "abc1234", "level=1 fp32", runs)
    assert row["added_ms"] == 4.0  # medians of each request's difference: 4, 5, 3
    assert row["e2e_ms"] == 43.0 and row["inference_ms"] == 40.0
    assert row["spans_ms"]["decode"] == 1.1
    assert row["rest_of_total_ms"] == pytest.approx(0.5)  # 0.5, 0.5, 0.4
    assert row["outside_handler_ms"] == pytest.approx(2.1)  # end to end - total: 2.1, 2.8, 1.0
    before = summary("before", "def5678", "level=1 fp32", [sample(40.0, 30.0)] * 3)
    assert before["added_ms"] == 10.0 and "spans_ms" not in before


def test_the_report_section(tmp_path):
    spans = {"decode": 1.0, "queue": 0.1, "infer": 30.0, "render": 0.3, "total": 31.9}
    rows = [
        summary("before", "def5678", "level=1 fp32", [sample(40.0, 30.0)] * 3),
        summary("after", "abc1234", "level=1 fp32", [sample(33.0, 30.0, spans)] * 3),
    ]
    data = {
        "study": "overhead",
        "command": ".venv/bin/python -m benchmarks.overhead --models m",
        "quick": False,
        "machine": {"load_average_at_start": [1.0, 1.0, 1.0], "load_average_at_end": [1.0] * 3},
        "wall_s": 60.0,
        "models": "m",
        "image": "256x256 crop",
        "settle_s": 0.05,
        "rows": rows,
    }
    text = overhead_section(json.loads(json.dumps(data)), Place(tmp_path))
    assert "level=1 fp32: 10.0 -> 3.0 ms" in text
    assert "| **3.00** (3.0..3.0) | 3.00 | 1.5..1.5 |" in text
    assert "| level=1 fp32 | after (`abc1234`) | 1.00 | 0.10 | 0.30 | 0.50 | 1.10 |" in text
