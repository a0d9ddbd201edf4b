"""Fair text encoding: bounded anonymous text work, and class adds never wait behind it."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from service.text import PriorityLock
from tests.service.conftest import png_bytes


def test_priority_lock_serves_waiting_high_before_low() -> None:
    lock = PriorityLock()
    order: list[str] = []
    release = threading.Event()

    def holder() -> None:
        with lock.hold(high=False):
            order.append("first")
            release.wait(5)

    def take(name: str, high: bool) -> None:
        with lock.hold(high):
            order.append(name)

    threads = [threading.Thread(target=holder)]
    threads[0].start()
    while not order:
        time.sleep(0.001)
    for i in range(3):
        threads.append(threading.Thread(target=take, args=(f"low{i}", False)))
        threads[-1].start()
    time.sleep(0.05)  # the low waiters are queued first ...
    threads.append(threading.Thread(target=take, args=("high", True)))
    threads[-1].start()
    time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(5)
    assert order[:2] == ["first", "high"], order  # ... yet the high-priority holder goes next
    assert sorted(order[2:]) == ["low0", "low1", "low2"]


def test_a_low_priority_holder_steps_aside_mid_work_for_a_waiting_high_one() -> None:
    lock = PriorityLock()
    order: list[str] = []

    def high() -> None:
        with lock.hold(high=True):
            order.append("high")

    def low() -> None:
        with lock.hold(high=False):
            for i in range(4):
                order.append(f"block{i}")
                if i == 1:
                    threading.Thread(target=high).start()
                    deadline = time.monotonic() + 5
                    while not lock._high_waiting and time.monotonic() < deadline:
                        time.sleep(0.001)
                lock.step_aside()  # a no-op unless a high-priority holder waits

    worker = threading.Thread(target=low)
    worker.start()
    worker.join(10)
    deadline = time.monotonic() + 5
    while len(order) < 5 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert order == ["block0", "block1", "high", "block2", "block3"], order


def test_open_vocabulary_work_is_chunked_and_a_class_add_cuts_in(live: Any) -> None:
    """The real text side: a long anonymous encode yields to a mutation after at most one chunk."""
    with live(text_chunk_prompts=14) as server:  # 7 templates -> 2 names per chunk
        text = server.services.text
        side = text.side
        real = side.class_vectors
        log: list[tuple[str, int]] = []
        started = threading.Event()

        pauses = [0]
        step_aside = text._encoder_lock.step_aside

        def counted() -> None:
            pauses[0] += 1
            step_aside()

        text._encoder_lock.step_aside = counted  # type: ignore[method-assign]

        def spy(names: list[str], templates: Any = None, progress: bool = False, between_blocks: Any = None) -> Any:
            log.append((names[0], len(names)))
            started.set()
            time.sleep(0.02)  # each chunk takes a while, so the add arrives mid-stream
            return real(names, templates, between_blocks=between_blocks)

        side.class_vectors = spy  # type: ignore[method-assign]
        names = [f"anonymous label {i}" for i in range(40)]
        with ThreadPoolExecutor(1) as pool:
            anonymous = pool.submit(text.encode_cached, names)
            assert started.wait(10)
            added = text.encode(["authenticated add"])  # priority (what registry.add uses)
            vectors = anonymous.result(30)
        side.class_vectors = real  # type: ignore[method-assign]
        position = [n for n, _ in log].index("authenticated add")
        assert position <= 2, f"the add waited behind {position} anonymous chunks: {log}"
        assert all(k <= 2 for n, k in log if n != "authenticated add"), log
        assert vectors.shape == (40, added.shape[1])
        blocks = len(side.encoder.clip.transformer.resblocks)
        assert pauses[0] == (blocks - 1) * (len(log) - 1)  # anonymous chunks offer to step aside at every block
        reference = real(names[:3]).numpy()  # chunking changes nothing in the vectors
        assert np.abs(vectors[:3] - reference).max() < 1e-5


def test_text_work_per_request_is_bounded(live: Any, photos: list[Any]) -> None:
    image = base64.b64encode(png_bytes(photos[0].resize((32, 32)))).decode()
    with live(max_candidate_prompts=70) as server, server.client() as http:
        ok = http.post("/v1/classify", json={"images": [image], "candidate_labels": [f"l{i}" for i in range(10)]})
        assert ok.status_code == 200, ok.text  # 10 labels x 7 templates = 70 prompts
        over = http.post("/v1/classify", json={"images": [image], "candidate_labels": [f"l{i}" for i in range(11)]})
        assert over.status_code == 422 and "max_candidate_prompts" in over.json()["detail"], over.text
        labels = [f"m{i}" for i in range(70)]
        one_template = {"images": [image], "candidate_labels": labels, "hypothesis_template": "{}"}
        assert http.post("/v1/classify", json=one_template).status_code == 200
