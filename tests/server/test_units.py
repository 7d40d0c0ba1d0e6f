"""The server's logic in process, in milliseconds, without onnxruntime files: fake sessions (a
pointwise function of the input, one factor per graph, so that the logits say which graph ran)
behind real Runners, driving Engine, Gate, MemoryBudget, Batcher and facade.segment directly
on an event loop; and the Registry with a fake loader."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from unetpp.core.errors import ImageTooLarge, ModelRepositoryError
from unetpp.core.imageio import encode_png
from unetpp.core.manifest import MANIFEST_NAME, Accuracy, Graph, Manifest
from unetpp.core.preprocess import Preprocessing
from unetpp.core.routing import Choice
from unetpp.core.task import Task
from unetpp.core.tiling import TileRun, choose_tile, count
from unetpp.server import facade, registry
from unetpp.server.admission import Gate, MemoryBudget
from unetpp.server.engine import Engine
from unetpp.server.errors import DeadlineExceeded, LoadFailed, ModelUnavailable, QueueFull
from unetpp.server.facade import EncodedImage, Outcome, Pixels
from unetpp.server.metrics import Metrics
from unetpp.server.runtime import LoadedModel, Runner
from unetpp.server.settings import Settings

REFERENCE = 64  # the manifest's reference size: the probe runs every graph at it
# graph -> (level, precision, IoU, factor of its logits)
GRAPHS = {
    "L1": (1, "fp32", 0.70, 1.0),
    "L2": (2, "fp32", 0.80, 2.0),
    "L3": (3, "fp32", 0.85, 3.0),
    "L4": (4, "fp32", 0.86, 4.0),
    "L1.int8": (1, "int8", 0.69, 5.0),
    "L2.int8": (2, "int8", 0.79, 6.0),
    "L3.int8": (3, "int8", 0.84, 7.0),
    "L4.int8": (4, "int8", 0.85, 8.0),
}


class FakeSession:
    """A backend's session (core/backends.py `Session`) for a pointwise graph: logits =
    factor * (x - 0.5). `hold` (when set on it) keeps a run waiting until released; `batches` records each run's
    batch size."""

    def __init__(self, factor: float) -> None:
        self.factor = factor
        self.hold: threading.Event | None = None
        self.running = threading.Event()
        self.batches: list[int] = []

    def run(self, x: np.ndarray, output: str) -> np.ndarray:
        self.batches.append(x.shape[0])
        self.running.set()
        if self.hold is not None:
            assert self.hold.wait(10), "the test never released the session"
        return self.factor * (x[:, :1] - 0.5)


def graph(name: str) -> Graph:
    level, precision, iou, _ = GRAPHS[name]
    return Graph(
        name=name,
        file=f"{name}.onnx",
        sha256="0" * 64,
        level=level,
        output="logits",
        precision=precision,
        parameters=1000 * level,
        gflops=float(level),
        accuracy=Accuracy(iou=iou, dice=iou, images=4, data="synthetic:val"),
        latency_ms={str(REFERENCE): 10.0 * level},
    )


def manifest(name: str = "unetpp") -> Manifest:
    return Manifest(
        name=name,
        version="1",
        checkpoint_sha256="0" * 64,
        arch="unetpp",
        in_channels=1,
        task=Task.binary(),
        preprocessing=Preprocessing(),
        reference_size=REFERENCE,
        graphs=tuple(graph(n) for n in GRAPHS),
    )


def loaded(directory: Path = Path("unused"), name: str = "unetpp") -> LoadedModel:
    runners = {g.name: Runner(g, FakeSession(GRAPHS[g.name][3])) for g in manifest(name).graphs}
    return LoadedModel(directory, manifest(name), runners, "cpu", ("CPUExecutionProvider",))


def settings(**overrides) -> Settings:
    base = dict(tile_size=128, tile_overlap=16, max_wait_ms=0.0, max_batch=8, memory_limit=1 << 30)
    return Settings(**{**base, **overrides})


def engine_for(max_queue: int = 8, capacity: int = 1 << 30, **overrides) -> Engine:
    """A probed engine on fake sessions, with its own gate and memory budget."""
    config = settings(max_queue=max_queue, **overrides)
    gate = Gate(
        max_queue=config.max_queue,
        timeout_ms=config.timeout_ms,
        max_pixels_in_flight=config.max_pixels_in_flight,
        max_body_bytes_in_flight=config.max_body_bytes_in_flight,
    )
    engine = Engine("unetpp", loaded(), config, Metrics(), gate, MemoryBudget(capacity))
    engine.probe()
    return engine


def session(engine: Engine, name: str) -> FakeSession:
    fake = engine.runners[name].session
    assert isinstance(fake, FakeSession)
    return fake


def hold(engine: Engine, name: str) -> FakeSession:
    """Graph `name`'s session, its probe runs forgotten, holding its next run until released."""
    held = session(engine, name)
    held.batches.clear()
    held.running.clear()
    held.hold = threading.Event()
    return held


