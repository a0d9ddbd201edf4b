"""Fair text encoding: bounded anonymous text work, and class adds never wait behind it."""

from __future__ import annotations

import base64
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
