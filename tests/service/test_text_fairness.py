"""Fair text encoding: bounded anonymous text work, and class adds never wait behind it."""

from __future__ import annotations

import base64
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import numpy as np

from tests.service.conftest import png_bytes


def test_a_class_add_cuts_in_front_of_an_open_vocabulary_flood(live: Any, photos: list[Any]) -> None:
    """The real text side behind the text engine: anonymous candidate labels from several clients queue;
    a class add (urgent) is encoded after at most the anonymous batch running when it arrived (and one
    more that may start while the add's request is parsed), and batching changes no vector."""
    image = base64.b64encode(png_bytes(photos[0].resize((32, 32)))).decode()
    with live() as server:
        side = server.services.text.side
        real = side.class_vectors
        log: list[list[str]] = []

        def spy(names: list[str], templates: Any = None, progress: bool = False) -> Any:
            log.append(list(names))
            time.sleep(0.05)  # every batch takes a while, so the flood keeps the text engine busy
            return real(names, templates)

        side.class_vectors = spy  # type: ignore[method-assign]

        def anonymous(client: int) -> int:
            labels = [f"anonymous {client} label {i}" for i in range(30)]
            body = {"images": [image], "candidate_labels": labels}
            return httpx2.post(server.url + "/v1/classify", json=body, timeout=60).status_code

        with ThreadPoolExecutor(4) as pool:
            flood = [pool.submit(anonymous, c) for c in range(4)]
            deadline = time.monotonic() + 20
            while len(log) < 2 and time.monotonic() < deadline:  # the flood is being encoded
                time.sleep(0.005)
            before = len(log)
            with server.client() as http:
                added = http.post("/v1/label-sets/default/classes", json={"names": ["authenticated add"]})
            codes = [f.result(60) for f in flood]
        side.class_vectors = real  # type: ignore[method-assign]
        assert added.status_code == 201, added.text
        assert set(codes) <= {200, 429}, codes
        position = next(k for k, names in enumerate(log) if "authenticated add" in names)
        assert position - before <= 2, f"the add waited behind {position - before} anonymous batches: {log}"
        anon = [n for names in log for n in names if n.startswith("anonymous")]
        assert len(anon) >= 30 and len(log) > len(codes), "anonymous work was not split into batches"
        vec = server.services.registry.get("default")
        row = vec.names.index("authenticated add")
        assert np.abs(vec.vectors[row] - real(["authenticated add"]).numpy()[0]).max() < 1e-5


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


def test_a_text_batch_whose_clients_all_left_stops_at_the_next_transformer_block(live: Any, photos: list[Any]) -> None:
    """Open-vocabulary work already running for a client that disconnects: the real text side's
    blocks see the batch abandoned and stop (the forward pre-hook service/text.py installs); the
    labels count as dropped, no batch is recorded as encoded, and the server answers the next request."""
    from service.engine import Abandoned
    from tests.service.test_classify import metric

    image = base64.b64encode(png_bytes(photos[0].resize((32, 32)))).decode()
    with live() as server:
        side, engine = server.services.text.side, server.services.text.engine
        real = side.class_vectors
        outcome: list[str] = []

        def held(names: list[str], templates: Any = None, progress: bool = False) -> Any:
            abandoned = engine.abandoned  # this batch's flag (set by the engine when its requests are gone)
            if not abandoned.wait(30):  # the batch is running; its client hangs up meanwhile
                outcome.append("never abandoned")
            try:
                return real(names, templates)
            except Abandoned:
                outcome.append("stopped")
                raise

        side.class_vectors = held  # type: ignore[method-assign]
        labels = [f"gone label {i}" for i in range(5)]
        before = httpx2.get(server.url + "/metrics").text
        with contextlib.suppress(httpx2.TimeoutException):  # the client gives up while its labels encode
            httpx2.post(server.url + "/v1/classify", json={"images": [image], "candidate_labels": labels}, timeout=1.0)
        deadline = time.monotonic() + 30
        while not outcome and time.monotonic() < deadline:
            time.sleep(0.01)
        side.class_vectors = real  # type: ignore[method-assign]
        after = httpx2.get(server.url + "/metrics").text
        again = httpx2.post(
            server.url + "/v1/classify", json={"images": [image], "candidate_labels": ["a cat", "a dog"]}, timeout=60
        )
    assert outcome == ["stopped"], outcome
    text = {"tower": "text"}
    encoded = metric(after, "promptdistill_batch_seconds_count", text) - metric(
        before, "promptdistill_batch_seconds_count", text
    )
    dropped = metric(after, "promptdistill_dropped_images_total", {**text, "reason": "cancelled"}) - metric(
        before, "promptdistill_dropped_images_total", {**text, "reason": "cancelled"}
    )
    assert encoded == 0 and dropped == len(labels), (encoded, dropped)
    assert again.status_code == 200, again.text