def image(height: int = 48, width: int = 40) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4096, (height, width)).astype(np.uint16)


def expected_logits(engine: Engine, pixels: np.ndarray, name: str) -> np.ndarray:
    """What graph `name` answers for `pixels`: its factor applied to the preprocessed image."""
    x = engine.model.manifest.preprocessing(pixels)
    return GRAPHS[name][3] * (x[:1] - 0.5)


async def segment(engine: Engine, pixels: np.ndarray, choice: Choice, **kw) -> Outcome:
    with engine.lease():
        return await facade.segment(engine, Pixels([pixels]), choice, lambda o: o, **kw)


def run(scenario):
    """Run `scenario(engine)` with a started engine, closed afterwards."""

    async def main(engine: Engine):
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.close()

    def go(engine: Engine):
        return asyncio.run(main(engine))

    return go


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (Choice(level=2), "L2"),
        (Choice(level=3, precision="int8"), "L3.int8"),
        (Choice(graph="L1.int8"), "L1.int8"),
        (Choice(mode="accurate"), "L4"),
        (Choice(min_iou=0.8), "L2"),  # the fastest that reaches it (int8 is slower here)
        (Choice(min_iou=0.8, precision="int8"), "L3.int8"),
    ],
)
def test_the_facade_runs_the_routed_graph_and_only_it(choice: Choice, expected: str):
    engine = engine_for()
    for name, (level, precision, _, _) in GRAPHS.items():
        session(engine, name).batches.clear()  # the probe's runs
        engine.predictor.seed(name, 48 * 48, (100.0 if precision == "int8" else 10.0) * level)
    pixels = image()

    async def scenario(engine: Engine) -> Outcome:
        return await segment(engine, pixels, choice)

    outcome = run(scenario)(engine)
    assert outcome.route.graph == expected
    assert outcome.headers()["X-UNetPP-Graph"] == expected
    assert outcome.logits.shape == (1, 1, 48, 40)  # cropped back from the padded 48x48
    np.testing.assert_allclose(outcome.logits[0], expected_logits(engine, pixels, expected))
    ran = {name for name in GRAPHS if session(engine, name).batches}
    assert ran == {expected}


def test_the_probe_measures_every_graph_once_and_times_the_fastest():
    """Ready in seconds: one run per graph (its memory), one more of the graph the export
    measured fastest (this machine's speed); every other latency is the export's, scaled."""
    engine = engine_for()
    assert engine.figures["L1"].latency_source == {REFERENCE: "probe"}
    assert engine.figures["L2"].latency_source == {REFERENCE: "estimate"}
    assert session(engine, "L1").batches == [1, 1]  # memory, then latency
    assert session(engine, "L2").batches == [1]  # memory only
    pixels = REFERENCE * REFERENCE
    scale = engine.predictor.predict("L1", pixels) / 10.0  # the export timed L1 at 10 ms
    assert engine.predictor.predict("L2", pixels) == pytest.approx(20.0 * scale)


def test_the_max_latency_budget_takes_the_most_accurate_graph_that_fits():
    engine = engine_for()
    pixels = image()
    for name in GRAPHS:
        engine.predictor.seed(name, 48 * 48, 10.0 * GRAPHS[name][0])  # L_k: 10k ms

    async def scenario(engine: Engine) -> tuple[Outcome, Outcome]:
        fits = await segment(engine, pixels, Choice(max_latency_ms=35, precision="fp32"))
        missed = await segment(engine, pixels, Choice(max_latency_ms=1, precision="fp32"))
        return fits, missed

    fits, missed = run(scenario)(engine)
    assert (fits.route.graph, fits.route.missed) == ("L3", False)
    assert (missed.route.graph, missed.route.missed) == ("L1", True)
    assert missed.headers()["X-UNetPP-Target-Missed"] == "max_latency_ms"


