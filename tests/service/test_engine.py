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
        self.drops: dict[str, int] = {}

    def batch(self, tower: str, size: int, seconds: float) -> None:
        self.batches.append(size)

    def dropped(self, tower: str, reason: str, n: int) -> None:
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
        engine = Engine(_encoder(), EngineCfg(max_batch_size=8, max_wait_ms=100, max_queued=64), hooks)
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
        cfg = EngineCfg(max_batch_size=1, max_wait_ms=0, max_queued=2, retry_after_s=3)
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
        cfg = EngineCfg(max_batch_size=4, max_wait_ms=0, max_queued=16)
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
    with live(max_images_in_flight=2, max_batch_size=1, max_wait_ms=0, retry_after_s=2) as server:
        engine = server.services.engine
        fast = engine.encode
        engine.encode = lambda px: (time.sleep(0.1), fast(px))[1]  # a slow model: bursts queue

        def one(_: int) -> httpx2.Response:
            return httpx2.post(server.url + "/v1/classify", json={"images": [image, image]}, timeout=30)

        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(one, range(24)))
        codes = sorted(r.status_code for r in results)
        refused = [r for r in results if r.status_code in (429, 503)]
        assert refused and 200 in codes and set(codes) <= {200, 429, 503}, codes
        assert all(r.headers.get("Retry-After") == "2" and r.json()["detail"] for r in refused)
        engine.encode = fast
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

        engine.encode = gated
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


def test_urgent_work_goes_before_queued_normal_work_and_is_never_refused_for_a_full_queue() -> None:
    """A write (urgent) waits only for the batch running when it arrives, however much normal work queued."""

    async def run() -> tuple[list[list[float]], list[float]]:
        gate, entered = threading.Event(), threading.Event()
        order: list[list[float]] = []

        def encode(pixels: np.ndarray) -> np.ndarray:
            order.append([float(p[0, 0, 0]) for p in pixels])
            entered.set()
            gate.wait(5)
            return _encoder()(pixels)

        engine = Engine(encode, EngineCfg(max_batch_size=2, max_queued=6))
        engine.start()
        busy = asyncio.ensure_future(engine.embed(_px(0), timeout_s=5))
        await _until(entered)
        normal = [asyncio.ensure_future(engine.embed(_px(i, 2), timeout_s=5)) for i in (1, 2, 3)]  # queue: 6
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await engine.embed(_px(4), timeout_s=5)  # normal work beyond max_queued: 429
        urgent = asyncio.ensure_future(engine.embed(_px(9, 3), timeout_s=5, urgent=True))
        await asyncio.sleep(0)
        gate.set()
        outs = await asyncio.gather(busy, *normal, urgent)
        await engine.stop()
        return order, [float(o[0, 0]) for o in outs]

    order, firsts = asyncio.run(run())
    assert order[0] == [0.0]
    assert order[1:3] == [[9.0, 9.0], [9.0]], f"urgent work waited behind normal work: {order}"
    assert order[3:] == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]], order
    assert firsts == [0.0, 2.0, 4.0, 6.0, 18.0]


def test_urgent_requests_share_batches_in_turns_so_a_small_write_is_not_held_behind_a_large_one() -> None:
    async def run() -> list[list[float]]:
        gate, entered = threading.Event(), threading.Event()
        order: list[list[float]] = []

        def encode(pixels: np.ndarray) -> np.ndarray:
            order.append([float(p[0, 0, 0]) for p in pixels])
            entered.set()
            gate.wait(5)
            return _encoder()(pixels)

        engine = Engine(encode, EngineCfg(max_batch_size=2))
        engine.start()
        busy = asyncio.ensure_future(engine.embed(_px(0), timeout_s=5))
        await _until(entered)
        large = asyncio.ensure_future(engine.embed(_px(1, 6), timeout_s=5, urgent=True))  # a bulk add
        await asyncio.sleep(0)
        small = asyncio.ensure_future(engine.embed(_px(2), timeout_s=5, urgent=True))  # a one-name add, later
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(busy, large, small)
        await engine.stop()
        return order

    order = asyncio.run(run())
    assert order[1] == [1.0, 2.0], f"the small write waited for the large one: {order}"
    assert order[2:] == [[1.0, 1.0], [1.0, 1.0], [1.0]], order


def test_items_cost_counts_against_the_batch_and_normal_batches_follow_the_time_target() -> None:
    """Text names cost one row per template: a batch holds items up to max_batch_size of cost; with
    target_batch_s, normal batches shrink to what the measured rate finishes in about that time."""

    async def run(target: float | None) -> list[int]:
        sizes: list[int] = []

        def encode(pixels: np.ndarray) -> np.ndarray:
            sizes.append(len(pixels))
            time.sleep(0.01 * len(pixels) * 4)  # 0.01 s per unit of cost, 4 units per item
            return _encoder()(pixels)

        engine = Engine(encode, EngineCfg(max_batch_size=16, target_batch_s=target))
        engine.start()
        await engine.embed(_px(0), timeout_s=10, cost=4)  # measures the rate (the target needs one)
        await asyncio.gather(*(engine.embed(_px(i), timeout_s=10, cost=4) for i in range(1, 9)))
        await engine.stop()
        return sizes

    untargeted = asyncio.run(run(None))
    assert untargeted[0] == 1 and max(untargeted) == 4, untargeted  # 16 units of cost: 4 items of 4
    targeted = asyncio.run(run(0.05))  # 5 units at 0.01 s: one item of cost 4 per batch
    assert targeted[0] == 1 and max(targeted) == 1, targeted


def test_a_seeded_rate_sizes_the_first_batch_and_a_large_request_is_answered_whole() -> None:
    """The text tower's start-up warm-up seeds the rate, so the very first normal batch already
    follows the time target (not max_batch_size); a request of many items gets every row back."""

    async def run(seed: float | None) -> tuple[list[int], np.ndarray]:
        sizes: list[int] = []

        def encode(pixels: np.ndarray) -> np.ndarray:
            sizes.append(len(pixels))
            return _encoder()(pixels)

        engine = Engine(encode, EngineCfg(max_batch_size=64, target_batch_s=0.03))
        if seed is not None:
            engine.seed_rate(seed)
        engine.start()
        out = await engine.embed(_px(1, 40), timeout_s=10)  # all 40 queue before the worker's first look
        await engine.stop()
        return sizes, out

    sizes, out = asyncio.run(run(0.01))
    assert sizes[0] == 3, sizes  # 0.03 s at 0.01 s per item
    assert sum(sizes) == 40 and out.shape == (40, 4) and np.allclose(out, 2.0), (sizes, out.shape)
    unseeded, _ = asyncio.run(run(None))
    assert unseeded[0] == 40, unseeded  # no rate yet: the whole queue at once
