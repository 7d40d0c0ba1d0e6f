"""The routing rules on hand-made candidates (the HTTP tests check them on the live server)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unetpp.core.errors import BadParameter
from unetpp.core.routing import Candidate, Choice, choose

# IoU rises with cost; L4 barely beats L3, the ensemble is best; int8 L3 is cheap and close.
GRAPHS = [
    Candidate("L1", 1, "fp32", "logits", 0.60, 1.0),
    Candidate("L2", 2, "fp32", "logits", 0.78, 2.0),
    Candidate("L3", 3, "fp32", "logits", 0.83, 5.0),
    Candidate("L4", 4, "fp32", "logits", 0.84, 12.0),
    Candidate("ensemble", 4, "fp32", "ensemble", 0.85, 13.0),
    Candidate("L3.int8", 3, "int8", "logits", 0.825, 3.0),
]


def pick(candidates=GRAPHS, queue_ms: float = 0.0, tolerance: float = 0.02, **choice):
    return choose(
        candidates,
        Choice(**choice),
        default_mode="balanced",
        fast_tolerance=tolerance,
        queue_ms=queue_ms,
    )


@pytest.mark.parametrize(
    ("level", "precision", "graph"),
    [(1, "auto", "L1"), (3, "auto", "L3"), (3, "int8", "L3.int8"), (4, "auto", "L4")],
)
def test_level_picks_the_plain_head_fp32_first(level, precision, graph):
    route = pick(level=level, precision=precision)
    assert (route.graph, route.rule, route.missed) == (graph, "level", False)


def test_precision_filters_candidates():
    assert {c.name for c in pick(mode="fast", precision="int8").candidates} == {"L3.int8"}
    assert "L3.int8" not in {c.name for c in pick(mode="fast", precision="fp32").candidates}
    with pytest.raises(BadParameter, match="no int8 graph"):
        pick(precision="int8", candidates=GRAPHS[:5])
    with pytest.raises(BadParameter, match="level 2"):
        pick(level=2, precision="int8")


def test_accurate_is_the_best_measured():
    assert pick(mode="accurate").graph == "ensemble"
    assert pick(mode="accurate", precision="int8").graph == "L3.int8"


def test_fast_is_the_fastest_within_the_tolerance_of_balanced():
    # balanced picks L3.int8 (0.825, 3 ms); fast looks only at graphs no slower and no more
    # accurate than that: L3.int8 itself, L2 (0.78, 2 ms) and L1 (0.60, 1 ms)
    assert pick(mode="fast").graph == "L3.int8"
    assert pick(mode="fast", tolerance=0.05).graph == "L2"
    assert pick(mode="fast", tolerance=0.0).graph == "L3.int8"
    assert pick(mode="fast", tolerance=1.0).graph == "L1"
    # the manifest: the deep int8 graph was "fast" and slower than "balanced"
    seen = [
        Candidate("L2.int8", 2, "int8", "logits", 0.70, 99.0),
        Candidate("L4.int8", 4, "int8", "logits", 0.72, 258.0),
        Candidate("L4", 4, "fp32", "logits", 0.725, 400.0),
    ]
    modes = {m: pick(candidates=seen, mode=m).graph for m in ("fast", "balanced", "accurate")}
    assert modes == {"fast": "L2.int8", "balanced": "L4.int8", "accurate": "L4"}


def test_balanced_is_the_knee_and_the_default():
    # scaled over the front: L1 (0, 0), L2 (.08, .72), L3.int8 (.17, .90), L3 (.33, .92) ...
    route = pick()
    assert (route.graph, route.rule) == ("L3.int8", "mode")
    assert "mode=balanced" in route.reason
    fp32 = pick(mode="balanced", precision="fp32")
    assert fp32.graph == "L2"  # (.08, .72) beats L3 (.33, .92): 0.64 > 0.59
    # a dominated graph is never the knee, whatever its numbers
    dominated = [*GRAPHS, Candidate("slow", 2, "fp32", "logits", 0.78, 20.0)]
    assert pick(candidates=dominated).graph == "L3.int8"


def test_latency_budget_takes_the_most_accurate_that_fits():
    assert pick(max_latency_ms=5.0).graph == "L3"
    assert pick(max_latency_ms=4.99).graph == "L3.int8"
    assert pick(max_latency_ms=100.0).graph == "ensemble"
    # the queue wait counts: 3 ms of queue leave 2 ms for inference
    assert pick(max_latency_ms=5.0, queue_ms=3.0).graph == "L2"


def test_latency_budget_no_graph_meets_gives_the_fastest_and_says_so():
    route = pick(max_latency_ms=0.5)
    assert (route.graph, route.missed) == ("L1", True)
    assert "budget missed" in route.reason
    assert pick(max_latency_ms=5.0, queue_ms=10.0).missed


def test_min_iou_takes_the_fastest_reaching_it():
    assert pick(min_iou=0.8).graph == "L3.int8"
    assert pick(min_iou=0.8, precision="fp32").graph == "L3"
    assert pick(min_iou=0.0).graph == "L1"
    route = pick(min_iou=0.9)
    assert (route.graph, route.missed) == ("ensemble", True)
    assert "floor missed" in route.reason


def test_one_rule_at_a_time():
    with pytest.raises(BadParameter, match="at most one"):
        pick(level=2, mode="fast")
    with pytest.raises(BadParameter, match="at most one"):
        pick(max_latency_ms=5.0, min_iou=0.5)


def test_without_measured_accuracy_deeper_counts_as_better():
    blind = [
        Candidate(c.name, c.level, c.precision, c.output, None, c.predicted_ms) for c in GRAPHS
    ]
    assert pick(candidates=blind, mode="accurate").graph == "L4"
    assert pick(candidates=blind, mode="fast").graph == "L1"
    assert pick(candidates=blind, mode="balanced").graph in {"L1", "L2", "L3", "L3.int8", "L4"}
    assert pick(candidates=blind, min_iou=0.1).missed
    # a measured graph outranks unmeasured ones
    mixed = [*blind[:3], Candidate("m", 1, "fp32", "logits", 0.1, 9.0)]
    assert pick(candidates=mixed, mode="accurate").graph == "m"


def test_the_route_reports_what_it_weighed():
    route = pick(max_latency_ms=5.0, queue_ms=1.5, precision="fp32")
    assert [c.name for c in route.candidates] == ["L1", "L2", "L3", "L4", "ensemble"]
    assert route.queue_ms == 1.5


# Any candidate set: names unique, IoU measured or not, latencies positive (ties allowed).
candidate_sets = st.lists(
    st.builds(
        lambda level, precision, iou, ms: (level, precision, iou, ms),
        st.integers(1, 4),
        st.sampled_from(["fp32", "int8"]),
        st.one_of(st.none(), st.floats(0.0, 1.0)),
        st.one_of(st.floats(0.01, 1000.0), st.sampled_from([1.0, 2.0, 5.0])),
    ),
    min_size=1,
    max_size=9,
).map(
    lambda rows: [
        Candidate(f"g{n}", level, precision, "logits", iou, ms)
        for n, (level, precision, iou, ms) in enumerate(rows)
    ]
)


@settings(max_examples=400)
@given(candidate_sets, st.floats(0.0, 1.0), st.sampled_from(["auto", "fp32", "int8"]))
def test_modes_keep_their_order(candidates, tolerance, precision):
    """fast is never predicted slower than balanced, nor balanced than accurate, and accuracy
    (measured IoU; the level where nothing is measured) runs the other way, for any set."""
    if not any(precision in ("auto", c.precision) for c in candidates):
        return
    by_name = {c.name: c for c in candidates}
    picks = [
        by_name[pick(candidates, tolerance=tolerance, mode=m, precision=precision).graph]
        for m in ("fast", "balanced", "accurate")
    ]
    measured = any(c.iou is not None for c in route_pool(candidates, precision))

    def accuracy(c: Candidate) -> tuple[float, float]:
        if measured:
            return (1.0, c.iou) if c.iou is not None else (0.0, c.level)
        return (0.0, c.level)

    fast, balanced, accurate = picks
    assert fast.predicted_ms <= balanced.predicted_ms <= accurate.predicted_ms
    assert accuracy(fast) <= accuracy(balanced) <= accuracy(accurate)
    if measured and balanced.iou is not None:
        assert fast.iou is not None and fast.iou >= balanced.iou - tolerance - 1e-9


def route_pool(candidates, precision):
    return [c for c in candidates if precision in ("auto", c.precision)]


CASCADES = [
    Candidate(f"adaptive@{t:g}", 4, "fp32", "adaptive", 0.84 - t, ms, target=t)
    for t, ms in ((0.002, 6.0), (0.005, 4.5), (0.01, 4.0))
]


def test_adaptive_takes_the_target_asked_for_or_the_middle_one():
    pool = [*GRAPHS, *CASCADES]
    assert pick(candidates=pool, mode="adaptive").graph == "adaptive@0.005"
    assert pick(candidates=pool, mode="adaptive", target=0.002).graph == "adaptive@0.002"
    with pytest.raises(BadParameter, match=r"0\.002, 0\.005, 0\.01"):
        pick(candidates=pool, mode="adaptive", target=0.003)
    with pytest.raises(BadParameter, match="no calibrated cascade"):
        pick(mode="adaptive")
    with pytest.raises(BadParameter, match="mode=adaptive only"):
        pick(candidates=pool, mode="fast", target=0.002)


def test_adaptive_is_weighed_like_any_other_candidate():
    pool = [*GRAPHS, *CASCADES]
    # adaptive@0.005 (0.835, 4.5 ms) reaches 0.832 faster than L4 (12 ms); adaptive@0.01 does not
    assert pick(candidates=pool, min_iou=0.832, precision="fp32").graph == "adaptive@0.005"
    assert pick(candidates=pool, max_latency_ms=6.0, precision="fp32").graph == "adaptive@0.002"
    # but never answers a request for a level
    assert pick(candidates=pool, level=4).graph == "L4"
