"""OpenTelemetry traces from a real ``promptdistill serve``, received by a small OTLP/HTTP receiver that
decodes the protobuf ``ExportTraceServiceRequest`` (opentelemetry-proto): a span per request (REST and
gRPC), its children admission, decode, search and text_encode, and the engine's encode span (with
its batch size) in the same trace; the caller's W3C traceparent is continued; the access log line
carries the trace id. Without OTEL_* variables nothing is configured."""

from __future__ import annotations

import gzip
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx2
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from service import tracing
from service.oip import join_bytes
from service.oip_proto import grpc_predict_v2_pb2 as pb
from service.oip_proto import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.reliability.conftest import start_server, stop_server
from tests.service.conftest import free_port, jpeg_bytes

pytestmark = pytest.mark.slow
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Any] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()

    def named(self) -> dict[str, list[Any]]:
        with self.lock:
            out: dict[str, list[Any]] = {}
            for s in self.spans:
                out.setdefault(s.name, []).append(s)
            return out


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.paths.append(self.path)
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans.extend(scope.spans)
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def _wait_for(receiver: Receiver, names: set[str], timeout_s: float = 30.0) -> dict[str, list[Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        named = receiver.named()
        if names <= named.keys():
            return named
        time.sleep(0.05)
    got = receiver.named()
    raise AssertionError(f"spans {sorted(names - got.keys())} never arrived; got {sorted(got)}")


def _attrs(span: Any) -> dict[str, Any]:
    out = {}
    for kv in span.attributes:
        v = kv.value
        out[kv.key] = v.int_value if v.HasField("int_value") else v.string_value
    return out


def test_spans_exported_over_otlp(receiver: Receiver, tiny_bundle_dir: Path, tmp_path: Path, photos: list[Any]) -> None:
    grpc_port = free_port()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_SERVICE_NAME": "pd-test",
        "PROMPTDISTILL_GRPC_PORT": str(grpc_port),
    }
    server = start_server(tiny_bundle_dir, tmp_path, env=env)
    try:
        image = jpeg_bytes(photos[0])
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        files = {"files": ("a.jpg", image, "image/jpeg")}
        r = httpx2.post(server.url + "/v1/classify", files=files, headers={"traceparent": traceparent}, timeout=60)
        assert r.status_code == 200, r.text
        data = {"candidate_labels": ["cat", "dog"]}
        r = httpx2.post(server.url + "/v1/classify", files=files, data=data, timeout=60)
        assert r.status_code == 200, r.text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            req = pb.ModelInferRequest(model_name="default")
            req.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
            req.raw_input_contents.append(join_bytes([image]))
            req.outputs.add(name="SCORES").parameters["classification"].int64_param = 2
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req)
        names = {"POST /v1/classify", "grpc ModelInfer", "admission", "decode", "encode", "search", "text_encode"}
        spans = _wait_for(receiver, names)
        assert all(p == "/v1/traces" for p in receiver.paths)
        # the first request continues the caller's trace; its children hang under its span
        first = next(s for s in spans["POST /v1/classify"] if s.trace_id.hex() == CALLER_TRACE)
        assert first.parent_span_id.hex() == CALLER_SPAN and first.kind == first.SPAN_KIND_SERVER
        assert _attrs(first)["http.response.status_code"] == 200 and _attrs(first)["http.route"] == "/v1/classify"
        in_first = {s.name: s for name in names for s in spans[name] if s.trace_id == first.trace_id}
        for child in ("admission", "decode", "encode", "search"):
            assert in_first[child].parent_span_id == first.span_id, child
        assert _attrs(in_first["encode"])["batch_size"] == 1 and _attrs(in_first["admission"])["images"] == 1
        # the candidate-label request encodes its labels' text
        second = next(s for s in spans["POST /v1/classify"] if s.trace_id != first.trace_id)
        text = [s for s in spans["text_encode"] if s.trace_id == second.trace_id]
        assert len(text) == 1 and text[0].parent_span_id == second.span_id
        # gRPC: the same pipeline's spans under the ModelInfer span
        rpc = spans["grpc ModelInfer"][0]
        in_rpc = {s.name for s in receiver.spans if s.trace_id == rpc.trace_id}
        assert in_rpc >= {"admission", "decode", "encode", "search"}, in_rpc
        # the access log line of a traced request names its trace
        deadline = time.monotonic() + 10
        while CALLER_TRACE not in server.log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"trace_id={CALLER_TRACE}" in server.log.read_text(errors="replace"), server.output()
    finally:
        stop_server(server)


def test_off_without_otel_variables() -> None:
    assert not tracing.wanted({})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})
    assert tracing.wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x/v1/traces"})
    assert not tracing.configure({}) and not tracing.enabled()
    with tracing.span("anything", a=1) as s:  # the shared no-op: no provider, nothing recorded
        assert s is None
    assert tracing.current() is None
