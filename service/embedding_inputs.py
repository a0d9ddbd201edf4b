"""One decoder for the three OpenAI-style image-embedding conventions (see EmbeddingsRequest):

* NV-CLIP / NeMo Retriever: ``{"input": ["a cat", "data:image/jpeg;base64,..."]}`` - each item's
  modality is inferred: a ``data:image/`` URI is an image, anything else a text;
* Infinity: ``{"input": [...], "modality": "image"}`` - the field says what every item is (images as
  base64 or data: URIs);
* vLLM: ``{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url":
  "data:..."}}, {"type": "text", "text": "a cat"}]}]}`` - each part is one input, in order (vLLM
  serves CLIP one part per request; several parts here give several embeddings).

Every convention becomes the same list of :class:`Item` s; images then walk the classify path
(URLs refused there), texts the text side. Nothing here fetches anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from service.errors import InvalidInput
from service.schemas import EmbeddingsRequest, ImagePart

Kind = Literal["image", "text"]
_IMAGE_URI = "data:image/"


@dataclass(frozen=True)
class Item:
    kind: Kind
    value: str  # a text, or an image as base64 / data: URI


def decode_inputs(body: EmbeddingsRequest) -> list[Item]:
    """The request's inputs in order, each with its modality; InvalidInput (422) when none or both given."""
    if (body.input is None) == (body.messages is None):
        raise InvalidInput("send exactly one of 'input' (OpenAI / NV-CLIP / Infinity) and 'messages' (vLLM)")
    if body.messages is not None:
        if body.modality is not None:
            raise InvalidInput("modality applies to 'input'; 'messages' parts say their own type")
        return _from_messages(body)
    assert body.input is not None
    inputs = [body.input] if isinstance(body.input, str) else list(body.input)
    if body.modality is not None:
        return [Item(body.modality, value) for value in inputs]
    return [Item("image" if _is_image_uri(v) else "text", v) for v in inputs]


def _is_image_uri(value: str) -> bool:
    return value[: len(_IMAGE_URI)].lower() == _IMAGE_URI


def _from_messages(body: EmbeddingsRequest) -> list[Item]:
    items: list[Item] = []
    for m, message in enumerate(body.messages or []):
        if isinstance(message.content, str):
            items.append(Item("text", message.content))
            continue
        for p, part in enumerate(message.content):
            if isinstance(part, ImagePart):
                if not _is_image_uri(part.image_url.url):
                    raise InvalidInput(
                        f"messages[{m}].content[{p}].image_url.url: send the image as a data:image/...;base64, URI "
                        "(URLs are not fetched by this server)"
                    )
                items.append(Item("image", part.image_url.url))
            else:
                items.append(Item("text", part.text))
    return items
