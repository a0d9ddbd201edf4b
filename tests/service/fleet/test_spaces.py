"""A rolling upgrade in miniature: replicas of two embedding spaces share one PostgreSQL database.

A class added through either is served by both: each replica encodes what its own space lacks when
it learns of the class, and ``min_version`` keeps its meaning (503 + Retry-After until the vector
exists in that replica's space, then the answer).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

from tests.service.conftest import png_bytes
from tests.service.fleet.test_registry_sync import wait_until

pytestmark = pytest.mark.slow


def _other_space(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["text_encoder"]["templates"] = ["{}"]  # encodes names differently: another space
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def _labels(http: httpx2.Client, image: str, min_version: int) -> tuple[int, set[str]]:
    r = http.post("/v1/classify", json={"images": [image], "top_k": 50, "min_version": min_version})
    if r.status_code != 200:
        assert r.status_code == 503 and r.headers.get("Retry-After"), r.text
        return r.status_code, set()
    return 200, {p["label"] for p in r.json()["results"][0]["predictions"]}


def test_replicas_of_two_spaces_serve_every_class_either_adds(
    live: Any, pg_url: str, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]
) -> None:
    image = base64.b64encode(png_bytes(photos[3])).decode()
    new = _other_space(tiny_bundle_dir, tmp_path / "v2")
    with live(database_url=pg_url, state_dir=tmp_path / "a") as a, a.client() as old_http:
        assert old_http.post("/v1/label-sets/default/classes", json={"names": ["okapi"]}).status_code == 201
        with live(database_url=pg_url, state_dir=tmp_path / "b", bundle=new) as b, b.client() as new_http:
            wait_until(lambda: new_http.get("/readyz").status_code == 200, 60)  # okapi encoded in the new space
            for added_by, reader, name in ((old_http, b, "narwhal"), (new_http, a, "lynx")):
                made = added_by.post("/v1/label-sets/default/classes", json={"names": [name]})
                assert made.status_code == 201, made.text
                version = made.json()["version"]
                with reader.client() as http:
                    codes: list[int] = []

                    def served(
                        http: httpx2.Client = http, version: int = version, name: str = name, codes: list[int] = codes
                    ) -> bool:
                        code, labels = _labels(http, image, version)
                        codes.append(code)
                        return code == 200 and name in labels

                    wait_until(served, 60)
                assert set(codes) <= {200, 503}, codes  # never an answer without the class
                snap = reader.services.registry.get("default")
                reference = reader.services.text.side.class_vectors([name]).numpy()[0]  # that replica's space
                assert np.abs(snap.vectors[snap.names.index(name)] - reference).max() < 1e-5
            spaces = b.services.registry.store.spaces()
            assert len(spaces) == 2 and len(set(spaces.values())) == 1, spaces  # every class in both spaces
            gone = old_http.delete("/v1/label-sets/default/classes", params={"name": "okapi"})
            assert gone.status_code == 200
            wait_until(lambda: "okapi" not in _labels(new_http, image, gone.json()["version"])[1], 30)
