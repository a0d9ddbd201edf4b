"""Open Inference Protocol (KServe v2) core, shared by the REST router (service/routes/v2.py) and the
gRPC servicer (service/grpc_server.py): the models, their metadata, tensor checks and one ``infer``.

Models: every label set is a model of the same name (so ``default`` always exists) that answers
through the classification extension; ``image-encoder`` is the bare image encoder (a label set of
that name is reachable through /v1 only). Both take one input, ``IMAGE``: a ``BYTES`` tensor of
shape ``[B]`` (or ``[B, 1]``), one encoded image file (JPEG, PNG, ...) per element. Binary forms
(REST's binary-data extension, gRPC's ``raw_input_contents``) carry each element as a 4-byte
little-endian length and its bytes; JSON cannot carry raw bytes, so there an element is a base64
string or a ``data:`` URI (URLs are refused, as everywhere).

* ``<label set>``: output ``SCORES`` (FP32 ``[B, C]``, the softmax over the set's C classes that
  /v1/classify reports), returned only through the classification extension: the requested output's
  ``classification`` parameter k gives ``BYTES [B, k]`` strings ``"score:class_id:label"``, best
  first, the same scores as /v1/classify (asked for nothing, an answer has the top 5).
* ``image-encoder``: output ``EMBEDDING`` (FP32 ``[B, D]``, L2-normalised: the vectors classify searches).

Every request walks the service's own pipeline (:class:`service.classifier.Classifier`): the same
admission, caps, deadline and domain errors; a transport renders them in its protocol's form.
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.classifier import ClassifyJob, Disconnected
from service.errors import InvalidInput, ServiceError, Unauthorized, UnknownLabelSet
from service.images import EncodedImage
from service.index import Snapshot
from service.state import Services

SERVER_NAME = "promptdistill"
EXTENSIONS = ["classification", "binary_tensor_data"]
ENCODER_MODEL = "image-encoder"
IMAGE = "IMAGE"
SCORES = "SCORES"
EMBEDDING = "EMBEDDING"
DEFAULT_CLASS_COUNT = 5  # top-k of an answer that asked for no output
PLATFORM_LABEL_SET = "promptdistill_label_set"
PLATFORM_ENCODER = "promptdistill_image_encoder"
_LENGTH = struct.Struct("<I")


class UnknownModel(ServiceError):
    status, code = 404, "unknown_model"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    datatype: str
    shape: list[int]


@dataclass(frozen=True)
class ModelMeta:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMeta]
    outputs: list[TensorMeta]


@dataclass(frozen=True)
class InputTensor:
    """An input as it arrived: elements are raw bytes (binary forms) or base64 / data: URI text (JSON)."""

    name: str
    datatype: str
    shape: list[int]
    elements: list[EncodedImage | str]


@dataclass(frozen=True)
class OutputRequest:
    name: str
    class_count: int | None = None  # the classification extension's k
    binary: bool = False  # REST: answer this output in the binary-data extension


@dataclass
class OutputTensor:
    name: str
    datatype: str  # "FP32" or "BYTES"
    shape: list[int]
    fp32: np.ndarray | None = None  # float32, flat row-major
    strings: list[bytes] = field(default_factory=list)

    def raw(self) -> bytes:
        """Row-major bytes: little-endian float32, or 4-byte length + bytes per BYTES element."""
        if self.fp32 is not None:
            return np.ascontiguousarray(self.fp32, dtype="<f4").tobytes()
        return join_bytes(self.strings)


@dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    outputs: list[OutputTensor]


def split_bytes(raw: bytes, where: str) -> list[bytes]:
    """A binary BYTES tensor -> its elements (4-byte little-endian length, then that many bytes, each)."""
    out: list[bytes] = []
    pos, n = 0, len(raw)
    while pos < n:
        if pos + 4 > n:
            raise InvalidInput(f"{where}: {n - pos} trailing byte(s) where a 4-byte element length should be")
        (size,) = _LENGTH.unpack_from(raw, pos)
        pos += 4
        if pos + size > n:
            raise InvalidInput(
                f"{where}: element {len(out)} declares {size} bytes but only {n - pos} remain; "
                "each BYTES element is a 4-byte little-endian length followed by that many bytes"
            )
        out.append(raw[pos : pos + size])
        pos += size
    return out


def join_bytes(items: Sequence[bytes]) -> bytes:
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def check_key(services: Services, sent: str | None) -> None:
    """OIP routes are open like /v1/classify, unless ``oip_require_api_key`` is set and the server has a key."""
    key = services.settings.api_key
    if not services.settings.oip_require_api_key or key is None:
        return
    if sent is None or not secrets.compare_digest(sent.encode(), key.get_secret_value().encode()):
        raise Unauthorized("missing or wrong API key: send it in the X-API-Key header (gRPC: x-api-key metadata)")


def image_batch(inputs: Sequence[InputTensor], max_images: int) -> list[EncodedImage | str]:
    """The one ``IMAGE`` input, checked: BYTES, shape [B] or [B, 1], B elements, 1 <= B <= max_images."""
    if len(inputs) != 1 or inputs[0].name != IMAGE:
        names = [t.name for t in inputs]
        raise InvalidInput(f"inputs {names}: this model takes exactly one input, {IMAGE!r} (BYTES, one image each)")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input {IMAGE}: datatype {tensor.datatype!r}; it must be BYTES (encoded image files)")
    shape = tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"input {IMAGE}: shape {shape}; it must be [B] or [B, 1] with B >= 1 images")
    if len(tensor.elements) != shape[0]:
        raise InvalidInput(
            f"input {IMAGE}: shape {shape} declares {shape[0]} element(s) but the data holds {len(tensor.elements)}"
        )
    if shape[0] > max_images:
        raise InvalidInput(f"input {IMAGE}: {shape[0]} images, at most {max_images} per request")
    return list(tensor.elements)


class Models:
    """The OIP view of one running service."""

    def __init__(self, services: Services) -> None:
        self.services = services

    @property
    def live(self) -> bool:
        return True

    @property
    def ready(self) -> bool:
        return self.services.engine.running

    async def metadata(self, model: str) -> ModelMeta:
        images = [TensorMeta(IMAGE, "BYTES", [-1])]
        if model == ENCODER_MODEL:
            dim = self.services.bundle.manifest.embed_dim
            return ModelMeta(model, ["1"], PLATFORM_ENCODER, images, [TensorMeta(EMBEDDING, "FP32", [-1, dim])])
        snap = await self._snapshot(model)
        return ModelMeta(
            model, [str(snap.version)], PLATFORM_LABEL_SET, images, [TensorMeta(SCORES, "FP32", [-1, len(snap)])]
        )

    async def model_ready(self, model: str) -> bool:
        """Unknown models raise UnknownModel (404 / NOT_FOUND); a known one is ready when it can answer."""
        if model == ENCODER_MODEL:
            return self.ready
        return self.ready and len(await self._snapshot(model)) > 0

    async def _snapshot(self, model: str) -> Snapshot:
        try:
            return await asyncio.to_thread(self.services.registry.get, model)
        except UnknownLabelSet as e:
            raise UnknownModel(
                f"unknown model {model!r}: models are the label sets (GET /v1/label-sets) and {ENCODER_MODEL!r}"
            ) from e

    async def infer(
        self,
        model: str,
        inputs: Sequence[InputTensor],
        outputs: Sequence[OutputRequest],
        is_disconnected: Disconnected | None = None,
    ) -> InferResult:
        images = image_batch(inputs, self.services.settings.max_images_per_request)
        if model == ENCODER_MODEL:
            return await self._embed(images, outputs, is_disconnected)
        return await self._classify(model, images, outputs, is_disconnected)

    async def _embed(
        self, images: list[EncodedImage | str], outputs: Sequence[OutputRequest], is_disconnected: Disconnected | None
    ) -> InferResult:
        for out in outputs:
            if out.name != EMBEDDING:
                raise InvalidInput(f"output {out.name!r}: model {ENCODER_MODEL!r} has one output, {EMBEDDING!r}")
            if out.class_count is not None:
                raise InvalidInput(f"output {EMBEDDING}: the classification extension applies to label-set models")
        deadline = asyncio.get_running_loop().time() + self.services.settings.request_timeout_s
        emb = await self.services.classifier.embed_images(images, deadline, is_disconnected)  # [B, D]
        tensor = OutputTensor(EMBEDDING, "FP32", list(emb.shape), fp32=emb.astype(np.float32).reshape(-1))
        return InferResult(ENCODER_MODEL, "1", [tensor])

    async def _classify(
        self,
        model: str,
        images: list[EncodedImage | str],
        outputs: Sequence[OutputRequest],
        is_disconnected: Disconnected | None,
    ) -> InferResult:
        if len(outputs) > 1 or (outputs and outputs[0].name != SCORES):
            raise InvalidInput(f"outputs {[o.name for o in outputs]}: a label-set model has one output, {SCORES!r}")
        k = outputs[0].class_count if outputs else DEFAULT_CLASS_COUNT
        if k is None:
            raise InvalidInput(
                f"output {SCORES}: answered through the classification extension only; "
                "ask for it with the output parameter classification = k (the top k classes)"
            )
        job = ClassifyJob(images, label_set=model, top_k=k)
        try:
            answer = await self.services.classifier.classify(job, is_disconnected)
        except UnknownLabelSet as e:
            raise UnknownModel(f"unknown model {model!r}: {e.message}") from e
        rows = [[f"{p.score!r}:{p.class_id}:{p.label}".encode() for p in r.predictions] for r in answer.results]
        width = len(rows[0])
        tensor = OutputTensor(SCORES, "BYTES", [len(rows), width], strings=[s for row in rows for s in row])
        return InferResult(model, str(answer.version), [tensor])


# --- how a transport reports a domain error: OIP REST uses 400 for a request it cannot use
def rest_status(error: ServiceError) -> int:
    return 400 if error.status == 422 else error.status
