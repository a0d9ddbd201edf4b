"""Runs inside the client virtualenv (tritonclient[http,grpc], kserve), never imported by the suite.

Usage: python oip_clients.py CLIENT HTTP_HOST:PORT GRPC_HOST:PORT K IMAGE...
(CLIENT: triton_http, triton_grpc, kserve_rest or kserve_grpc; one per process, because tritonclient and
kserve each register the protocol's ``inference.*`` messages in protobuf's one descriptor pool.)

Prints one JSON object: what it says about server and model readiness, the model's
metadata (where the client has a call for it), the classification answer for the images (the
"score:index:label" strings, best first) and the error it raises for an unknown model. The clients
are used as their documentation shows, unmodified.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def _strings(array: np.ndarray) -> list[list[str]]:
    return [[s.decode() if isinstance(s, bytes) else str(s) for s in row] for row in array]


def triton_http(url: str, images: list[bytes], k: int) -> dict[str, Any]:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    client = httpclient.InferenceServerClient(url)
    image = httpclient.InferInput("IMAGE", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    scores = httpclient.InferRequestedOutput("SCORES", binary_data=True, class_count=k)
    result = client.infer("default", [image], outputs=[scores])
    encoder = client.infer("image-encoder", [image])
    try:
        client.infer("no-such-model", [image], outputs=[scores])
        unknown = "no error"
    except InferenceServerException as e:
        unknown = f"{e.status()} {e.message()}"
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("default"),
        "metadata": client.get_model_metadata("default"),
        "server": client.get_server_metadata(),
        "classes": _strings(result.as_numpy("SCORES")),
        "embedding": encoder.as_numpy("EMBEDDING").tolist(),
        "unknown_model": unknown,
    }


def triton_grpc(url: str, images: list[bytes], k: int) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    image = grpcclient.InferInput("IMAGE", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_))
    scores = grpcclient.InferRequestedOutput("SCORES", class_count=k)
    result = client.infer("default", [image], outputs=[scores])
    encoder = client.infer("image-encoder", [image])
    try:
        client.infer("no-such-model", [image], outputs=[scores])
        unknown = "no error"
    except InferenceServerException as e:
        unknown = f"{e.status()} {e.message()}"
    return {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready("default"),
        "metadata": client.get_model_metadata("default", as_json=True),
        "server": client.get_server_metadata(as_json=True),
        "classes": _strings(result.as_numpy("SCORES")),
        "embedding": encoder.as_numpy("EMBEDDING").tolist(),
        "unknown_model": unknown,
    }


def _kserve_request(images: list[bytes], k: int, model: str = "default") -> Any:
    from kserve import InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    image = InferInput("IMAGE", [len(images)], "BYTES")
    image.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
    output = RequestedOutput("SCORES", parameters={"classification": k, "binary_data": True})
    return InferRequest(model_name=model, infer_inputs=[image], request_outputs=[output])


async def kserve_rest(url: str, images: list[bytes], k: int) -> dict[str, Any]:
    import httpx
    from kserve import InferenceRESTClient, RESTConfig

    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    base = f"http://{url}"
    result = await client.infer(base, _kserve_request(images, k), model_name="default")
    try:
        await client.infer(base, _kserve_request(images, k, "no-such-model"), model_name="no-such-model")
        unknown = "no error"
    except httpx.HTTPStatusError as e:
        unknown = f"{e.response.status_code} {e.response.json().get('error')}"
    out = {
        "live": await client.is_server_live(base),
        "ready": await client.is_server_ready(base),
        "model_ready": await client.is_model_ready(base, "default"),
        "classes": _strings(result.outputs[0].as_numpy()),
        "unknown_model": unknown,
    }
    await client.close()
    return out


async def kserve_grpc(url: str, images: list[bytes], k: int) -> dict[str, Any]:
    import grpc
    from kserve import InferenceGRPCClient

    client = InferenceGRPCClient(url)
    result = await client.infer(_kserve_request(images, k))
    try:
        await client.infer(_kserve_request(images, k, "no-such-model"))
        unknown = "no error"
    except grpc.RpcError as e:
        unknown = f"{e.code().name} {e.details()}"
    out = {
        "live": await client.is_server_live(),
        "ready": await client.is_server_ready(),
        "model_ready": await client.is_model_ready("default"),
        "classes": _strings(result.outputs[0].as_numpy()),
        "unknown_model": unknown,
    }
    await client.close()
    return out


def main() -> None:
    client, http_url, grpc_url, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    images = [Path(p).read_bytes() for p in sys.argv[5:]]
    if client == "triton_http":
        report = triton_http(http_url, images, k)
    elif client == "triton_grpc":
        report = triton_grpc(grpc_url, images, k)
    elif client == "kserve_rest":
        report = asyncio.run(kserve_rest(http_url, images, k))
    else:
        report = asyncio.run(kserve_grpc(grpc_url, images, k))
    sys.stdout.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
