"""Open Inference Protocol v2 over gRPC (``serve --grpc-port PORT``), beside the HTTP server.

A ``grpc.aio`` server on the HTTP server's own event loop: the servicer calls the very pipeline the
REST routes call (:class:`service.oip.Models` -> :class:`service.classifier.Classifier`), so the
admission, caps, request deadline and errors are the same. The app's lifespan starts it after the
model is loaded and stops it (drain, then close) before the engine drains. A client's gRPC deadline
cancels its handler, which drops its queued images like a vanished HTTP client. Messages over
``max_request_bytes`` are refused by gRPC itself with RESOURCE_EXHAUSTED. ``grpc.health.v1``
answers Kubernetes gRPC probes: SERVING for "" and the inference service while running.

Domain errors map to status codes: 400/422 and 415 -> INVALID_ARGUMENT, 404 -> NOT_FOUND,
401 -> UNAUTHENTICATED, 413 and 429 -> RESOURCE_EXHAUSTED (429 with ``retry-after`` trailing
metadata), 409 -> FAILED_PRECONDITION, 503 -> UNAVAILABLE, 504 -> DEADLINE_EXCEEDED.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from models import __version__
from service.errors import InvalidInput, ServiceError
from service.images import EncodedImage
from service.oip import (
    EXTENSIONS,
    SERVER_NAME,
    InferResult,
    InputTensor,
    Models,
    OutputRequest,
    check_key,
    split_bytes,
)
from service.oip_proto import grpc_predict_v2_pb2 as pb
from service.oip_proto import grpc_predict_v2_pb2_grpc as pb_grpc
from service.state import Services
from service.tracing import server_span

log = logging.getLogger(__name__)
SERVICE_NAME = "inference.GRPCInferenceService"
T = TypeVar("T")

_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, services: Services) -> None:
        self.services = services
        self.models = Models(services)

    async def _guard(self, context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        try:
            metadata = dict(context.invocation_metadata() or ())
            check_key(self.services, _text(metadata.get("x-api-key")))
            return await call()
        except ServiceError as e:
            retry = e.headers.get("Retry-After")
            if retry is not None:
                context.set_trailing_metadata((("retry-after", retry),))
            await context.abort(_CODES.get(e.status, grpc.StatusCode.INVALID_ARGUMENT), e.message)
            raise  # abort raises; this only satisfies the type checker

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.models.live)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.models.ready)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=await self.models.model_ready(request.name))

        return await self._guard(context, call)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext) -> Any:
        async def call() -> pb.ModelMetadataResponse:
            meta = await self.models.metadata(request.name)
            tensor = pb.ModelMetadataResponse.TensorMetadata
            return pb.ModelMetadataResponse(
                name=meta.name,
                versions=meta.versions,
                platform=meta.platform,
                inputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
                outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
            )

        return await self._guard(context, call)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext) -> Any:
        async def gone() -> bool:
            return bool(context.cancelled())

        async def call() -> pb.ModelInferResponse:
            carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            with server_span("grpc ModelInfer", carrier, model=request.model_name):
                inputs = _inputs(request)
                outputs = [_output(o) for o in request.outputs]
                result = await self.models.infer(request.model_name, inputs, outputs, gone)
                return _response(result, request.id)

        return await self._guard(context, call)


def _text(value: str | bytes | None) -> str | None:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _inputs(request: pb.ModelInferRequest) -> list[InputTensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs")
    out: list[InputTensor] = []
    for i, t in enumerate(request.inputs):
        if raw and t.HasField("contents"):
            raise InvalidInput(f"input {t.name}: contents and raw_input_contents cannot both be given")
        if t.datatype != "BYTES":
            raise InvalidInput(f"input {t.name}: datatype {t.datatype!r}; it must be BYTES (encoded image files)")
        items = split_bytes(raw[i], f"input {t.name}") if raw else list(t.contents.bytes_contents)
        elements: list[EncodedImage | str] = [EncodedImage(b) for b in items]
        out.append(InputTensor(t.name, t.datatype, list(t.shape), elements))
    return out


def _output(o: pb.ModelInferRequest.InferRequestedOutputTensor) -> OutputRequest:
    param = o.parameters.get("classification")
    if param is None:
        return OutputRequest(o.name)
    if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param < 1:
        raise InvalidInput(f"output {o.name}: classification must be an int64 parameter >= 1 (the top k)")
    return OutputRequest(o.name, int(param.int64_param))


def _response(result: InferResult, request_id: str) -> pb.ModelInferResponse:
    tensor = pb.ModelInferResponse.InferOutputTensor
    return pb.ModelInferResponse(
        model_name=result.model,
        model_version=result.version,
        id=request_id,
        outputs=[tensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in result.outputs],
        raw_output_contents=[t.raw() for t in result.outputs],
    )


class GrpcServer:
    """The gRPC server's life: ``await start()`` in the lifespan, ``await stop(grace)`` before draining."""

    def __init__(self, services: Services, host: str, port: int) -> None:
        limit = services.settings.max_request_bytes
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit)])
        self.health = health.aio.HealthServicer()
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(services), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        if self.server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen for gRPC on {address}")
        self.address = address

    async def start(self) -> None:
        await self.server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving the Open Inference Protocol over gRPC on %s", self.address)

    async def stop(self, grace_s: float) -> None:
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING while calls finish
        await self.server.stop(grace_s)
