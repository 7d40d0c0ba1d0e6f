"""The routing rules on hand-made candidates (the HTTP tests check them on the live server)."""

from __future__ import annotations

import pytest
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


def test_fast_is_the_fastest_within_the_tolerance():
    # best 0.85: within 0.02 are L3 (0.83), L3.int8 (0.825 is not), L4, ensemble -> L3
    assert pick(mode="fast").graph == "L3"
    assert pick(mode="fast", tolerance=0.03).graph == "L3.int8"
    assert pick(mode="fast", tolerance=0.0).graph == "ensemble"
    assert pick(mode="fast", tolerance=1.0).graph == "L1"


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
    assert pick(candidates=blind, min_iou=0.1).missed
    # a measured graph outranks unmeasured ones
    mixed = [*blind[:3], Candidate("m", 1, "fp32", "logits", 0.1, 9.0)]
    assert pick(candidates=mixed, mode="accurate").graph == "m"


def test_the_route_reports_what_it_weighed():
    route = pick(max_latency_ms=5.0, queue_ms=1.5, precision="fp32")
    assert [c.name for c in route.candidates] == ["L1", "L2", "L3", "L4", "ensemble"]
    assert route.queue_ms == 1.5
