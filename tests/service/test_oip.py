"""Open Inference Protocol v2 over REST and gRPC against the real app: the answers equal /v1/classify's
(and the embeddings /v1/embeddings'), in JSON and in the binary-data extension, and every kind of bad
input gets the protocol's own error (``{"error": ...}`` with a 4xx; a gRPC status code).

The third-party clients (tritonclient, kserve) are in tests/service/test_oip_clients.py."""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.oip import join_bytes, split_bytes
from service.oip_proto import grpc_predict_v2_pb2 as pb
from service.oip_proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.service.conftest import LiveServer, free_port, jpeg_bytes

ROOT = Path(__file__).resolve().parents[2]
KEY = "oip-key"
LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def server(tiny_bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    from service import Settings

    settings = Settings(
        bundle=tiny_bundle_dir,
        state_dir=tmp_path_factory.mktemp("oip-state"),
        threads=1,
        grpc_port=free_port(),
        max_request_bytes=4 * 1024 * 1024,
        max_image_bytes=1024 * 1024,
    )
    with LiveServer(settings) as live:
        yield live


@pytest.fixture(scope="module")
def jpegs(photos: list[Any]) -> list[bytes]:
    return [jpeg_bytes(p) for p in photos[:3]]


@pytest.fixture
def stub(server: LiveServer) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(f"127.0.0.1:{server.services.settings.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def _classify(server: LiveServer, images: list[bytes], k: int) -> list[list[tuple[str, int, float]]]:
    body = {"images": [base64.b64encode(i).decode() for i in images], "top_k": k}
    answer = server.client().post("/v1/classify", json=body).json()
    return [[(p["label"], p["class_id"], p["score"]) for p in r["predictions"]] for r in answer["results"]]


def _parse_classes(strings: list[str], batch: int) -> list[list[tuple[str, int, float]]]:
    rows = []
    for s in strings:
        score, index, label = s.split(":", 2)
        rows.append((label, int(index), float(score)))
    k = len(rows) // batch
    return [rows[b * k : (b + 1) * k] for b in range(batch)]


def _same(got: list[list[tuple[str, int, float]]], want: list[list[tuple[str, int, float]]]) -> None:
    assert [[(lab, i) for lab, i, _ in row] for row in got] == [[(lab, i) for lab, i, _ in row] for row in want]
    for g_row, w_row in zip(got, want, strict=True):
        for (_, _, g), (_, _, w) in zip(g_row, w_row, strict=True):
            assert abs(g - w) <= 1e-5, (g, w)


def _binary_body(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + b"".join(tensors), {LENGTH: str(len(head)), "Content-Type": "application/octet-stream"}


def test_metadata_and_readiness(server: LiveServer) -> None:
    c = server.client()
    meta = c.get("/v2").json()
    assert meta["name"] == "promptdistill" and {"classification", "binary_tensor_data"} <= set(meta["extensions"])
    assert c.get("/v2/health/live").json() == {"live": True}
    assert c.get("/v2/health/ready").json() == {"ready": True}
    model = c.get("/v2/models/default").json()
    snap = server.services.registry.get("default")
    assert model["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1]}]
    assert model["outputs"] == [{"name": "SCORES", "datatype": "FP32", "shape": [-1, len(snap)]}]
    assert model["versions"] == [str(snap.version)]
    encoder = c.get("/v2/models/image-encoder").json()
    assert encoder["outputs"] == [{"name": "EMBEDDING", "datatype": "FP32", "shape": [-1, 64]}]
    assert c.get("/v2/models/default/ready").json() == {"name": "default", "ready": True}


def test_rest_json_and_binary_equal_v1_classify(server: LiveServer, jpegs: list[bytes]) -> None:
    want = _classify(server, jpegs, 3)
    c = server.client()
    data = [base64.b64encode(i).decode() for i in jpegs]
    body = {
        "id": "r1",
        "inputs": [{"name": "IMAGE", "shape": [3], "datatype": "BYTES", "data": data}],
        "outputs": [{"name": "SCORES", "parameters": {"classification": 3}}],
    }
    r = c.post("/v2/models/default/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["id"] == "r1" and out["model_name"] == "default" and out["outputs"][0]["shape"] == [3, 3]
    _same(_parse_classes(out["outputs"][0]["data"], 3), want)
    # binary-data extension both ways: raw JPEG bytes in, raw "score:index:label" elements out
    raw = join_bytes(jpegs)
    header = {
        "inputs": [
            {"name": "IMAGE", "shape": [3, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
        ],
        "outputs": [{"name": "SCORES", "parameters": {"classification": 3, "binary_data": True}}],
    }
    content, headers = _binary_body(header, raw)
    r = c.post("/v2/models/default/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers[LENGTH])
    meta = json.loads(r.content[:n])
    size = meta["outputs"][0]["parameters"]["binary_data_size"]
    assert size == len(r.content) - n
    strings = [s.decode() for s in split_bytes(r.content[n:], "answer")]
    _same(_parse_classes(strings, 3), want)


def test_rest_encoder_equals_v1_embeddings(server: LiveServer, jpegs: list[bytes]) -> None:
    c = server.client()
    data = [base64.b64encode(i).decode() for i in jpegs[:2]]
    want = np.array(
        [d["embedding"] for d in c.post("/v1/embeddings", json={"input": data, "modality": "image"}).json()["data"]]
    )
    raw = join_bytes(jpegs[:2])
    header = {
        "inputs": [{"name": "IMAGE", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }
    content, headers = _binary_body(header, raw)
    r = c.post("/v2/models/image-encoder/infer", content=content, headers=headers)
    assert r.status_code == 200, r.text
    n = int(r.headers[LENGTH])
    out = json.loads(r.content[:n])["outputs"][0]
    assert out["name"] == "EMBEDDING" and out["datatype"] == "FP32" and out["shape"] == [2, 64]
    got = np.frombuffer(r.content[n:], dtype="<f4").reshape(2, 64)
    assert np.allclose(got, want, atol=1e-6)


def _image_input(shape: list[int], size: int) -> dict[str, Any]:
    return {"name": "IMAGE", "shape": shape, "datatype": "BYTES", "parameters": {"binary_data_size": size}}


def test_rest_bad_input_in_oip_form(server: LiveServer, jpegs: list[bytes]) -> None:
    c = server.client()
    b64 = base64.b64encode(jpegs[0]).decode()
    raw = join_bytes(jpegs[:1])

    def image(shape: list[int], data: list[Any], datatype: str = "BYTES", name: str = "IMAGE") -> dict[str, Any]:
        return {"json": {"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}}

    no_k = image([1], [b64])
    no_k["json"]["outputs"] = [{"name": "SCORES"}]
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("wrong datatype", image([1], [1.0], "FP32"), 400, "BYTES"),
        ("wrong shape", image([1, 2], [b64, b64]), 400, "shape"),
        ("count vs shape", image([2], [b64]), 400, "declares 2"),
        ("wrong input name", image([1], [b64], name="PIXELS"), 400, "IMAGE"),
        ("not an image", image([1], ["aGVsbG8="]), 400, "image 0"),
        ("url refused", image([1], ["https://x.org/a.jpg"]), 400, "URL"),
        ("not json", {"content": b"{nope", "headers": {"Content-Type": "application/json"}}, 400, "invalid request"),
        ("no classification", no_k, 400, "classification"),
    ]
    for what, kwargs, status, words in cases:
        r = c.post("/v2/models/default/infer", **kwargs)
        assert r.status_code == status and words in r.json()["error"], (what, r.status_code, r.text)
        assert r.headers["content-type"] == "application/json", what
    # the declared size of a tensor disagrees with its bytes; element lengths overrun; header overruns the body
    binary: list[tuple[str, bytes, dict[str, str], str]] = [
        ("size > bytes", *_binary_body({"inputs": [_image_input([1], len(raw) + 10)]}, raw), "overruns"),
        ("size < bytes", *_binary_body({"inputs": [_image_input([1], len(raw) - 10)]}, raw), "remain"),
        ("extra tail", *_binary_body({"inputs": [_image_input([1], len(raw))]}, raw, b"xx"), "belong to no input"),
        (
            "element overrun",
            *_binary_body({"inputs": [_image_input([1], 8)]}, struct.pack("<I", 999) + b"abcd"),
            "declares 999",
        ),
    ]
    for what, content, headers, words in binary:
        r = c.post("/v2/models/default/infer", content=content, headers=headers)
        assert r.status_code == 400 and words in r.json()["error"], (what, r.text)
    content, headers = _binary_body({"inputs": [_image_input([1], len(raw))]}, raw)
    r = c.post("/v2/models/default/infer", content=content, headers={**headers, LENGTH: str(len(content) + 1)})
    assert r.status_code == 400 and "overruns" in r.json()["error"], r.text
    r = c.post("/v2/models/default/infer", content=content, headers={**headers, LENGTH: "-3"})
    assert r.status_code == 400 and "byte count" in r.json()["error"], r.text
    # unknown model: 404 in the same form, for metadata, readiness and inference
    for r in (
        c.get("/v2/models/nope"),
        c.get("/v2/models/nope/ready"),
        c.post(
            "/v2/models/nope/infer",
            json={"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]}]},
        ),
    ):
        assert r.status_code == 404 and "unknown model" in r.json()["error"], r.text


@pytest.mark.slow  # starts a server of its own
def test_rest_key_when_required(live: Any, jpegs: list[bytes]) -> None:
    b64 = base64.b64encode(jpegs[0]).decode()
    body = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    with live(api_key=KEY, oip_require_api_key=True) as server, server.client() as c:
        r = c.post("/v2/models/default/infer", json=body)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert c.get("/v2/models/default").status_code == 401
        assert c.post("/v2/models/default/infer", json=body, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/v2/health/ready").status_code == 200  # health stays open


def _grpc_request(model: str, images: list[bytes], k: int | None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="g1")
    t = req.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(images)])
    del t
    if k is not None:
        out = req.outputs.add(name="SCORES")
        out.parameters["classification"].int64_param = k
    req.raw_input_contents.append(join_bytes(images))
    return req


def test_grpc_equals_v1_classify_and_health(server: LiveServer, stub: Any, jpegs: list[bytes]) -> None:
    want = _classify(server, jpegs, 4)
    assert stub.ServerLive(pb.ServerLiveRequest()).live and stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name="default")).ready
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="default"))
    assert meta.inputs[0].name == "IMAGE" and meta.inputs[0].datatype == "BYTES" and list(meta.inputs[0].shape) == [-1]
    answer = stub.ModelInfer(_grpc_request("default", jpegs, 4))
    assert answer.id == "g1" and answer.outputs[0].datatype == "BYTES" and list(answer.outputs[0].shape) == [3, 4]
    strings = [s.decode() for s in split_bytes(answer.raw_output_contents[0], "answer")]
    _same(_parse_classes(strings, 3), want)
    # elements in contents.bytes_contents (no raw) work too
    req = pb.ModelInferRequest(model_name="default")
    req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1]).contents.bytes_contents.append(jpegs[0])
    req.outputs.add(name="SCORES").parameters["classification"].int64_param = 4
    strings = [s.decode() for s in split_bytes(stub.ModelInfer(req).raw_output_contents[0], "answer")]
    _same(_parse_classes(strings, 1), want[:1])
    with grpc.insecure_channel(f"127.0.0.1:{server.services.settings.grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def _code(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_grpc_errors(server: LiveServer, stub: Any, jpegs: list[bytes]) -> None:
    bad_type = pb.ModelInferRequest(model_name="default")
    bad_type.inputs.add(name="IMAGE", datatype="FP32", shape=[1])
    bad_type.raw_input_contents.append(b"\0\0\0\0")
    bad_shape = _grpc_request("default", jpegs[:1], 1)
    bad_shape.inputs[0].shape[:] = [2]
    overrun = _grpc_request("default", jpegs[:1], 1)
    overrun.raw_input_contents[0] = struct.pack("<I", 10_000) + b"abc"
    cases = [
        (bad_type, grpc.StatusCode.INVALID_ARGUMENT, "BYTES"),
        (bad_shape, grpc.StatusCode.INVALID_ARGUMENT, "declares 2"),
        (overrun, grpc.StatusCode.INVALID_ARGUMENT, "declares 10000"),
        (_grpc_request("nope", jpegs[:1], 1), grpc.StatusCode.NOT_FOUND, "unknown model"),
        (_grpc_request("default", [b"not an image"], 1), grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    ]
    for req, code, words in cases:
        got, details = _code(lambda req=req: stub.ModelInfer(req))
        assert got == code and words in details, (got, details)
    got, _ = _code(lambda: stub.ModelMetadata(pb.ModelMetadataRequest(name="nope")))
    assert got == grpc.StatusCode.NOT_FOUND
    # over the message cap (max_request_bytes = 4 MiB): gRPC itself refuses with RESOURCE_EXHAUSTED
    huge = _grpc_request("default", [b"\xff" * (5 * 1024 * 1024)], 1)
    got, _ = _code(lambda: stub.ModelInfer(huge))
    assert got == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerReady(pb.ServerReadyRequest()).ready  # and the server carries on


@pytest.mark.slow  # starts a server of its own
def test_grpc_key_when_required(live: Any, jpegs: list[bytes]) -> None:
    port = free_port()
    with live(api_key=KEY, oip_require_api_key=True, grpc_port=port), grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        got, details = _code(lambda: stub.ModelInfer(_grpc_request("default", jpegs[:1], 1)))
        assert got == grpc.StatusCode.UNAUTHENTICATED and "API key" in details
        got, _ = _code(
            lambda: stub.ModelInfer(_grpc_request("default", jpegs[:1], 1), metadata=(("x-api-key", "wrong"),))
        )
        assert got == grpc.StatusCode.UNAUTHENTICATED
        answer = stub.ModelInfer(_grpc_request("default", jpegs[:1], 1), metadata=(("x-api-key", KEY),))
        assert len(split_bytes(answer.raw_output_contents[0], "answer")) == 1


@pytest.mark.slow  # starts a server of its own
def test_grpc_port_refused_with_several_workers(tiny_bundle_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "promptdistill", "serve", "--bundle", str(tiny_bundle_dir), "--state-dir",
           str(tmp_path), "--workers", "2", "--grpc-port", str(free_port())]  # fmt: skip
    run = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env={**_env(), "PYTHONPATH": str(ROOT)}
    )
    assert run.returncode == 2 and "grpc_port needs workers = 1" in run.stderr, run.stderr


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("PROMPTDISTILL_")}


def test_checked_in_stubs_match_the_proto(tmp_path: Path) -> None:
    """The generated modules are what grpcio-tools (pinned) makes of the checked-in .proto."""
    from grpc_tools import protoc

    proto = "service/oip_proto/grpc_predict_v2.proto"
    args = ["protoc", f"-I{ROOT}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    assert protoc.main([*args, str(ROOT / proto)]) == 0
    for name in ("grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2.pyi", "grpc_predict_v2_pb2_grpc.py"):
        fresh = (tmp_path / "service" / "oip_proto" / name).read_text()
        checked_in = (ROOT / "service" / "oip_proto" / name).read_text()
        header, _, body = checked_in.partition("\n")
        assert "Generated by grpcio-tools" in header and body == fresh, f"{name}: run scripts/gen_oip_grpc.sh"


def test_admission_and_deadline_in_each_protocol(server: LiveServer, stub: Any, jpegs: list[bytes]) -> None:
    """A server at capacity refuses OIP requests before any decoding, as it does /v1/classify: 429 with
    Retry-After and ``{"error"}`` over REST, RESOURCE_EXHAUSTED with ``retry-after`` metadata over gRPC."""
    admission = server.services.classifier.admission
    b64 = base64.b64encode(jpegs[0]).decode()
    body = {"inputs": [{"name": "IMAGE", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    admission.in_flight += admission.capacity  # as if that many images were being decoded and encoded
    try:
        r = server.client().post("/v2/models/default/infer", json=body)
        assert r.status_code == 429 and "capacity" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(_grpc_request("default", jpegs[:1], 1))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "capacity" in info.value.details()
        assert int(dict(info.value.trailing_metadata())["retry-after"]) >= 1
    finally:
        admission.in_flight -= admission.capacity
    # a client's gRPC deadline ends its call; the server answers the next one as usual
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_grpc_request("default", jpegs * 10, 1), timeout=0.001)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert len(split_bytes(stub.ModelInfer(_grpc_request("default", jpegs[:1], 1)).raw_output_contents[0], "a")) == 1