def test_an_encoded_image_takes_the_same_path():
    engine = engine_for()
    pixels = image(30, 50)

    async def scenario(engine: Engine) -> Outcome:
        with engine.lease():
            inputs = EncodedImage(encode_png(pixels))
            return await facade.segment(engine, inputs, Choice(level=1), lambda o: o)

    outcome = run(scenario)(engine)
    np.testing.assert_allclose(outcome.logits[0], expected_logits(engine, pixels, "L1"))
    assert engine.gate.in_flight == 0 and engine.gate.pixels_in_flight == 0


def test_the_queue_limit_refuses_while_admitted_requests_are_in_flight():
    engine = engine_for(max_queue=2)
    held = hold(engine, "L1")
    pixels = image()

    async def scenario(engine: Engine):
        first = [asyncio.create_task(segment(engine, pixels, Choice(level=1))) for _ in range(2)]
        while engine.gate.in_flight < 2 or not held.running.is_set():
            await asyncio.sleep(0.001)
        with pytest.raises(QueueFull) as refused:
            await segment(engine, pixels, Choice(level=2))
        held.hold.set()
        answered = await asyncio.gather(*first)
        after = await segment(engine, pixels, Choice(level=2))  # room again
        return refused.value, answered, after

    refused, answered, after = run(scenario)(engine)
    assert refused.status_code == 503 and refused.retry_after is not None
    assert "2 requests in flight, the limit is 2" in refused.detail
    assert [o.route.graph for o in answered] == ["L1", "L1"]
    assert after.route.graph == "L2"
    assert session(engine, "L2").batches[-1:] == [1]  # the refused request never ran
    assert engine.gate.in_flight == 0


def test_a_request_past_its_deadline_is_answered_and_its_input_never_runs():
    engine = engine_for()
    held = hold(engine, "L1")
    pixels = image()

    async def scenario(engine: Engine):
        first = asyncio.create_task(segment(engine, pixels, Choice(level=1)))
        while not held.running.is_set():
            await asyncio.sleep(0.001)
        with pytest.raises(DeadlineExceeded) as late:  # queued behind the held batch
            await segment(engine, pixels, Choice(level=1), deadline_ms=30)
        held.hold.set()
        await first
        return late.value

    late = run(scenario)(engine)
    assert late.status_code == 504 and "30 ms" in late.detail
    assert held.batches == [1]  # the first request's; the late one was dropped from the queue


def test_a_deadline_already_passed_is_refused_before_inference():
    engine = engine_for()

    async def scenario(engine: Engine):
        prepared = engine.preprocess(image())
        with pytest.raises(DeadlineExceeded):
            await engine.infer("L1", prepared, engine.plan(prepared), deadline=0.0)

    run(scenario)(engine)
    assert session(engine, "L1").batches == [1, 1]  # the probe's two runs only


def memory_engine(capacity: int, bytes_per_pixel: int = 1000, **overrides) -> Engine:
    engine = engine_for(capacity=capacity, **overrides)
    for figures in engine.figures.values():
        figures.bytes_per_pixel = bytes_per_pixel
    return engine


def test_an_image_whose_activations_pass_the_budget_is_tiled_and_batches_fit_it():
    pixels = image(256, 256)
    one_tile = 64 * 64 * 1000  # bytes of one 64x64 tile's activations
    engine = memory_engine(capacity=one_tile * 2 + 1)  # whole: no, 128-px tiles: no, 64: two
    plan = engine.plan(engine.preprocess(pixels))
    assert (plan.tile, plan.run_pixels) == (64, 64 * 64)
    assert plan.tiles > 4  # overlapping 64-px tiles over 256x256

    async def scenario(engine: Engine) -> Outcome:
        return await segment(engine, pixels, Choice(level=4))

    outcome = run(scenario)(engine)
    assert outcome.plan == plan and outcome.timings()["tiles"] == plan.tiles
    assert max(session(engine, "L4").batches[2:]) <= 2  # never more tiles at once than fit
    np.testing.assert_allclose(
        outcome.logits[0], expected_logits(engine, pixels, "L4"), rtol=1e-5, atol=1e-5
    )
    assert engine.budget.in_use == 0


