"""``POST /v1/embeddings``: the OpenAI / Infinity embeddings shape over the bundle's two towers.

Images go through the very path classify uses (admission, decode pool, engine), so an image's
embedding is exactly the vector classify searches the label sets with; texts go through the
bundle's text side on the open-vocabulary text lane, so a text's embedding is the class vector a
class of that name would get. Images arrive as base64 or data: URIs only; URLs are refused.
"""

from __future__ import annotations

import base64

import numpy as np
from fastapi import APIRouter, Request

from service.deps import ServicesDep
from service.errors import InvalidInput
from service.schemas import Embedding, EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage

router = APIRouter(prefix="/v1", tags=["embeddings"])


@router.post(
    "/embeddings",
    response_model=EmbeddingsResponse,
    summary="embed images or texts (OpenAI / Infinity shape; modality 'image' or 'text')",
    responses={
        409: {"description": "texts on a bundle without a text side"},
        413: {"description": "body, image bytes or pixels over the limit"},
        422: {"description": "undecodable image, URL instead of image, invalid text, wrong dimensions"},
        429: {"description": "at capacity (refused before any decoding); see Retry-After"},
        504: {"description": "not finished within the request deadline"},
    },
)
async def create_embeddings(body: EmbeddingsRequest, request: Request, services: ServicesDep) -> EmbeddingsResponse:
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    dim = services.bundle.manifest.embed_dim
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidInput(f"dimensions: this model's embeddings have {dim} dimensions; omit it or send {dim}")
    if not inputs:
        raise InvalidInput("input: send at least one text or image")
    if body.modality == "image":
        vectors, used = await services.classifier.embed_image_inputs(inputs, request.is_disconnected), len(inputs)
    else:
        vectors, used = await services.classifier.embed_texts(inputs, request.is_disconnected)
    data = [Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)]
    model = services.settings.bundle.name if services.settings.bundle is not None else "default"
    return EmbeddingsResponse(data=data, model=model, usage=EmbeddingsUsage(prompt_tokens=used, total_tokens=used))


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":  # what the openai client asks for by default and decodes itself
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]
