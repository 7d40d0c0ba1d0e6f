"""The soak benchmark's bookkeeping (benchmarks/ is not run in CI; these pieces are cheap to
check): memory growth from RSS samples, answers against expectations, the report section."""

from __future__ import annotations

import json

from benchmarks.common import Place
from benchmarks.report import soak_body, soak_section
from benchmarks.soak import Kind, Record, memory, mix, per_kind


def samples(soak: list[float], overload: list[float], idle: list[float]) -> list[dict]:
    out, t = [], 0.0
    for phase, values in (("soak", soak), ("overload", overload), ("idle", idle)):
        for v in values:
            out.append({"t_s": t, "rss_mb": v, "phase": phase})
            t += 10.0
    return out


def test_memory_growth_is_measured_after_the_warm_up():
    # 60 s of warm-up climbing to 100 MB, then flat at 100, ending at 104: +4%
    soak = [50, 70, 90, 95, 98, 99] + [100.0] * 12 + [104.0] * 6
    m = memory(samples(soak, [150, 160], [101, 100]), warmup_s=60, window_s=50)
    assert m["baseline_mb"] == 100.0 and m["end_of_soak_mb"] == 104.0
    assert m["growth_pct"] == 4.0 and m["slope_mb_per_min"] > 0
    assert m["overload_peak_mb"] == 160 and m["idle_end_mb"] == 100
    assert m["idle_vs_baseline_pct"] == 0.0
    assert memory(samples([1.0], [], []), warmup_s=60, window_s=60) == {
        "note": "too few samples after warm-up"
    }


def test_the_floor_is_each_whole_minutes_lowest_reading():
    # memory follows the work in flight (a saw-tooth) while its floor creeps up 3 MB a minute;
    # the last, partial minute (one low reading) is not a minute's floor
    saw = [0.0, 50.0, 60.0, 50.0, 40.0, 30.0]
    soak = [100.0] * 6 + [f + v for f in (100.0, 103.0, 106.0) for v in saw] + [90.0]
    m = memory(samples(soak, [], []), warmup_s=60, window_s=50)
    assert m["minute_floors_mb"] == [100.0, 103.0, 106.0] and m["floor_from_s"] == 60.0
    assert m["floor_growth_pct"] == 6.0 and m["floor_slope_mb_per_min"] == 3.0
    short = memory(samples([100.0] * 12, [], []), warmup_s=60, window_s=50)
    assert short["minute_floors_mb"] == [] and short["floor_growth_pct"] is None


def test_answers_are_checked_against_what_each_request_must_get():
    good, bad = Kind("good", b"", "image/png", {}, 200), Kind("bad", b"", "image/png", {}, 400)
    record = Record()
    record.add(good, 200, 10.0, "")
    record.add(good, 503, 1.0, '{"error": "queue_full"}')
    record.add(bad, 400, 2.0, "")
    rows = {r["kind"]: r for r in per_kind(record, [good, bad], wall_s=1.0)}
    assert rows["good"]["statuses"] == {"200": 1, "503": 1}
    assert rows["good"]["requests"] == 1 and rows["good"]["p50_ms"] == 10.0  # expected only
    assert record.examples == {"good: 503": '{"error": "queue_full"}'}


def test_the_mix_covers_good_and_bad_requests():
    kinds = mix()
    assert len({k.name for k in kinds}) == len(kinds)
    assert {k.expect for k in kinds} == {200, 400, 415, 422, 504}
    assert any("tiled" in k.name for k in kinds)


def test_the_report_section(tmp_path):
    stats = {"requests": 3, "requests_per_s": 1.0, "p50_ms": 5.0, "p99_ms": 9.0}
    data = {
        "command": ".venv/bin/python -m benchmarks.soak --quick",
        "wall_s": 90.0,
        "quick": True,
        "machine": {},
        "settings": {"clients": 4, "minutes": 1, "warmup_min": 0.25, "sample_s": 2, "max_queue": 8},
        "requests": 10,
        "requests_per_s": 2.5,
        "unexpected": 1,
        "unexpected_examples": {"level=9: 500": "boom"},
        "kinds": [{"kind": "level=9", "expect": 422, "statuses": {"422": 9, "500": 1}, **stats}],
        "memory": memory(samples([100.0] * 20, [120.0], [100.0]), warmup_s=10, window_s=30),
        "overload": {
            "clients": 48,
            "seconds": 10.0,
            "statuses": {"200": 5, "503": 50},
            "served": stats,
            "refused_503": stats,
            "retry_after_s": {"1": 50},
            "unexpected": 0,
        },
        "alive_after": True,
    }
    text = soak_section(json.loads(json.dumps(data)), Place(tmp_path))
    assert "+0.00%" in text and "goal < 5.0%: met" in text
    assert "went from 100.0 to 100.0 MB over 3 minutes (+0.00%, trend +0.000 MB/min)" in text
    assert "1 of 10 differed" in text and "`level=9: 500`: boom" in text
    assert "| level=9 | 422 | 422: 9, 500: 1 | 5.0 | 9.0 |" in text
    assert "UNETPP_MEMORY_ARENA" not in text
    data["settings"]["memory_arena"] = False
    variant = soak_body(json.loads(json.dumps(data)), Place(tmp_path))
    assert "served with `UNETPP_MEMORY_ARENA=false`" in variant
    assert "## Soak" not in variant  # it goes under the variants' heading