def test_an_image_within_the_budget_runs_whole():
    engine = memory_engine(capacity=256 * 256 * 1000)
    plan = engine.plan(engine.preprocess(image(256, 256)))
    assert (plan.tiles, plan.run_pixels) == (0, 256 * 256)


def test_an_image_not_even_the_smallest_tile_fits_is_refused_413():
    engine = memory_engine(capacity=64 * 64 * 1000 - 1)  # 64 px is the smallest tile here

    async def scenario(engine: Engine):
        with pytest.raises(ImageTooLarge) as refused:
            await segment(engine, image(256, 256), Choice(level=1))
        return refused.value

    refused = run(scenario)(engine)
    assert refused.status_code == 413 and "UNETPP_MEMORY_LIMIT" in refused.detail
    assert session(engine, "L1").batches == [1, 1]  # nothing ran after the probe
    assert engine.gate.in_flight == 0 and engine.gate.pixels_in_flight == 0


def test_refine_measures_each_tile_side_and_batch_and_chooses_from_them():
    engine = engine_for(tile_sides=(48, 64), max_batch=4)
    for name in GRAPHS:
        session(engine, name).batches.clear()

    async def scenario(engine: Engine) -> None:
        await engine.refine(threading.Event())

    run(scenario)(engine)
    figures = engine.figures["L3"]
    # each side at batch 1 and at the batch that fits (max_batch here), every run warmed up once
    assert [(r.side, r.batch) for r in figures.tile_runs] == [(48, 1), (48, 4), (64, 1), (64, 4)]
    assert session(engine, "L3").batches == [1] * 4 + [4] * 4 + [1] * 4 + [4] * 4
    assert figures.latency_source[48] == figures.latency_source[64] == "calibrated"
    assert figures.tile == choose_tile(
        figures.tile_runs, overlap=16, bytes_per_pixel=figures.bytes_per_pixel, room=1 << 30
    )


def test_tile_sides_come_from_the_environment_as_json_and_are_checked(monkeypatch):
    monkeypatch.setenv("UNETPP_TILE_SIDES", "[256, 384]")
    assert Settings().tile_sides == (256, 384)
    monkeypatch.setenv("UNETPP_TILE_SIDES", "[]")
    assert Settings().tile_sides == ()
    for wrong in ("[100]", "[128]"):  # not a multiple of 16; not over twice the overlap (64)
        monkeypatch.setenv("UNETPP_TILE_SIDES", wrong)
        with pytest.raises(ValueError, match="tile_sides"):
            Settings()


def test_tile_bytes_bound_the_measured_runs_and_the_batches_before_they_are_measured():
    room = 1000 * 64 * 64 * 3  # three 64x64 windows at 1000 bytes per pixel
    engine = memory_engine(1 << 30, tile_bytes=room, tile_sides=(48, 64, 112), tile_above_pixels=1)
    assert engine._tile_candidates(1000) == [(48, 1), (48, 5), (64, 1), (64, 3)]
    plan = engine.plan(engine.preprocess(image(256, 256)))  # unmeasured: tile_size, 128
    assert (plan.tile, plan.batch) == (128, 1)  # a 128x128 window alone passes tile_bytes
    engine = memory_engine(1 << 30, tile_bytes=room, tile_size=48, tile_above_pixels=1)
    assert engine.plan(engine.preprocess(image(256, 256))).batch == 5


def test_a_closed_engine_stops_refining():
    """A reload retires the old engine (closed once idle): its background calibration ends
    instead of keeping it, and its sessions, alive for minutes."""
    engine = engine_for(tile_sides=(48, 64))
    for name in GRAPHS:
        session(engine, name).batches.clear()
    asyncio.run(engine.close())
    asyncio.run(engine.refine(threading.Event()))
    assert not any(session(engine, name).batches for name in GRAPHS)
    assert all(f.tile is None for f in engine.figures.values())


