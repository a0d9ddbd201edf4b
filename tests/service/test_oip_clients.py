"""The Open Inference Protocol through the clients KServe / Triton pipelines call, unmodified:
``tritonclient[http]``, ``tritonclient[grpc]`` and the ``kserve`` SDK's REST and gRPC clients, in
their own virtualenv (their pins fight ours), against a real ``promptdistill serve --grpc-port``.

Each reports server and model readiness, metadata (where it has a call), and classifies real JPEGs
sent as BYTES with the binary-data extension, asking for the classification extension: the top-k
labels and scores equal /v1/classify's within 1e-5. An unknown model comes back as the protocol's
error (HTTP 404 ``{"error"}``, gRPC NOT_FOUND), which each client surfaces as its own exception.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

from tests.service.clients.venv import client_venv
from tests.service.conftest import free_port, jpeg_bytes, subprocess_server

pytestmark = pytest.mark.slow
CLIENTS = ["tritonclient[http,grpc]==2.73.0", "kserve==0.21.0"]
SCRIPT = Path(__file__).with_name("clients") / "oip_clients.py"
K = 4


@pytest.fixture(scope="session")
def clients_python() -> Path:
    python, seconds = client_venv(CLIENTS)
    if seconds:
        print(f"client virtualenv {CLIENTS} installed in {seconds:.0f} s")
    return python


@pytest.fixture(scope="module")
def served(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    grpc_port = free_port()
    state = tmp_path_factory.mktemp("oip-clients-state")
    with subprocess_server(tiny_bundle_dir, state, "--grpc-port", str(grpc_port)) as server:
        yield server.url, grpc_port


@pytest.mark.parametrize("client", ["triton_http", "triton_grpc", "kserve_rest", "kserve_grpc"])
def test_oip_client_matches_v1_classify(
    client: str, clients_python: Path, served: tuple[str, int], photos: list[Any], tmp_path: Path
) -> None:
    url, grpc_port = served
    jpegs = [jpeg_bytes(p) for p in photos[:2]]
    files = []
    for i, data in enumerate(jpegs):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(data)
    host = url.removeprefix("http://")
    cmd = [str(clients_python), str(SCRIPT), client, host, f"127.0.0.1:{grpc_port}", str(K), *map(str, files)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-5000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])

    body = {"images": [base64.b64encode(j).decode() for j in jpegs], "top_k": K}
    want = httpx2.post(url + "/v1/classify", json=body, timeout=60).json()["results"]
    emb = httpx2.post(url + "/v1/embeddings", json={"input": body["images"], "modality": "image"}, timeout=60).json()
    want_emb = np.array([d["embedding"] for d in emb["data"]])
    assert got["live"] is True and got["ready"] is True and got["model_ready"] is True, client
    assert len(got["classes"]) == len(jpegs), client
    for row, result in zip(got["classes"], want, strict=True):
        parsed = [s.split(":", 2) for s in row]
        assert [(int(i), label) for _, i, label in parsed] == [
            (p["class_id"], p["label"]) for p in result["predictions"]
        ], client
        for (score, _, _), p in zip(parsed, result["predictions"], strict=True):
            assert abs(float(score) - p["score"]) <= 1e-5, (client, score, p["score"])
    assert "unknown model" in got["unknown_model"] and (
        got["unknown_model"].startswith(("404", "NOT_FOUND", "StatusCode.NOT_FOUND"))
    ), (client, got["unknown_model"])
    if "embedding" in got:
        assert np.allclose(np.array(got["embedding"]), want_emb, atol=1e-5), client
    if "metadata" in got:
        meta = got["metadata"]
        assert meta["name"] == "default" and meta["inputs"][0]["name"] == "IMAGE", (client, meta)
        assert meta["inputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["name"] == "SCORES", (client, meta)
        assert "classification" in got["server"]["extensions"], client
