"""Which graph serves a request: explicit level, a mode, a latency budget or an accuracy floor.

Pure functions over `Candidate`s (a graph's, or the adaptive cascade's, measured IoU and its
predicted latency for this request's pixels); the service fills them in. docs/routing.md shows
every rule with examples.

- precision: `fp32`, `int8` or `bf16` keeps only candidates of that precision; `auto` keeps all.
- `graph=name`: that graph (a /v2 model version names one).
- `level=k`: the graph of pruning depth k; among several, the plain head (output "logits")
  before the ensemble, fp32 before int8 and bf16.
- The modes are chained, so that they keep their order by construction (fast is never
  predicted slower than balanced, nor balanced than accurate, and accuracy runs the other way):
  - `mode=accurate`: the best accuracy (ties: the faster).
  - `mode=balanced`: among the candidates no slower than accurate's pick, the knee of their
    accuracy/latency front: on the Pareto-optimal ones, with latency and IoU each scaled to
    0..1 across them, the one with the largest IoU - latency (ties: the more accurate).
  - `mode=fast`: among the candidates no slower and no more accurate than balanced's pick,
    the fastest whose IoU is within `fast_tolerance` of balanced's (ties: the more accurate).
    balanced's pick is always one of them, so the rule never comes up empty.
  - `mode=adaptive`: the cascade calibrated for `target` (the IoU it may lose against the
    deepest graph; default: the middle of the calibrated targets).
- `max_latency_ms=N`: the most accurate candidate whose predicted latency plus the current
  queue wait fits in N; if none fits, the fastest, and the route says the budget was missed.
- `min_iou=x`: the fastest candidate whose measured IoU reaches x; if none does, the most
  accurate, and the route says the floor was missed.
Adaptive candidates (output "adaptive") take part in every rule but `graph` and `level`.
Candidates without a measured accuracy count as less accurate than any measured one; if none
is measured, the deeper level counts as the more accurate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from unetpp.core.errors import BadParameter

Mode = Literal["fast", "balanced", "accurate", "adaptive"]
Precision = Literal["auto", "fp32", "int8", "bf16"]


@dataclass(frozen=True)
class Candidate:
    name: str
    level: int
    precision: str
    output: str
    iou: float | None
    predicted_ms: float  # inference alone, for this request's pixels
    target: float | None = None  # adaptive only: the IoU loss its thresholds were calibrated for


@dataclass(frozen=True)
class Choice:
    """What the client asked for; at most one of graph, level, mode, max_latency_ms, min_iou."""

    level: int | None = None
    mode: Mode | None = None
    max_latency_ms: float | None = None
    min_iou: float | None = None
    precision: Precision = "auto"
    graph: str | None = None
    target: float | None = None  # mode=adaptive only


@dataclass(frozen=True)
class Route:
    graph: str
    rule: str  # "graph", "level", "mode", "max_latency_ms", "min_iou"
    reason: str
    missed: bool = False  # the budget or the accuracy floor could not be met
    candidates: tuple[Candidate, ...] = ()  # what was weighed (after the precision filter)
    queue_ms: float = 0.0  # the predicted queue wait that was added to each candidate


def _score(candidate: Candidate, measured: bool) -> tuple[float, float]:
    """Sort key for accuracy: measured IoU first, the level as a stand-in otherwise."""
    if measured:
        return (1.0, candidate.iou) if candidate.iou is not None else (0.0, candidate.level)
    return (0.0, candidate.level)


def _most_accurate(cs: Sequence[Candidate], measured: bool) -> Candidate:
    """Ties: the faster."""
    return max(cs, key=lambda c: (_score(c, measured), -c.predicted_ms))


def _fastest(cs: Sequence[Candidate], measured: bool) -> Candidate:
    """Ties: the more accurate."""
    return min(cs, key=lambda c: (c.predicted_ms, [-x for x in _score(c, measured)]))


def _describe(c: Candidate) -> str:
    iou = f"IoU {c.iou:.3f}" if c.iou is not None else "IoU unmeasured"
    return f"{c.name} ({iou}, {c.predicted_ms:.1f} ms)"


def knee(candidates: Sequence[Candidate], measured: bool) -> Candidate:
    front = [
        c
        for c in candidates
        if not any(
            o.predicted_ms <= c.predicted_ms
            and _score(o, measured) >= _score(c, measured)
            and (o.predicted_ms < c.predicted_ms or _score(o, measured) > _score(c, measured))
            for o in candidates
        )
    ]

    def value(c: Candidate) -> float:  # an unmeasured graph among measured ones counts as 0
        return (c.iou or 0.0) if measured else c.level

    lat = [c.predicted_ms for c in front]
    acc = [value(c) for c in front]
    lat_span = (max(lat) - min(lat)) or 1.0
    acc_span = (max(acc) - min(acc)) or 1.0

    def gain(c: Candidate) -> tuple[float, float]:
        a = (value(c) - min(acc)) / acc_span
        return a - (c.predicted_ms - min(lat)) / lat_span, a

    return max(front, key=gain)


def choose(
    candidates: Sequence[Candidate],
    choice: Choice,
    *,
    default_mode: Mode,
    fast_tolerance: float,
    queue_ms: float = 0.0,
) -> Route:
    pool = [c for c in candidates if choice.precision in ("auto", c.precision)]
    route = _choose(pool, choice, default_mode, fast_tolerance, queue_ms)
    return replace(route, candidates=tuple(pool), queue_ms=queue_ms)


def _choose(
    pool: list[Candidate],
    choice: Choice,
    default_mode: Mode,
    fast_tolerance: float,
    queue_ms: float,
) -> Route:
    given = [
        name
        for name in ("graph", "level", "mode", "max_latency_ms", "min_iou")
        if getattr(choice, name) is not None
    ]
    if len(given) > 1:
        raise BadParameter(
            f"give at most one of graph (a model version), level, mode, max_latency_ms, "
            f"min_iou; got {given}"
        )
    if choice.target is not None and choice.mode != "adaptive":
        raise BadParameter("target applies to mode=adaptive only")
    if not pool:
        raise BadParameter(f"no {choice.precision} graph in this model repository")
    measured = any(c.iou is not None for c in pool)

    if choice.graph is not None:
        if not any(c.name == choice.graph for c in pool):
            raise BadParameter(f"no {choice.precision} graph named {choice.graph!r}")
        return Route(choice.graph, "graph", f"graph {choice.graph} requested")

    if choice.level is not None:
        level = [c for c in pool if c.level == choice.level and c.output != "adaptive"]
        if not level:
            raise BadParameter(f"no {choice.precision} graph of level {choice.level}")
        best = min(level, key=lambda c: (c.output != "logits", c.precision != "fp32", c.name))
        return Route(best.name, "level", f"level={choice.level} requested: {best.name}")

    if choice.max_latency_ms is not None or choice.min_iou is not None:
        if choice.max_latency_ms is not None:
            rule, value = "max_latency_ms", choice.max_latency_ms
            met = [c for c in pool if queue_ms + c.predicted_ms <= value]
            best = _most_accurate(met, measured) if met else _fastest(pool, measured)
            how = "most accurate predicted to fit" if met else "budget missed, none fits; fastest"
            tail = f" + queue {queue_ms:.1f} ms"
        else:
            rule, value = "min_iou", choice.min_iou
            met = [c for c in pool if c.iou is not None and c.iou >= value]
            best = _fastest(met, measured) if met else _most_accurate(pool, measured)
            how = "fastest reaching it" if met else "floor missed, none reaches it; most accurate"
            tail = ""
        reason = f"{rule}={value:g}: {how}: {_describe(best)}{tail}"
        return Route(best.name, rule, reason, missed=not met)

    mode = choice.mode or default_mode
    if mode == "adaptive":
        best = _adaptive(pool, choice.target)
        why = f"the cascade calibrated to lose at most {best.target:g} IoU against the deepest"
        return Route(best.name, "mode", f"mode=adaptive: {why}, {_describe(best)}")
    best, why = _mode(pool, mode, fast_tolerance, measured)
    return Route(best.name, "mode", f"mode={mode}: {why}, {_describe(best)}")


def _mode(
    pool: Sequence[Candidate], mode: Mode, fast_tolerance: float, measured: bool
) -> tuple[Candidate, str]:
    """accurate, then balanced among those no slower, then fast among those no slower and no
    more accurate than balanced: each pick bounds the next, so the order holds by construction."""
    accurate = _most_accurate(pool, measured)
    if mode == "accurate":
        return (
            accurate,
            "best measured accuracy" if measured else "deepest level (no accuracy measured)",
        )
    balanced = knee([c for c in pool if c.predicted_ms <= accurate.predicted_ms], measured)
    if mode == "balanced":
        return balanced, "knee of the accuracy/latency front"
    floor = (0.0, 0.0)  # any level
    if measured:
        floor = (_score(balanced, measured)[0], (balanced.iou or 0.0) - fast_tolerance - 1e-9)
        why = f"fastest within {fast_tolerance:g} IoU of balanced's pick ({balanced.name})"
    else:
        why = "fastest no more accurate than balanced's pick (no accuracy measured)"
    near = [
        c
        for c in pool
        if c.predicted_ms <= balanced.predicted_ms
        and floor <= _score(c, measured) <= _score(balanced, measured)
    ]
    return _fastest(near, measured), why


def _adaptive(pool: Sequence[Candidate], target: float | None) -> Candidate:
    cascades = sorted((c for c in pool if c.output == "adaptive"), key=lambda c: c.target or 0.0)
    if not cascades:
        raise BadParameter(
            "mode=adaptive: this model repository has no calibrated cascade "
            "(export it again with this version of unetpp)"
        )
    if target is None:
        return cascades[len(cascades) // 2]
    for c in cascades:
        if c.target is not None and abs(c.target - target) < 1e-9:
            return c
    raise BadParameter(
        f"target={target:g} is not calibrated; choose one of "
        f"{', '.join(f'{c.target:g}' for c in cascades)}"
    )