def test_each_graph_tiles_at_its_own_measured_tile_and_batch():
    """L4 measured fastest per output pixel at 48 px in batches of 2 (given figures), L1 at 96
    px alone; the other graphs are unmeasured and keep `tile_size` (128). A 256x256 image on
    each runs in those windows and batches, and comes out equal to the untiled answer."""
    engine = engine_for(tile_above_pixels=64 * 64)
    given = {
        "L4": [TileRun(48, 1, 10.0), TileRun(48, 2, 14.0), TileRun(96, 1, 60.0)],
        "L1": [TileRun(48, 1, 10.0), TileRun(96, 1, 12.0)],
    }
    for name, runs in given.items():
        engine._choose_tile(name, runs)
    assert (engine.figures["L4"].tile, engine.figures["L1"].tile) == (
        given["L4"][1],
        given["L1"][1],
    )
    pixels = image(256, 256)
    plan = engine.plan(engine.preprocess(pixels))
    assert (plan.tile, plan.for_graph("L2").tile) == (128, 128)
    assert (plan.for_graph("L4").tile, plan.for_graph("L4").batch) == (48, 2)
    assert plan.for_graph("L4").tiles == count(256, 256, 48, 16)
    assert (plan.for_graph("L1").tile, plan.for_graph("L1").tiles) == (96, count(256, 256, 96, 16))
    levels = {"L4": 4, "L1": 1, "L2": 2}
    for name in levels:
        session(engine, name).batches.clear()

    async def scenario(engine: Engine) -> list[Outcome]:
        return [await segment(engine, pixels, Choice(level=k)) for k in levels.values()]

    for outcome, name in zip(run(scenario)(engine), levels, strict=True):
        layout = plan.for_graph(name)
        assert outcome.route.graph == name and outcome.timings()["tiles"] == layout.tiles
        assert sum(session(engine, name).batches) == layout.tiles
        assert max(session(engine, name).batches) <= (layout.batch or 8)
        np.testing.assert_allclose(
            outcome.logits[0], expected_logits(engine, pixels, name), rtol=1e-5, atol=1e-5
        )
    assert max(session(engine, "L4").batches) == 2


def test_an_image_below_tile_above_runs_whole_or_tiled_whichever_is_predicted_faster():
    engine = engine_for()  # tile_above_pixels: 1 MP
    engine._choose_tile("L2", [TileRun(64, 1, 1.0)])  # the predictor: 1 ms per 64x64 window
    x = engine.preprocess(image(256, 256))
    windows = count(256, 256, 64, 16)
    engine.predictor.seed("L2", 256 * 256, windows * 1.0 + 1.0)  # whole: 1 ms slower
    plan = engine.plan(x)
    assert (plan.for_graph("L2").tile, plan.for_graph("L2").tiles) == (64, windows)
    assert plan.tiles == 0  # the graphs without a measured tile run whole
    candidate = {c.name: c for c in engine.candidates(plan)}["L2"]
    assert candidate.predicted_ms == pytest.approx(windows * 1.0)  # routing sees L2's own plan
    engine.predictor.seed("L2", 256 * 256, windows * 1.0 - 1.0)  # whole: 1 ms faster
    assert engine.plan(x).for_graph("L2").tiles == 0


def test_a_model_whose_load_fails_leaves_the_other_serving(tmp_path: Path, monkeypatch):
    for name in ("good", "broken"):
        (tmp_path / name).mkdir()
        text = json.dumps(manifest(name).to_dict())
        (tmp_path / name / MANIFEST_NAME).write_text(text)

    def load_model(directory: Path, device, threads, memory_arena, backend) -> LoadedModel:
        if directory.name == "broken":
            raise ModelRepositoryError(f"{directory.name}/L1.onnx: sha256 mismatch")
        return loaded(directory, directory.name)

    monkeypatch.setattr(registry, "load_model", load_model)
    models = registry.Registry(settings(models=tmp_path, tile_size=REFERENCE), Metrics())

    async def scenario():
        await models.start()
        try:
            with models.lease("good") as engine:
                outcome = await facade.segment(engine, Pixels([image()]), Choice(), lambda o: o)
            with pytest.raises(ModelUnavailable) as broken:
                models.engine("broken")
            with pytest.raises(LoadFailed) as again:
                await models.load("broken")
            return outcome, broken.value, again.value
        finally:
            await models.close()

    outcome, broken, again = asyncio.run(scenario())
    assert models.slots["good"].state == "ready" and models.slots["broken"].state == "failed"
    assert models.ready and models.status == "ready"
    assert outcome.engine.name == "good" and outcome.route.graph in GRAPHS
    assert "sha256 mismatch" in broken.detail and "sha256 mismatch" in again.detail
    assert again.status_code == 422
