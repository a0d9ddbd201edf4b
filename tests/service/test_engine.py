"""The batching engine: batches across requests, refuses when full, drops abandoned and late work, drains."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import numpy as np
import pytest

from service.engine import Engine, EngineCfg, EngineHooks
from service.errors import ClientGone, DeadlineExceeded, Overloaded
from tests.service.conftest import png_bytes
from tests.service.test_classify import metric


class Recorder(EngineHooks):
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.lanes: list[int] = []
        self.drops: dict[str, int] = {}

    def batch(self, size: int, seconds: float, lanes: int) -> None:
        self.batches.append(size)
        self.lanes.append(lanes)

    def dropped(self, reason: str, n: int) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n


def _encoder(delay_s: float = 0.0, gate: threading.Event | None = None, entered: threading.Event | None = None) -> Any:
    def encode(pixels: np.ndarray) -> np.ndarray:
        if entered is not None:
            entered.set()
        if gate is not None:
            gate.wait(5)
        time.sleep(delay_s)
        return pixels.reshape(len(pixels), -1)[:, :4] * 2.0  # [B, 4]

    return encode


async def _until(event: threading.Event, timeout_s: float = 10.0) -> None:
    """Wait (without blocking the loop) until the encoder thread has taken a batch."""
    deadline = time.monotonic() + timeout_s
    while not event.is_set():
        assert time.monotonic() < deadline, "the encoder never received a batch"
        await asyncio.sleep(0.005)


def _px(value: float, n: int = 1) -> np.ndarray:
    return np.full((n, 3, 2, 2), value, dtype=np.float32)


def test_requests_are_batched_together_and_answered_correctly() -> None:
    async def run() -> tuple[list[np.ndarray], list[int]]:
        hooks = Recorder()
        engine = Engine(_encoder(), EngineCfg(max_batch_size=8, max_wait_ms=100, queue_size=64), hooks)
        engine.start()
        outs = await asyncio.gather(*(engine.embed(_px(i), timeout_s=5) for i in range(8)))
        await engine.stop()
        return outs, hooks.batches

    outs, batches = asyncio.run(run())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(8)]  # each request got its own row
    assert sum(batches) == 8 and max(batches) > 1, batches


def test_full_queue_refuses_with_retry_after_and_draining_gives_503() -> None:
    async def run() -> None:
        gate, entered = threading.Event(), threading.Event()
        cfg = EngineCfg(max_batch_size=1, max_wait_ms=0, queue_size=2, retry_after_s=3)
        engine = Engine(_encoder(gate=gate, entered=entered), cfg)
        engine.start()
        first = asyncio.ensure_future(engine.embed(_px(1), timeout_s=5))
        await _until(entered)  # the worker holds the first image inside the (blocked) encoder
        queued = asyncio.ensure_future(engine.embed(_px(2, 2), timeout_s=5))  # fills the queue
        await asyncio.sleep(0)  # let it enqueue (one loop turn: enqueueing does not wait)
        with pytest.raises(Overloaded) as full:
            await engine.embed(_px(3), timeout_s=5)
        assert full.value.status == 429 and full.value.headers["Retry-After"] == "3"
        gate.set()
        assert (await first).shape == (1, 4) and (await queued).shape == (2, 4)
        await engine.stop()
        with pytest.raises(Overloaded) as draining:
            await engine.embed(_px(4), timeout_s=5)
        assert draining.value.status == 503 and "Retry-After" in draining.value.headers

    asyncio.run(run())


def test_work_of_disconnected_or_late_clients_is_dropped() -> None:
    async def run() -> Recorder:
        gate, entered = threading.Event(), threading.Event()
        hooks = Recorder()
        cfg = EngineCfg(max_batch_size=4, max_wait_ms=0, queue_size=16)
        engine = Engine(_encoder(gate=gate, entered=entered), cfg, hooks)
        engine.start()
        blocker = asyncio.ensure_future(engine.embed(_px(0), timeout_s=5))
        await _until(entered)  # the blocker's batch is inside the encoder: later images queue behind it

        async def gone() -> bool:
            return True

        with pytest.raises(ClientGone):
            await engine.embed(_px(1, 3), timeout_s=5, is_disconnected=gone)
        with pytest.raises(DeadlineExceeded):
            await engine.embed(_px(2, 2), timeout_s=0.1)
        gate.set()
        await blocker
        await engine.stop()
        return hooks

    hooks = asyncio.run(run())
    assert hooks.batches == [1], "abandoned images reached the encoder"
    assert hooks.drops == {"cancelled": 5}


def test_burst_against_tiny_queue_gets_429_and_server_stays_ready(live: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0].resize((64, 64)))).decode()
    with live(queue_size=2, max_batch_size=1, max_wait_ms=0, retry_after_s=2) as server:
        engine = server.services.engine
        fast = engine.encode
        engine.encode = engine.encode_lane = lambda px: (time.sleep(0.1), fast(px))[1]  # a slow model: bursts queue

        def one(_: int) -> httpx2.Response:
            return httpx2.post(server.url + "/v1/classify", json={"images": [image, image]}, timeout=30)

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(24)))
        codes = sorted(r.status_code for r in results)
        refused = [r for r in results if r.status_code in (429, 503)]
        assert refused and 200 in codes and set(codes) <= {200, 429, 503}, codes
        assert all(r.headers.get("Retry-After") == "2" and r.json()["detail"] for r in refused)
        engine.encode = engine.encode_lane = fast
        with server.client() as http:
            assert http.get("/readyz").status_code == 200
            assert http.post("/v1/classify", json={"images": [image]}).status_code == 200
    print(f"burst: {len(refused)} of {len(results)} refused")


def test_queued_work_of_a_client_that_hung_up_never_reaches_the_encoder(live: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0].resize((64, 64)))).decode()
    gate = threading.Event()
    seen: list[int] = []
    with live(max_batch_size=1, max_wait_ms=0) as server:
        engine = server.services.engine
        fast = engine.encode

        def gated(px: np.ndarray) -> np.ndarray:
            seen.append(len(px))
            gate.wait(10)
            return fast(px)

        engine.encode = engine.encode_lane = gated
        holder = ThreadPoolExecutor(1).submit(
            httpx2.post, server.url + "/v1/classify", json={"images": [image]}, timeout=30
        )
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:  # the first request now occupies the encoder
            time.sleep(0.01)
        with pytest.raises(httpx2.TimeoutException):  # this client gives up while its 3 images are queued
            httpx2.post(server.url + "/v1/classify", json={"images": [image] * 3}, timeout=0.5)
        # the server notices the hang-up within POLL_S and answers 499 (to nobody), cancelling the
        # queued images; only then may the encoder be freed (a fixed sleep loses that race under load)
        gone = 0.0
        deadline = time.monotonic() + 20
        while not gone and time.monotonic() < deadline:
            text = server.app.state.metrics.render().decode()
            gone = metric(text, "promptdistill_requests_total", {"status": "499"})
            time.sleep(0.01)
        assert gone == 1, "the server never noticed that the client hung up"
        gate.set()
        assert holder.result().status_code == 200
        dropped = 0.0
        with server.client() as http:
            deadline = time.monotonic() + 20  # the worker drops them when it reaches them, after the holder
            while not dropped and time.monotonic() < deadline:
                text = http.get("/metrics").text
                dropped = metric(text, "promptdistill_dropped_images_total", {"reason": "cancelled"})
                time.sleep(0.05)
    assert seen == [1], f"images of the departed client were encoded: batches {seen}"
    assert dropped == 3


def test_a_lone_request_is_encoded_at_once_and_batches_form_only_while_busy() -> None:
    """No idle window: with the encoder idle, the first image goes alone even though company follows."""

    async def run() -> list[int]:
        gate = threading.Event()
        hooks = Recorder()
        engine = Engine(_encoder(gate=gate), EngineCfg(max_batch_size=8), hooks)  # default max_wait_ms: 0
        engine.start()
        first = asyncio.ensure_future(engine.embed(_px(1), timeout_s=5))
        await asyncio.sleep(0)  # the request is queued; the worker takes it as soon as it runs
        while engine.depth:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(engine.embed(_px(i), timeout_s=5)) for i in range(2, 7)]
        await asyncio.sleep(0.05)  # all five queue behind the busy encoder
        gate.set()
        await asyncio.gather(first, *rest)
        await engine.stop()
        return hooks.batches

    assert asyncio.run(run()) == [1, 5]


def test_queued_images_share_side_by_side_lanes_and_never_run_beside_a_wide_batch() -> None:
    """A lone image runs on every thread; what queues behind it is split across lanes that run at once."""

    async def run() -> tuple[list[np.ndarray], Recorder, list[tuple[int, int]]]:
        gate, lock = threading.Event(), threading.Lock()
        both_lanes_in = threading.Barrier(2, timeout=5)  # broken unless two lane calls overlap
        active = {"wide": 0, "lane": 0}
        seen: list[tuple[int, int]] = []

        def tracked(kind: str, wait: Any) -> Any:
            def encode(pixels: np.ndarray) -> np.ndarray:
                with lock:
                    active[kind] += 1
                    seen.append((active["wide"], active["lane"]))
                wait()
                with lock:
                    active[kind] -= 1
                return _encoder()(pixels)

            return encode

        hooks = Recorder()
        cfg = EngineCfg(max_batch_size=8, lanes=2)
        engine = Engine(tracked("wide", lambda: gate.wait(5)), cfg, hooks, tracked("lane", both_lanes_in.wait))
        engine.start()
        first = asyncio.ensure_future(engine.embed(_px(1), timeout_s=5))
        await asyncio.sleep(0)
        while engine.depth:  # the lone image is in the wide run
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(engine.embed(_px(i), timeout_s=5)) for i in range(2, 8)]
        await asyncio.sleep(0.05)  # six images queue behind the wide run
        gate.set()
        outs = await asyncio.gather(first, *rest)
        await engine.stop()
        return outs, hooks, seen

    outs, hooks, seen = asyncio.run(run())
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(1, 8)]
    assert hooks.batches == [1, 3, 3] and hooks.lanes == [1, 2, 2], (hooks.batches, hooks.lanes)
    assert all(not (wide and lane) for wide, lane in seen), f"a wide run overlapped a lane run: {seen}"
    with pytest.raises(ValueError, match="encode_lane"):
        Engine(_encoder(), EngineCfg(lanes=2))


def test_lanes_run_only_while_the_backlog_fills_every_free_lane() -> None:
    """With 4 lanes a backlog of 2 runs wide and 9 split over the 4 lanes; with 2 lanes free, 1 image waits."""

    async def run() -> tuple[Recorder, list[str], list[str]]:
        wide_gate = threading.Event()
        lane_gates = [threading.Event() for _ in range(5)]  # the i-th lane call waits on the i-th gate
        four_lanes_in = threading.Barrier(4, timeout=5)  # broken unless the first four lane runs overlap
        calls: list[str] = []
        lock = threading.Lock()

        def wide(pixels: np.ndarray) -> np.ndarray:
            calls.append(f"wide{len(pixels)}")
            wide_gate.wait(5)
            return _encoder()(pixels)

        def lane(pixels: np.ndarray) -> np.ndarray:
            with lock:
                n = sum(c.startswith("lane") for c in calls)
                calls.append(f"lane{len(pixels)}")
            if n < 4:
                four_lanes_in.wait()
            lane_gates[n].wait(5)
            return _encoder()(pixels)

        async def until(cond: Any) -> None:
            deadline = time.monotonic() + 10
            while not cond():
                assert time.monotonic() < deadline, calls
                await asyncio.sleep(0.001)

        async def queue_behind_busy_encoder(n: int) -> list[asyncio.Future[np.ndarray]]:
            busy = len(calls)
            first = asyncio.ensure_future(engine.embed(_px(0), timeout_s=10))
            await until(lambda: len(calls) > busy)  # the lone image is in a wide run
            rest = [asyncio.ensure_future(engine.embed(_px(i), timeout_s=10)) for i in range(n)]
            await asyncio.sleep(0.05)
            return [first, *rest]

        hooks = Recorder()
        engine = Engine(wide, EngineCfg(max_batch_size=8, lanes=4), hooks, lane)
        engine.start()
        small = await queue_behind_busy_encoder(2)
        wide_gate.set()
        await asyncio.gather(*small)
        wide_gate.clear()
        big = await queue_behind_busy_encoder(9)
        wide_gate.set()
        await until(lambda: len(calls) == 3 + 4)  # the four lane runs hold the lanes
        lane_gates[0].set()
        lane_gates[1].set()
        await until(lambda: engine._lanes_busy == 2)  # two lanes free, two still busy
        late = asyncio.ensure_future(engine.embed(_px(9), timeout_s=10))
        await asyncio.sleep(0.05)
        held = list(calls)  # the late image must not take a lane of its own while the other lane idles
        for gate in lane_gates:
            gate.set()
        await asyncio.gather(*big, late)
        await engine.stop()
        return hooks, held, calls

    hooks, held, calls = asyncio.run(run())
    assert held[:3] == ["wide1", "wide2", "wide1"], held
    assert sorted(held[3:]) == ["lane2", "lane2", "lane2", "lane3"], held
    assert calls[-1] == "wide1", f"the late image ran on a lane instead of wide: {calls}"
    assert sorted(hooks.batches) == [1, 1, 1, 2, 2, 2, 2, 3]
