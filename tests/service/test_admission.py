"""Admission before work: refusals come before any decoding, capacity follows the latency target."""

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

from service.admission import Admission, AdmissionCfg
from service.errors import Overloaded
from tests.service.conftest import png_bytes
from tests.service.test_classify import metric


def _cfg(**kw: Any) -> AdmissionCfg:
    values: dict[str, Any] = {
        "capacity": None, "target_latency_s": 0.5, "deadline_s": 30.0, "min_capacity": 3, "decode_workers": 2,
        "retry_after_s": 1,
    }  # fmt: skip
    values.update(kw)
    return AdmissionCfg(**values)


def test_capacity_follows_the_latency_target_and_the_slower_stage() -> None:
    adm = Admission(_cfg(), encode_s=0.020, decode_s=0.010)
    assert adm.capacity == 25  # 0.5 s / 20 ms: the encoder is the slower stage (decode: 10 ms / 2 workers)
    for _ in range(200):  # the encoder turns out slower: 16 images in 1.6 s -> 100 ms per image
        adm.observe_encode(1.6, 16)
    assert adm.capacity == 5  # 0.5 / 0.100
    assert Admission(_cfg(deadline_s=0.1), 0.015, 0.005).capacity == 6  # never more than fits the deadline
    assert Admission(_cfg(), 1.0, 0.1).capacity == 3  # a slow model still keeps every stage busy
    assert Admission(_cfg(capacity=7), 1.0, 0.1).capacity == 7  # max_images_in_flight fixes it
    decode_bound = Admission(_cfg(), encode_s=0.002, decode_s=0.050)  # tiny model, big photos
    assert decode_bound.capacity == 20  # 0.5 s / (50 ms / 2 decode workers)
    assert Admission(_cfg(decode_workers=1), 0.002, 0.050).capacity == 10


def test_the_encoder_rate_weighs_batches_by_their_images() -> None:
    """Time per image delivered, not the mean of per-batch quotients: one batch of 15 in 0.6 s and one
    image alone in 0.06 s is 0.66 s for 16 images (41 ms each), where the quotients average 50 ms."""
    adm = Admission(_cfg(target_latency_s=10.0, decode_workers=64), encode_s=0.060, decode_s=0.001)
    for _ in range(300):
        adm.observe_encode(0.6, 15)
        adm.observe_encode(0.06, 1)
    assert adm.image_s == pytest.approx(0.66 / 16, rel=0.1)


def test_refusal_is_immediate_carries_retry_after_and_frees_nothing() -> None:
    adm = Admission(_cfg(capacity=4, retry_after_s=2), encode_s=0.5, decode_s=0.5)
    with adm.admit(3):
        with pytest.raises(Overloaded) as refused, adm.admit(2):
            pytest.fail("admitted over capacity")
        assert refused.value.status == 429
        assert int(refused.value.headers["Retry-After"]) >= 2
        assert adm.in_flight == 3
        with adm.admit(1):
            assert adm.in_flight == 4
    assert adm.in_flight == 0 and adm.refused == 1
    with adm.admit(10):  # an idle server takes one request however large
        assert adm.in_flight == 10


def test_http_refusal_happens_before_decoding(live: Any, photos: list[Any]) -> None:
    """With the encoder busy and capacity used up, a request gets 429 and none of its images is decoded."""
    image = base64.b64encode(png_bytes(photos[0].resize((64, 64)))).decode()
    gate = threading.Event()
    with live(max_images_in_flight=2, max_batch_size=1, retry_after_s=3) as server:
        classifier = server.services.classifier
        engine = server.services.engine
        fast, real_pre = engine.encode, classifier.preprocess  # gate both stages
        decoded: list[int] = []
        encoding: list[int] = []

        def counting_pre(im: Any, index: int = 0) -> np.ndarray:
            decoded.append(index)
            return real_pre(im, index)

        def gated(px: np.ndarray) -> np.ndarray:
            encoding.append(len(px))
            gate.wait(20)
            return fast(px)

        classifier.preprocess = counting_pre
        engine.encode = gated
        pool = ThreadPoolExecutor(1)
        holder = pool.submit(httpx2.post, server.url + "/v1/classify", json={"images": [image] * 2}, timeout=60)
        deadline = time.monotonic() + 20
        while not encoding and time.monotonic() < deadline:  # 2 images in flight: capacity is used up
            time.sleep(0.01)
        assert encoding and classifier.admission.in_flight == 2
        before = len(decoded)
        with server.client() as http:
            refused = http.post("/v1/classify", json={"images": [image]})
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "3" and "capacity" in refused.json()["detail"]
        assert len(decoded) == before == 2, "the refused request's image was decoded"
        with server.client() as http:  # what an operator sees meanwhile
            text = http.get("/metrics").text
        assert metric(text, "promptdistill_admission_capacity") == 2
        assert metric(text, "promptdistill_admission_in_flight") == 2
        assert metric(text, "promptdistill_admission_seconds_per_image") > 0
        gate.set()
        assert holder.result().status_code == 200
        pool.shutdown()
        classifier.preprocess = real_pre
        engine.encode = fast
        with server.client() as http:
            assert http.post("/v1/classify", json={"images": [image]}).status_code == 200
        assert classifier.admission.in_flight == 0


def test_admission_counts_images_until_they_are_encoded() -> None:
    """in_flight covers decoding, queueing and encoding, and drops back to zero after errors too."""

    async def run() -> list[int]:
        adm = Admission(_cfg(capacity=8), 0.01, 0.01)
        seen: list[int] = []

        async def work(n: int, fail: bool) -> None:
            with adm.admit(n):
                seen.append(adm.in_flight)
                await asyncio.sleep(0.01)
                if fail:
                    raise ValueError("decode failed")

        results = await asyncio.gather(work(3, False), work(4, True), return_exceptions=True)
        assert isinstance(results[1], ValueError)
        seen.append(adm.in_flight)
        return seen

    assert asyncio.run(run()) == [3, 7, 0]
